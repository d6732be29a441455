"""Contrastive alignment: the loss against NumPy, masking, replicas, the model hook."""

import json
import sys

import numpy as np
import pytest

from multimodal_tf import config as config_lib
from multimodal_tf import launch
from multimodal_tf.alignment import ContrastiveAlignment, embedding_model, info_nce_pair
from multimodal_tf.compat import keras, tf
from multimodal_tf.models import build_model
from multimodal_tf.testing import assert_config_round_trip, random_features, tiny_config
from tests import alignment_worker

ALIGNED = (
    "model.modalities=[image,text,audio]",
    "model.alignment.weight=0.5",
    "model.alignment.pairs=[[image,text],[audio,text]]",
    "model.alignment.dim=8",
)


def numpy_info_nce_rows(a, b, valid, temperature):
    """Per row: (CE(a_i -> b) + CE(b_i -> a)) / 2 over the valid rows, 0 for an invalid row (NumPy)."""
    keep = valid > 0
    out = np.zeros(len(valid))
    a, b = a[keep].astype(np.float64), b[keep].astype(np.float64)
    if len(a) == 0:
        return out
    logits = a @ b.T / temperature

    def cross_entropy(rows):  # positives on the diagonal
        rows = rows - rows.max(axis=1, keepdims=True)
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.diag(log_softmax)

    out[keep] = (cross_entropy(logits) + cross_entropy(logits.T)) / 2
    return out


def numpy_info_nce(a, b, valid, temperature):
    """Symmetric CLIP loss over the rows where ``valid``, written out with NumPy."""
    keep = valid > 0
    return float(numpy_info_nce_rows(a, b, valid, temperature)[keep].mean()) if keep.any() else 0.0


