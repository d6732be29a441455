"""``mmtf evaluate``: metrics, plots, modality ablation and a Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from multimodal_tf import target_report
from multimodal_tf import targets as targets_lib
from multimodal_tf.calibration import (
    NUM_BINS,
    expected_calibration_error,
    plot_reliability_diagram,
    reliability_bins,
)
from multimodal_tf.compat import keras, tf
from multimodal_tf.data import features
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.models import OUTPUT_NAME, UNCALIBRATED_NAME, EnsembleModel
from multimodal_tf.robustness import RobustnessOptions, robustness_report
from multimodal_tf.robustness import to_markdown as robustness_markdown
from multimodal_tf.run_dir import CALIBRATION_FILE, load_trained_model


def predict_split(model, config, metadata, split: str, drop: tuple[str, ...] = ()):
    """(probabilities [N, K], labels [N], ids [N]) with modalities in ``drop`` removed."""
    primary = config.data.targets[0].name if config.data.targets else None

    def predict(x):
        output = model(x, training=False)
        if primary is not None:  # data.targets: the primary target's output
            output = output[primary]
        return output.numpy()

    return predict_split_with(predict, config, metadata, split, drop)


def predict_split_with(predict, config, metadata, split: str, drop: tuple[str, ...] = ()):
    """``predict_split`` for any ``predict(feature dict of tensors) -> probabilities`` (a model, an artifact)."""

    def remove(x, y, ids):
        x = dict(x)
        for modality in drop:
            x[modality] = tf.zeros_like(x[modality])
            x[features.presence_name(modality)] = tf.zeros_like(x[features.presence_name(modality)])
        return x, y, ids

    dataset = make_dataset(config, split, training=False, metadata=metadata, with_ids=True).map(remove)
    probabilities, labels, ids = [], [], []
    for x, y, example_ids in dataset:
        probabilities.append(predict(x))
        labels.append(y.numpy())
        ids.append(example_ids.numpy())
    probabilities = np.concatenate(probabilities)
    if probabilities.shape[-1] == 1:  # binary head: P(class 1)
        probabilities = np.concatenate([1 - probabilities, probabilities], axis=-1)
    return probabilities, np.concatenate(labels), np.concatenate(ids)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1, one-vs-rest ROC-AUC, log loss and ECE.

    ``ece``: the top-label expected calibration error over NUM_BINS
    equal-width confidence bins (Guo et al., 2017), with the bins in
    ``reliability``.
    """
    k = len(label_names)
    predictions = probabilities.argmax(-1)
    classes = list(range(k))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    clipped = np.clip(probabilities, 1e-7, 1.0)
    clipped /= clipped.sum(-1, keepdims=True)
    result = {
        "examples": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "macro_f1": float(
            skm.f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)
        ),
        "log_loss": float(skm.log_loss(labels, clipped, labels=classes)),
        "ece": expected_calibration_error(probabilities, labels),
        "reliability": reliability_bins(probabilities, labels),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=False)
        },
    }
    present = sorted(set(labels.tolist()))
    try:
        if k == 2:
            result["roc_auc"] = float(skm.roc_auc_score(labels, clipped[:, 1]))
        elif len(present) > 1:
            # One-vs-rest over the classes present in this split.
            sub = clipped[:, present] / clipped[:, present].sum(-1, keepdims=True)
            result["roc_auc"] = float(skm.roc_auc_score(labels, sub, multi_class="ovr", labels=present))
    except ValueError:
        result["roc_auc"] = None
    result["confusion_matrix"] = skm.confusion_matrix(labels, predictions, labels=classes).tolist()
    return result


