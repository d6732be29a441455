"""One worker of the 2-worker alignment test (tests/test_alignment.py): ``python -m tests.alignment_worker OUT``.

Every worker trains the same tiny aligned model under
MultiWorkerMirroredStrategy (``TF_CONFIG`` from ``mmtf launch``) on its own
half of :func:`global_batch`, and writes ``OUT/<task>-<index>.json``: its
replica's share of the first step's alignment loss (computed before any
update), what Keras reports for the first step, and a checksum of its final
weights; worker 0 also writes the initial weights (``initial.npz``) from
which the test computes the NumPy reference over the global batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from multimodal_tf import distribute
from multimodal_tf.alignment import embedding_model
from multimodal_tf.compat import keras, tf
from multimodal_tf.data.features import presence_name
from multimodal_tf.models import build_model
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
    "model.alignment.classification_weight=0",
)
GLOBAL_BATCH = 8
NUM_CLASSES, VOCAB_SIZE = 3, 50
STEPS = 3


def global_batch(config) -> tuple[dict, np.ndarray]:
    """The 8 examples both workers draw from: worker w holds rows 4w..4w+3.

    One text is missing on worker 0 and two audio clips on worker 1, so
    each worker holds a different number of valid pairs (3 and 2).
    """
    features = random_features(config, batch_size=GLOBAL_BATCH, seed=7, vocab_size=VOCAB_SIZE)
    features[presence_name("text")][1] = 0.0
    features[presence_name("audio")][[5, 6]] = 0.0
    return features, np.arange(GLOBAL_BATCH) % NUM_CLASSES


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
        local = ({k: v[rows] for k, v in features.items()}, labels[rows])
        return tf.data.Dataset.from_tensors(local).repeat()

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(config, NUM_CLASSES, VOCAB_SIZE)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy", loss_weights=[0.0]
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
        "initial_sha256": distribute.weights_checksum(initial),
        "final_sha256": distribute.weights_checksum(model.get_weights()),
    }
    out.mkdir(parents=True, exist_ok=True)
    if index == 0:
        np.savez(out / "initial.npz", *initial)
    (out / f"{task_type}-{index}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