@pytest.fixture(scope="module")
def mirrored():
    """One 2-replica strategy for the module: two in one process reuse collective keys and clash."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_loss_equals_numpy_reference_with_a_missing_pair_row():
    rng = np.random.default_rng(0)
    a, b = unit_rows(rng, 6, 5), unit_rows(rng, 6, 5)
    valid = np.array([1, 1, 0, 1, 1, 1], np.float32)  # row 2: one modality absent
    got = float(info_nce_pair(a, b, valid, 0.1))
    np.testing.assert_allclose(got, numpy_info_nce(a, b, valid, 0.1), rtol=1e-5)
    # The absent row is neither anchor nor negative: changing its vectors changes nothing.
    a[2], b[2] = a[0], b[0]
    np.testing.assert_allclose(float(info_nce_pair(a, b, valid, 0.1)), got, rtol=1e-6)
    assert float(info_nce_pair(a, b, np.zeros(6, np.float32), 0.1)) == 0.0


def test_layer_weights_pairs_and_round_trips():
    rng = np.random.default_rng(1)
    emb = {m: unit_rows(rng, 4, 3) for m in ("image", "text", "audio")}
    presence = {m: np.ones(4, np.float32) for m in emb}
    presence["audio"][1] = 0.0
    layer = ContrastiveAlignment([["image", "text"], ["audio", "text"]], temperature=0.2, weight=0.5)
    expected = 0.5 * np.mean(
        [
            numpy_info_nce(emb["image"], emb["text"], presence["image"] * presence["text"], 0.2),
            numpy_info_nce(emb["audio"], emb["text"], presence["audio"] * presence["text"], 0.2),
        ]
    )
    np.testing.assert_allclose(float(layer(emb, presence)), expected, rtol=1e-5)
    assert_config_round_trip(layer)


def test_two_replicas_gather_negatives_and_match_one_replica(mirrored):
    strategy = mirrored
    rng = np.random.default_rng(2)
    a, b = unit_rows(rng, 8, 4), unit_rows(rng, 8, 4)
    valid = np.array([1, 0, 1, 1, 1, 1, 0, 1], np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((a, b, valid)).batch(8)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

    def step(a_local, b_local, valid_local):
        with tf.GradientTape() as tape:
            tape.watch(a_local)
            loss = info_nce_pair(a_local, b_local, valid_local, 0.1)
        return loss, tape.gradient(loss, a_local)

    losses, grads = strategy.run(tf.function(step), args=batch)
    replicas = strategy.experimental_local_results(losses)
    assert len(replicas) == 2
    # Keras averages the replicas' losses and sums their gradients scaled by 1/R.
    mean = float(strategy.reduce("MEAN", losses, axis=None))
    np.testing.assert_allclose(mean, numpy_info_nce(a, b, valid, 0.1), rtol=1e-5)
    a_t = tf.constant(a)
    with tf.GradientTape() as tape:
        tape.watch(a_t)
        single = info_nce_pair(a_t, b, valid, 0.1)
    expected_grad = tape.gradient(single, a_t).numpy()
    got_grad = np.concatenate([g.numpy() for g in strategy.experimental_local_results(grads)]) / 2
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_model_adds_the_loss_and_embeddings_are_unit_vectors():
    config = tiny_config(*ALIGNED)
    model = build_model(config, num_classes=3, vocab_size=50)
    x = random_features(config, batch_size=4)
    x["audio_present"][2] = 0.0
    model(x)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0
    for modality in ("image", "text", "audio"):
        embedded = embedding_model(model, modality)(x[modality]).numpy()
        assert embedded.shape == (4, 8)
        np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-5)
    # The model's loss is the NumPy loss of those embeddings.
    emb = {m: embedding_model(model, m)(x[m]).numpy() for m in ("image", "text", "audio")}
    expected = 0.5 * np.mean(
        [
            numpy_info_nce(emb["image"], emb["text"], x["image_present"] * x["text_present"], 0.07),
            numpy_info_nce(emb["audio"], emb["text"], x["audio_present"] * x["text_present"], 0.07),
        ]
    )
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-4)


def test_fit_under_mirrored_strategy_reports_the_one_replica_loss(mirrored):
    config = tiny_config(*ALIGNED, "model.alignment.classification_weight=0")
    x = random_features(config, batch_size=8)
    x["text_present"][3] = 0.0
    y = np.arange(8) % 3
    losses = []
    for strategy in (tf.distribute.get_strategy(), mirrored):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config, num_classes=3, vocab_size=50)
            model.compile(loss="sparse_categorical_crossentropy", loss_weights=[0.0])
        losses.append(model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)["loss"])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


@pytest.mark.slow
def test_two_worker_processes_gather_negatives_across_workers_and_end_with_identical_weights(tmp_path):
    """MultiWorkerMirroredStrategy, 2 processes on 127.0.0.1 (tests/alignment_worker.py).

    The alignment loss and a masked regression loss (uneven labels per
    worker) equal their one-device values on the global batch.
    """
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tests.alignment_worker", str(out)]
    code = launch.launch(command, workers=2, log_dir=tmp_path / "logs", timeout=240, echo_chief=False)
    assert code == 0, (tmp_path / "logs" / "worker-0.log").read_text()[-3000:]
    summaries = [json.loads((out / f"worker-{i}.json").read_text()) for i in (0, 1)]

    # The NumPy references over the GLOBAL batch (both workers' rows), from
    # the initial weights with one device.
    config = tiny_config(*alignment_worker.OVERRIDES)
    features, labels = alignment_worker.global_batch(config)
    model = build_model(
        config,
        alignment_worker.NUM_CLASSES,
        alignment_worker.VOCAB_SIZE,
        target_sizes=alignment_worker.TARGET_SIZES,
    )
    with np.load(out / "initial.npz") as saved:
        model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
    emb = {m: embedding_model(model, m)(features[m]).numpy() for m in ("audio", "text")}
    valid = features["audio_present"] * features["text_present"]
    temperature = config.model.alignment.temperature
    rows = numpy_info_nce_rows(emb["audio"], emb["text"], valid, temperature)
    expected = rows.sum() / valid.sum()
    # The regression target: squared error over the rows with a score (3 on
    # worker 0, 1 on worker 1), one mean over the global batch.
    squared = (model(features)["score"].numpy()[:, 0] - labels["score"][:, 0]) ** 2
    present = labels["score"][:, 1] > 0
    expected_score = squared[present].mean()
    halves = [alignment_worker.worker_rows(worker, 2) for worker in (0, 1)]
    per_worker_score = np.mean([squared[rows_][present[rows_]].mean() for rows_ in halves])
    assert abs(per_worker_score - expected_score) > 0.1 * expected_score  # the data tells them apart
    for worker, summary in enumerate(summaries):
        assert summary["num_replicas_in_sync"] == 2
        assert summary["initial_sha256"] == summaries[0]["initial_sha256"]
        # (a) A worker's share: its own rows against the negatives of BOTH
        # workers, 2 x (their sum) / (global valid pairs); Keras reports the
        # mean of the shares, the global InfoNCE. float32 encoders against a
        # float64 reference: 1e-4 relative, as for one device above.
        mine = halves[worker]
        np.testing.assert_allclose(summary["share"], [2 * rows[mine].sum() / valid.sum()], rtol=1e-4)
        np.testing.assert_allclose(summary["first_step_alignment_loss"], expected, rtol=1e-4)
        np.testing.assert_allclose(summary["first_step_score_loss"], expected_score, rtol=1e-4)
        # The category target weighs 0: the loss is alignment + score.
        np.testing.assert_allclose(summary["first_step_loss"], expected + expected_score, rtol=1e-4)
        # Without the cross-worker gather a worker would report its half's own InfoNCE.
        local = numpy_info_nce(emb["audio"][mine], emb["text"][mine], valid[mine], temperature)
        assert abs(local - summary["share"][0]) > 0.05 * local
    # (b) Both workers applied the same summed gradients.
    assert summaries[0]["final_sha256"] == summaries[1]["final_sha256"] != summaries[0]["initial_sha256"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.alignment.pairs=[[image,image]]", "two different modalities"),
        ("model.alignment.pairs=[[image,smell]]", "two different modalities"),
        ("model.alignment.weight=1", "needs at least one pair"),
    ],
)
def test_bad_alignment_config_is_named(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load((), [override])


def test_alignment_modality_must_be_a_model_modality():
    with pytest.raises(config_lib.ConfigError, match="not in model.modalities"):
        config_lib.load((), ["model.modalities=[image,text]", *ALIGNED[1:3]])
