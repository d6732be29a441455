"""mmtf distill: the loss against NumPy, the teacher cache, a distilled run end to end."""

import json
import shutil

import numpy as np
import pytest

from multimodal_tf import cli
from multimodal_tf import config as config_lib
from multimodal_tf.compat import keras
from multimodal_tf.distillation import (
    DistillationLoss,
    check_targets,
    distillation_loss,
    pack_targets,
    split_ids,
)
from multimodal_tf.distillation_views import predict_views, view_targets, views_of
from multimodal_tf.evaluation import predict_split
from multimodal_tf.run_dir import TEACHER_INFO_FILE, TEACHER_TARGETS_FILE, load_trained_model
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(labels, teacher_logits, student_logits, temperature, alpha):
    """Hinton et al. 2015 from the logits, in float64 NumPy."""
    p_student = _softmax(student_logits)
    hard = -np.log(p_student[np.arange(len(labels)), labels])
    soft_teacher = _softmax(teacher_logits / temperature)
    soft_student = _softmax(student_logits / temperature)
    kl = (soft_teacher * (np.log(soft_teacher) - np.log(soft_student))).sum(axis=-1)
    return alpha * hard + (1 - alpha) * temperature**2 * kl


@pytest.mark.parametrize(
    "temperature, alpha",
    [(1.0, 0.5), (4.0, 0.1), (20.0, 0.3), (0.5, 0.7), (4.0, 0.0), (4.0, 1.0)],
)
def test_loss_equals_numpy_reference_from_logits(temperature, alpha):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=6)
    teacher_logits, student_logits = rng.normal(0, 3, (6, 5)), rng.normal(0, 2, (6, 5))
    got = distillation_loss(
        labels,
        _softmax(teacher_logits).astype(np.float32),
        _softmax(student_logits).astype(np.float32),
        temperature,
        alpha,
    ).numpy()
    np.testing.assert_allclose(
        got, _reference(labels, teacher_logits, student_logits, temperature, alpha), rtol=2e-4, atol=1e-5
    )
    # The Keras loss on packed targets is the batch mean of the same values.
    packed = DistillationLoss(temperature, alpha)(
        pack_targets(labels, _softmax(teacher_logits)), _softmax(student_logits).astype(np.float32)
    )
    np.testing.assert_allclose(float(packed), got.mean(), rtol=1e-5)


def test_alpha_one_is_keras_crossentropy_and_equal_distributions_leave_only_it():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=8)
    student = _softmax(rng.normal(0, 2, (8, 4))).astype(np.float32)
    teacher = _softmax(rng.normal(0, 2, (8, 4))).astype(np.float32)
    crossentropy = keras.losses.SparseCategoricalCrossentropy(reduction="none")(labels, student).numpy()
    np.testing.assert_allclose(
        distillation_loss(labels, teacher, student, 4.0, 1.0).numpy(), crossentropy, rtol=1e-5
    )
    # Teacher == student: the KL term is 0 whatever T, only alpha * CE is left.
    np.testing.assert_allclose(
        distillation_loss(labels, student, student, 7.0, 0.25).numpy(),
        0.25 * crossentropy,
        rtol=1e-4,
        atol=1e-6,
    )


