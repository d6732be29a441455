"""Multi-label experiment on emoji3: predict the words of an emoji's name from its image and speech.

Tags are the words of each emoji's CLDR name (the manifest's ``text``
column, Unicode CLDR annotations) and of its Unicode emoji subgroup (the
``subgroup`` column, from Unicode's emoji-test.txt: ``face-smiling``,
``animal-mammal``, ...) that appear in at least MIN_COUNT training rows,
minus a few function words. Every row has at least its subgroup's words, so
none is missing unless its subgroup is rare. The derived manifest points at
the original media; the text modality is left out of the model (it is the
name).

    python pipelines/emoji3_tags.py [--out runs/emoji3_tags_data] [--set train.seed=1]

Prints the tags section of ``mmtf evaluate``'s report: mAP, micro/macro F1
and ROC-AUC against the per-label frequency baseline.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import re
from pathlib import Path

SOURCE = Path("../shared/data/emoji3/manifest.csv")
MIN_COUNT = 8
STOP_WORDS = {"a", "and", "at", "for", "in", "of", "on", "the", "to", "with"}


def words(row: dict) -> set[str]:
    """Content words of the row's CLDR name and Unicode subgroup."""
    text = f"{row['text']} {row['subgroup']}".lower()
    return {w for w in re.findall(r"[a-z]+", text) if w not in STOP_WORDS and len(w) > 1}


def derive(source: Path, out: Path, min_count: int = MIN_COUNT) -> Path:
    """Writes ``out/manifest.csv``: the source rows plus a ``tags`` column (absolute media paths)."""
    rows = list(csv.DictReader(open(source, encoding="utf-8")))
    counts = collections.Counter(w for r in rows if r["split"] == "train" for w in words(r))
    vocabulary = {w for w, n in counts.items() if n >= min_count}
    for row in rows:
        row["tags"] = "|".join(sorted(words(row) & vocabulary))
        for column in ("image", "audio"):
            if row[column]:
                row[column] = str((source.parent / row[column]).resolve())
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


def main() -> None:
    from multimodal_tf import config as config_lib  # noqa: PLC0415  (TF import after argument errors)
    from multimodal_tf.evaluation import evaluate  # noqa: PLC0415
    from multimodal_tf.training import train  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/emoji3_tags_data")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    manifest = derive(SOURCE, Path(args.out))
    config = config_lib.load(
        ["pipelines/emoji3.yaml", "pipelines/emoji3_tags.yaml"],
        [f"data.manifest={manifest}", "train.verbose=0", *args.overrides],
    )
    run = train(config, progress=False)
    report = evaluate(run, ablation=False)
    tags = report["targets"]["tags"]
    summary = {
        "run": str(run),
        "accuracy": report["metrics"]["accuracy"],
        "labels": len(tags["metrics"]["per_label"]),
        "examples": tags["metrics"]["examples"],
        "missing": tags["missing"],
        **{f"model_{k}": tags["metrics"][k] for k in ("map", "micro_f1", "macro_f1", "macro_roc_auc")},
        **{f"baseline_{k}": tags["baseline"][k] for k in ("map", "micro_f1", "macro_f1", "macro_roc_auc")},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
