"""``mmtf export``: versioned SavedModels for TF Serving with raw-input signatures.

Every signature calls the same :class:`Preprocessor` the training pipeline
uses, so serving cannot skew from training. Layout (TF Serving's)::

    BASE/NAME/VERSION/saved_model.pb, variables/, assets.extra/
        tf_serving_warmup_requests   TFRecord of PredictionLog
        config.yaml, metadata.json, label_names.txt
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf.compat import tf
from multimodal_tf.config import MULTILABEL, REGRESSION
from multimodal_tf.data import features
from multimodal_tf.data.cache import default_tfrecord_dir
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.run_dir import METADATA_FILE, load_run, load_trained_model
from multimodal_tf.serving_target import (  # noqa: F401  (ExportError, check_ops, ... are part of this API)
    SERVING_IMAGES,
    ExportError,
    allowed_ops,
    check_ops,
    default_target_serving,
    graph_ops,
    installed_text_ops,
    target_text_ops,
)
from multimodal_tf.signatures import (
    ASSETS_EXTRA,
    CLASS_ID,
    CLASS_NAME,
    CLASSES,
    CLASSIFY_INPUTS,
    CLASSIFY_METHOD,
    CLASSIFY_SIGNATURE,
    DEFAULT_SIGNATURE,
    EXAMPLES_INPUT,
    LABELS,
    PREDICT_EXAMPLES_SIGNATURE,
    PREDICT_FEATURES_SIGNATURE,
    PROBABILITIES,
    REGRESS_METHOD,
    REGRESS_OUTPUTS,
    REGRESS_SIGNATURE,
    SCORES,
    VALUE,
    WARMUP_FILE_NAME,
    target_output,
)


class ServingModule(tf.Module):
    """Preprocessing + model + label names, with TF Serving signatures.

    Args:
        model: a model from ``build_model`` with trained weights.
        preprocessor: the training pipeline's preprocessor.
        label_names: class names, index = class id.
        head_type: ``multiclass``, ``binary`` or ``multilabel``.
        feature_specs: the model's preprocessed inputs (``predict_features``).
        targets: with ``data.targets``, (name, type, label names) per target,
            primary first: the model then outputs a dict; the primary target
            fills the usual outputs and Classify, every target adds its
            ``<target>/...`` outputs, and the first regression target gets
            a ``regress`` signature (TF Serving's Regress API).
    """

    def __init__(
        self,
        model,
        preprocessor: Preprocessor,
        label_names,
        head_type: str,
        feature_specs: dict,
        targets: tuple = (),
    ):
        super().__init__(name="serving")
        self.model = model
        # Traced once and shared by every signature: tracing the model (LSTMs
        # especially) per signature made exports several times slower.
        self.predict_probabilities = tf.function(
            lambda model_features: model(model_features, training=False), input_signature=[feature_specs]
        )
        self.feature_specs = feature_specs
        self.preprocessor = preprocessor
        self.label_names = tf.constant(list(label_names))
        self.head_type = head_type
        self.modalities = preprocessor.modalities
        self.targets = tuple(targets)
        self.target_labels = {
            name: tf.constant(list(names)) for name, kind, names in self.targets if kind == MULTILABEL
        }
        self.regression = next((name for name, kind, _ in self.targets if kind == REGRESSION), None)

    def _target_outputs(self, predicted: dict) -> dict:
        """``<target>/...`` outputs of every target (see signatures.target_output)."""
        outputs = {}
        for name, kind, _ in self.targets:
            value = predicted[name]
            if kind == REGRESSION:
                outputs[target_output(name, VALUE)] = value[:, 0]
                continue
            outputs[target_output(name, PROBABILITIES)] = value
            if kind == MULTILABEL:
                labels = self.target_labels[name]
                outputs[target_output(name, LABELS)] = tf.tile(labels[None, :], [tf.shape(value)[0], 1])
            else:
                class_id = tf.argmax(value, axis=-1, output_type=tf.int64)
                outputs[target_output(name, CLASS_ID)] = class_id
                outputs[target_output(name, CLASS_NAME)] = tf.gather(self.label_names, class_id)
        return outputs

    def _outputs(self, model_features: dict) -> dict:
        probabilities = self.predict_probabilities(model_features)
        extra = {}
        if self.targets:
            extra = self._target_outputs(probabilities)
            probabilities = probabilities[self.targets[0][0]]
        if self.head_type == "binary":  # one sigmoid unit -> [P(0), P(1)]
            probabilities = tf.concat([1.0 - probabilities, probabilities], axis=-1)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        outputs = {
            PROBABILITIES: probabilities,
            CLASS_ID: class_id,
            CLASS_NAME: tf.gather(self.label_names, class_id),
        }
        for modality in self.modalities:
            name = features.presence_name(modality)
            outputs[name] = model_features[name]
        outputs.update(extra)
        return outputs

    @tf.function
    def serve_raw(self, raw):
        return self._outputs(self.preprocessor(raw))

    @tf.function
    def serve_examples(self, examples):
        return self._outputs(self.preprocessor(self.preprocessor.parse_examples(examples)))

    @tf.function
    def serve_features(self, model_features):
        return self._outputs(model_features)

    @tf.function
    def classify(self, inputs):
        outputs = self._outputs(self.preprocessor(self.preprocessor.parse_examples(inputs)))
        scores = outputs[PROBABILITIES]
        classes = tf.tile(self.label_names[None, :], [tf.shape(scores)[0], 1])
        return {CLASSES: classes, SCORES: scores}

    @tf.function
    def regress(self, inputs):
        outputs = self._outputs(self.preprocessor(self.preprocessor.parse_examples(inputs)))
        return {REGRESS_OUTPUTS: outputs[target_output(self.regression, VALUE)]}

    def signatures(self) -> dict:
        string = lambda name: tf.TensorSpec([None], tf.string, name=name)  # noqa: E731
        extra = {}
        if self.regression:
            extra[REGRESS_SIGNATURE] = self.regress.get_concrete_function(string(CLASSIFY_INPUTS))
        embedding = getattr(self, "embedding", None)  # model.alignment: retrieval.EmbeddingModule
        if embedding is not None:
            extra |= embedding.signatures()
        return {
            **extra,
            DEFAULT_SIGNATURE: self.serve_raw.get_concrete_function({m: string(m) for m in self.modalities}),
            PREDICT_EXAMPLES_SIGNATURE: self.serve_examples.get_concrete_function(string(EXAMPLES_INPUT)),
            CLASSIFY_SIGNATURE: self.classify.get_concrete_function(string(CLASSIFY_INPUTS)),
            PREDICT_FEATURES_SIGNATURE: self.serve_features.get_concrete_function(self.feature_specs),
        }

    def save(self, directory: str | Path) -> None:
        """Writes the SavedModel with its signatures, ``classify`` marked for TF Serving's Classify."""
        tf.saved_model.save(self, str(directory), signatures=self.signatures())
        set_method_name(directory, CLASSIFY_SIGNATURE, CLASSIFY_METHOD)
        if self.regression:
            set_method_name(directory, REGRESS_SIGNATURE, REGRESS_METHOD)


def serving_targets(config, metadata) -> tuple:
    """(name, type, label names) per target of ``data.targets`` (empty without targets)."""
    out = []
    for i, target in enumerate(config.data.targets):
        names = metadata.label_names if i == 0 else metadata.targets[target.name]["label_names"]
        out.append((target.name, target.type, tuple(names)))
    return tuple(out)


def set_method_name(saved_model_dir: str | Path, signature: str, method_name: str) -> None:
    """Rewrites a signature's method_name (TF2 always writes ``.../predict``)."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(saved_model_dir) / "saved_model.pb"
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(path.read_bytes())
    for meta_graph in proto.meta_graphs:
        meta_graph.signature_def[signature].method_name = method_name
    path.write_bytes(proto.SerializeToString())


def write_warmup(path: Path, config, metadata, model_name: str, count: int = 8) -> int:
    """Writes up to ``count`` real requests (from the test/val TFRecords) as PredictionLogs."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    directory = Path(default_tfrecord_dir(config.data))
    split = next((s for s in ("test", "val", "train") if s in metadata.shards), None)
    records = []
    if split and (directory / metadata.shards[split][0]).exists():
        files = [str(directory / f) for f in metadata.shards[split]]
        parsed = (
            tf.data.TFRecordDataset(files)
            .take(count)
            .batch(count)
            .map(lambda s: tf.io.parse_example(s, features.raw_feature_spec()))
        )
        records = list(parsed)
    modalities = config.model.modalities
    with tf.io.TFRecordWriter(str(path)) as writer:
        written = 0
        for batch in records:
            for i in range(int(tf.shape(batch[features.ID])[0])):
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=DEFAULT_SIGNATURE)
                )
                for modality in modalities:
                    request.inputs[modality].CopyFrom(tf.make_tensor_proto([batch[modality][i].numpy()]))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
                written += 1
    return written


