"""``mmtf demo`` / ``make demo``: the whole product on one small job.

synthetic data (or ``--manifest``) -> TFRecords -> train -> evaluate ->
export -> embedded server -> queries over gRPC and REST -> stop.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from multimodal_tf import config as config_lib

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
MODEL_NAME = "mmtf_demo"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _test_rows(manifest: Path, count: int) -> list[dict]:
    with open(manifest, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split", "").lower() == "test"]
    return rows[:count]


def query_server(export_base: Path, manifest: Path, count: int = 6) -> int:
    """Starts the embedded server, queries it over gRPC and REST, stops it."""
    from multimodal_tf.serving.demo import serve_and_query

    return serve_and_query(export_base, MODEL_NAME, manifest, _test_rows(manifest, count))


def run_demo(out: str | Path, manifest: str | None = None, overrides=()) -> int:
    from multimodal_tf.data.synthetic import synthesize
    from multimodal_tf.evaluation import evaluate
    from multimodal_tf.export import export_run
    from multimodal_tf.training import train

    start = time.perf_counter()
    out = Path(out)
    if manifest is None:
        _banner("1/6 synthetic dataset")
        manifest = synthesize(out / "data", num_examples=2400, seed=0)
        print(f"wrote {manifest}")
    manifest = Path(manifest)
    config = config_lib.load(
        [DEMO_CONFIG] if DEMO_CONFIG.exists() else [],
        [f"data.manifest={manifest}", f"train.output_dir={out / 'run'}", *overrides],
    )
    _banner("2/6 convert + train")
    run_dir = train(config)
    _banner("3/6 evaluate")
    report = evaluate(run_dir)
    print(f"test accuracy {report['metrics']['accuracy']:.3f}, macro-F1 {report['metrics']['macro_f1']:.3f}")
    for row in report.get("ablation", []):
        print(f"  {row['setting']:<16} accuracy {row['accuracy']:.3f}")
    print(f"report: {run_dir / 'report.md'}")
    _banner("4/6 export")
    export_base = out / "models"
    path = export_run(run_dir, export_base, MODEL_NAME)
    print(f"exported {path}")
    _banner("5/6 serve + query (gRPC and REST)")
    status = query_server(export_base, manifest)
    _banner(f"6/6 done in {time.perf_counter() - start:.0f} s")
    return status
