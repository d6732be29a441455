"""``mmtf demo`` / ``make demo``: the whole product on one small job.

synthetic data (or ``--manifest``) -> TFRecords -> train -> evaluate ->
export -> embedded server -> queries over gRPC and REST -> stop.
"""

from __future__ import annotations

import time
from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf.config import DataConfig

# Package data (setup.cfg), so an installed wheel has it too.
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
MODEL_NAME = "mmtf_demo"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def demo_config(overrides=()) -> config_lib.ExperimentConfig:
    """The packaged demo config with ``overrides``; a missing file is an error, not defaults."""
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"the demo config {DEMO_CONFIG} is missing from the installed package")
    return config_lib.load([DEMO_CONFIG], list(overrides))


def held_out_records(manifest: Path, data: DataConfig, count: int):
    """The first ``count`` test-split records, read with the config's columns."""
    from multimodal_tf.data import manifest as manifest_lib  # noqa: PLC0415

    records = manifest_lib.read_manifest(manifest, data).records
    split = manifest_lib.SPLIT_ALIASES
    return [r for r in records if split.get(r.split) == manifest_lib.TEST][:count]


def query_server(export_base: Path, manifest: Path, data: DataConfig, count: int = 6) -> int:
    """Starts the embedded server, queries it over gRPC and REST, stops it."""
    from multimodal_tf.serving.demo import serve_and_query  # noqa: PLC0415

    return serve_and_query(export_base, MODEL_NAME, held_out_records(manifest, data, count))


def run_demo(out: str | Path, manifest: str | None = None, overrides=(), num_examples: int = 2400) -> int:
    """Runs the whole job; returns the exit status of the queries (0: every answer was right-shaped).

    Args:
        out: folder for the data, the run and the exports.
        manifest: a manifest to use instead of the synthetic set.
        overrides: ``key=value`` overrides of the packaged demo config.
        num_examples: size of the synthetic set (ignored with ``manifest``).
    """
    from multimodal_tf.data.synthetic import synthesize
    from multimodal_tf.evaluation import evaluate
    from multimodal_tf.export import export_run
    from multimodal_tf.training import train

    start = time.perf_counter()
    out = Path(out)
    if manifest is None:
        _banner("1/6 synthetic dataset")
        manifest = synthesize(out / "data", num_examples=num_examples, seed=0)
        print(f"wrote {manifest}")
    manifest = Path(manifest)
    config = demo_config([f"data.manifest={manifest}", f"train.output_dir={out / 'run'}", *overrides])
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
    status = query_server(export_base, manifest, config.data)
    _banner(f"6/6 done in {time.perf_counter() - start:.0f} s")
    return status
