"""The model: per-modality encoders, modality dropout, fusion and a classifier head.

:func:`build_model` is the one construction path; training, tuning and export
all call it. :func:`loss_for` and :func:`labels_for_head` give the loss and
target format that match the head type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from multimodal_tf import targets as targets_lib
from multimodal_tf.alignment import add_alignment
from multimodal_tf.calibration import TemperatureScaling
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import HEAD_TYPES, MODALITIES, EncoderConfig, ExperimentConfig, ModelConfig
from multimodal_tf.data import features
from multimodal_tf.encoders import build_encoder, load_encoder_checkpoint
from multimodal_tf.fusion import build_fusion
from multimodal_tf.fusion.late import PRIMARY_OUTPUT
from multimodal_tf.registry import ENCODERS, FUSIONS

OUTPUT_NAME = "probabilities"
# The layer before a TemperatureScaling output (train.calibration: temperature).
UNCALIBRATED_NAME = "uncalibrated"


@keras.utils.register_keras_serializable(package="multimodal_tf")
class ModalityDropout(keras.layers.Layer):
    """Hides whole modalities of training examples by clearing presence flags.

    In training, each present modality of each example is hidden with its
    configured probability (its flag set to 0, so encoders' outputs for it
    are masked by the fusion). If that would hide every present modality of
    an example, one of them, chosen uniformly, is kept instead. At inference
    the flags pass through unchanged. Modality dropout as in Neverova et al.,
    2016, "ModDrop".

    Call arguments:
        presence: dict modality -> float 0/1 [B].

    Returns:
        dict modality -> float32 0/1 [B], the same keys.

    Args:
        rates: modality -> probability of hiding it (modalities not listed
            are never hidden).
        seed: random seed.
        **kwargs: standard layer arguments.
    """

    def __init__(self, rates: Mapping[str, float], seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        for modality, rate in rates.items():
            if modality not in MODALITIES or not 0.0 <= rate <= 1.0:
                raise ValueError(
                    f"{self.name}: rate for {modality!r} must be a modality with 0 <= rate <= 1, got {rate}"
                )
        self.rates = dict(rates)
        self.seed = seed

    def call(self, presence, training=None):
        modalities = sorted(presence)  # a fixed order for the stacked [B, M] flags
        flags = tf.stack([tf.cast(presence[m], tf.float32) for m in modalities], axis=1)
        if not any(self.rates.get(m, 0.0) > 0 for m in modalities):
            return {m: flags[:, i] for i, m in enumerate(modalities)}
        if training is None:
            training = keras.backend.learning_phase()
        rates = tf.constant([self.rates.get(m, 0.0) for m in modalities], tf.float32)
        flags = tf.__internal__.smart_cond.smart_cond(
            training, lambda: self._drop(flags, rates), lambda: tf.identity(flags)
        )
        return {m: flags[:, i] for i, m in enumerate(modalities)}

    def _drop(self, flags: tf.Tensor, rates: tf.Tensor) -> tf.Tensor:
        """[B, M] flags -> flags with modalities hidden, never all present ones."""
        # Another op seed for the rescue draws: two ops with one seed draw the same numbers.
        rescue_seed = None if self.seed is None else self.seed + 1
        return hide_modalities(
            flags,
            rates,
            tf.random.uniform(tf.shape(flags), seed=self.seed),
            tf.random.uniform(tf.shape(flags), seed=rescue_seed),
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"rates": dict(self.rates), "seed": self.seed})
        return config


def hide_modalities(
    flags: tf.Tensor, rates: tf.Tensor, draws: tf.Tensor, rescue_draws: tf.Tensor
) -> tf.Tensor:
    """ModalityDropout's rule on given uniform draws: [B, M] 0/1 flags -> the flags left visible.

    A present modality is hidden where its draw is below its rate; an
    example that would lose every present modality keeps the one with the
    highest rescue draw instead. Shared by :class:`ModalityDropout` and
    distillation's teacher views (distillation_views.py), which must hide
    modalities exactly as training does.

    Args:
        flags: float32 [B, M] presence flags.
        rates: float32 [M] probability of hiding each modality.
        draws: float32 [B, M] uniform in [0, 1).
        rescue_draws: float32 [B, M] uniform in [0, 1).
    """
    kept = flags * tf.cast(draws >= rates, tf.float32)
    scores = tf.where(flags > 0, rescue_draws, -1.0)
    rescue = tf.one_hot(tf.argmax(scores, axis=1), tf.shape(flags)[1]) * flags
    lost_all = tf.reduce_max(kept, axis=1, keepdims=True) <= 0
    return tf.where(lost_all, rescue, kept)


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """Validated model modalities (a non-empty subset of MODALITIES, no repeats)."""
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if not modalities or unknown or len(set(modalities)) != len(modalities):
        raise ValueError(f"model.modalities must be distinct names from {MODALITIES}, got {list(modalities)}")
    return modalities


def output_units(head_type: str, num_classes: int) -> tuple[int, str]:
    """(units, activation) of the output layer for ``model.head.type``."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f"model.head.type must be one of {HEAD_TYPES}, got {head_type!r}")
    if head_type == "binary":
        if num_classes != 2:
            raise ValueError(
                f"model.head.type 'binary' needs exactly 2 classes, got num_classes={num_classes}"
            )
        return 1, "sigmoid"
    if num_classes < (2 if head_type == "multiclass" else 1):
        raise ValueError(f"model.head.type {head_type!r}: num_classes too small, got {num_classes}")
    return num_classes, "softmax" if head_type == "multiclass" else "sigmoid"


