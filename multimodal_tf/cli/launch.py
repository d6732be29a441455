"""``mmtf launch``: run a command as a local multi-worker / parameter-server / tuning cluster."""

from __future__ import annotations

import argparse


def cmd_launch(args) -> int:
    from multimodal_tf.launch import launch  # noqa: PLC0415  (no TensorFlow)

    return launch(args.command, args.workers, args.ps, args.tuner_workers, args.log_dir, args.timeout)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``mmtf launch``."""
    parser = subparsers.add_parser(
        "launch",
        help="run a command as a local multi-worker / parameter-server / tuning cluster",
        description="Example: mmtf launch --workers 2 -- mmtf train --config pipelines/demo.yaml "
        "--strategy multi_worker",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker tasks (default 1)")
    parser.add_argument("--ps", type=int, default=0, help="parameter-server tasks (adds a chief)")
    parser.add_argument("--tuner-workers", type=int, default=0, help="Keras Tuner workers next to a chief")
    parser.add_argument("--log-dir", default="runs/launch", help="one log file per task")
    parser.add_argument("--timeout", type=float, help="stop every task after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. mmtf train ...")
    parser.set_defaults(func=cmd_launch, needs_tensorflow=False)
    return parser
