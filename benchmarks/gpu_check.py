"""GPU check: one script for a lent accelerator machine (under 8 minutes), runnable on a CPU too.

Steps, each timed and written to ``--out`` (JSON):

1. ``--install``: a venv from ``requirements/lock.txt`` (plus
   ``tensorflow[and-cuda]`` at the locked version when ``nvidia-smi``
   exists: the lock's plain ``tensorflow`` brings no CUDA libraries), then
   the script re-runs itself in it. Without network (the lent machines
   have none) it says so and carries on in the current environment.
2. Trains a real config three ways through ``mmtf train``'s code path
   (``training.train``): float32, ``train.mixed_precision=mixed_float16``
   and ``train.jit_compile=true`` (XLA). avmnist when the shared data is
   found (``--data-root``, ``$MMTF_SHARED_DATA``, ``../shared/data``,
   ``shared/data``), else the synthetic demo set (``mmtf demo``'s).
3. Examples/s (mean of the epochs after the first) and MFU: training FLOPs
   per example (multimodal_tf.profiling: TF profiler on the frozen forward
   graph, 3x for training) x examples/s, over (a) the datasheet dense
   peak of the GPU (:data:`PEAKS`, TF32 for float32 where TF enables it,
   FP16 tensor cores for mixed_float16) and (b) a matmul peak measured in
   this run (float32 and float16), so the number means something on a
   GPU missing from the table and on a CPU.
4. Same accuracy within noise: each variant's test accuracy against
   float32's, within 3 standard errors of a difference of two binomial
   proportions on the test split (sampling noise only; seeds add more).
5. Exports the float32 run (``export.export_run``) and times the
   ``predict_features`` signature at batch 1 (p50) and 32 (examples/s).
6. TF-TRT (FP16) of that SavedModel where TensorRT is importable and a GPU
   is there, with the same timings side by side. TF 2.18+ wheels are
   built without TensorRT, so on the default lock this step reports why
   it was skipped; the TF 2.17 lock has it.

Everything that needs a GPU is skipped on a CPU, and each skip is printed
and listed under ``skipped`` in the JSON. ``--quick``: tiny models on a
small synthetic set, image + text only, 1 epoch (the CI test on CPU).

    python benchmarks/gpu_check.py --out gpu_check.json [--install] [--quick] [--epochs 10]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) datasheet peaks, TFLOP/s: FP32 on CUDA cores, TF32 and
# FP16/BF16 on tensor cores. H100/H200: SXM figures (H100 PCIe is ~25% lower).
# Matched by substring of the device name TF reports, first match wins.
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.1},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0},
    "T4": {"fp32": 8.1, "tf32": 8.1, "fp16": 65.0},
}
VARIANTS = {
    "float32": [],
    "mixed_float16": ["train.mixed_precision=mixed_float16"],
    "xla": ["train.jit_compile=true"],
}
QUICK_EXAMPLES = 160
DEMO_EXAMPLES = 2400  # mmtf demo's synthetic set


def log(text: str) -> None:
    print(text, flush=True)


# === Install ===


def network_up(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def install(venv: Path) -> tuple[bool, str]:
    """Creates ``venv`` from the lock (Makefile's recipe); returns (installed, what happened)."""
    if not network_up():
        return False, f"no network (pypi.org unreachable): using the current environment {sys.executable}"
    lock = ROOT / "requirements" / "lock.txt"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([*pip, "--upgrade", "pip>=25.3"], check=True)
    constraint = ["--build-constraint", str(ROOT / "requirements" / "build-constraints.txt")]
    subprocess.run([*pip, *constraint, "-r", str(lock)], check=True)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True)
    done = f"installed {lock.name} into {venv}"
    if shutil.which("nvidia-smi"):  # the CUDA libraries, as pip wheels, for the locked TF
        pinned = next(line for line in lock.read_text().splitlines() if line.startswith("tensorflow=="))
        subprocess.run([*pip, pinned.replace("tensorflow==", "tensorflow[and-cuda]==")], check=True)
        done += " + tensorflow[and-cuda]"
    return True, done


# === Device ===


