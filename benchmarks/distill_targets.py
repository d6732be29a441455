"""How much a teacher's soft targets say beyond the label, per split (docs/results.md, "Distillation").

    python benchmarks/distill_targets.py TEACHER_RUN [--student STUDENT_RUN] [--temperature 4]

Runs the teacher (``training=False``, full examples) on train, val and test
and prints, per split: accuracy, the mean top probability, the mean
probability of the true class, and the mean entropy (nats) of the
distribution at T = 1 and at the distillation temperature
(``softmax(log p / T)``, as distillation.distillation_loss softens it). With
``--student``, the student's cached full-view train/val targets
(``teacher_targets.npz``, view 0) are checked against the teacher's
predictions (largest absolute difference), so the numbers describe what it
trained on, and each cached missing-modality view (distill.views:
consistent) gets the same statistics on the train split.
"""

from __future__ import annotations

import argparse

import numpy as np

from multimodal_tf import run_dir as run_files
from multimodal_tf.evaluation import predict_split

SPLITS = ("train", "val", "test")


def soften(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise, float64 (p clipped at 1e-7 as Keras clips)."""
    logits = np.log(np.clip(probabilities.astype(np.float64), 1e-7, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Row entropies in nats (0 log 0 = 0)."""
    p = probabilities.astype(np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def statistics(probabilities: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """The per-split numbers the script prints, for [N, K] probabilities and [N] labels."""
    soft = soften(probabilities, temperature)
    return {
        "n": len(labels),
        "accuracy": float((probabilities.argmax(-1) == labels).mean()),
        "max_probability": float(probabilities.max(-1).mean()),
        "true_class_probability": float(probabilities[np.arange(len(labels)), labels].mean()),
        "entropy_t1": float(entropy(probabilities).mean()),
        f"max_probability_t{temperature:g}": float(soft.max(-1).mean()),
        f"entropy_t{temperature:g}": float(entropy(soft).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher_run")
    parser.add_argument("--student", help="a student run whose teacher_targets.npz to check")
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args()
    config, metadata, model = run_files.load_trained_model(args.teacher_run)
    rows, predictions = [], {}
    for split in SPLITS:
        probabilities, labels, ids = predict_split(model, config, metadata, split)
        predictions[split] = (probabilities, labels, ids)
        rows.append((split, statistics(probabilities, labels, args.temperature)))
    print(f"teacher {args.teacher_run}: {len(metadata.label_names)} classes")
    print(f"(uniform entropy {np.log(len(metadata.label_names)):.3f} nats)")
    _print_table("split", rows)
    if args.student:
        _check_cache(args.student, predictions, args.temperature)


def _print_table(first: str, rows: list) -> None:
    header = list(rows[0][1])
    print(f"| {first} | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for name, row in rows:
        cells = [str(v) if isinstance(v, int) else f"{v:.3f}" for v in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _check_cache(student: str, predictions: dict, temperature: float) -> None:
    """The cache's view 0 against the teacher's predictions; each cached view's train statistics."""
    with np.load(f"{student}/{run_files.TEACHER_TARGETS_FILE}") as cache:
        probabilities = cache["probabilities"]
        if probabilities.ndim == 2:  # written before views: the full examples only
            probabilities = probabilities[:, None]
        views = cache["views"].tolist() if "views" in cache.files else [""]
        row_of = {i: n for n, i in enumerate(cache["ids"].tolist())}
    for split in ("train", "val"):
        expected, _, ids = predictions[split]
        stored = probabilities[[row_of[i] for i in ids.tolist()], 0]
        print(f"cache view 0 vs teacher, {split}: max |difference| {np.abs(stored - expected).max():.2e}")
    _, labels, ids = predictions["train"]
    rows = [row_of[i] for i in ids.tolist()]
    _print_table(
        "cached view (train)",
        [
            (f"hidden: {v or 'none'}", statistics(probabilities[rows, k], labels, temperature))
            for k, v in enumerate(views)
        ],
    )


if __name__ == "__main__":
    main()
