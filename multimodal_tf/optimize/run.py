"""``mmtf optimize``: a run's pruned SavedModel, TFLite and ONNX artifacts, each with its JSON."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from multimodal_tf.optimize.artifacts import OPTIMIZED_DIR, PRUNED_NAME, artifact_name, write_description
from multimodal_tf.run_dir import load_trained_model


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """What ``mmtf optimize`` makes.

    Attributes:
        prune: target sparsity in (0, 1), or None for no pruning.
        prune_epochs: fine-tune epochs while pruning.
        quantize: TFLite quantizations to write (``dynamic``, ``int8``).
        tflite: also write the float TFLite model.
        onnx: write the ONNX model.
        qat: quantization-aware fine-tune epochs (tfmot) before an int8
            conversion, written as ``model_qat_int8.tflite``; needs
            ``quantize`` to hold ``int8``. None: no QAT.
    """

    prune: float | None = None
    prune_epochs: int = 2
    quantize: tuple[str, ...] = ()
    tflite: bool = False
    onnx: bool = False
    qat: int | None = None

    def flags(self) -> dict:
        return dataclasses.asdict(self)


def _export_pruned(model, run_dir: Path, out: Path, options: OptimizeOptions, result) -> Path:
    from multimodal_tf.export import export_run  # noqa: PLC0415

    model_dir = out / PRUNED_NAME
    if model_dir.exists():  # one pruned model per run: a new optimize replaces it
        shutil.rmtree(model_dir)
    path = export_run(run_dir, out, PRUNED_NAME, version=1, model=model)
    write_description(
        path,
        "pruned SavedModel (mmtf export layout; tfmot magnitude pruning, strip_pruning)",
        run_dir,
        options.flags(),
        target_sparsity=result.target_sparsity,
        sparsity=result.sparsity,
        pruned_weights=result.pruned_weights,
        pruned_layers=list(result.layers),
        fine_tune_steps=result.fine_tune_steps,
        fine_tune_history=result.history,
        parameters=int(model.count_params()),
    )
    return path


def _write_qat(model, config, metadata, run_dir: Path, out: Path, options: OptimizeOptions, common: dict):
    from multimodal_tf.optimize import qat, quantization  # noqa: PLC0415

    result = qat.train_qat(model, config, metadata, options.qat)
    conversion = quantization.convert_int8(
        result.model, config, lambda: quantization.representative_features(config, metadata)
    )
    path = out / artifact_name("qat_int8", common["pruned"])
    path.write_bytes(conversion.flatbuffer)
    write_description(
        path,
        "TFLite (int8) of the quantization-aware fine-tuned model on preprocessed features",
        run_dir,
        options.flags(),
        **common,
        quantization="int8",
        qat_epochs=options.qat,
        annotated_layers=list(result.annotated),
        float_layers=list(result.float_layers),
        fine_tune_history=result.history,
        int8_only=conversion.int8_only,
        note=conversion.note,
        kept_float=list(conversion.kept_float),
        representative_examples=quantization.REPRESENTATIVE_EXAMPLES,
    )
    return path


def optimize_run(run_dir: str | Path, options: OptimizeOptions) -> list[Path]:
    """Writes the artifacts ``options`` asks for under ``RUN/optimized/``; returns their paths."""
    from multimodal_tf.optimize import onnx, pruning, quantization  # noqa: PLC0415

    if options.qat is not None and "int8" not in options.quantize:
        raise ValueError("--qat EPOCHS is a quantization-aware int8 model: give it with --quantize int8")
    if not (options.prune or options.quantize or options.tflite or options.onnx):
        raise ValueError("nothing to do: give --prune, --quantize, --tflite and/or --onnx")
    for kind in options.quantize:
        if kind not in quantization.QUANTIZATIONS[1:]:
            raise ValueError(f"--quantize must be dynamic or int8, got {kind!r}")
    run_dir = Path(run_dir)
    config, metadata, model = load_trained_model(run_dir)
    out = run_dir / OPTIMIZED_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    pruned = options.prune is not None
    common = {"parameters": int(model.count_params()), "pruned": pruned}
    if pruned:
        result = pruning.prune_model(model, config, metadata, options.prune, options.prune_epochs)
        written.append(_export_pruned(model, run_dir, out, options, result))
        common["sparsity"] = result.sparsity
    kinds = (["float"] if options.tflite else []) + list(options.quantize)
    for kind in kinds:
        conversion = quantization.convert(model, config, metadata, kind)
        path = out / artifact_name(kind, pruned)
        path.write_bytes(conversion.flatbuffer)
        what = f"TFLite ({kind}) of the model on preprocessed features (predict_features)"
        details = {"quantization": kind, "int8_only": conversion.int8_only, "note": conversion.note}
        if kind == "int8":
            details["representative_examples"] = quantization.REPRESENTATIVE_EXAMPLES
            details["kept_float"] = list(conversion.kept_float)
            details["debugger_rounds"] = conversion.debugger_rounds
        write_description(path, what, run_dir, options.flags(), **common, **details)
        written.append(path)
    if options.qat is not None:
        written.append(_write_qat(model, config, metadata, run_dir, out, options, common))
    if options.onnx:
        path = out / artifact_name("onnx", pruned)
        path.write_bytes(onnx.convert(model, config))
        what = "ONNX (tf2onnx) of the model on preprocessed features (predict_features)"
        write_description(path, what, run_dir, options.flags(), opset=onnx.OPSET, **common)
        written.append(path)
    return written


__all__ = ["OptimizeOptions", "optimize_run"]
