"""ONNX export of the feature-level model through tf2onnx, run with onnxruntime."""

from __future__ import annotations

import numpy as np

from multimodal_tf.optimize.quantization import feature_specs

# ONNX opset: 17 is the newest tf2onnx 1.17 converts every op of our models
# with, and onnxruntime >= 1.14 runs it.
OPSET = 17


def convert(model, config) -> bytes:
    """The model on preprocessed features as a serialized ONNX graph (inputs named like the features).

    The batch dimension stays dynamic (no LSTM restriction as in TFLite:
    tf2onnx turns the Keras LSTM into ONNX's own LSTM op).
    """
    import tf2onnx  # noqa: PLC0415  (heavy; only here)

    from multimodal_tf.compat import tf  # noqa: PLC0415

    specs = feature_specs(config)  # refuses raw-string text inputs with a clear message
    names = list(specs)

    # tf2onnx names graph inputs after positional TensorSpecs; the model takes a dict.
    @tf.function
    def predict(*tensors):
        return model(dict(zip(names, tensors, strict=True)), training=False)

    proto, _ = tf2onnx.convert.from_function(predict, input_signature=list(specs.values()), opset=OPSET)
    return proto.SerializeToString()


class ONNXRunner:
    """Runs an ``.onnx`` feature-level model with onnxruntime on feature dicts.

    Args:
        path_or_bytes: the ``.onnx`` file or its bytes.
        num_threads: intra-op threads; None: onnxruntime's default.
    """

    def __init__(self, path_or_bytes, num_threads: int | None = None):
        import onnxruntime  # noqa: PLC0415

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def __call__(self, model_features: dict) -> np.ndarray:
        feeds = {}
        for name, node in self.inputs.items():
            if name not in model_features:
                raise ValueError(f"ONNX model input {name!r} missing; got {sorted(model_features)}")
            dtype = np.int64 if node.type == "tensor(int64)" else np.float32
            feeds[name] = np.asarray(model_features[name]).astype(dtype)
        return np.asarray(self.session.run(None, feeds)[0], np.float32)