def encoder_config(model_config: ModelConfig, modality: str) -> EncoderConfig:
    """The encoder config of ``modality`` (its family was checked when the config was built)."""
    return getattr(model_config, f"{modality}_encoder")


def build_model(
    config: ExperimentConfig,
    num_classes: int,
    vocab_size: int,
    target_sizes: Mapping[str, int] | None = None,
) -> keras.Model:
    """Builds the (uncompiled) multimodal classifier.

    Args:
        config: the experiment; uses ``config.data`` (input shapes) and
            ``config.model``.
        num_classes: number of classes (2 for a binary head).
        vocab_size: text vocabulary size (token ids are < vocab_size).
        target_sizes: with ``data.targets``, output units of each extra
            target (``targets.sizes(config.data, metadata)``).

    Returns:
        A functional ``keras.Model`` taking the dict of
        ``features.model_feature_specs(config.data, config.model)``
        and returning one float32 tensor named ``"probabilities"``:
        [B, num_classes] (multiclass, multilabel) or [B, 1] (binary). With
        ``model.ensemble_size`` > 1, an :class:`EnsembleModel` of that many
        members with the same inputs and output. With ``data.targets``, a
        dict of outputs, one per target, named after it (targets.build_heads).
    """
    size = config.model.ensemble_size
    if size < 1:
        raise ValueError(f"model.ensemble_size must be >= 1, got {size}")
    seed = config.train.seed
    calibrated = config.train.calibration == "temperature"
    if size > 1 and config.model.alignment.enabled:
        raise ValueError("model.alignment needs model.ensemble_size 1 (members would each have a space)")
    if size == 1:
        name = "multimodal_targets" if config.data.targets else "multimodal_classifier"
        return _build_classifier(
            config, num_classes, vocab_size, seed, name, calibrated, target_sizes=_sizes(config, target_sizes)
        )
    # Each member draws its own initial weights from the seeded global
    # generator; modality dropout gets its own op seeds (one seed in two ops
    # would hide the same modalities in every member).
    members = [
        _build_classifier(
            config,
            num_classes,
            vocab_size,
            None if seed is None else seed + 2 * k,
            f"member_{k}",
            target_sizes=_sizes(config, target_sizes),
        )
        for k in range(size)
    ]
    inputs = _model_inputs(config)
    predictions = [member(inputs) for member in members]
    if config.data.targets:  # per target: the mean of probabilities (values for regression)
        averages = {
            name: keras.layers.Average(dtype="float32", name=targets_lib.average_name(name))(
                [p[name] for p in predictions]
            )
            for name in predictions[0]
        }
        outputs = targets_lib.output_layers(config.data, averages, calibrated)
        return EnsembleModel(inputs=inputs, outputs=outputs, name="multimodal_ensemble")
    average = keras.layers.Average(dtype="float32", name=UNCALIBRATED_NAME if calibrated else OUTPUT_NAME)
    outputs = average(predictions)
    if calibrated:  # one temperature for the average, on its log-probabilities
        activation = output_units(config.model.head.type, num_classes)[1]
        outputs = TemperatureScaling(activation, from_logits=False, name=OUTPUT_NAME)(outputs)
    return EnsembleModel(inputs=inputs, outputs=outputs, name="multimodal_ensemble")


