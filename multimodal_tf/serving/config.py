"""Server configuration in TF Serving's own file formats.

* ``--model_config_file``: a ``ModelServerConfig`` text proto
  (``model_config_list { config { name base_path model_version_policy
  version_labels } }``), parsed into TF Serving's proto.
* ``--batching_parameters_file``: a ``BatchingParameters`` text proto.
* ``--monitoring_config_file``: a ``MonitoringConfig`` text proto.
* ``--ssl_config_file``: an ``SSLConfig`` text proto (read by
  :mod:`multimodal_tf.serving.tls`).

tensorflow-serving-api ships no Python module for the last three
(``session_bundle_config.proto``, ``monitoring_config.proto``,
``ssl_config.proto``), so this module declares those messages with TF Serving's field names and types
and lets ``text_format`` parse them: the files are read exactly as the real
server reads them, and a misspelt field is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"


class ServingConfigError(ValueError):
    """A configuration file or flag is invalid; the message names the file and field."""


# === Model config ===


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One served model: where its versions are and which of them to serve.

    ``policy`` is TF Serving's ``model_version_policy``: ``latest`` serves the
    ``num_versions`` highest versions, ``all`` every version, ``specific``
    the listed ``versions``.
    """

    name: str
    base_path: str
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    version_labels: tuple[tuple[str, int], ...] = ()

    def aspired_versions(self, on_disk: Sequence[int]) -> list[int]:
        """The versions to serve, given the version folders that exist."""
        ordered = sorted(set(on_disk), reverse=True)
        if self.policy == "all":
            return ordered
        if self.policy == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[: self.num_versions]

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.version_labels)


def _is_absolute(path: str) -> bool:
    return os.path.isabs(path) or "://" in path


def _spec_from_proto(config: model_server_config_pb2.ModelConfig, where: str) -> ModelSpec:
    if not config.name:
        raise ServingConfigError(f"{where}: a model config has no name")
    if not config.base_path:
        raise ServingConfigError(f"{where}: model {config.name!r} has no base_path")
    if not _is_absolute(config.base_path):
        # As TF Serving's ServerCore: a relative path would depend on the server's cwd.
        raise ServingConfigError(
            f"{where}: Expected model {config.name} to have an absolute path or URI; "
            f"got base_path()={config.base_path}"
        )
    if config.model_platform not in ("", "tensorflow"):
        raise ServingConfigError(
            f"{where}: model {config.name!r}: model_platform {config.model_platform!r} is not supported (only 'tensorflow')"
        )
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice") or "latest"
    num_versions = policy.latest.num_versions if kind == "latest" else 1
    if kind == "latest" and policy.HasField("latest") and num_versions < 1:
        raise ServingConfigError(f"{where}: model {config.name!r}: latest.num_versions must be >= 1")
    versions = tuple(sorted(policy.specific.versions)) if kind == "specific" else ()
    if kind == "specific" and not versions:
        raise ServingConfigError(f"{where}: model {config.name!r}: specific policy lists no versions")
    labels = tuple(sorted(config.version_labels.items()))
    return ModelSpec(config.name, config.base_path, kind, max(num_versions, 1), versions, labels)


def parse_model_config(text: str, where: str = "<model config>") -> list[ModelSpec]:
    """Parses a ``ModelServerConfig`` text proto into model specs."""
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ServingConfigError(f"{where}: {e}") from None
    return specs_from_proto(config, where)


def specs_from_proto(
    config: model_server_config_pb2.ModelServerConfig, where: str = "<model config>"
) -> list[ModelSpec]:
    """Model specs of a ``ModelServerConfig`` (a parsed file or a ReloadConfigRequest)."""
    if config.HasField("custom_model_config"):
        raise ServingConfigError(f"{where}: custom_model_config is not supported; use model_config_list")
    specs = [_spec_from_proto(c, where) for c in config.model_config_list.config]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ServingConfigError(f"{where}: model names appear more than once: {duplicates}")
    return specs


def single_model(name: str, base_path: str | os.PathLike) -> list[ModelSpec]:
    """``--model_name NAME --model_base_path PATH``: policy latest 1, like TF Serving."""
    if not name:
        raise ServingConfigError("--model-name must not be empty")
    return [ModelSpec(name, str(base_path))]


# === Batching, monitoring and SSL (messages declared here) ===

_INT64, _STRING, _BOOL = (
    ".google.protobuf.Int64Value",
    ".google.protobuf.StringValue",
    ".google.protobuf.BoolValue",
)
_FDP = descriptor_pb2.FieldDescriptorProto
# (name, number, type, type_name, label) as in session_bundle_config.proto.
_BATCHING_FIELDS = (
    ("max_batch_size", 1, _FDP.TYPE_MESSAGE, _INT64, _FDP.LABEL_OPTIONAL),
    ("batch_timeout_micros", 2, _FDP.TYPE_MESSAGE, _INT64, _FDP.LABEL_OPTIONAL),
    ("max_enqueued_batches", 3, _FDP.TYPE_MESSAGE, _INT64, _FDP.LABEL_OPTIONAL),
    ("num_batch_threads", 4, _FDP.TYPE_MESSAGE, _INT64, _FDP.LABEL_OPTIONAL),
    ("thread_pool_name", 5, _FDP.TYPE_MESSAGE, _STRING, _FDP.LABEL_OPTIONAL),
    ("allowed_batch_sizes", 6, _FDP.TYPE_INT64, "", _FDP.LABEL_REPEATED),
    ("pad_variable_length_inputs", 7, _FDP.TYPE_BOOL, "", _FDP.LABEL_OPTIONAL),
    ("enable_large_batch_splitting", 9, _FDP.TYPE_MESSAGE, _BOOL, _FDP.LABEL_OPTIONAL),
    ("max_execution_batch_size", 10, _FDP.TYPE_MESSAGE, _INT64, _FDP.LABEL_OPTIONAL),
)


