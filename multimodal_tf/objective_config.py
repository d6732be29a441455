"""Configs of what a model is trained toward beyond its one label: extra targets, alignment, distillation.

``data.targets`` (targets.py), ``model.alignment`` (alignment.py) and
``distill`` (distillation.py); config.py re-exports them as part of the
experiment config.
"""

from __future__ import annotations

import dataclasses
import re

from multimodal_tf.modality_config import MODALITIES
from multimodal_tf.typed_config import Checked, ConfigFieldError, option

MULTICLASS, MULTILABEL, REGRESSION = "multiclass", "multilabel", "regression"
TARGET_TYPES = (MULTICLASS, MULTILABEL, REGRESSION)
EXTRA_TARGET_TYPES = (MULTILABEL, REGRESSION)  # the types of targets after the primary one
TARGET_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class TargetConfig(Checked):
    """One thing the model predicts, from a manifest column (see multimodal_tf/targets.py)."""

    name: str = ""  # output name: lower-case letters, digits and _
    column: str = ""  # the manifest column
    type: str = option(MULTICLASS, choices=TARGET_TYPES)
    loss_weight: float = option(1.0, minimum=0.0)  # this target's loss is multiplied by it
    separator: str = "|"  # multilabel: between the labels of a cell


def check_targets(targets: tuple[TargetConfig, ...], label_column: str) -> None:
    """Raises ConfigFieldError (naming ``targets[i].field``) for an inconsistent target list.

    The first target is the primary one: multiclass on the label column, so
    that class names, class weights, stratified validation and the Classify
    API keep working as they do for the implicit single target. The others
    are multilabel or regression targets on other columns.
    """
    if not targets:
        return
    names = [t.name for t in targets]
    for i, target in enumerate(targets):
        if not TARGET_NAME.fullmatch(target.name):
            raise ConfigFieldError(
                f"targets[{i}].name", f"use lower-case letters, digits and _, got {target.name!r}"
            )
        if not target.column:
            raise ConfigFieldError(f"targets[{i}].column", "name the manifest column")
    if len(set(names)) != len(names):
        raise ConfigFieldError("targets", f"names must be distinct, got {names}")
    first = targets[0]
    if first.type != MULTICLASS or first.column != label_column:
        raise ConfigFieldError(
            "targets[0]",
            f"the primary target must be multiclass on the label column {label_column!r} "
            f"(data.columns.label), got {first.type} on {first.column!r}",
        )
    for i, target in enumerate(targets[1:], start=1):
        if target.type not in EXTRA_TARGET_TYPES:
            raise ConfigFieldError(
                f"targets[{i}].type",
                f"targets after the primary one are {list(EXTRA_TARGET_TYPES)}, got {target.type!r}",
            )
        if target.column == label_column:
            raise ConfigFieldError(f"targets[{i}].column", f"{label_column!r} is the primary target's column")
        if target.type == MULTILABEL and not target.separator:
            raise ConfigFieldError(f"targets[{i}].separator", "a multilabel target needs a separator")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig(Checked):
    """Contrastive alignment of modality embeddings (alignment.py); ``weight`` 0 = off.

    Each pair's encoder outputs are projected to ``dim``, L2-normalised and
    pulled together by a symmetric InfoNCE loss (CLIP), on the examples where
    both modalities of the pair are present.
    """

    weight: float = option(0.0, minimum=0.0)  # of the alignment loss; 0 disables alignment
    temperature: float = option(0.07, minimum=1e-4)  # softmax temperature of the similarities
    pairs: tuple[tuple[str, ...], ...] = ()  # e.g. [[image, text], [audio, text]]
    dim: int = option(64, minimum=1)  # size of the shared embedding space
    # Weight of the classification loss next to the alignment loss; 0 trains
    # the alignment alone (the head then stays at its initial weights).
    classification_weight: float = option(1.0, minimum=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2 or len(set(pair)) != 2 or not set(pair) <= set(MODALITIES):
                raise ConfigFieldError(
                    f"pairs[{i}]",
                    f"expected two different modalities from {list(MODALITIES)}, got {list(pair)}",
                )
        if self.weight > 0 and not self.pairs:
            raise ConfigFieldError("pairs", "alignment.weight > 0 needs at least one pair")

    @property
    def enabled(self) -> bool:
        return self.weight > 0 and bool(self.pairs)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The aligned modalities, in MODALITIES order."""
        return tuple(m for m in MODALITIES if any(m in pair for pair in self.pairs))


@dataclasses.dataclass(frozen=True)
class DistillConfig(Checked):
    """Knowledge distillation by ``mmtf distill`` (Hinton et al., 2015); ``mmtf train`` ignores it.

    The student's loss is ``alpha * CE(y, p_s) + (1 - alpha) * T^2 *
    KL(p_t^T || p_s^T)``, ``p^T`` being the softmax of the logits over T
    (distillation.distillation_loss). The defaults are the reference
    setting of Tian et al. 2020 (CRD) and Stanton et al. 2021 for KD:
    T = 4 spreads a confident teacher's mass over the classes it ranks
    close without flattening it, and most of the weight goes to the soft
    term, as Hinton et al. found best ("a considerably lower weight on the
    second", hard-label, objective).
    """

    temperature: float = 4.0
    alpha: float = 0.1  # weight of the hard-label cross-entropy, in [0, 1]
    # What the teacher predicts on, once, before the student trains
    # (distillation_views.py): "full", the full examples only (Hinton et
    # al.'s setting; the student's modality dropout hides modalities of its
    # inputs); "consistent", every missing-modality view the student's
    # modality dropout can make, the student being trained on a drawn view
    # with the teacher's prediction on that same view (Beyer et al. 2022).
    # "full" by default: one run each, it did better on both avmnist (0.970
    # vs 0.962) and emoji3 (0.697 vs 0.677) (docs/results.md, Distillation).
    views: str = option("full", choices=("full", "consistent"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ConfigFieldError("temperature", f"must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigFieldError("alpha", f"must be in [0, 1], got {self.alpha!r}")
