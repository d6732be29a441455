"""TF Serving-compatible serving: an embedded gRPC/REST model server and its client.

``Client`` speaks TF Serving's gRPC API, so it works against
``tensorflow_model_server`` and against :class:`ModelServer` alike.
"""

from multimodal_tf import runtime

# Before anything below imports TensorFlow (a no-op, with a warning, if the
# caller already did): see runtime.protect_concurrent_inference.
runtime.protect_concurrent_inference()

from multimodal_tf.serving.client import Client  # noqa: E402
from multimodal_tf.serving.config import ModelSpec  # noqa: E402
from multimodal_tf.serving.server import ModelServer  # noqa: E402

__all__ = ["Client", "ModelServer", "ModelSpec"]