def _sizes(config: ExperimentConfig, target_sizes: Mapping[str, int] | None) -> dict | None:
    """The extra targets' output units with ``data.targets`` (else None: one output)."""
    return dict(target_sizes or {}) if config.data.targets else None


@keras.utils.register_keras_serializable(package="multimodal_tf")
class EnsembleModel(keras.Model):
    """A deep ensemble (Lakshminarayanan et al., 2017) trained in one ``fit``.

    The functional graph averages the members' probabilities, so inference,
    evaluation, validation loss (hence checkpoint choice and early stopping)
    and export see one model with one ``probabilities`` output. Training
    differs from fitting that average: each member is trained on its own
    loss, as if alone, and the step minimises their mean. Fitting the average
    instead would let members specialise into parts of one bigger model and
    lose the independent errors that make averaging pay. Reported training
    metrics are those of the average; the training ``loss`` is the members'
    mean loss.

    Members are the nested ``keras.Model`` layers ``member_0``, ``member_1``,
    ... (see :func:`build_model`). With ``data.targets`` every member has
    every target's head and each output is the mean of the members' (layers
    ``<target>_average``); each member's loss is then its masked losses.
    """

    @property
    def members(self) -> list[keras.Model]:
        return [layer for layer in self.layers if isinstance(layer, keras.Model)]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            predictions = [member(x, training=True) for member in self.members]
            losses = [self.compiled_loss(y, p, sample_weight) for p in predictions]
            loss = tf.add_n(losses) / len(losses)
            if self.losses:  # regularisation terms, once
                loss += tf.add_n(self.losses)
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        # Members output float32 (see OUTPUT_NAME), one tensor or one per target.
        average = tf.nest.map_structure(lambda *p: tf.add_n(p) / len(p), *predictions)
        return self.compute_metrics(x, y, average, sample_weight)


def _model_inputs(config: ExperimentConfig) -> dict:
    """One named ``keras.Input`` per model feature."""
    specs = features.model_feature_specs(config.data, config.model)
    return {
        name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=name) for name, spec in specs.items()
    }


