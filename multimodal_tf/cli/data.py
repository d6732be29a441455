"""``mmtf data validate | convert | synth``."""

from __future__ import annotations

import sys

from multimodal_tf.cli.common import add_config_args, add_runner_args, load_config


def cmd_validate(args) -> int:
    from multimodal_tf.data.validate import validate  # noqa: PLC0415

    report = validate(args.manifest, load_config(args).data)
    print(report.to_text())
    if report.problems and args.on_error == "fail":
        print(f"FAILED: {len(report.bad_ids)} bad records (use --on-error skip to accept)", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args) -> int:
    config = load_config(args)
    if args.runner == "beam":
        from multimodal_tf.data.beam_convert import convert_with_beam  # noqa: PLC0415

        metadata = convert_with_beam(
            args.manifest,
            args.out_dir,
            config.data,
            on_error=args.on_error,
            beam_options=args.beam_option,
            force=args.force,
        )
    else:
        from multimodal_tf.data.convert import convert  # noqa: PLC0415

        metadata = convert(args.manifest, args.out_dir, config.data, on_error=args.on_error, force=args.force)
    for split, names in metadata.shards.items():
        print(f"{split}: {metadata.counts[split]['examples']} examples in {len(names)} shards")
    if metadata.counts.get("skipped"):
        print(
            f"skipped {len(metadata.counts['skipped'])} bad records: {', '.join(metadata.counts['skipped'])}"
        )
    print(
        f"wrote {args.out_dir} ({len(metadata.label_names)} classes, vocabulary {len(metadata.vocabulary)})"
    )
    return 0


def cmd_synth(args) -> int:
    from multimodal_tf.data.synthetic import synthesize  # noqa: PLC0415

    manifest = synthesize(args.out_dir, num_examples=args.num_examples, seed=args.seed, task=args.task)
    print(f"wrote {manifest}")
    return 0


def add_parser(subparsers) -> None:
    """Adds ``mmtf data`` and its three subcommands."""
    data = subparsers.add_parser("data", help="validate, convert or synthesize datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("validate", help="check every record of a manifest")
    p.add_argument("manifest")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    add_config_args(p)
    p.set_defaults(func=cmd_validate)
    p = data_sub.add_parser("convert", help="manifest -> sharded TFRecords + metadata")
    p.add_argument("manifest")
    p.add_argument("out_dir")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--force", action="store_true", help="convert even if up to date")
    add_runner_args(p, "local: one process; beam: an Apache Beam pipeline (pip install multimodal-tf[beam])")
    add_config_args(p)
    p.set_defaults(func=cmd_convert)
    p = data_sub.add_parser("synth", help="generate the demo dataset")
    p.add_argument("out_dir")
    p.add_argument("--num-examples", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=["multiclass", "binary"], default="multiclass")
    p.set_defaults(func=cmd_synth)
