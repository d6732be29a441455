"""One worker of the 2-worker alignment test (tests/test_alignment.py): ``python -m tests.alignment_worker OUT``.

Every worker trains the same tiny aligned model, with a regression target
whose labels are partly missing, under MultiWorkerMirroredStrategy
(``TF_CONFIG`` from ``mmtf launch``) on its own half of
:func:`global_batch`, and writes ``OUT/<task>-<index>.json``: its replica's
share of the first step's alignment loss (computed before any update), what
Keras reports for the first step, and a checksum of its final weights;
worker 0 also writes the initial weights (``initial.npz``) from which the
test computes the NumPy references over the global batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from multimodal_tf import distribute
from multimodal_tf import targets as targets_lib
from multimodal_tf.alignment import embedding_model
from multimodal_tf.compat import keras, tf
from multimodal_tf.data.features import presence_name
from multimodal_tf.models import build_model, loss_for
from multimodal_tf.testing import random_features, tiny_config

# No BatchNorm (image/cnn, audio/cnn have it) and no dropout: a replica's
# forward pass on its half is then row for row the one-device pass on the
# global batch, so the loss can be compared with a reference on that batch.
OVERRIDES = (
    "model.modalities=[text,audio]",
    "model.text_encoder.name=text/bow",
    "model.text_encoder.dropout_rate=0",
    "model.audio_encoder.name=audio/lstm",
    "model.audio_encoder.dropout_rate=0",
    "model.head.dropout_rate=0",
    "model.alignment.weight=1",
    "model.alignment.pairs=[[audio,text]]",
    "model.alignment.dim=8",
    "model.alignment.classification_weight=1",
    "data.targets=[{name: category, column: label, type: multiclass, loss_weight: 0},"
    " {name: score, column: rating, type: regression}]",
)
TARGET_SIZES = {"score": 1}
GLOBAL_BATCH = 8
NUM_CLASSES, VOCAB_SIZE = 3, 50
STEPS = 3


def global_batch(config) -> tuple[dict, dict]:
    """The 8 examples both workers draw from, and their labels: worker w holds rows 4w..4w+3.

    One text is missing on worker 0 and two audio clips on worker 1, so
    each worker holds a different number of valid pairs (3 and 2); the
    score (packed ``[value, present]``) is present in 3 rows of worker 0
    and 1 of worker 1.
    """
    features = random_features(config, batch_size=GLOBAL_BATCH, seed=7, vocab_size=VOCAB_SIZE)
    features[presence_name("text")][1] = 0.0
    features[presence_name("audio")][[5, 6]] = 0.0
    present = np.array([1, 1, 0, 1, 0, 0, 1, 0], np.float32)
    scores = np.linspace(-2.0, 2.0, GLOBAL_BATCH, dtype=np.float32) * present
    labels = {
        "category": np.arange(GLOBAL_BATCH) % NUM_CLASSES,
        "score": np.stack([scores, present], axis=1),
    }
    return features, labels


def worker_rows(worker: int, workers: int) -> slice:
    size = GLOBAL_BATCH // workers
    return slice(worker * size, (worker + 1) * size)


def main(out: Path) -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # first: it starts this task's server
    task_type, index = distribute.task_info()
    config = tiny_config(*OVERRIDES)
    features, labels = global_batch(config)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        rows = worker_rows(context.input_pipeline_id, context.num_input_pipelines)
        local = ({k: v[rows] for k, v in features.items()}, {k: v[rows] for k, v in labels.items()})
        return tf.data.Dataset.from_tensors(local).repeat()

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(config, NUM_CLASSES, VOCAB_SIZE, target_sizes=TARGET_SIZES)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=loss_for(config),
            loss_weights=targets_lib.loss_weights(config.data),
        )
    initial = model.get_weights()
    modalities = ("text", "audio")
    embedders = {m: embedding_model(model, m) for m in modalities}
    alignment = model.get_layer("contrastive_alignment")

    @tf.function
    def share(batch):
        x = batch[0]
        embeddings = {m: embedders[m](x[m], training=True) for m in modalities}
        return alignment(embeddings, {m: x[presence_name(m)] for m in modalities})

    local = strategy.experimental_local_results(strategy.run(share, args=(next(iter(dataset)),)))
    history = model.fit(dataset, epochs=STEPS, steps_per_epoch=1, verbose=0).history
    summary = {
        "num_replicas_in_sync": strategy.num_replicas_in_sync,
        "share": [float(v) for v in local],
        "first_step_loss": history["loss"][0],
        "first_step_alignment_loss": history["alignment_loss"][0],
        "first_step_score_loss": history["score_loss"][0],
        "initial_sha256": distribute.weights_checksum(initial),
        "final_sha256": distribute.weights_checksum(model.get_weights()),
    }
    out.mkdir(parents=True, exist_ok=True)
    if index == 0:
        np.savez(out / "initial.npz", *initial)
    (out / f"{task_type}-{index}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
