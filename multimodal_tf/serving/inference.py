"""Predict / Classify / Regress / GetModelMetadata on one servable, proto in, proto out.

``run`` is how a signature is executed: directly, or through the batcher.
The gRPC servicer, the REST handler and warmup replay all come through here,
so the three answer identically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
    regression_pb2,
)

from multimodal_tf.compat import tf
from multimodal_tf.serving import tensors
from multimodal_tf.serving.errors import Code, ServingError, invalid_argument
from multimodal_tf.serving.servable import (
    DEFAULT_SIGNATURE,
    REGRESS_METHOD,
    Servable,
)
from multimodal_tf.signatures import CLASSES, CLASSIFY_INPUTS, CLASSIFY_METHOD, REGRESS_OUTPUTS, SCORES
from multimodal_tf.signatures import WARMUP_PATH as WARMUP_FILE

Runner = Callable[[Servable, str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def direct_run(
    servable: Servable, signature_name: str, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    return servable.run(signature_name, inputs)


def fill_model_spec(spec: model_pb2.ModelSpec, servable: Servable, signature_name: str) -> None:
    spec.name = servable.name
    spec.version.value = servable.version
    spec.signature_name = signature_name


def predict(
    servable: Servable,
    request: predict_pb2.PredictRequest,
    run: Runner,
    max_elements: int,
    max_rows: int | None = None,
) -> predict_pb2.PredictResponse:
    name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    servable.signature(name)  # FAILED_PRECONDITION before any conversion work
    inputs = {
        key: tensors.to_ndarray(proto, key, max_elements, max_rows) for key, proto in request.inputs.items()
    }
    outputs = predict_arrays(servable, name, inputs, request.output_filter, run)
    response = predict_pb2.PredictResponse()
    fill_model_spec(response.model_spec, servable, name)
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tensors.to_proto(value))
    return response


def predict_arrays(
    servable: Servable, signature_name: str, inputs: Mapping[str, np.ndarray], output_filter, run: Runner
) -> dict[str, np.ndarray]:
    """Predict on numpy inputs; returns the filtered outputs (all when the filter is empty)."""
    name = signature_name or DEFAULT_SIGNATURE
    output_names = tensors.check_output_filter(servable.signature(name), output_filter)
    outputs = run(servable, name, inputs)
    return {key: outputs[key] for key in output_names}


def _example_signature(servable: Servable, signature_name: str, method: str, what: str):
    name = signature_name or DEFAULT_SIGNATURE
    signature = servable.signature(name, Code.INVALID_ARGUMENT)
    if signature.method_name != method:
        raise invalid_argument(
            f"Expected {what} signature method_name to be {method}. Was: {signature.method_name} "
            f"(signature '{name}')"
        )
    if list(signature.inputs) != [CLASSIFY_INPUTS]:
        raise ServingError(
            Code.FAILED_PRECONDITION,
            f"{what} signature '{name}' must have exactly one input named '{CLASSIFY_INPUTS}', has {sorted(signature.inputs)}",
        )
    return name


def _batch_matrix(outputs: Mapping[str, np.ndarray], key: str, num_examples: int) -> np.ndarray | None:
    if key not in outputs:
        return None
    value = outputs[key]
    if value.ndim != 2 or value.shape[0] != num_examples:
        raise ServingError(
            Code.INTERNAL,
            f"Expected output '{key}' of shape [batch_size={num_examples}, num_classes], got {list(value.shape)}",
        )
    return value


def classify(
    servable: Servable, request: classification_pb2.ClassificationRequest, run: Runner
) -> classification_pb2.ClassificationResponse:
    name = _example_signature(servable, request.model_spec.signature_name, CLASSIFY_METHOD, "classification")
    examples = tensors.serialized_examples(request.input)
    outputs = run(servable, name, {CLASSIFY_INPUTS: examples})
    classes = _batch_matrix(outputs, CLASSES, len(examples))
    scores = _batch_matrix(outputs, SCORES, len(examples))
    if classes is None and scores is None:
        raise ServingError(
            Code.INTERNAL, f"classification signature '{name}' has neither '{CLASSES}' nor '{SCORES}'"
        )
    if classes is not None and scores is not None and classes.shape != scores.shape:
        raise ServingError(
            Code.INTERNAL, f"'{CLASSES}' {classes.shape} and '{SCORES}' {scores.shape} differ in shape"
        )
    response = classification_pb2.ClassificationResponse()
    fill_model_spec(response.model_spec, servable, name)
    width = (classes if classes is not None else scores).shape[1]
    for row in range(len(examples)):
        classification = response.result.classifications.add()
        for column in range(width):
            entry = classification.classes.add()
            if classes is not None:
                label = classes[row, column]
                entry.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
            if scores is not None:
                entry.score = float(scores[row, column])
    return response


def regress(
    servable: Servable, request: regression_pb2.RegressionRequest, run: Runner
) -> regression_pb2.RegressionResponse:
    name = _example_signature(servable, request.model_spec.signature_name, REGRESS_METHOD, "regression")
    examples = tensors.serialized_examples(request.input)
    outputs = run(servable, name, {CLASSIFY_INPUTS: examples})
    values = outputs.get(REGRESS_OUTPUTS)
    if values is None or values.shape not in ((len(examples),), (len(examples), 1)):
        shape = None if values is None else list(values.shape)
        raise ServingError(
            Code.INTERNAL,
            f"Expected output '{REGRESS_OUTPUTS}' of shape [batch_size] or [batch_size, 1], got {shape}",
        )
    response = regression_pb2.RegressionResponse()
    fill_model_spec(response.model_spec, servable, name)
    for value in values.reshape(-1):
        response.result.regressions.add(value=float(value))
    return response


def _model_of(spec: model_pb2.ModelSpec) -> model_pb2.ModelSpec:
    """The spec without its signature: which model version it names."""
    model = model_pb2.ModelSpec()
    model.CopyFrom(spec)
    model.ClearField("signature_name")
    return model


def multi_inference(
    servable: Servable, request: inference_pb2.MultiInferenceRequest, run: Runner
) -> inference_pb2.MultiInferenceResponse:
    """Classify and Regress tasks over one shared ``Input`` (TF Serving's multi_inference.cc).

    Every task must name the same model and version, and each signature may
    be used once. The tasks run one after another on the same examples.
    """
    tasks = list(request.tasks)
    if not tasks:
        raise invalid_argument("Expected at least one task")
    signatures = set()
    for task in tasks:
        if _model_of(task.model_spec) != _model_of(tasks[0].model_spec):
            raise invalid_argument(
                "All ModelSpecs in a MultiInferenceRequest must access the same model version."
            )
        if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise invalid_argument(f"Unsupported signature method_name: {task.method_name}")
        signature = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature in signatures:
            raise invalid_argument(f"Duplicate evaluation of signature: {signature}")
        signatures.add(signature)
    response = inference_pb2.MultiInferenceResponse()
    for task in tasks:
        result = response.results.add()
        if task.method_name == CLASSIFY_METHOD:
            sub = classification_pb2.ClassificationRequest(model_spec=task.model_spec, input=request.input)
            answer = classify(servable, sub, run)
            result.classification_result.CopyFrom(answer.result)
        else:
            sub = regression_pb2.RegressionRequest(model_spec=task.model_spec, input=request.input)
            answer = regress(servable, sub, run)
            result.regression_result.CopyFrom(answer.result)
        result.model_spec.CopyFrom(answer.model_spec)
    return response


def metadata(
    servable: Servable, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    fields = list(request.metadata_field)
    if not fields:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != "signature_def":
            raise invalid_argument(f"Metadata field {field} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    fill_model_spec(response.model_spec, servable, "")
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata["signature_def"].Pack(signature_map)
    return response


def replay_warmup(servable: Servable, run: Runner = direct_run, max_elements: int = 1 << 28) -> int:
    """Replays ``assets.extra/tf_serving_warmup_requests``; returns how many ran.

    A failing record fails the load, as in TF Serving: a version whose
    warmup does not run would fail its first real requests too.
    """
    path = servable.export_dir / WARMUP_FILE
    if not path.is_file():
        return 0
    count = 0
    for count, record in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator(), start=1):
        if count > MAX_WARMUP_RECORDS:
            raise ValueError(f"{path}: more than {MAX_WARMUP_RECORDS} warmup records")
        log = prediction_log_pb2.PredictionLog.FromString(record)
        kind = log.WhichOneof("log_type")
        try:
            if kind == "predict_log":
                predict(servable, log.predict_log.request, run, max_elements)
            elif kind == "classify_log":
                classify(servable, log.classify_log.request, run)
            elif kind == "regress_log":
                regress(servable, log.regress_log.request, run)
            else:
                raise ValueError(f"warmup log type {kind!r} is not supported")
        except ServingError as e:
            raise ValueError(f"warmup record {count} ({kind}) failed: {e.code.name}: {e.message}") from None
    return count
