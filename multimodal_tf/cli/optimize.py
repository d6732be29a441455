"""``mmtf optimize``: pruned SavedModel, quantized TFLite and ONNX artifacts of a run."""

from __future__ import annotations

import importlib.util

# What each flag needs beyond the training stack: the `[optimize]` extra, in the
# default lock but not in the TF 2.17 compatibility lock (docs/dependencies.md).
_NEEDS = {
    "prune": ("tensorflow_model_optimization", "tensorflow-model-optimization"),
    "onnx_converter": ("tf2onnx", "tf2onnx"),
    "onnx_runtime": ("onnxruntime", "onnxruntime"),
}


def missing_packages(args) -> list[str]:
    """The pip names of the packages ``args`` needs that are not installed."""
    wanted = []
    if args.prune or args.qat:
        wanted.append(_NEEDS["prune"])
    if args.onnx:
        wanted += [_NEEDS["onnx_converter"], _NEEDS["onnx_runtime"]]
    return [pip for module, pip in wanted if importlib.util.find_spec(module) is None]


def cmd_optimize(args) -> int:
    missing = missing_packages(args)
    if missing:
        # One line naming what to install, instead of a ModuleNotFoundError deep in a step.
        raise SystemExit(
            f"mmtf optimize: {', '.join(missing)} not installed; "
            "install the [optimize] extra (pip install 'multimodal-tf[optimize]')"
        )
    from multimodal_tf.optimize.run import OptimizeOptions, optimize_run  # noqa: PLC0415

    options = OptimizeOptions(
        prune=args.prune,
        prune_epochs=args.prune_epochs,
        quantize=tuple(args.quantize or ()),
        tflite=args.tflite,
        onnx=args.onnx,
        qat=args.qat,
    )
    for path in optimize_run(args.run_dir, options):
        print(f"wrote {path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize", help="pruned SavedModel, TFLite (float/dynamic/int8) and ONNX under RUN/optimized/"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--prune",
        type=float,
        metavar="SPARSITY",
        help="magnitude-prune to this fraction of zero weights (e.g. 0.8), fine-tuning on the train split",
    )
    p.add_argument("--prune-epochs", type=int, default=2, help="fine-tune epochs while pruning (default 2)")
    p.add_argument(
        "--quantize",
        nargs="+",
        choices=("dynamic", "int8"),
        help="post-training quantized TFLite of the feature-level model (int8: calibrated on the train split)",
    )
    p.add_argument(
        "--qat",
        type=int,
        metavar="EPOCHS",
        help="with --quantize int8: also a quantization-aware fine-tuned int8 TFLite (tfmot, on the "
        "layers it supports), after EPOCHS epochs on the train split",
    )
    p.add_argument("--tflite", action="store_true", help="the float TFLite model too")
    p.add_argument("--onnx", action="store_true", help="ONNX of the feature-level model (tf2onnx)")
    p.set_defaults(func=cmd_optimize)