def _plots(probabilities, labels, label_names, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(label_names)
    paths = {}
    matrix = skm.confusion_matrix(labels, probabilities.argmax(-1), labels=list(range(k)))
    fig, axis = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.6 * k))
    skm.ConfusionMatrixDisplay(matrix, display_labels=label_names).plot(
        ax=axis, colorbar=False, xticks_rotation=60
    )
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    paths["confusion_matrix"] = "confusion_matrix.png"
    fig, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for c, name in enumerate(label_names):
        positives = labels == c
        if positives.any() and (~positives).any():
            skm.RocCurveDisplay.from_predictions(positives, probabilities[:, c], name=name, ax=roc_axis)
            skm.PrecisionRecallDisplay.from_predictions(positives, probabilities[:, c], name=name, ax=pr_axis)
    roc_axis.set_title("ROC (one vs rest)")
    pr_axis.set_title("Precision-recall (one vs rest)")
    for axis in (roc_axis, pr_axis):
        axis.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "roc_pr_curves.png", dpi=100)
    plt.close(fig)
    paths["roc_pr_curves"] = "roc_pr_curves.png"
    plot_reliability_diagram(probabilities, labels, out_dir / "reliability_diagram.png")
    paths["reliability_diagram"] = "reliability_diagram.png"
    return paths


def modality_ablation(model, config, metadata, split: str) -> list[dict]:
    """Accuracy with all modalities, each one removed, and each one alone."""
    modalities = config.model.modalities
    settings = [("all", ())]
    if len(modalities) > 1:
        settings += [(f"without {m}", (m,)) for m in modalities]
        settings += [(f"only {m}", tuple(o for o in modalities if o != m)) for m in modalities]
    rows = []
    for name, drop in settings:
        probabilities, labels, _ = predict_split(model, config, metadata, split, drop)
        rows.append({"setting": name, "accuracy": float((probabilities.argmax(-1) == labels).mean())})
    return rows


def ensemble_members(model: EnsembleModel, config, metadata, split: str) -> list[dict]:
    """Accuracy and log loss of each ensemble member alone: what averaging adds.

    One pass over the split: the members' outputs (the inputs of the
    averaging layer) are stacked into [B, members, K], so each example is
    decoded and preprocessed once, not once per member.
    """
    names = [layer.name for layer in model.layers]
    if config.data.targets:  # the primary target's members (predict_split reads that output)
        primary = config.data.targets[0].name
        average = model.get_layer(targets_lib.average_name(primary))
        stacked = keras.Model(model.inputs, {primary: tf.stack(average.input, axis=1)})
    else:
        average = model.get_layer(UNCALIBRATED_NAME if UNCALIBRATED_NAME in names else OUTPUT_NAME)
        stacked = keras.Model(model.inputs, tf.stack(average.input, axis=1))
    probabilities, labels, _ = predict_split(stacked, config, metadata, split)
    rows = []
    for k, member in enumerate(model.members):
        metrics = classification_metrics(probabilities[:, k], labels, metadata.label_names)
        rows.append({"member": member.name, "accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"]})
    return rows


def _comparison_row(run_dir, config, metrics: dict) -> dict:
    """One row of the report's "fused vs other runs" table."""
    return {
        "run": str(run_dir),
        "modalities": list(config.model.modalities),
        "fusion": config.model.fusion.name,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
    }


