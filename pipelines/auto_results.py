"""No-config results: ``mmtf train --manifest`` on each real set and the synthetic demo set.

Runs the automatic run (config inferred, candidates chosen on validation,
within a time budget) exactly as the command does, one process per set, and
writes ``runs/auto_results/auto_results.json`` and a Markdown table, which
``--write-docs`` puts into docs/results.md under "No-config runs". Sets
already recorded are skipped, so an interrupted table resumes.

    python pipelines/auto_results.py [--only emoji3] [--time-budget 10m] [--write-docs]

Each set also gets logistic-regression baselines (a floor, not a target;
the recipe of ../shared/data/README.md): one scikit-learn model per
modality -- pixels (32x32 RGB, standardised), log-mel statistics (mean and
standard deviation of 40 log-mel bands, 16 kHz), TF-IDF of words and
character 3-grams -- with C chosen by 3-fold cross-validation on the train
split alone, and the mean of their probabilities. Written to
``runs/auto_results/baselines.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path("../shared/data")
# Sets built by tools/ from package-registry material, kept outside the repository.
EXTRA = Path("../data-extra")
OUT = Path("runs/auto_results")
DOCS = Path("docs/results.md")
HEADING = "## No-config runs (`mmtf train --manifest`)"
MODALITIES = ("image", "text", "audio")


def manifests() -> dict[str, Path]:
    sets = {name: SHARED / name / "manifest.csv" for name in ("avmnist", "emoji3")}
    sets["synthetic"] = OUT / "synth" / "manifest.csv"
    sets["icons"] = EXTRA / "icons" / "manifest.csv"  # tools/make_icons_dataset.py
    return sets


def _pixels(path: Path):
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    image = Image.open(path).convert("RGBA")
    flat = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparency shows as white
    flat.alpha_composite(image)
    return np.asarray(flat.convert("RGB").resize((32, 32), Image.BILINEAR), np.float32).ravel() / 255.0


def _log_mel_stats(path: Path):
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from multimodal_tf.data import audio_io  # noqa: PLC0415

    values, rate = audio_io.read_audio(path)
    wave = audio_io.resample(values, rate, 16000).mean(axis=1)
    stft = tf.signal.stft(tf.constant(wave, tf.float32), 400, 160, 512, pad_end=True)
    mel = tf.signal.linear_to_mel_weight_matrix(40, 257, 16000, 20.0, 8000.0)
    log_mel = np.log(np.abs(stft.numpy()) ** 2 @ mel.numpy() + 1e-6)
    return np.concatenate([log_mel.mean(axis=0), log_mel.std(axis=0)])


def baselines(manifest: Path) -> dict:
    """Test accuracy of a logistic regression per modality and of the mean of their probabilities.

    Rows lacking a modality are left out of that modality's model; the mean
    averages the modalities each test row has.
    """
    import numpy as np  # noqa: PLC0415
    from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegressionCV  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline, make_union  # noqa: PLC0415
    from sklearn.preprocessing import FunctionTransformer, StandardScaler  # noqa: PLC0415

    with open(manifest, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("label", "").strip()]
    root = manifest.parent
    splits = {name: [r for r in rows if r["split"].strip().lower() == name] for name in ("train", "test")}
    classes = sorted({r["label"] for r in splits["train"]})
    result, probabilities = {}, {}
    for modality in MODALITIES:
        train = [r for r in splits["train"] if r.get(modality, "").strip()]
        test = [r for r in splits["test"] if r.get(modality, "").strip()]
        if len(train) < 0.01 * len(splits["train"]) or not test:
            continue
        lr = LogisticRegressionCV(Cs=[0.1, 1.0, 10.0], cv=3, max_iter=1000)
        if modality == "text":
            union = make_union(
                TfidfVectorizer(analyzer="word", sublinear_tf=True),
                TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), sublinear_tf=True),
            )
            model = make_pipeline(FunctionTransformer(lambda rs: [r["text"] for r in rs]), union, lr)
        else:
            read = _pixels if modality == "image" else _log_mel_stats
            load = FunctionTransformer(
                lambda rs, read=read, m=modality: np.stack([read(root / r[m]) for r in rs])
            )
            model = make_pipeline(load, StandardScaler(), lr)
        model.fit(train, [r["label"] for r in train])
        predicted = model.predict(test)
        result[modality] = float(np.mean([p == r["label"] for p, r in zip(predicted, test, strict=False)]))
        order = [list(model.classes_).index(c) if c in model.classes_ else None for c in classes]
        for row, p in zip(test, model.predict_proba(test), strict=False):
            full = np.array([p[i] if i is not None else 0.0 for i in order])
            probabilities.setdefault(row["id"], []).append(full)
    test = [r for r in splits["test"] if r["id"] in probabilities and r["label"] in classes]
    if len(result) > 1:
        predicted = [classes[int(np.argmax(np.mean(probabilities[r["id"]], axis=0)))] for r in test]
        result["mean"] = float(np.mean([p == r["label"] for p, r in zip(predicted, test, strict=False)]))
    return result


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
        "baseline": baseline_of(name, manifest),
        "candidates": {c["name"]: c["val_accuracy"] for c in report["candidates"]},
    }


def baseline_of(name: str, manifest: Path) -> dict:
    """The set's baselines, computed once and kept in ``baselines.json``."""
    record = OUT / "baselines.json"
    known = json.loads(record.read_text()) if record.exists() else {}
    if name not in known:
        known[name] = baselines(manifest)
        record.write_text(json.dumps(known, indent=1))
    return known[name]


