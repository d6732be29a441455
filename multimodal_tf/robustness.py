"""``mmtf evaluate --robustness``: accuracy as each modality is degraded (MultiBench).

Where the degradations happen: inside ``make_dataset``, between parsing the
TFRecords and the model, through :class:`DegradingPreprocessor`. It reuses
the real :class:`~multimodal_tf.data.preprocessing.Preprocessor` for
everything it does not degrade, so a degraded example goes through the same
decoding, resizing, tokenizer and log-mel code as in training and serving:

- images: the model's image feature *is* the decoded [0, 1] pixels, so the
  pixels the Preprocessor returns are degraded directly;
- audio: the waveform is decoded with the pipeline's ``preprocess_waveforms``,
  degraded, then turned into the model's feature (log-mel or waveform) by
  the same functions the Preprocessor calls;
- text: the raw strings are degraded before the Preprocessor tokenizes them;
- missing: the modality's features and presence flag are zeroed for a
  random subset of examples, the mechanism of the "without X" ablation.

A degraded modality keeps its presence flag (a corrupted input was still
given); only ``<modality>/missing`` clears it. The batches and their order
are those of ``make_dataset`` (evaluation order), so level 0 reproduces the
clean accuracy and ``missing`` at rate 1.0 the ablation, exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from multimodal_tf import degradations as deg
from multimodal_tf.compat import tf
from multimodal_tf.data import features
from multimodal_tf.data.audio import log_mel_spectrogram, preprocess_waveforms
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.run_dir import load_trained_model

IMAGE_FUNCTIONS = {"gaussian_noise": deg.gaussian_noise, "occlusion": deg.occlusion}
AUDIO_FUNCTIONS = {"white_noise": deg.white_noise, "time_shift": deg.time_shift}


@dataclasses.dataclass(frozen=True)
class RobustnessOptions:
    """What ``evaluate`` measures for the robustness report.

    Attributes:
        degradations: names from ``degradations.DEGRADATIONS``; empty = every
            degradation of the model's modalities.
        seed: seeds every random draw (same seed, same degraded inputs).
        baseline: run directory of the reference model for effective
            robustness (MultiBench uses late fusion); None = a flat trend.
    """

    degradations: tuple[str, ...] = ()
    seed: int = 0
    baseline: str | None = None

    def __post_init__(self):
        for name in self.degradations:  # fail before any evaluation runs
            deg.get(name)


class DegradingPreprocessor:
    """A Preprocessor whose output has one degradation applied at one level.

    Args:
        preprocessor: the run's real preprocessor.
        degradation: what to apply; None (or its clean level, or a modality
            the preprocessor does not compute) = the preprocessor unchanged.
        level: the severity, one of ``degradation.levels``.
        seed: the random seed.
    """

    def __init__(
        self, preprocessor: Preprocessor, degradation: deg.Degradation | None = None, level=None, seed=0
    ):
        self.preprocessor = preprocessor
        self.degradation = degradation
        self.level = level
        self.seed = seed

    def parse_examples(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.preprocessor.parse_examples(serialized)

    def __call__(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        d = self.degradation
        if d is None or d.is_clean(self.level) or d.modality not in self.preprocessor.modalities:
            return self.preprocessor(raw)
        ids, encoded = raw[features.ID], raw[d.modality]
        present = tf.cast(tf.strings.length(encoded) > 0, tf.float32)
        seeds = deg.example_seeds(ids, self.seed, d.name)
        raw = dict(raw)
        if d.kind in ("typos", "word_dropout"):
            raw[d.modality] = deg.degrade_texts(encoded, ids, d, self.level, self.seed)
        elif d.modality == features.AUDIO and d.kind != "missing":
            raw[d.modality] = tf.fill(tf.shape(encoded), "")  # decoded below, not twice
        outputs = self.preprocessor(raw)
        name = features.presence_name(d.modality)
        outputs[name] = present
        value = outputs[d.modality]
        if d.kind == "missing":
            missing = deg.missing_mask(ids, self.level, self.seed, d.name)
            outputs[d.modality] = tf.where(_expand(missing, value), tf.zeros_like(value), value)
            outputs[name] = tf.where(missing, tf.zeros_like(present), present)
        elif d.kind == "gaussian_blur":
            outputs[d.modality] = self._keep_absent(deg.gaussian_blur(value, self.level), value, present)
        elif d.modality == features.IMAGE:
            degraded = IMAGE_FUNCTIONS[d.kind](value, self.level, seeds)
            outputs[d.modality] = self._keep_absent(degraded, value, present)
        elif d.modality == features.AUDIO:
            outputs[d.modality] = self._audio(encoded, present, seeds)
        return outputs

    def _audio(self, encoded: tf.Tensor, present: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
        """Decoded waveform -> degraded -> the model's audio feature, as the Preprocessor makes it."""
        config = self.preprocessor.config.audio
        waveforms = preprocess_waveforms(encoded, config)
        waveforms = AUDIO_FUNCTIONS[self.degradation.kind](waveforms, self.level, seeds)
        if self.preprocessor.kinds[features.AUDIO] == features.WAVEFORM:
            return waveforms * present[:, None]
        return log_mel_spectrogram(waveforms, config) * present[:, None, None]

    @staticmethod
    def _keep_absent(degraded: tf.Tensor, clean: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
        """Absent inputs stay all-zero: the report measures degradation, not absence."""
        return tf.where(_expand(present > 0, clean), degraded, clean)


def _expand(mask: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """[B] mask broadcastable against ``like`` ([B, ...])."""
    return tf.reshape(mask, [-1] + [1] * (len(like.shape) - 1))


def predicted_classes(probabilities: np.ndarray) -> np.ndarray:
    """Class ids, a binary head's P(class 1) read as ``predict_split`` reads it."""
    if probabilities.shape[-1] == 1:
        probabilities = np.concatenate([1 - probabilities, probabilities], axis=-1)
    return probabilities.argmax(-1)


def accuracy(model, config, metadata, split: str, preprocessor: DegradingPreprocessor) -> float:
    """Accuracy of ``model`` on ``split`` with ``preprocessor``'s degradation applied."""
    dataset = make_dataset(
        config, split, training=False, metadata=metadata, with_ids=True, preprocessor=preprocessor
    )
    correct = total = 0
    primary = config.data.targets[0].name if config.data.targets else None
    for x, y, _ in dataset:
        output = model(x, training=False)
        output = output[primary] if primary else output  # data.targets: the primary target
        correct += int((predicted_classes(output.numpy()) == y.numpy()).sum())
        total += int(y.shape[0])
    return correct / total


def select(names: tuple[str, ...], modalities) -> list[deg.Degradation]:
    """The named degradations (default: all of ``modalities``), each checked against the model."""
    if not names:
        return [d for d in deg.DEGRADATIONS.values() if d.modality in modalities]
    chosen = [deg.get(name) for name in names]
    for d in chosen:
        if d.modality not in modalities:
            raise ValueError(
                f"degradations: {d.name!r} degrades {d.modality}, which the model does not use "
                f"(modalities: {list(modalities)})"
            )
    return chosen


def curves(model, config, metadata, split: str, chosen: list[deg.Degradation], seed: int):
    """(clean accuracy, {name: accuracy per level}); level 0 is the clean accuracy."""
    base = Preprocessor(config.data, metadata.vocabulary, config.model)
    clean = accuracy(model, config, metadata, split, DegradingPreprocessor(base))
    result = {}
    for d in chosen:
        if d.modality not in config.model.modalities:  # a baseline without it: unaffected
            result[d.name] = [clean] * len(d.levels)
            continue
        result[d.name] = [clean] + [
            accuracy(model, config, metadata, split, DegradingPreprocessor(base, d, level, seed))
            for level in d.levels[1:]
        ]
    return clean, result


def relative_robustness(accuracies: list[float]) -> float:
    """Trapezoidal area under accuracy vs level, levels evenly spaced on [0, 1]."""
    y = np.asarray(accuracies, dtype=np.float64)
    x = np.linspace(0.0, 1.0, len(y))
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


def effective_robustness(accuracies: list[float], reference: list[float] | None = None) -> float:
    """Mean over degraded levels of acc_i - (ref_i - ref_0 + acc_0); no reference = a flat one."""
    acc = np.asarray(accuracies, dtype=np.float64)
    ref = np.full_like(acc, acc[0]) if reference is None else np.asarray(reference, dtype=np.float64)
    trend = ref - ref[0] + acc[0]
    return float(np.mean(acc[1:] - trend[1:]))


def robustness_report(model, config, metadata, split: str, out_dir: Path, options: RobustnessOptions) -> dict:
    """Curves, MultiBench's relative and effective robustness, one PNG per degradation."""
    chosen = select(options.degradations, config.model.modalities)
    clean, accuracies = curves(model, config, metadata, split, chosen, options.seed)
    reference = None
    if options.baseline:
        b_config, b_metadata, b_model = load_trained_model(options.baseline)
        _, reference = curves(b_model, b_config, b_metadata, split, chosen, options.seed)
    rows = []
    for d in chosen:
        ref = reference[d.name] if reference else None
        row = {
            "name": d.name,
            "modality": d.modality,
            "unit": d.unit,
            "levels": [None if math.isinf(level) else level for level in d.levels],
            "labels": [d.label(level) for level in d.levels],
            "accuracy": accuracies[d.name],
            "baseline_accuracy": ref,
            "relative_robustness": relative_robustness(accuracies[d.name]),
            "effective_robustness": effective_robustness(accuracies[d.name], ref),
        }
        row["plot"] = f"{out_dir.name}/{_plot(row, out_dir)}"
        rows.append(row)
    return {"seed": options.seed, "baseline": options.baseline, "clean_accuracy": clean, "degradations": rows}


def _plot(row: dict, out_dir: Path) -> str:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    name = "robustness_" + row["name"].replace("/", "_") + ".png"
    fig, axis = plt.subplots(figsize=(5, 3.5))
    positions = range(len(row["labels"]))
    axis.plot(positions, row["accuracy"], marker="o", label="this run")
    if row["baseline_accuracy"] is not None:
        axis.plot(positions, row["baseline_accuracy"], marker="s", linestyle="--", label="baseline")
    axis.set_xticks(list(positions), row["labels"])
    axis.set_ylim(0.0, 1.02)
    axis.set_xlabel(row["unit"])
    axis.set_ylabel("accuracy")
    axis.set_title(
        f"{row['name']}: relative {row['relative_robustness']:.3f}, "
        f"effective {row['effective_robustness']:+.3f}",
        fontsize=9,
    )
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


def to_markdown(section: dict) -> list[str]:
    """The report.md lines of the robustness section."""
    reference = (
        f"baseline run `{section['baseline']}`" if section["baseline"] else "a flat trend (no baseline)"
    )
    lines = [
        "",
        "## Robustness",
        "",
        f"Test accuracy as each modality is degraded (seed {section['seed']}; clean accuracy "
        f"{section['clean_accuracy']:.4f}). Relative robustness: area under accuracy vs level "
        f"(levels evenly spaced on [0, 1]); effective robustness: mean gap to {reference} "
        "shifted to this run's clean accuracy.",
        "",
        "| degradation | levels | accuracy | relative robustness | effective robustness |",
        "|---|---|---|---|---|",
    ]
    for r in section["degradations"]:
        accuracies = " / ".join(f"{a:.3f}" for a in r["accuracy"])
        lines.append(
            f"| {r['name']} | {' / '.join(r['labels'])} | {accuracies} | "
            f"{r['relative_robustness']:.4f} | {r['effective_robustness']:+.4f} |"
        )
    lines.append("")
    lines += [f"![{r['name']}]({r['plot']})" for r in section["degradations"]]
    return lines
