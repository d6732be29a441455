"""Real-data results table (``make results``): every fusion x dataset + unimodal rows.

Trains each configuration through the same path as ``mmtf train`` (on 2 CPU
cores each run takes a few minutes), evaluates on the test split and writes
``runs/results/results.json`` and ``runs/results/results.md``. Runs already
recorded in results.json are skipped, so an interrupted table resumes.

    python pipelines/results.py [--only avmnist] [--fusions concat,gated]

Besides one row per fusion and modality, VARIANTS adds fused rows whose
config layers an overlay YAML on the dataset's (the emoji3 deep ensemble).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf.registry import FUSIONS

DATASETS = {
    "avmnist": ("pipelines/avmnist.yaml", ("image", "audio")),
    "emoji3": ("pipelines/emoji3.yaml", ("image", "text", "audio")),
}
# Extra fused rows: (dataset, table label, overlay YAML layered on the dataset's).
VARIANTS = {
    "emoji3-ensemble7": ("emoji3", "late ×7 ensemble", "pipelines/emoji3_ensemble.yaml"),
}
OUT = Path("runs/results")


def plan_row(dataset: str, fusion: str | None, modalities: tuple[str, ...], variant: str | None = None):
    """(row name, YAML paths, resolved config, overrides) of one table row."""
    yaml_paths = [DATASETS[dataset][0]] + ([VARIANTS[variant][2]] if variant else [])
    name = variant or f"{dataset}-{fusion or 'single'}-{'+'.join(modalities)}"
    overrides = [
        f"train.output_dir={OUT / name}",
        f"model.modalities=[{','.join(modalities)}]",
        "train.verbose=2",
    ]
    if fusion:
        overrides.append(f"model.fusion.name={fusion}")
    return name, yaml_paths, config_lib.load(yaml_paths, overrides), overrides


def row_fingerprint(yaml_paths: list[str], overrides: list[str]) -> str:
    """A row is re-run when its YAML or overrides change (new config fields with defaults do not)."""
    yaml = "".join(Path(p).read_text() for p in yaml_paths)
    return config_lib.fingerprint({"yaml": yaml, "overrides": overrides})


def run_one(
    dataset: str, fusion: str | None, modalities: tuple[str, ...], variant: str | None = None
) -> dict:
    from multimodal_tf.evaluation import evaluate
    from multimodal_tf.training import train

    name, yaml_paths, config, overrides = plan_row(dataset, fusion, modalities, variant)
    start = time.perf_counter()
    run_dir = train(config, progress=False)
    seconds = time.perf_counter() - start
    report = evaluate(run_dir, ablation=False)
    return {
        "name": name,
        "dataset": dataset,
        "fusion": VARIANTS[variant][1] if variant else fusion or "-",
        "modalities": list(modalities),
        "test_accuracy": report["metrics"]["accuracy"],
        "macro_f1": report["metrics"]["macro_f1"],
        "train_seconds": round(seconds, 1),
        "fingerprint": row_fingerprint(yaml_paths, overrides),
        "command": "mmtf train "
        + " ".join(f"--config {p}" for p in yaml_paths)
        + " "
        + " ".join(f"--set {o}" for o in overrides[:2] + overrides[3:]),
    }


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | fusion | modalities | test accuracy | macro-F1 | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["fusion"] == "-", -r["test_accuracy"])):
        lines.append(
            f"| {r['dataset']} | {r['fusion']} | {'+'.join(r['modalities'])} | {r['test_accuracy']:.4f} "
            f"| {r['macro_f1']:.4f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(DATASETS))
    parser.add_argument("--fusions", help="comma-separated subset (default: all registered)")
    parser.add_argument("--no-unimodal", action="store_true")
    args = parser.parse_args()
    import multimodal_tf.fusion  # noqa: F401  (registers the fusions)

    fusions = args.fusions.split(",") if args.fusions else FUSIONS.keys()
    OUT.mkdir(parents=True, exist_ok=True)
    results_file = OUT / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {r["name"]: r.get("fingerprint") for r in rows}
    for dataset, (_, modalities) in DATASETS.items():
        if args.only and dataset != args.only:
            continue
        plan = [(None, (m,), None) for m in modalities] if not args.no_unimodal else []
        plan = (
            [(f, modalities, None) for f in fusions[:1]] + plan + [(f, modalities, None) for f in fusions[1:]]
        )
        if not args.fusions:
            plan += [(None, modalities, v) for v, (d, _, _) in VARIANTS.items() if d == dataset]
        for fusion, mods, variant in plan:
            name, yaml_paths, _, overrides = plan_row(dataset, fusion, mods, variant)
            if done.get(name) == row_fingerprint(yaml_paths, overrides):
                continue
            rows = [r for r in rows if r["name"] != name] + [run_one(dataset, fusion, mods, variant)]
            results_file.write_text(json.dumps(rows, indent=1))
            (OUT / "results.md").write_text(to_markdown(rows))
            print(to_markdown(rows), flush=True)


if __name__ == "__main__":
    main()
