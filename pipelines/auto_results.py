"""No-config results: ``mmtf train --manifest`` on each real set and the synthetic demo set.

Runs the automatic run (config inferred, candidates chosen on validation,
within a time budget) exactly as the command does, one process per set, and
writes ``runs/auto_results/auto_results.json`` and a Markdown table, which
``--write-docs`` puts into docs/results.md under "No-config runs". Sets
already recorded are skipped, so an interrupted table resumes.

    python pipelines/auto_results.py [--only emoji3] [--time-budget 10m] [--write-docs]

The logistic-regression baselines are those of ../shared/data/README.md
(a floor, not a target).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path("../shared/data")
OUT = Path("runs/auto_results")
DOCS = Path("docs/results.md")
HEADING = "## No-config runs (`mmtf train --manifest`)"
# Test accuracy of logistic regression, mean of the modalities' probabilities
# (../shared/data/README.md); the synthetic set has none.
BASELINES = {"avmnist": 0.96, "emoji3": 0.67}


def manifests() -> dict[str, Path]:
    sets = {name: SHARED / name / "manifest.csv" for name in ("avmnist", "emoji3")}
    sets["synthetic"] = OUT / "synth" / "manifest.csv"
    return sets


def run_one(name: str, manifest: Path, budget: str) -> dict:
    """Runs the command in a fresh process (as a user would) and reads its run directory."""
    if name == "synthetic" and not manifest.exists():
        subprocess.run(
            [sys.executable, "-m", "multimodal_tf.cli", "data", "synth", str(manifest.parent)], check=True
        )
    run_dir = OUT / name
    started = time.monotonic()
    command = [sys.executable, "-m", "multimodal_tf.cli", "train", "--manifest", str(manifest)]
    subprocess.run(command + ["--output-dir", str(run_dir), "--time-budget", budget], check=True)
    seconds = time.monotonic() - started
    report = json.loads((run_dir / "candidates.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "set": name,
        "kept": report["kept"],
        "val_accuracy": metrics["val"]["accuracy"],
        "test_accuracy": metrics.get("test", {}).get("accuracy"),
        "seconds": seconds,
        "budget": budget,
        "baseline": BASELINES.get(name),
        "candidates": {c["name"]: c["val_accuracy"] for c in report["candidates"]},
    }


def table(rows: list[dict]) -> str:
    lines = [
        HEADING,
        "",
        "`python pipelines/auto_results.py`: the config inferred from the manifest, candidates",
        "chosen on validation, on 2 CPU cores. LR baseline: ../shared/data/README.md.",
        "",
        "| set | kept | test accuracy | LR baseline | wall time (budget) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        test = "–" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}"
        baseline = "–" if row["baseline"] is None else f"{row['baseline']:.2f}"
        lines.append(
            f"| {row['set']} | {row['kept']} | {test} | {baseline} | {row['seconds']:.0f} s ({row['budget']}) |"
        )
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    """Replaces (or appends) the section in docs/results.md."""
    current = DOCS.read_text()
    if HEADING in current:
        start = current.index(HEADING)
        end = current.find("\n## ", start + len(HEADING))
        current = current[:start] + text + (current[end + 1 :] if end >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    DOCS.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated sets (avmnist, emoji3, synthetic)")
    parser.add_argument("--time-budget", default="10m")
    parser.add_argument("--write-docs", action="store_true", help=f"put the table into {DOCS}")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    record = OUT / "auto_results.json"
    rows = json.loads(record.read_text()) if record.exists() else []
    wanted = args.only.split(",") if args.only else list(manifests())
    for name, manifest in manifests().items():
        if name in wanted and name not in {row["set"] for row in rows}:
            rows.append(run_one(name, manifest, args.time_budget))
            record.write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (OUT / "auto_results.md").write_text(text)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
