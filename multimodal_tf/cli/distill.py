"""``mmtf distill``: train a student config on a teacher run's softened predictions."""

from __future__ import annotations

from multimodal_tf.cli.common import add_config_args, load_config


def cmd_distill(args) -> int:
    from multimodal_tf.distillation import distill  # noqa: PLC0415

    config = load_config(args, [f"train.output_dir={args.out}"] if args.out else [])
    run_dir = distill(args.teacher_run, config)
    print(f"run directory: {run_dir}")
    return 0


def add_parser(subparsers) -> None:
    """Adds ``distill``."""
    p = subparsers.add_parser(
        "distill",
        help="train a student config on a teacher run's temperature-softened predictions (docs/training.md)",
    )
    p.add_argument("teacher_run", help="the teacher's run directory (one model or an ensemble)")
    add_config_args(p)
    p.add_argument("--out", help="the student's run directory (shortcut for --set train.output_dir=...)")
    p.set_defaults(func=cmd_distill)
