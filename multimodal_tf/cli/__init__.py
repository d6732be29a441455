"""``mmtf``: a thin command line over the library (parse, build, call one function).

Each subcommand's parser and glue lives in a module of this package; the
library modules hold no argparse code. TensorFlow is imported only once a
command that needs it runs, so ``mmtf --help`` is fast and prints no
TensorFlow log lines.
"""

from __future__ import annotations

import argparse
import sys
import time

from multimodal_tf import runtime
from multimodal_tf.cli import data, demo, distill, launch, optimize, retrieval, run, serving, tune
from multimodal_tf.cli.common import add_config_args, import_tensorflow, load_config, quiet_tensorflow_logs

quiet_tensorflow_logs()  # before anything imports TensorFlow

__all__ = ["add_config_args", "build_parser", "load_config", "main"]

_config = load_config  # the name tests/test_config.py uses


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data.add_parser(sub)
    run.add_parsers(sub)
    distill.add_parser(sub)
    retrieval.add_parser(sub)
    serving.add_serve_parser(sub)
    serving.add_predict_parser(sub)
    tune.add_parser(sub)
    optimize.add_parser(sub)
    launch.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv=None) -> int:
    started = time.monotonic()  # a --time-budget counts from here, TensorFlow's import included
    args = build_parser().parse_args(argv)
    args.started = started
    if getattr(args, "serves_concurrently", False):
        # Before TensorFlow loads: its oneDNN switch is read once, at import.
        runtime.protect_concurrent_inference()
    if getattr(args, "needs_tensorflow", True):
        import_tensorflow()
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # ConfigError, ManifestError, ConversionError, ServingConfigError are
        # ValueErrors: a user's input, reported in one line.
        print(f"mmtf {args.command}: error: {e}", file=sys.stderr)
        return 2
