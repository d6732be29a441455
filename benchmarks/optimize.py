"""Float vs ensemble vs distilled vs pruned vs int8 TFLite vs ONNX, side by side, in one run.

    python benchmarks/optimize.py --run avmnist=runs/avmnist                 # trained runs
    python benchmarks/optimize.py --run emoji3=runs/emoji3 \
        --ensemble emoji3=runs/emoji3_ensemble --student emoji3=runs/emoji3_student

Per dataset: the run's float SavedModel (``mmtf export``), the ensemble and
the distilled student (optional run dirs, exported the same way), the run
pruned by ``mmtf optimize --prune`` (SavedModel), its int8 TFLite and its
ONNX (``mmtf optimize --quantize int8 --onnx``), and with ``--qat EPOCHS`` its
quantization-aware int8 TFLite (no row, and the reason printed, where QAT
does not apply, e.g. late fusion). Each is fed the same
preprocessed test features (the ``predict_features`` path), and the table
gives test accuracy, file size (and gzipped), parameters (nonzero ones for
the pruned model), batch-1 latency (median of single-example calls) and
batch-32 throughput. TFLite and onnxruntime run with their default threads;
SavedModels through TF's eager ``signatures`` call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _pairs(values) -> dict[str, str]:
    out = {}
    for value in values or ():
        name, _, path = value.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=RUN_DIR, got {value!r}")
        out[name] = path
    return out


def _timings(runner, features: dict, repeats: int) -> tuple[float, float]:
    """(batch-1 median latency in ms, batch-32 examples/s)."""
    one = {k: v[:1] for k, v in features.items()}
    batch = {k: v[:32] for k, v in features.items()}
    runner(one), runner(batch)  # warm up (graph build, allocation)
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(one)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(max(3, repeats // 10)):
        runner(batch)
    seconds = time.perf_counter() - start
    return 1000 * statistics.median(latencies), 32 * max(3, repeats // 10) / seconds


def _export(run: Path, base: Path, name: str) -> Path:
    from multimodal_tf.export import export_run

    return export_run(run, base, name, version=1)


def _parameters(path: Path) -> tuple[int, int]:
    """(parameters, nonzero parameters) of a SavedModel's Keras model."""
    from multimodal_tf.compat import tf

    loaded = tf.saved_model.load(str(path))
    values = [v.numpy() for v in loaded.model.trainable_variables]
    return sum(v.size for v in values), sum(int((v != 0).sum()) for v in values)


def benchmark_dataset(
    name: str, run: Path, others: dict, prune: float, repeats: int, work: Path, qat: int | None = None
) -> list[dict]:
    from multimodal_tf.data.pipeline import make_dataset
    from multimodal_tf.optimize import artifacts
    from multimodal_tf.optimize.evaluation import predict_artifact_split
    from multimodal_tf.optimize.run import OptimizeOptions, optimize_run
    from multimodal_tf.run_dir import load_run

    config, metadata = load_run(run)
    x, _ = next(iter(make_dataset(config, "test", training=False, metadata=metadata, batch_size=32)))
    features = {k: v.numpy() for k, v in x.items()}
    out = run / artifacts.OPTIMIZED_DIR
    started = time.monotonic()
    optimize_run(run, OptimizeOptions(quantize=("int8",), tflite=True, onnx=True))
    convert_seconds = time.monotonic() - started
    optimize_run(run, OptimizeOptions(prune=prune))
    qat_entry = []
    if qat:
        try:
            optimize_run(run, OptimizeOptions(quantize=("int8",), qat=qat))
            qat_entry = [
                (f"QAT int8 TFLite ({qat} epochs)", out / artifacts.artifact_name("qat_int8", False), run)
            ]
        except ValueError as e:  # e.g. late fusion: no top-level layer tfmot can annotate
            print(f"{name}: no QAT row: {e}", flush=True)
    entries = [("float SavedModel", _export(run, work / name, "float"), run)]
    for label, other in others.items():
        entries.append((label, _export(Path(other), work / name, label.replace(" ", "_")), Path(other)))
    entries += [
        (f"pruned {prune:.0%} SavedModel", out / artifacts.PRUNED_NAME / "1", run),
        ("float TFLite", out / artifacts.artifact_name("float", False), run),
        ("int8 TFLite", out / artifacts.artifact_name("int8", False), run),
        ("ONNX", out / artifacts.artifact_name("onnx", False), run),
        *qat_entry,
    ]
    float_params = _parameters(entries[0][1])
    rows = []
    for label, path, source in entries:
        runner = artifacts.load_runner(path)
        source_config, source_metadata = load_run(source)
        probabilities, labels, _ = predict_artifact_split(runner, source_config, source_metadata, "test")
        latency, throughput = _timings(runner, features, repeats)
        if path.is_dir():
            parameters, nonzero = _parameters(path)
        else:
            parameters, nonzero = float_params
        rows.append(
            {
                "dataset": name,
                "model": label,
                "accuracy": float((probabilities.argmax(-1) == labels).mean()),
                "bytes": artifacts.size_bytes(path),
                "gzip_bytes": artifacts.gzip_bytes(path),
                "parameters": parameters,
                "nonzero_parameters": nonzero,
                "latency_ms": latency,
                "examples_per_s": throughput,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    rows[0]["convert_seconds"] = convert_seconds
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | model | test accuracy | size (KB) | gzip (KB) | size vs float | parameters (nonzero) "
        "| batch-1 latency (ms) | batch-32 examples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    floats = {r["dataset"]: r for r in rows if r["model"] == "float SavedModel"}
    for r in rows:
        base = floats[r["dataset"]]
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['accuracy']:.4f} | {r['bytes'] / 1024:.0f} "
            f"| {r['gzip_bytes'] / 1024:.0f} | {r['bytes'] / base['bytes']:.0%} "
            f"| {r['parameters']:,} ({r['nonzero_parameters']:,}) | {r['latency_ms']:.2f} "
            f"| {r['examples_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, metavar="NAME=RUN_DIR", help="trained runs")
    parser.add_argument("--ensemble", nargs="*", metavar="NAME=RUN_DIR", help="an ensemble run per dataset")
    parser.add_argument(
        "--student", nargs="*", metavar="NAME=RUN_DIR", help="a distilled student per dataset"
    )
    parser.add_argument("--prune", type=float, default=0.8)
    parser.add_argument("--qat", type=int, metavar="EPOCHS", help="also a QAT int8 row (mmtf optimize --qat)")
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 calls timed per model")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    from multimodal_tf.cli.common import quiet_tensorflow_logs

    quiet_tensorflow_logs()
    ensembles, students = _pairs(args.ensemble), _pairs(args.student)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_optimize_"))
    try:
        for name, run in _pairs(args.run).items():
            others = {}
            if name in ensembles:
                others["ensemble"] = ensembles[name]
            if name in students:
                others["distilled student"] = students[name]
            rows += benchmark_dataset(name, Path(run), others, args.prune, args.repeats, work, args.qat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
