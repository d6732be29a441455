"""``mmtf``: a thin command line over the library (parse, build, call one function)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config(args, extra_overrides=()):
    from multimodal_tf import config as config_lib

    paths = getattr(args, "config", None) or []
    return config_lib.load(paths, list(extra_overrides) + list(getattr(args, "set", None) or []))


def add_config_args(parser):
    """``--config`` (repeatable YAML layers) and ``--set`` overrides; read back by ``_config``."""
    parser.add_argument(
        "--config",
        action="append",
        help="experiment YAML (see pipelines/); repeat to layer files, later ones win",
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=3")


def cmd_validate(args) -> int:
    from multimodal_tf.data.validate import validate

    config = _config(args)
    report = validate(args.manifest, config.data)
    print(report.to_text())
    if report.problems and args.on_error == "fail":
        print(f"FAILED: {len(report.bad_ids)} bad records (use --on-error skip to accept)", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args) -> int:
    from multimodal_tf.data.convert import convert

    config = _config(args)
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
    from multimodal_tf.data.synthetic import synthesize

    manifest = synthesize(args.out_dir, num_examples=args.num_examples, seed=args.seed, task=args.task)
    print(f"wrote {manifest}")
    return 0


def cmd_train(args) -> int:
    from multimodal_tf.training import train

    overrides = []
    if args.manifest:
        overrides.append(f"data.manifest={args.manifest}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.strategy:
        overrides.append(f"train.strategy={args.strategy}")
    if args.tpu:
        overrides.append(f"train.tpu={args.tpu}")
    run_dir = train(_config(args, overrides))
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from multimodal_tf.evaluation import evaluate

    report = evaluate(
        args.run_dir, split=args.split, compare=tuple(args.compare or ()), ablation=not args.no_ablation
    )
    m = report["metrics"]
    print(
        f"{args.split}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, log loss {m['log_loss']:.4f}"
    )
    for row in report.get("ablation", []):
        print(f"  {row['setting']:<16} accuracy {row['accuracy']:.4f}")
    print(f"report: {Path(args.run_dir) / 'report.md'}")
    return 0


def cmd_export(args) -> int:
    from multimodal_tf.export import export_run

    path = export_run(args.run_dir, args.base_path, args.model_name, version=args.version)
    print(f"exported {path}")
    return 0


def cmd_demo(args) -> int:
    from multimodal_tf.demo import run_demo

    return run_demo(args.out, manifest=args.manifest, overrides=args.set or [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="validate, convert or synthesize datasets")
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
    add_config_args(p)
    p.set_defaults(func=cmd_convert)
    p = data_sub.add_parser("synth", help="generate the demo dataset")
    p.add_argument("out_dir")
    p.add_argument("--num-examples", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=["multiclass", "binary"], default="multiclass")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a model from a config")
    add_config_args(p)
    p.add_argument("--manifest", help="shortcut for --set data.manifest=...")
    p.add_argument("--output-dir", help="shortcut for --set train.output_dir=...")
    p.add_argument("--strategy", help="default | mirrored | multi_worker | parameter_server | tpu")
    p.add_argument("--tpu", help="TPU name or 'local' (with --strategy tpu)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, plots and modality ablation of a run")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--compare", nargs="*", help="other run dirs (e.g. unimodal baselines) for the table")
    p.add_argument("--no-ablation", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a versioned SavedModel for TF Serving")
    p.add_argument("run_dir")
    p.add_argument("--base-path", default="models")
    p.add_argument("--model-name", default="mmtf")
    p.add_argument("--version", type=int, help="default: next integer")
    p.set_defaults(func=cmd_export)

    try:
        from multimodal_tf.serving import cli as serving_cli
    except ImportError:  # serving extras missing: the rest of the CLI still works
        serving_cli = None
    if serving_cli is not None:
        serving_cli.add_serve_parser(sub)
        serving_cli.add_predict_parser(sub)

    _add_optional(sub, "multimodal_tf.tuning", "add_tune_parser")
    _add_optional(sub, "multimodal_tf.launch", "add_launch_parser")

    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> export -> serve -> query")
    p.add_argument("--out", default="runs/demo_job")
    p.add_argument("--manifest", help="use this manifest instead of the synthetic set")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_optional(sub, module: str, function: str) -> None:
    import importlib

    try:
        getattr(importlib.import_module(module), function)(sub)
    except ImportError:
        pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from multimodal_tf.config import ConfigError
    from multimodal_tf.data.convert import ConversionError
    from multimodal_tf.data.manifest import ManifestError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ConversionError, ManifestError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"mmtf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