def _build_classifier(
    config: ExperimentConfig,
    num_classes: int,
    vocab_size: int,
    seed: int | None,
    name: str,
    calibrated: bool = False,
    target_sizes: Mapping[str, int] | None = None,
) -> keras.Model:
    """One classifier (encoders, modality dropout, fusion, head) named ``name``.

    ``calibrated``: the output is a TemperatureScaling layer on the head's
    logits (or on a probability-producing fusion's output); with targets,
    each multiclass and multilabel target's output is.
    ``target_sizes``: given, one head per ``data.targets`` entry
    (targets.build_heads) instead of the output layer; under decision-level
    fusion, one per target and modality, combined by the fusion.
    """
    model_config = config.model
    modalities = check_modalities(model_config.modalities)
    num_outputs, activation = output_units(model_config.head.type, num_classes)

    # === Layers ===
    extra = {}
    if target_sizes is not None and FUSIONS.get(model_config.fusion.name).produces_probabilities:
        # Decision-level fusion: each modality gets a head per target (fusion/late.py).
        extra["extra_outputs"] = targets_lib.extra_outputs(config.data, target_sizes)
    fusion = build_fusion(
        model_config.fusion,
        modalities,
        num_outputs=num_outputs,
        output_activation=activation,
        name="fusion",
        **extra,
    )
    encoders = {}
    kinds = features.input_kinds(model_config)
    for modality in modalities:
        family = encoder_config(model_config, modality)
        # Only encoders of the data vocabulary's ids take its size; a
        # pretrained text encoder (text/bert) brings its own vocabulary.
        extra = {"vocab_size": vocab_size} if kinds[modality] == features.TOKEN_IDS else {}
        # A fusion over sequences gets each encoder's (sequence, mask) where
        # the encoder has one; the others' pooled [B, D] embeddings reach it
        # as one token each (fusion.cross_attention.as_sequence).
        if fusion.consumes_sequences and getattr(
            ENCODERS.get(family.name), "supports_sequence_output", False
        ):
            extra["sequence_output"] = True
        encoders[modality] = build_encoder(family, name=f"{modality}_encoder", **extra)
    rates = {m: getattr(model_config.modality_dropout, m) for m in modalities}
    modality_dropout = ModalityDropout(rates, seed=seed, name="modality_dropout")
    head = []
    if not fusion.produces_probabilities:
        for i, units in enumerate(model_config.head.hidden_units):
            head.append(keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}"))
            head.append(keras.layers.Dropout(model_config.head.dropout_rate, name=f"head_dropout_{i}"))
        # float32 so that the probabilities (and the loss) stay float32 under
        # a mixed-precision policy.
        output_layer = keras.layers.Dense(
            num_outputs,
            activation=None if calibrated else activation,
            dtype="float32",
            name=UNCALIBRATED_NAME if calibrated else OUTPUT_NAME,
        )
    else:
        output_name = UNCALIBRATED_NAME if calibrated else OUTPUT_NAME
        output_layer = keras.layers.Activation("linear", dtype="float32", name=output_name)
    if calibrated and target_sizes is None:  # with targets, each head has its own (targets.py)
        from_logits = not fusion.produces_probabilities
        head.append(output_layer)
        output_layer = TemperatureScaling(activation, from_logits=from_logits, name=OUTPUT_NAME)

    # === Functional Model ===
    inputs = _model_inputs(config)
    presence = modality_dropout({m: inputs[features.presence_name(m)] for m in modalities})
    embeddings = {m: encoders[m](inputs[m]) for m in modalities}
    x = fusion(embeddings, presence)
    for layer in head:
        x = layer(x)
    if target_sizes is not None and fusion.produces_probabilities:
        fused = {t.name: x[t.name] for t in targets_lib.extras(config.data)}
        fused[targets_lib.primary(config.data).name] = x[PRIMARY_OUTPUT]
        outputs = targets_lib.output_layers(config.data, fused, calibrated)
    elif target_sizes is not None:
        outputs = targets_lib.build_heads(config.data, x, num_classes, target_sizes, calibrated)
    else:
        outputs = output_layer(x)
    model = keras.Model(inputs=inputs, outputs=outputs, name=name)
    if model_config.alignment.enabled:
        add_alignment(model, model_config.alignment, inputs, embeddings)

    for modality in modalities:
        checkpoint = encoder_config(model_config, modality).checkpoint
        if checkpoint:
            load_encoder_checkpoint(encoders[modality], checkpoint)
    return model


def loss_for(config: ExperimentConfig) -> keras.losses.Loss | dict:
    """The loss matching ``config.model.head.type`` (on probabilities, not logits).

    Multiclass: sparse categorical crossentropy on integer labels; binary and
    multilabel: binary crossentropy on :func:`labels_for_head` targets. With
    ``data.targets``: a loss per output (targets.losses; weights in
    targets.loss_weights).
    """
    if config.data.targets:
        return targets_lib.losses(config.data, keras.losses.SparseCategoricalCrossentropy())
    head_type = config.model.head.type
    if head_type not in HEAD_TYPES:
        raise ValueError(f"model.head.type must be one of {HEAD_TYPES}, got {head_type!r}")
    if head_type == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy()
    return keras.losses.BinaryCrossentropy()


def labels_for_head(labels: tf.Tensor, config: ExperimentConfig, num_classes: int) -> tf.Tensor:
    """Integer class labels [B] -> the targets of ``config.model.head.type``.

    Multiclass: the labels unchanged (int); binary: float32 [B, 1];
    multilabel: float32 one-hot [B, num_classes] (an already multi-hot
    [B, num_classes] input is only cast). Usable inside ``tf.data.map``.
    """
    head_type = config.model.head.type
    output_units(head_type, num_classes)  # validates the pair
    labels = tf.convert_to_tensor(labels)
    if head_type == "multiclass":
        return labels
    if head_type == "binary":
        return tf.reshape(tf.cast(labels, tf.float32), [-1, 1])
    if labels.shape.rank == 2:
        return tf.cast(labels, tf.float32)
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