def evaluate(
    run_dir: str | Path,
    split: str = "test",
    compare: tuple[str, ...] = (),
    ablation: bool = True,
    robustness: RobustnessOptions | None = None,
) -> dict:
    """Evaluates a run on ``split``; writes report.json, report.md and plots.

    ``robustness`` adds the degraded-input curves (``multimodal_tf.robustness``).
    """
    run_dir = Path(run_dir)
    config, metadata, model = load_trained_model(run_dir)
    if split not in metadata.shards:
        raise ValueError(f"split {split!r} not in the dataset; have {sorted(metadata.shards)}")
    out_dir = run_dir / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities, labels, ids = predict_split(model, config, metadata, split)
    report = {
        "run": str(run_dir),
        "split": split,
        "modalities": list(config.model.modalities),
        "fusion": config.model.fusion.name,
        "metrics": classification_metrics(probabilities, labels, metadata.label_names),
    }
    report["plots"] = {
        k: f"eval_{split}/{v}"
        for k, v in _plots(probabilities, labels, metadata.label_names, out_dir).items()
    }
    if config.data.targets[1:]:
        dataset = make_dataset(config, split, training=False, metadata=metadata, with_targets=True)
        outputs, labels_of = target_report.predict_targets(model, dataset)
        report["targets"] = target_report.report_sections(config.data, metadata, outputs, labels_of)
    if (run_dir / CALIBRATION_FILE).exists():  # train.calibration: temperature
        report["calibration"] = json.loads((run_dir / CALIBRATION_FILE).read_text())
    if ablation:
        report["ablation"] = modality_ablation(model, config, metadata, split)
    if robustness is not None:
        report["robustness"] = robustness_report(model, config, metadata, split, out_dir, robustness)
    if isinstance(model, EnsembleModel):
        report["members"] = ensemble_members(model, config, metadata, split)
    if config.model.alignment.enabled:
        from multimodal_tf.retrieval import retrieval_report  # noqa: PLC0415

        report["retrieval"] = retrieval_report(model, config, metadata, split)
    report["comparison"] = [_comparison_row(run_dir, config, report["metrics"])]
    for other in compare:
        other_config, other_metadata, other_model = load_trained_model(other)
        p, y, _ = predict_split(other_model, other_config, other_metadata, split)
        metrics = classification_metrics(p, y, other_metadata.label_names)
        report["comparison"].append(_comparison_row(other, other_config, metrics))
    with open(out_dir / "predictions.csv", "w", encoding="utf-8") as f:
        f.write("id,label,predicted," + ",".join(f"p_{i}" for i in range(probabilities.shape[1])) + "\n")
        for i, y, p in zip(ids, labels, probabilities, strict=False):
            f.write(f"{i.decode()},{y},{p.argmax()}," + ",".join(f"{v:.5f}" for v in p) + "\n")
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report, metadata.label_names)
    if "retrieval" in report:
        from multimodal_tf.retrieval import retrieval_markdown  # noqa: PLC0415

        markdown += "\n" + retrieval_markdown(report["retrieval"])
    (run_dir / "report.md").write_text(markdown)
    return report


def to_markdown(report: dict, label_names: list[str]) -> str:
    m = report["metrics"]
    auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.4f}"
    lines = [
        f"# Evaluation report: {report['run']} ({report['split']} split)",
        "",
        f"Modalities: {', '.join(report['modalities'])}; fusion: `{report['fusion']}`; {m['examples']} examples.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {m['accuracy']:.4f} |",
        f"| macro-F1 | {m['macro_f1']:.4f} |",
        f"| ROC-AUC (one-vs-rest) | {auc} |",
        f"| log loss | {m['log_loss']:.4f} |",
        f"| ECE ({NUM_BINS} bins, top label) | {m['ece']:.4f} |",
    ]
    if report.get("calibration"):
        c = report["calibration"]
        lines += [
            "",
            f"Temperature scaling: T = {c['temperature']:.4f}, fitted on {c['split']} "
            f"(ECE there {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}).",
        ]
        for name, t in list(c.get("targets", {}).items())[1:]:  # data.targets after the primary
            lines.append(
                f"Target `{name}`: T = {t['temperature']:.4f} on {t['examples']} labelled examples "
                f"(NLL {t['before']['nll']:.4f} -> {t['after']['nll']:.4f})."
            )
    lines += [
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name in label_names:
        c = m["per_class"][name]
        lines.append(
            f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        )
    if report.get("targets"):
        lines += target_report.to_markdown(report["targets"])
    if report.get("ablation"):
        lines += ["", "## Modality ablation", "", "| setting | accuracy |", "|---|---|"]
        lines += [f"| {r['setting']} | {r['accuracy']:.4f} |" for r in report["ablation"]]
    if report.get("members"):
        lines += ["", "## Ensemble members alone", "", "| member | accuracy | log loss |", "|---|---|---|"]
        lines += [f"| {r['member']} | {r['accuracy']:.4f} | {r['log_loss']:.4f} |" for r in report["members"]]
        lines.append(f"| **average (the model)** | {m['accuracy']:.4f} | {m['log_loss']:.4f} |")
    if len(report.get("comparison", [])) > 1:
        lines += [
            "",
            "## Fused vs other runs",
            "",
            "| run | modalities | fusion | accuracy | macro-F1 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['run']} | {', '.join(r['modalities'])} | {r['fusion']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |"
            for r in report["comparison"]
        ]
    if report.get("robustness"):
        lines += robustness_markdown(report["robustness"])
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in report["plots"].items()]
    return "\n".join(lines) + "\n"