def test_one_hot_teacher_gives_a_finite_loss_and_gradient():
    import tensorflow as tf

    teacher = np.eye(3, dtype=np.float32)[[0, 2]]  # exact zeros: log clipped at epsilon
    student = tf.Variable(_softmax(np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(distillation_loss(np.array([0, 2]), teacher, student, 4.0, 0.1))
    grad = tape.gradient(loss, student)
    assert np.isfinite(loss.numpy()) and np.isfinite(grad.numpy()).all()


@pytest.mark.parametrize(
    "override, message", [("distill.alpha=1.5", "alpha"), ("distill.temperature=0", "temperature")]
)
def test_config_rejects_bad_settings(override, message):
    with pytest.raises(config_lib.ConfigError, match=f"distill.{message}"):
        config_lib.load((), [override])


@pytest.fixture(scope="module")
def teacher_run(synth_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={out / 'run'}",
        # Audio's log-mel and the LSTM's graph tracing would only add seconds here.
        "model.modalities=[image,text]",
        "model.text_encoder.name=text/bow",
        "model.ensemble_size=2",
        "model.fusion.name=late",
        "model.modality_dropout.text=0.5",
    )
    return train(config, progress=False)


# slow: trains a 2-member teacher and two students (~40 s); keeps the default run under 15 min
@pytest.mark.slow
def test_student_trains_from_the_cache_after_the_teacher_is_gone(teacher_run, synth_manifest, tmp_path):
    student = tmp_path / "student"
    args = [
        "--set",
        f"data.manifest={synth_manifest}",
        "--set",
        "model.modalities=[image,text]",
        "--set",
        "model.text_encoder.name=text/bow",
        "--set",
        "model.modality_dropout.image=0.5",
        "--set",
        "distill.views=consistent",
    ]
    # text/bow has no width or depth (one --set layer cannot switch a family and drop them).
    lstm_only = ("model.text_encoder.width", "model.text_encoder.depth")
    tiny = [a for o in tiny_config_overrides() if not o.startswith(lstm_only) for a in ("--set", o)]
    assert cli.main(["distill", str(teacher_run), *tiny, *args, "--out", str(student)]) == 0
    info = json.loads((student / TEACHER_INFO_FILE).read_text())
    cached = np.load(student / TEACHER_TARGETS_FILE)
    # The cache holds the teacher's predictions on the full examples (as evaluated), keyed by id.
    config, metadata, teacher = load_trained_model(teacher_run)
    expected, _, ids = predict_split(teacher, config, metadata, "train")
    rows = {i: k for k, i in enumerate(cached["ids"].tolist())}
    # View 0 is the full example; view 1 hides the image (the student's modality dropout).
    assert cached["views"].tolist() == ["", "image"] and info["view_rates"] == {"image": 0.5, "text": 0.0}
    full = cached["probabilities"][[rows[i] for i in ids.tolist()], 0]
    np.testing.assert_allclose(full, expected, atol=1e-6)
    assert info["examples"]["train"] == len(ids) and info["examples"]["val"] > 0
    # The pipeline hides modalities instead of the student model (consistent views).
    saved = config_lib.load([str(student / "config.yaml")])
    assert saved.model.modality_dropout.image == 0.0
    assert set(cached["splits"].tolist()) == {"train", "val"}
    written = (student / TEACHER_TARGETS_FILE).stat().st_mtime_ns
    trained = (student / "history.json").stat().st_mtime_ns
    # The teacher cannot run any more: a second distillation must train from the cache.
    shutil.move(teacher_run, teacher_run.with_name("moved"))
    try:
        assert cli.main(["distill", str(teacher_run), *tiny, *args, "--out", str(student)]) == 0
    finally:
        shutil.move(teacher_run.with_name("moved"), teacher_run)
    assert (student / TEACHER_TARGETS_FILE).stat().st_mtime_ns == written  # not rewritten
    assert (student / "history.json").stat().st_mtime_ns > trained  # the student trained again
    history = json.loads((student / "history.json").read_text())
    assert len(history["loss"]) == 1 and "val_accuracy" in history
    metrics = json.loads((student / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0


def tiny_config_overrides():
    from multimodal_tf.testing import TINY_OVERRIDES

    return TINY_OVERRIDES


def test_targets_must_share_classes_and_cover_every_student_id(teacher_run, synth_manifest, tmp_path):
    config, metadata, _ = load_trained_model(teacher_run)
    cache = tmp_path / TEACHER_TARGETS_FILE
    ids = np.concatenate([split_ids(config, s, metadata) for s in ("train", "val")])
    targets = {"ids": ids, "probabilities": None, "label_names": list(metadata.label_names)}
    check_targets(targets, config, metadata, cache)  # complete: passes
    with pytest.raises(ValueError, match=f"no teacher prediction for 1 train example.*{ids[3].decode()}"):
        check_targets({**targets, "ids": np.delete(ids, 3)}, config, metadata, cache)
    with pytest.raises(ValueError, match="teacher classes"):
        check_targets({**targets, "label_names": ["a", "b"]}, config, metadata, cache)


@pytest.mark.slow
def test_distilled_run_evaluates_and_exports_equal_to_the_model(teacher_run, synth_manifest, tmp_path):
    """Three modalities, audio included; the export reloaded in a fresh process equals the student."""
    from tests.test_export import test_reload_in_a_fresh_process_equals_the_in_memory_model as reload_equals

    student = tmp_path / "student"
    tiny = [a for o in tiny_config_overrides() for a in ("--set", o)]
    assert (
        cli.main(
            [
                "distill",
                str(teacher_run),
                *tiny,
                "--set",
                f"data.manifest={synth_manifest}",
                "--out",
                str(student),
            ]
        )
        == 0
    )
    assert cli.main(["evaluate", str(student), "--no-ablation"]) == 0
    report = json.loads((student / "report.json").read_text())
    metrics = json.loads((student / "metrics.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert (
        cli.main(["export", str(student), "--base-path", str(tmp_path / "models"), "--model-name", "s"]) == 0
    )
    reload_equals((student, tmp_path / "models" / "s" / "1"), tmp_path)


def test_views_are_the_hidden_sets_modality_dropout_can_make():
    three = views_of({"image": 0.25, "text": 0.5, "audio": 0.25})
    assert three[0] == () and len(three) == 7  # nothing, each single, each pair; never all three
    assert ("audio", "image", "text") not in three and ("audio", "text") in three
    assert views_of({"image": 0.2, "audio": 0.0}) == [(), ("image",)]  # rate 0: never hidden
    assert views_of({"image": 0.2, "audio": 0.2}) == [(), ("audio",), ("image",)]
    assert views_of({"image": 0.0, "text": 0.0}) == [()]


def test_view_inputs_hide_as_training_does_and_targets_are_the_teacher_on_that_input(teacher_run):
    import tensorflow as tf

    from multimodal_tf.data.features import presence_name
    from multimodal_tf.data.pipeline import make_dataset
    from multimodal_tf.models import ModalityDropout

    config, metadata, teacher = load_trained_model(teacher_run)
    views = views_of({"image": 0.5, "text": 0.5})
    probabilities, _, ids = predict_views(teacher, config, metadata, "train", views)
    for v, hidden in enumerate(views):  # the cache equals evaluation's own missing-modality path
        expected, _, expected_ids = predict_split(teacher, config, metadata, "train", drop=hidden)
        assert expected_ids.tolist() == ids.tolist()
        np.testing.assert_allclose(probabilities[:, v], expected, atol=1e-5)
    assert np.abs(probabilities[:, 1] - probabilities[:, 0]).max() > 1e-3  # views do differ
    x, _, batch_ids = next(
        iter(make_dataset(config, "train", training=False, metadata=metadata, with_ids=True))
    )
    rows = tf.constant([ids.tolist().index(i) for i in batch_ids.numpy().tolist()], tf.int64)
    presence = {m: x[presence_name(m)] for m in ("image", "text")}
    for rates in ({"image": 1.0, "text": 0.0}, {"image": 1.0, "text": 1.0}, {"image": 0.5, "text": 0.5}):
        seen, target = view_targets(probabilities, views, rates, seed=3)(x, rows)
        flags = {m: seen[presence_name(m)].numpy() for m in presence}
        if 0.0 in rates.values():  # deterministic: the flags ModalityDropout leaves in training
            layer = ModalityDropout(rates)(presence, training=True)
            for m in presence:
                np.testing.assert_array_equal(flags[m], layer[m].numpy())
        assert (np.maximum(flags["image"], flags["text"]) == 1).all()  # never both hidden
        for name in x:  # only presence flags change, as in training
            if not name.endswith("present") and name in seen:
                np.testing.assert_array_equal(seen[name].numpy(), x[name].numpy())
        # Each example's target is the teacher's prediction on exactly the student's input.
        np.testing.assert_allclose(target.numpy(), teacher(seen, training=False).numpy(), atol=1e-5)


def test_a_cache_without_views_reads_as_full_and_other_views_need_the_teacher(tmp_path):
    from multimodal_tf.distillation import teacher_targets

    probabilities = _softmax(np.random.default_rng(2).normal(size=(3, 4))).astype(np.float32)
    np.savez(tmp_path / TEACHER_TARGETS_FILE, ids=np.array([b"a", b"b", b"c"]), probabilities=probabilities)
    info = {"teacher": "gone", "fingerprint": "x", "label_names": ["w", "x", "y", "z"]}
    (tmp_path / TEACHER_INFO_FILE).write_text(json.dumps(info))
    targets = teacher_targets(tmp_path / "gone", tmp_path, views=[()], verbose=False)
    assert targets["views"].tolist() == [""] and targets["probabilities"].shape == (3, 1, 4)
    np.testing.assert_array_equal(targets["probabilities"][:, 0], probabilities)
    with pytest.raises(ValueError, match=r"holds the views \[''\], this student needs \['', 'image'\]"):
        teacher_targets(tmp_path / "gone", tmp_path, views=[(), ("image",)], verbose=False)
