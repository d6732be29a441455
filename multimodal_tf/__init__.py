"""multimodal-tf: multimodal (image + text + audio) models from data to TF Serving."""

__version__ = "0.1.0"

import os as _os

# Before anything imports TensorFlow: Keras 2 API for `tf.keras` (see compat.py)
# and no C++ INFO/WARNING chatter in CLI output.
_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
