"""Conversion and batch prediction at growing sizes: single process vs Beam (local).

Rows reuse a pool of synthetic media files (``--media`` of them, each row its
own id, so splits and examples differ) so that making 100k rows is cheap
while every row is still read, validated, resampled and written. Each run is
a child process; its peak RSS is the largest resident set of that process
and of the processes it started (Beam's workers), from ``wait4``.

    python benchmarks/convert.py [--rows 2000 20000 100000] [--beam-rows 2000] \
        [--beam-workers 1 2] [--predict-rows 1000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_manifest(folder: Path, rows: int, media: int) -> Path:
    """``rows`` rows cycling over ``media`` synthetic examples' files."""
    from multimodal_tf.data.synthetic import synthesize

    pool = folder / "pool"
    source = pool / "manifest.csv" if (pool / "manifest.csv").exists() else synthesize(pool, media, seed=0)
    base = list(csv.DictReader(open(source, encoding="utf-8")))
    path = folder / f"rows{rows}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(base[0]))
        writer.writeheader()
        for index in range(rows):
            row = dict(base[index % len(base)])
            row["id"] = f"row{index:06d}"
            for column in ("image", "audio"):
                row[column] = str(pool / row[column]) if row[column] else ""
            writer.writerow(row)
    return path


def run_child(argv: list[str]) -> dict:
    """Runs this script in a child process; returns its JSON result plus seconds and peak RSS."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv} failed with status {status}")
    result = json.loads(output.decode().strip().splitlines()[-1])
    return result | {"wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def child_convert(runner: str, manifest: str, out: str, workers: int) -> dict:
    from multimodal_tf.config import DataConfig

    start = time.perf_counter()
    if runner == "local":
        from multimodal_tf.data.convert import convert

        metadata = convert(manifest, out, DataConfig(), on_error="skip", progress=False)
    else:
        from multimodal_tf.data.beam_convert import convert_with_beam, local_options

        options = local_options(workers) if workers > 1 else ["--runner=FnApiRunner"]
        metadata = convert_with_beam(manifest, out, DataConfig(), on_error="skip", beam_options=options)
    examples = sum(metadata.counts[s]["examples"] for s in metadata.shards)
    return {"examples": examples, "convert_s": time.perf_counter() - start}


def child_predict(runner: str, manifest: str, model: str, workers: int) -> dict:
    from multimodal_tf import cli

    argv = [
        "predict",
        "--saved-model",
        model,
        "--manifest",
        manifest,
        "--output",
        manifest + f".{runner}.csv",
    ]
    argv += ["--batch-size", "64", "--runner", "local" if runner == "local" else "beam"]
    if runner == "beam":
        options = ["--runner=FnApiRunner"] + (
            [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
            if workers > 1
            else []
        )
        argv += [f"--beam-option={option}" for option in options]
    start = time.perf_counter()
    cli.main(argv)
    return {"predict_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="*", default=[2000, 20000, 100000])
    parser.add_argument("--beam-rows", type=int, nargs="*", default=[2000])
    parser.add_argument("--beam-workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--predict-rows", type=int, default=1000)
    parser.add_argument("--media", type=int, default=400)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, runner, manifest, target, workers = args.child
        work = child_convert if kind == "convert" else child_predict
        print(json.dumps(work(runner, manifest, target, int(workers))))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    print(
        "| runner | rows | examples | seconds | rows/s | peak RSS (MB) |\n| --- | --- | --- | --- | --- | --- |"
    )
    plan = [("local", n, 1) for n in args.rows]
    plan += [("beam", n, w) for n in args.beam_rows for w in args.beam_workers]
    for runner, rows, workers in plan:
        manifest = make_manifest(folder, rows, args.media)
        out = folder / f"out-{runner}-{rows}-{workers}"
        result = run_child(["--child", "convert", runner, str(manifest), str(out), str(workers)])
        label = runner if runner == "local" else f"beam, {workers} worker{'s' * (workers > 1)}"
        print(
            f"| {label} | {rows} | {result['examples']} | {result['convert_s']:.1f} | "
            f"{rows / result['convert_s']:.0f} | {result['peak_rss_mb']:.0f} |",
            flush=True,
        )
    if args.predict_rows:
        import serving_helpers

        model = serving_helpers.make_test_savedmodel(folder / "models", "m", 1).parent
        manifest = make_manifest(folder, args.predict_rows, args.media)
        print("\n| prediction | rows | seconds | rows/s | peak RSS (MB) |\n| --- | --- | --- | --- | --- |")
        for runner, workers in [("local", 1)] + [("beam", w) for w in args.beam_workers]:
            result = run_child(["--child", "predict", runner, str(manifest), str(model), str(workers)])
            label = runner if runner == "local" else f"beam, {workers} worker{'s' * (workers > 1)}"
            seconds = result["predict_s"]
            print(
                f"| {label} | {args.predict_rows} | {seconds:.1f} | {args.predict_rows / seconds:.0f} | "
                f"{result['peak_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    main()