@contextlib.contextmanager
def staged_version(model_dir: Path, version: int):
    """A hidden temporary folder in ``model_dir``, renamed to ``model_dir/version`` when the block succeeds.

    TF Serving ignores non-numeric folders, so a half-written version is
    invisible to a polling server; on any error the folder is removed.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        yield tmp
        os.rename(tmp, Path(model_dir) / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.exists() else []
    return max(versions, default=0) + 1


def export_run(
    run_dir: str | Path,
    base_path: str | Path,
    model_name: str,
    version: int | None = None,
    target_serving: str | None = None,
    model=None,
) -> Path:
    """Exports a run's best weights to ``BASE/NAME/VERSION`` atomically.

    Args:
        run_dir: the training run.
        base_path: TF Serving's model base path.
        model_name: the model's name (a folder under ``base_path``).
        version: the version number; None: one above the highest there.
        target_serving: the TF Serving line whose ops the graph must keep
            to (see :func:`check_ops`); None: the installed TF's.
        model: the run's model with other weights (``mmtf optimize --prune``);
            None: the run's best weights.
    """
    target_text_ops(target_serving or default_target_serving())  # an unknown target fails before work
    if model is None:
        config, metadata, model = load_trained_model(run_dir)
    else:
        config, metadata = load_run(run_dir)
    model_dir = Path(base_path) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; pick another --version")
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    specs = features.model_feature_specs(config.data, config.model)
    module = ServingModule(
        model,
        preprocessor,
        metadata.label_names,
        config.model.head.type,
        specs,
        serving_targets(config, metadata),
    )
    if config.model.alignment.enabled:
        from multimodal_tf.retrieval import EmbeddingModule  # noqa: PLC0415

        module.embedding = EmbeddingModule(model, preprocessor, config.model.alignment.modalities)
    with staged_version(model_dir, version) as tmp:
        module.save(tmp)
        check_ops(tmp, target_serving)
        extra = tmp / ASSETS_EXTRA
        extra.mkdir(exist_ok=True)
        config_lib.save(config, extra / "config.yaml")
        shutil.copy(Path(run_dir) / METADATA_FILE, extra / METADATA_FILE)
        (extra / "label_names.txt").write_text("\n".join(metadata.label_names) + "\n", encoding="utf-8")
        write_warmup(extra / WARMUP_FILE_NAME, config, metadata, model_name)
    return final
