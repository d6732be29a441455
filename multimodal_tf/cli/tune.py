"""``mmtf tune``: hyperparameter search (Keras Tuner) over a config."""

from __future__ import annotations

import os

from multimodal_tf.cli.common import add_config_args, load_config

# The same names as tuning.TUNERS (a test checks); spelled out here because
# importing tuning loads TensorFlow, and `mmtf tune --help` must not.
TUNER_CHOICES = ("random", "bayesian", "hyperband")


def cmd_tune(args) -> int:
    from multimodal_tf.budget import parse_duration  # noqa: PLC0415
    from multimodal_tf.tuning import tune  # noqa: PLC0415

    extra = [f"data.manifest={args.manifest}"] if args.manifest else []
    if args.search_space:
        args.config = [*(args.config or []), args.search_space]
    budget = parse_duration(args.time_budget) if args.time_budget else None
    result = tune(
        load_config(args, extra),
        args.tuner,
        args.max_trials,
        args.directory,
        args.export_best,
        time_budget=budget,
        started=getattr(args, "started", None),
    )
    if result.role == "worker":
        print(f"tuner worker {os.environ.get('KERASTUNER_TUNER_ID')}: done")
        return 0
    print(f"{result.num_trials} trials; best score {result.best_score}; reports in {result.project_dir}")
    print(f"best config: {result.best_config} (mmtf train --config {result.best_config})")
    if result.export_path:
        print(f"trained {result.run_dir}; exported {result.export_path}")
    return 0


def add_parser(subparsers):
    """Adds ``mmtf tune``."""
    parser = subparsers.add_parser("tune", help="hyperparameter search (Keras Tuner) over a config")
    add_config_args(parser)
    parser.add_argument(
        "--search-space", help="YAML with a search_space section (pipelines/search_space.yaml)"
    )
    parser.add_argument("--manifest", help="shortcut for --set data.manifest=...")
    parser.add_argument("--tuner", choices=TUNER_CHOICES, default="random")
    parser.add_argument(
        "--max-trials", type=int, default=10, help="random/bayesian (hyperband: from train.epochs)"
    )
    parser.add_argument("--directory", default="runs/tune", help="results; re-running resumes")
    parser.add_argument("--export-best", action="store_true", help="train the best config and export it")
    parser.add_argument(
        "--time-budget",
        help="wall-clock limit of the search, e.g. 90s, 10m, 1h: the running trial stops at its next "
        "batch, no new trial starts, the best trial is kept",
    )
    parser.set_defaults(func=cmd_tune)
    return parser
