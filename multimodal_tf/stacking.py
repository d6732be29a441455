"""Stacking per-modality models into one ``late`` fusion model, its weights fit on validation.

Each per-modality model of the automatic run is a one-modality ``late``
fusion model: the modality's encoder, then its own classifier
(``fusion.hidden[m]``, ``fusion.classifiers[m]``). A multimodal ``late``
fusion model built from the same config has exactly those layers for every
modality, plus one learned logit per modality (``modality_logits``) that
weights them. Stacking copies each trained modality's layers into that
model and fits the modality logits on the validation split by minimising
its log loss (the second level of stacking, Wolpert 1992, with the
combination fixed to the late-fusion layer's: a weighted mean of
probabilities or a weighted product of experts). The result is an ordinary
run directory whose config and weights ``build_model``, ``mmtf evaluate``
and ``mmtf export`` read like any other.

Only M numbers (M = modalities) are fit on validation, so its loss stays a
fair (slightly optimistic) score for choosing between candidates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy import optimize

from multimodal_tf import config as config_lib
from multimodal_tf import run_dir as run_files
from multimodal_tf.data import features
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.data.text import vocabulary_size
from multimodal_tf.models import build_model
from multimodal_tf.run_dir import load_run, load_trained_model

# The fusion of every per-modality model and of the stacked one (same layer sizes).
LATE_FUSION = ("model.fusion.name=late", "model.fusion.hidden_dim=64", "model.fusion.dropout_rate=0.2")
COMBINATIONS = ("mean", "product")
EPSILON = 1e-7


def _inputs_of(model, x: dict) -> dict:
    return {name: x[name] for name in model.input_names}


def predictions(config, metadata, models: dict, split: str):
    """(probabilities [N, M, K] of each model, presence [N, M], labels [N]) on ``split``, in ``models``' order.

    ``config`` is the multimodal config (its dataset holds every modality);
    presence columns are those of the keys of ``models`` that name a modality.
    """
    probabilities, presence, labels = [], [], []
    for x, y in make_dataset(config, split, training=False, metadata=metadata):
        probabilities.append(
            np.stack([m(_inputs_of(m, x), training=False).numpy() for m in models.values()], 1)
        )
        flags = [x[features.presence_name(m)].numpy() for m in models if m in config_lib.MODALITIES]
        presence.append(np.stack(flags, 1).astype(np.float64) if flags else np.ones((len(y), 0)))
        labels.append(y.numpy())
    return np.concatenate(probabilities).astype(np.float64), np.concatenate(presence), np.concatenate(labels)


def fuse(probabilities: np.ndarray, presence: np.ndarray, logits: np.ndarray, combine: str) -> np.ndarray:
    """What ``LateFusion`` computes from its heads' probabilities: [N, M, K] -> [N, K]."""
    present = presence > 0
    scores = np.where(present, logits[None, :], -np.inf)
    top = np.where(present.any(1, keepdims=True), scores.max(1, keepdims=True), 0.0)
    weights = np.where(present, np.exp(scores - top), 0.0)
    weights /= np.maximum(weights.sum(1, keepdims=True), EPSILON)  # softmax over the present modalities
    prior = np.where(present.any(1, keepdims=True), 0.0, 1.0 / probabilities.shape[-1])  # none present
    if combine == "mean":
        return np.einsum("nm,nmk->nk", weights, probabilities) + prior
    # Product of experts: the weighted sum of the heads' logits; log-probabilities
    # differ from logits by a per-head constant that the softmax cancels.
    log_p = np.log(np.clip(probabilities, EPSILON, 1.0))
    combined = np.einsum("nm,nmk->nk", weights, log_p)
    combined = np.exp(combined - combined.max(1, keepdims=True))
    return combined / combined.sum(1, keepdims=True)


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1.0))))


def fit_weights(probabilities, presence, labels, combine: str) -> np.ndarray:
    """The modality logits [M] that minimise the fused validation log loss (the first is fixed at 0)."""
    num_modalities = probabilities.shape[1]

    def loss(free: np.ndarray) -> float:
        logits = np.concatenate([[0.0], free])
        return log_loss(fuse(probabilities, presence, logits, combine), labels)

    # A little L2 keeps the logits finite when one modality is useless.
    found = optimize.minimize(
        lambda v: loss(v) + 1e-3 * float(v @ v), np.zeros(num_modalities - 1), method="Powell"
    )
    return np.concatenate([[0.0], found.x])


