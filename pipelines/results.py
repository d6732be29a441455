"""Real-data results table (``make results``): every fusion x dataset + unimodal rows.

Trains each configuration through the same path as ``mmtf train`` (on 2 CPU
cores each run takes a few minutes), evaluates on the test split and writes
``runs/results/results.json`` and ``runs/results/results.md``. Runs already
recorded in results.json are skipped, so an interrupted table resumes.

    python pipelines/results.py [--only avmnist] [--fusions concat,gated]
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
OUT = Path("runs/results")


def plan_row(dataset: str, fusion: str | None, modalities: tuple[str, ...]):
    """(row name, resolved config, overrides) of one table row."""
    yaml_path, _ = DATASETS[dataset]
    name = f"{dataset}-{fusion or 'single'}-{'+'.join(modalities)}"
    overrides = [
        f"train.output_dir={OUT / name}",
        f"model.modalities=[{','.join(modalities)}]",
        "train.verbose=2",
    ]
    if fusion:
        overrides.append(f"model.fusion.name={fusion}")
    return name, config_lib.load([yaml_path], overrides), overrides


def row_fingerprint(yaml_path: str, overrides: list[str]) -> str:
    """A row is re-run when its YAML or overrides change (new config fields with defaults do not)."""
    return config_lib.fingerprint({"yaml": Path(yaml_path).read_text(), "overrides": overrides})


def run_one(dataset: str, fusion: str | None, modalities: tuple[str, ...]) -> dict:
    from multimodal_tf.evaluation import evaluate
    from multimodal_tf.training import train

    yaml_path, _ = DATASETS[dataset]
    name, config, overrides = plan_row(dataset, fusion, modalities)
    start = time.perf_counter()
    run_dir = train(config, progress=False)
    seconds = time.perf_counter() - start
    report = evaluate(run_dir, ablation=False)
    return {
        "name": name,
        "dataset": dataset,
        "fusion": fusion or "-",
        "modalities": list(modalities),
        "test_accuracy": report["metrics"]["accuracy"],
        "macro_f1": report["metrics"]["macro_f1"],
        "train_seconds": round(seconds, 1),
        "fingerprint": row_fingerprint(yaml_path, overrides),
        "command": f"mmtf train --config {yaml_path} "
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
        plan = [(None, (m,)) for m in modalities] if not args.no_unimodal else []
        plan = [(f, modalities) for f in fusions[:1]] + plan + [(f, modalities) for f in fusions[1:]]
        for fusion, mods in plan:
            name, _, overrides = plan_row(dataset, fusion, mods)
            if done.get(name) == row_fingerprint(DATASETS[dataset][0], overrides):
                continue
            rows = [r for r in rows if r["name"] != name] + [run_one(dataset, fusion, mods)]
            results_file.write_text(json.dumps(rows, indent=1))
            (OUT / "results.md").write_text(to_markdown(rows))
            print(to_markdown(rows), flush=True)


if __name__ == "__main__":
    main()