def device_info(tf) -> dict:
    gpus = tf.config.list_physical_devices("GPU")
    info = {"gpu": bool(gpus), "tensorflow": tf.__version__, "python": platform.python_version()}
    build = tf.sysconfig.get_build_info()
    info["cuda_build"] = bool(build.get("is_cuda_build"))
    info["tensorrt_build"] = bool(build.get("is_tensorrt_build"))
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        info["name"] = details.get("device_name", "unknown GPU")
        info["compute_capability"] = details.get("compute_capability")
        info["tf32"] = tf.config.experimental.tensor_float_32_execution_enabled()
    else:
        info["name"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def datasheet_peaks(device: dict) -> dict | None:
    """TFLOP/s for float32 (TF32 where TF uses it) and float16 training, or None off the table."""
    if not device["gpu"]:
        return None
    for key, peaks in PEAKS.items():
        if key in device["name"]:
            fp32 = peaks["tf32"] if device.get("tf32") else peaks["fp32"]
            return {"source": f"datasheet {key}", "float32": fp32, "mixed_float16": peaks["fp16"]}
    return None


def measured_peaks(tf, profiling, quick: bool) -> dict:
    """TFLOP/s of chained matmuls through TF, float32 and float16, on this run's device."""
    size = 512 if quick else (8192 if tf.config.list_logical_devices("GPU") else 2048)
    chain = 2 if quick else 8
    return {
        "source": f"measured: {chain} chained {size}x{size} matmuls",
        "float32": profiling.matmul_peak(size, chain) / 1e12,
        "mixed_float16": profiling.matmul_peak(size, chain, dtype=tf.float16) / 1e12,
    }


# === Data and config ===


def find_avmnist(data_root: str | None) -> Path | None:
    roots = [
        data_root,
        os.environ.get("MMTF_SHARED_DATA"),
        ROOT.parent / "shared" / "data",
        ROOT / "shared" / "data",
    ]
    for root in roots:
        if root and (Path(root) / "avmnist" / "manifest.csv").is_file():
            return Path(root) / "avmnist" / "manifest.csv"
    return None


def base_config(args, work: Path):
    """``(name, config)``: avmnist on the shared data, else the synthetic demo set; tiny with ``--quick``."""
    from multimodal_tf import config as config_lib  # noqa: PLC0415
    from multimodal_tf.data.synthetic import synthesize  # noqa: PLC0415
    from multimodal_tf.demo import DEMO_CONFIG  # noqa: PLC0415
    from multimodal_tf.testing import tiny_config  # noqa: PLC0415

    manifest = None if args.quick else find_avmnist(args.data_root)
    overrides = [f"train.epochs={args.epochs}", "train.verbose=0", "train.early_stopping_patience=0"]
    if manifest is not None:
        name, files = "avmnist", [ROOT / "pipelines" / "avmnist.yaml"]
    else:
        count = QUICK_EXAMPLES if args.quick else DEMO_EXAMPLES
        manifest = synthesize(work / "data", num_examples=count, seed=0)
        name, files = f"demo (synthetic, {count} examples)", [DEMO_CONFIG]
    overrides.append(f"data.manifest={manifest}")
    if args.quick:  # tiny sizes, two cheap branches: tracing and XLA compiles are most of a CPU run
        quick = ["model.modalities=[image,text]", "model.text_encoder.name=text/bow"]
        return f"{name}, tiny image+text", tiny_config(*quick, *overrides, base=config_lib.load(files))
    return name, config_lib.load(files, overrides)


# === Steps ===


def train_variant(config, name: str, work: Path) -> dict:
    from multimodal_tf import config as config_lib  # noqa: PLC0415
    from multimodal_tf.training import train  # noqa: PLC0415

    config = config_lib.load((), [*VARIANTS[name], f"train.output_dir={work / 'runs' / name}"], base=config)
    start = time.perf_counter()
    run_dir = train(config, progress=False)
    seconds = time.perf_counter() - start
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rates = history["examples_per_second"]
    steady = rates[1:] or rates  # the first epoch traces / compiles
    return {
        "run_dir": str(run_dir),
        "seconds": seconds,
        "epochs": len(rates),
        "examples_per_second": sum(steady) / len(steady),
        "first_epoch_examples_per_second": rates[0],
        "test_accuracy": metrics["test"]["accuracy"],
        "val_accuracy": metrics["val"]["accuracy"],
    }


def same_accuracy(results: dict, test_examples: int) -> dict:
    """Each variant's test accuracy vs float32's, within 3 binomial standard errors of a difference."""
    reference = results["float32"]["test_accuracy"]
    out = {}
    for name, row in results.items():
        p = (reference + row["test_accuracy"]) / 2
        tolerance = 3 * (2 * p * (1 - p) / max(test_examples, 1)) ** 0.5
        difference = row["test_accuracy"] - reference
        out[name] = {
            "difference": difference,
            "tolerance": tolerance,
            "within_noise": abs(difference) <= tolerance,
        }
    return out


def time_signature(function, inputs_1: dict, inputs_32: dict, calls: int) -> dict:
    """p50 ms at batch 1 and examples/s at batch 32 of a SavedModel signature (after a warm-up call)."""
    for inputs in (inputs_1, inputs_32):
        function(**inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function(**inputs_1)
        times.append(time.perf_counter() - start)
    times.sort()
    start = time.perf_counter()
    for _ in range(max(1, calls // 4)):
        function(**inputs_32)
    rate = 32 * max(1, calls // 4) / (time.perf_counter() - start)
    return {"batch1_p50_ms": 1000 * times[len(times) // 2], "batch32_examples_per_second": rate}


def feature_batches(tf, saved_model_dir: Path, config):
    from multimodal_tf.signatures import PREDICT_FEATURES_SIGNATURE  # noqa: PLC0415
    from multimodal_tf.testing import random_features  # noqa: PLC0415

    loaded = tf.saved_model.load(str(saved_model_dir))
    function = loaded.signatures[PREDICT_FEATURES_SIGNATURE]
    vocab = min(50, config.data.text.vocab_size)
    batches = [
        {k: tf.constant(v) for k, v in random_features(config, batch_size=n, vocab_size=vocab).items()}
        for n in (1, 32)
    ]
    return loaded, function, batches


def tensorrt_reason(device: dict) -> str | None:
    """Why TF-TRT cannot run here, or None when it can."""
    if not device["gpu"]:
        return "no GPU"
    if not device["tensorrt_build"]:
        return f"TensorFlow {device['tensorflow']} is built without TensorRT (TF 2.18+ wheels dropped TF-TRT)"
    try:
        from tensorflow.python.compiler.tensorrt import trt_convert  # noqa: F401, PLC0415
    except ImportError as error:
        return f"trt_convert does not import: {error}"
    # TF loads libnvinfer at run time; asking TF for its version without it
    # aborts the process (TF 2.17: "getInferLibVersion symbol not found").
    for library in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            ctypes.CDLL(library)
            return None
        except OSError:
            continue
    return "TensorRT's libnvinfer is not installed (pip install tensorrt, matching the TF build)"


def convert_tensorrt(tf, saved_model_dir: Path, out: Path, batches) -> None:
    from tensorflow.python.compiler.tensorrt import trt_convert as trt  # noqa: PLC0415

    from multimodal_tf.signatures import PREDICT_FEATURES_SIGNATURE  # noqa: PLC0415

    converter = trt.TrtGraphConverterV2(
        input_saved_model_dir=str(saved_model_dir),
        input_saved_model_signature_key=PREDICT_FEATURES_SIGNATURE,
        conversion_params=trt.TrtConversionParams(precision_mode=trt.TrtPrecisionMode.FP16),
    )
    converter.convert()
    try:  # engines for both batch sizes now, rather than at the first timed call
        converter.build(input_fn=lambda: iter([tuple(b.values()) for b in batches]))
    except Exception as error:  # noqa: BLE001  (then they are built lazily, at the warm-up call)
        log(f"  TF-TRT build() skipped ({type(error).__name__}: {error}); engines build at first call")
    converter.save(str(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check.json", help="JSON of the results")
    parser.add_argument("--install", action="store_true", help="venv from requirements/lock.txt first")
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "mmtf-gpu-venv"))
    parser.add_argument("--quick", action="store_true", help="tiny image+text model, synthetic data, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (1 with --quick)")
    parser.add_argument("--data-root", default=None, help="folder holding avmnist/manifest.csv")
    parser.add_argument("--work", default=None, help="data, runs and exports (default: a temp folder)")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per latency measurement")
    parser.add_argument("--installed", default=None, help=argparse.SUPPRESS)  # set by the re-run in the venv
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 10)
    started = time.perf_counter()
    results: dict = {"skipped": [], "steps_seconds": {}}

    def skip(what: str, why: str) -> None:
        log(f"SKIPPED {what}: {why}")
        results["skipped"].append({"step": what, "reason": why})

    if args.install:
        installed, what = install(Path(args.venv))
        log(f"install: {what}")
        if installed:  # the rest runs on the fresh stack
            rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--install"]
            python = str(Path(args.venv) / "bin" / "python")
            return subprocess.call([python, str(Path(__file__).resolve()), *rest, "--installed", what])
        results["install"] = what
    else:
        results["install"] = args.installed or "not asked (--install): current environment"

    try:
        import tensorflow  # noqa: F401, PLC0415
    except ImportError as error:  # e.g. a lent machine without TF and without network for --install
        results["error"] = f"TensorFlow does not import in {sys.executable}: {error}; nothing checked"
        log(f"ERROR {results['error']} (install the stack, or run with --install where there is network)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="mmtf-gpu-check-"))
    os.environ.setdefault("MMTF_CACHE_DIR", str(work / "cache"))
    from multimodal_tf import profiling  # noqa: PLC0415
    from multimodal_tf.compat import tf  # noqa: PLC0415
    from multimodal_tf.data import features  # noqa: PLC0415
    from multimodal_tf.run_dir import load_trained_model  # noqa: PLC0415

    device = device_info(tf)
    results["device"] = device
    log(f"device: {device['name']} ({'GPU' if device['gpu'] else 'no GPU'}), TF {device['tensorflow']}")
    if not device["gpu"]:
        skip("GPU training", "no GPU: the three variants run on the CPU (mixed_float16 is emulated there)")

    step = time.perf_counter()
    peaks = {"datasheet": datasheet_peaks(device), "measured": measured_peaks(tf, profiling, args.quick)}
    if peaks["datasheet"] is None:
        skip(
            "datasheet peak", f"{device['name']!r} is not in PEAKS (a GPU) or is a CPU: MFU vs measured only"
        )
    results["peak_tflops"] = peaks
    results["steps_seconds"]["peaks"] = time.perf_counter() - step
    log(
        f"matmul peak (measured): float32 {peaks['measured']['float32']:.3f}, "
        f"float16 {peaks['measured']['mixed_float16']:.3f} TFLOP/s"
    )

    name, config = base_config(args, work)
    results["config"] = name
    trained = {}
    for variant in VARIANTS:
        step = time.perf_counter()
        trained[variant] = train_variant(config, variant, work)
        results["steps_seconds"][f"train {variant}"] = time.perf_counter() - step

    _, metadata, model = load_trained_model(trained["float32"]["run_dir"])
    flops = profiling.forward_flops(model, features.model_feature_specs(config.data, config.model))
    results["flops_per_example"] = flops.as_dict()
    for variant, row in trained.items():
        achieved = row["examples_per_second"] * flops.train / 1e12
        row["achieved_tflops"] = achieved
        dtype = "mixed_float16" if variant == "mixed_float16" else "float32"
        for source, peak in peaks.items():
            row[f"mfu_vs_{source}"] = achieved / peak[dtype] if peak else None
    test_examples = metadata.counts.get("test", {}).get("examples", 0)
    accuracy = same_accuracy(trained, test_examples)
    results["variants"] = trained
    results["same_accuracy"] = {"test_examples": test_examples, **accuracy}

    log(f"\n{name}: {flops.forward / 1e6:.2f} MFLOP forward per example (train 3x), {args.epochs} epochs")
    header = f"{'variant':<15}{'ex/s':>10}{'GFLOP/s':>10}{'MFU sheet':>11}{'MFU meas.':>11}{'test acc':>10}{'within':>8}"
    log(header)
    for variant, row in trained.items():
        sheet, measured = row["mfu_vs_datasheet"], row["mfu_vs_measured"]
        sheet = f"{100 * sheet:.3g}%" if sheet is not None else "-"
        log(
            f"{variant:<15}{row['examples_per_second']:>10,.0f}{1000 * row['achieved_tflops']:>10.3g}"
            f"{sheet:>11}{f'{100 * measured:.3g}%':>11}"
            f"{row['test_accuracy']:>10.3f}{str(accuracy[variant]['within_noise']):>8}"
        )
    if args.epochs == 1:
        log("(1 epoch: the rates include tracing and compiling; use --epochs 2+ for steady rates)")

    from multimodal_tf.export import export_run  # noqa: PLC0415

    step = time.perf_counter()
    exported = export_run(trained["float32"]["run_dir"], work / "models", "gpu_check")
    results["export"] = {"path": str(exported), "seconds": time.perf_counter() - step}
    log(f"exported {exported}")
    loaded, function, batches = feature_batches(tf, exported, config)
    results["latency"] = {"saved_model": time_signature(function, *batches, args.calls)}
    reason = tensorrt_reason(device)
    if reason:
        skip("TF-TRT", reason)
    else:
        step = time.perf_counter()
        try:
            convert_tensorrt(tf, exported, work / "tensorrt", batches)
            _, trt_function, _ = feature_batches(tf, work / "tensorrt", config)
            results["latency"]["tensorrt_fp16"] = time_signature(trt_function, *batches, args.calls)
        except Exception as error:  # noqa: BLE001  (a failed conversion is a result, not a crash)
            results["latency"]["tensorrt_error"] = f"{type(error).__name__}: {error}"
            log(f"TF-TRT failed: {results['latency']['tensorrt_error']}")
        results["steps_seconds"]["tensorrt"] = time.perf_counter() - step
    for kind, row in results["latency"].items():
        if isinstance(row, dict):
            log(
                f"{kind}: batch-1 p50 {row['batch1_p50_ms']:.2f} ms, batch 32 {row['batch32_examples_per_second']:,.0f} ex/s"
            )

    results["total_seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    log(f"total {results['total_seconds']:.0f} s; wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