def stacked_config(config, combine: str, out_dir: Path):
    return config_lib.replace(
        config,
        [*LATE_FUSION, f"model.fusion.combine={combine}", f"train.output_dir={json.dumps(str(out_dir))}"]
        + [f"model.modality_dropout.{m}=0.0" for m in config_lib.MODALITIES],
    )


def assemble(config, metadata, models: dict, logits: np.ndarray):
    """A multimodal ``late`` model (``config``) with each modality's layers copied from ``models``."""
    model = build_model(
        config,
        config.model.num_classes or metadata.num_classes,
        vocabulary_size(config.data.text, metadata.vocabulary),
    )
    fusion = model.get_layer("fusion")
    for modality, source in models.items():
        model.get_layer(f"{modality}_encoder").set_weights(
            source.get_layer(f"{modality}_encoder").get_weights()
        )
        source_fusion = source.get_layer("fusion")
        fusion.hidden[modality].set_weights(source_fusion.hidden[modality].get_weights())
        fusion.classifiers[modality].set_weights(source_fusion.classifiers[modality].get_weights())
    order = [fusion.modalities.index(m) for m in models]
    values = np.zeros(len(fusion.modalities), np.float32)
    values[order] = logits
    fusion.modality_logits.assign(values)
    return model


def stack(config, metadata, models: dict, combine: str, out_dir: Path, val=None) -> dict:
    """Stacks trained per-modality ``models`` into a run directory at ``out_dir``.

    Args:
        config: the multimodal (inferred) config.
        metadata: the converted dataset's metadata.
        models: modality -> its trained one-modality late-fusion model.
        combine: ``"mean"`` or ``"product"`` (see ``LateFusion``).
        out_dir: the stacked model's run directory.
        val: ``predictions(config, metadata, models, "val")`` when already computed.

    Returns:
        ``{"loss", "accuracy", "weights", "seconds", "model"}``: the stacked
        model's own validation log loss and accuracy, each modality's weight
        for an example that has every modality, the seconds it took and the
        model.
    """
    started = time.monotonic()
    probabilities, presence, labels = val or predictions(config, metadata, models, "val")
    logits = fit_weights(probabilities, presence, labels, combine)
    stacked = stacked_config(config, combine, out_dir)
    model = assemble(stacked, metadata, models, logits)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config_lib.save(stacked, out_dir / run_files.CONFIG_FILE)
    metadata.save(out_dir)
    model.save_weights(str(out_dir / run_files.BEST_WEIGHTS))
    fused = predictions(stacked, metadata, {"stacked": model}, "val")[0][:, 0]
    weights = np.exp(logits - logits.max())
    return {
        "loss": log_loss(fused, labels),
        "accuracy": float((fused.argmax(-1) == labels).mean()),
        "weights": dict(zip(models, (weights / weights.sum()).tolist(), strict=True)),
        "seconds": time.monotonic() - started,
        "model": model,
    }


def split_scores(model, config, metadata, split: str) -> dict:
    """Log loss and accuracy of ``model`` on ``split`` (compiled models evaluate with their traced step)."""
    if model.compiled_loss is not None:
        from multimodal_tf import recipe  # noqa: PLC0415

        dataset = recipe.supervised_dataset(
            make_dataset(config, split, training=False, metadata=metadata), config, metadata.num_classes
        )
        values = model.evaluate(dataset, verbose=0, return_dict=True)
        return {"loss": float(values["loss"]), "accuracy": float(values["accuracy"])}
    probabilities, _, labels = predictions(config, metadata, {"model": model}, split)
    probabilities = probabilities[:, 0]
    return {
        "loss": log_loss(probabilities, labels),
        "accuracy": float((probabilities.argmax(-1) == labels).mean()),
    }


def write_final_metrics(run_dir: str | Path, model=None, val: dict | None = None) -> dict:
    """``metrics.json`` of a run directory: val and test log loss and accuracy of its best weights.

    ``model``: the run's model already in memory (else rebuilt from the run
    directory); ``val``: its validation scores when already known.
    """
    config, metadata = load_run(run_dir)
    if model is None:
        model = load_trained_model(run_dir)[2]
    results = {}
    for split in ("val", "test"):
        if split in metadata.shards:
            results[split] = val if split == "val" and val else split_scores(model, config, metadata, split)
    (Path(run_dir) / run_files.METRICS_FILE).write_text(json.dumps(results, indent=1))
    return results
