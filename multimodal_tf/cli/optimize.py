"""``mmtf optimize``: pruned SavedModel, quantized TFLite and ONNX artifacts of a run."""

from __future__ import annotations


def cmd_optimize(args) -> int:
    from multimodal_tf.optimize.run import OptimizeOptions, optimize_run  # noqa: PLC0415

    options = OptimizeOptions(
        prune=args.prune,
        prune_epochs=args.prune_epochs,
        quantize=tuple(args.quantize or ()),
        tflite=args.tflite,
        onnx=args.onnx,
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
    p.add_argument("--tflite", action="store_true", help="the float TFLite model too")
    p.add_argument("--onnx", action="store_true", help="ONNX of the feature-level model (tf2onnx)")
    p.set_defaults(func=cmd_optimize)
