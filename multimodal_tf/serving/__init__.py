"""TF Serving-compatible serving: an embedded gRPC/REST model server and its client.

``Client`` speaks TF Serving's gRPC API, so it works against
``tensorflow_model_server`` and against :class:`ModelServer` alike.
"""

from multimodal_tf.serving.client import Client
from multimodal_tf.serving.config import ModelSpec
from multimodal_tf.serving.server import ModelServer

__all__ = ["Client", "ModelServer", "ModelSpec"]
