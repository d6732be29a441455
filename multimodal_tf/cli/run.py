"""``mmtf train``, ``mmtf evaluate`` and ``mmtf export``: a run directory's life."""

from __future__ import annotations

from pathlib import Path

from multimodal_tf.cli.common import add_config_args, load_config


def _budget_seconds(args) -> float | None:
    from multimodal_tf.budget import parse_duration  # noqa: PLC0415  (no TensorFlow)

    return parse_duration(args.time_budget) if args.time_budget else None


def cmd_auto_train(args) -> int:
    """``mmtf train --manifest M.csv`` without ``--config``: infer, train candidates, keep the best."""
    from multimodal_tf.auto import DEFAULT_BUDGET, auto_train  # noqa: PLC0415

    budget = _budget_seconds(args) or DEFAULT_BUDGET
    result = auto_train(
        args.manifest,
        args.output_dir or "runs/auto",
        budget,
        started=getattr(args, "started", None),
        overrides=tuple(args.set or ()),
    )
    for candidate in result.candidates:
        if candidate.val_loss is None:
            print(f"  {candidate.name:<14} {candidate.note}")
        else:
            print(
                f"  {candidate.name:<14} val loss {candidate.val_loss:.4f}, "
                f"val accuracy {candidate.val_accuracy:.4f}{'  <- kept' if candidate.name == result.kept else ''}"
            )
    print(f"kept {result.kept} in {result.seconds:.0f} s; candidates: {result.run_dir / 'candidates.md'}")
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_train(args) -> int:
    if not args.config and args.manifest:
        if args.strategy or args.tpu:
            raise ValueError("--strategy/--tpu need a --config (the automatic run trains on one device)")
        return cmd_auto_train(args)
    from multimodal_tf.budget import Deadline, keras_callbacks  # noqa: PLC0415
    from multimodal_tf.training import train  # noqa: PLC0415

    seconds = _budget_seconds(args)
    overrides = []
    if args.manifest:
        overrides.append(f"data.manifest={args.manifest}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.strategy:
        overrides.append(f"train.strategy={args.strategy}")
    if args.tpu:
        overrides.append(f"train.tpu={args.tpu}")
    config = load_config(args, overrides)
    deadline = Deadline(seconds, getattr(args, "started", None))
    callbacks = [keras_callbacks()[0](deadline)] if seconds else []
    run_dir = train(config, callbacks=callbacks)
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    if args.artifact:
        return cmd_evaluate_artifact(args)
    from multimodal_tf.evaluation import evaluate  # noqa: PLC0415
    from multimodal_tf.robustness import RobustnessOptions  # noqa: PLC0415

    robustness = None
    if args.robustness or args.degradations or args.robustness_baseline:
        robustness = RobustnessOptions(
            tuple(args.degradations or ()), args.robustness_seed, args.robustness_baseline
        )
    report = evaluate(
        args.run_dir,
        split=args.split,
        compare=tuple(args.compare or ()),
        ablation=not args.no_ablation,
        robustness=robustness,
    )
    m = report["metrics"]
    print(
        f"{args.split}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, log loss {m['log_loss']:.4f}"
    )
    for row in report.get("ablation", []):
        print(f"  {row['setting']:<16} accuracy {row['accuracy']:.4f}")
    for row in report.get("robustness", {}).get("degradations", []):
        print(
            f"  {row['name']:<20} relative robustness {row['relative_robustness']:.4f}, "
            f"effective {row['effective_robustness']:+.4f}"
        )
    for row in report.get("retrieval", []):
        print(
            f"  {row['query']}->{row['gallery']:<6} R@1 {row['recall@1']:.3f} (chance {row['chance_recall@1']:.3f}), "
            f"R@10 {row['recall@10']:.3f} (chance {row['chance_recall@10']:.3f}), mAP {row['mAP']:.3f}"
        )
    print(f"report: {Path(args.run_dir) / 'report.md'}")
    return 0


def cmd_evaluate_artifact(args) -> int:
    """``mmtf evaluate RUN --artifact FILE``: a .tflite/.onnx/SavedModel through the same preprocessing."""
    from multimodal_tf.optimize.evaluation import evaluate_artifact  # noqa: PLC0415

    report = evaluate_artifact(args.run_dir, args.artifact, args.split)
    m = report["metrics"]
    print(
        f"{args.split} ({args.artifact}): accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
        f"log loss {m['log_loss']:.4f}"
    )
    print(f"report: {report['report_dir']}/report.md")
    return 0


def cmd_export(args) -> int:
    from multimodal_tf.export import export_run  # noqa: PLC0415

    path = export_run(
        args.run_dir,
        args.base_path,
        args.model_name,
        version=args.version,
        target_serving=args.target_serving,
    )
    print(f"exported {path}")
    return 0


def add_parsers(subparsers) -> None:
    """Adds ``train``, ``evaluate`` and ``export``."""
    p = subparsers.add_parser(
        "train", help="train a model from a config, or from a manifest alone (config inferred)"
    )
    add_config_args(p)
    p.add_argument(
        "--manifest",
        help="shortcut for --set data.manifest=...; without --config: infer the config, train "
        "per-modality and fusion candidates and keep the best on validation (docs/training.md)",
    )
    p.add_argument(
        "--time-budget",
        help="wall-clock limit, e.g. 90s, 10m, 1h: training stops at the next batch and keeps the best "
        "weights so far (without --config: bounds the whole automatic run, default 10m)",
    )
    p.add_argument("--output-dir", help="shortcut for --set train.output_dir=...")
    p.add_argument("--strategy", help="default | mirrored | multi_worker | parameter_server | tpu")
    p.add_argument("--tpu", help="TPU name or 'local' (with --strategy tpu)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("evaluate", help="metrics, plots and modality ablation of a run")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--compare", nargs="*", help="other run dirs (e.g. unimodal baselines) for the table")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument(
        "--artifact",
        metavar="FILE",
        help="score this .tflite/.onnx file (or SavedModel folder) of `mmtf optimize` instead of the run's "
        "Keras model, on the same preprocessed features (docs/optimization.md)",
    )
    p.add_argument(
        "--robustness", action="store_true", help="accuracy vs degradation level per modality (MultiBench)"
    )
    p.add_argument(
        "--degradations",
        nargs="+",
        metavar="NAME",
        help="implies --robustness; e.g. image/occlusion text/typos (default: all)",
    )
    p.add_argument("--robustness-seed", type=int, default=0, help="seed of the degradations' random draws")
    p.add_argument(
        "--robustness-baseline",
        metavar="RUN",
        help="implies --robustness; reference run for effective robustness (e.g. late fusion)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("export", help="write a versioned SavedModel for TF Serving")
    p.add_argument("run_dir")
    p.add_argument("--base-path", default="models")
    p.add_argument("--model-name", default="mmtf")
    p.add_argument("--version", type=int, help="default: next integer")
    p.add_argument(
        "--target-serving",
        help="TF Serving line the graph must run on (2.17 ... 2.21; default: the installed TF's): "
        "refuses tf-text ops that line's image lacks (2.17-2.19 embed tensorflow-text 2.12.1)",
    )
    p.set_defaults(func=cmd_export)