def _baseline_cell(baseline: dict | float | None) -> str:
    if baseline is None or baseline == {}:
        return "–"
    if not isinstance(baseline, dict):  # rows recorded before the baselines were computed here
        return f"{baseline:.2f}"
    single = {k: v for k, v in baseline.items() if k in MODALITIES}
    best = max(single, key=single.get)
    mean = f" / {baseline['mean']:.3f}" if "mean" in baseline else ""
    return f"{single[best]:.3f} ({best}){mean}"


def table(rows: list[dict]) -> str:
    lines = [
        HEADING,
        "",
        "`python pipelines/auto_results.py`: the config inferred from the manifest, candidates",
        "chosen on validation, on 2 CPU cores. LR baseline: test accuracy of the best",
        "single-modality logistic regression / of the mean of their probabilities (module",
        "docstring; a single number: ../shared/data/README.md's mean).",
        "",
        "Val columns: the kept model against the best single-modality candidate, both on the",
        "validation split the choice was made on.",
        "",
        "| set | kept | test accuracy | LR baseline | val: kept / best single modality | wall time (budget) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        test = "–" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}"
        baseline = _baseline_cell(row["baseline"])
        single = {k: v for k, v in row["candidates"].items() if k in ("image", "text", "audio")}
        best = max(single, key=single.get) if single else None
        versus = f"{row['val_accuracy']:.3f} / " + (f"{single[best]:.3f} ({best})" if best else "–")
        lines.append(
            f"| {row['set']} | {row['kept']} | {test} | {baseline} | {versus} |"
            f" {row['seconds']:.0f} s ({row['budget']}) |"
        )
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    """Replaces (or appends) the section in docs/results.md."""
    current = DOCS.read_text()
    if HEADING in current:
        start = current.index(HEADING)
        end = current.find("\n## ", start + len(HEADING))
        current = current[:start] + text + ("\n" + current[end + 1 :] if end >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    DOCS.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated sets (avmnist, emoji3, synthetic, icons)")
    parser.add_argument("--time-budget", default="10m")
    parser.add_argument("--write-docs", action="store_true", help=f"put the table into {DOCS}")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    record = OUT / "auto_results.json"
    rows = json.loads(record.read_text()) if record.exists() else []
    wanted = args.only.split(",") if args.only else list(manifests())
    for name, manifest in manifests().items():
        if name in wanted and name not in {row["set"] for row in rows}:
            if name != "synthetic" and not manifest.exists():  # the synthetic set is generated
                print(f"skipping {name}: no {manifest} (see ../shared/data/README.md, docs/data.md)")
                continue
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