def _declare_messages() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    file = descriptor_pb2.FileDescriptorProto(
        name="multimodal_tf/serving/tf_serving_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    batching = file.message_type.add(name="BatchingParameters")
    for name, number, type_, type_name, label in _BATCHING_FIELDS:
        batching.field.add(name=name, number=number, type=type_, type_name=type_name or None, label=label)
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=_FDP.TYPE_BOOL, label=_FDP.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=_FDP.TYPE_STRING, label=_FDP.LABEL_OPTIONAL)
    monitoring = file.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config",
        number=1,
        type=_FDP.TYPE_MESSAGE,
        type_name=".tensorflow.serving.PrometheusConfig",
        label=_FDP.LABEL_OPTIONAL,
    )
    ssl = file.message_type.add(name="SSLConfig")  # ssl_config.proto: PEM contents, not paths
    for number, name in enumerate(("server_key", "server_cert", "custom_ca"), start=1):
        ssl.field.add(name=name, number=number, type=_FDP.TYPE_STRING, label=_FDP.LABEL_OPTIONAL)
    ssl.field.add(name="client_verify", number=4, type=_FDP.TYPE_BOOL, label=_FDP.LABEL_OPTIONAL)
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in ("BatchingParameters", "MonitoringConfig", "SSLConfig")
    }


_MESSAGES = _declare_messages()
BatchingParameters = _MESSAGES["BatchingParameters"]
MonitoringConfig = _MESSAGES["MonitoringConfig"]
SSLConfig = _MESSAGES["SSLConfig"]


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """Server-side batching; defaults are TF Serving's when a field is omitted."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    num_batch_threads: int = os.cpu_count() or 1
    max_enqueued_batches: int = 10
    allowed_batch_sizes: tuple[int, ...] = ()
    # TF Serving's large batch splitting: a request of up to max_batch_size
    # rows is cut into pieces of at most max_execution_batch_size rows, each
    # batched and run on its own (so no single run is bigger than that).
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None

    @property
    def execution_batch_size(self) -> int:
        """The most rows one run of the model gets."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size:
            return self.max_execution_batch_size
        return self.max_batch_size

    def __post_init__(self):
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if getattr(self, name) < 1:
                raise ServingConfigError(f"batching parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ServingConfigError(
                f"batching parameter batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}"
            )
        execution = self.execution_batch_size
        if not 1 <= execution <= self.max_batch_size:
            raise ServingConfigError(
                f"batching parameter max_execution_batch_size must be in [1, max_batch_size "
                f"{self.max_batch_size}], got {execution}"
            )
        sizes = self.allowed_batch_sizes
        # As TF Serving: the last allowed size is the largest batch one run gets.
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != execution or sizes[0] < 1):
            raise ServingConfigError(
                f"allowed_batch_sizes {list(sizes)} must be increasing and end with "
                f"{'max_execution_batch_size' if execution != self.max_batch_size else 'max_batch_size'} {execution}"
            )


def parse_batching_parameters(text: str, where: str = "<batching parameters>") -> BatchingOptions:
    """Parses a ``BatchingParameters`` text proto (``max_batch_size { value: 32 }`` ...)."""
    message = BatchingParameters()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ServingConfigError(f"{where}: {e}") from None
    unsupported = _unsupported_fields(message)
    if unsupported:
        raise ServingConfigError(f"{where}: batching parameters not supported by this server: {unsupported}")
    defaults = BatchingOptions()
    values = {}
    for name in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
        values[name] = getattr(message, name).value if message.HasField(name) else getattr(defaults, name)
    values["enable_large_batch_splitting"] = message.enable_large_batch_splitting.value
    if message.HasField("max_execution_batch_size"):
        values["max_execution_batch_size"] = message.max_execution_batch_size.value
    try:
        return BatchingOptions(allowed_batch_sizes=tuple(message.allowed_batch_sizes), **values)
    except ServingConfigError as e:
        raise ServingConfigError(f"{where}: {e}") from None


def _unsupported_fields(message) -> list[str]:
    """Fields that change results, which this server does not implement."""
    return ["pad_variable_length_inputs"] if message.pad_variable_length_inputs else []


def load_batching_parameters(path: str | os.PathLike) -> BatchingOptions:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ServingConfigError(f"cannot read batching parameters file {path}: {e}") from None
    return parse_batching_parameters(text, str(path))


def parse_monitoring_config(text: str, where: str = "<monitoring config>") -> str | None:
    """Parses a ``MonitoringConfig`` text proto; returns the metrics path, or None if disabled."""
    message = MonitoringConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ServingConfigError(f"{where}: {e}") from None
    prometheus = message.prometheus_config
    if not prometheus.enable:
        return None
    path = prometheus.path or DEFAULT_METRICS_PATH
    if not path.startswith("/"):
        raise ServingConfigError(f"{where}: prometheus_config.path must start with '/', got {path!r}")
    return path


def load_monitoring_config(path: str | os.PathLike) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ServingConfigError(f"cannot read monitoring config file {path}: {e}") from None
    return parse_monitoring_config(text, str(path))
