"""The one place that knows Keras-version details.

The project uses the Keras 2 API through ``tf_keras`` (see docs/dependencies.md):
bert-for-tf2 only runs under it, and Keras 3 ``fit()`` does not work under
MultiWorkerMirroredStrategy or ParameterServerStrategy. Every other
module imports ``keras`` from here, so a later move to Keras 3 touches one file.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys

# Must be set before TensorFlow is imported anywhere: it makes `tf.keras`
# resolve to tf_keras, which bert-for-tf2 and tfmot rely on.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TF's C++ INFO/WARNING chatter hides real output in CLI runs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf", "import_bert", "import_keras_tuner", "message_to_dict"]


@contextlib.contextmanager
def _aliased_modules(aliases: dict[str, object]):
    """Temporarily points ``sys.modules`` entries at other modules."""
    saved = {name: sys.modules.get(name) for name in aliases}
    sys.modules.update(aliases)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_bert():
    """Imports bert-for-tf2 so that it builds tf_keras layers.

    bert-for-tf2 imports ``tensorflow.python.keras``; under TF 2.17 that is a
    stale Keras whose layers fail with "Layer input_spec must be an instance of
    InputSpec" inside tf_keras models. Pointing it at tf_keras fixes that. The
    ``sys.modules`` entries alone are not enough: once tf_keras is imported,
    ``tensorflow.python`` already has a ``keras`` attribute (that stale
    Keras), and ``from tensorflow.python import keras`` reads the attribute
    before ``sys.modules``; so both are pointed at tf_keras while ``bert`` is
    first imported, then restored.
    """
    if "bert" in sys.modules:
        return sys.modules["bert"]
    import tensorflow.python as tensorflow_python  # noqa: PLC0415

    aliases = {"tensorflow.python.keras": keras}
    for name in ("layers", "initializers", "activations", "backend", "models", "utils"):
        aliases[f"tensorflow.python.keras.{name}"] = getattr(keras, name)
    missing = object()
    saved = getattr(tensorflow_python, "keras", missing)
    tensorflow_python.keras = keras
    try:
        with _aliased_modules(aliases):
            import bert  # noqa: PLC0415
    finally:
        if saved is missing:
            del tensorflow_python.keras
        else:
            tensorflow_python.keras = saved
    return bert


def import_keras_tuner():
    """Imports keras-tuner so that it accepts tf_keras models.

    keras-tuner 1.4.8 decides which Keras it serves by importing ``keras``; on
    TF 2.17 that is Keras 3, and it then rejects tf_keras models with
    ``FatalTypeError``. It must see tf_keras under the name ``keras`` while it
    is first imported.
    """
    if "keras_tuner" in sys.modules:
        return sys.modules["keras_tuner"]
    with _aliased_modules({"keras": keras}):
        import keras_tuner  # noqa: PLC0415

    return keras_tuner


def message_to_dict(message) -> dict:
    """``json_format.MessageToDict`` with proto field names and default-valued fields printed.

    TF Serving's REST API prints primitive fields that hold their default
    (``always_print_primitive_fields``). protobuf < 5 (TF 2.17) calls that
    argument ``including_default_value_fields``; protobuf >= 5 (TF 2.21)
    removed it for ``always_print_fields_with_no_presence``.
    """
    from google.protobuf import json_format  # noqa: PLC0415

    parameters = inspect.signature(json_format.MessageToDict).parameters
    if "always_print_fields_with_no_presence" in parameters:
        keep_defaults = {"always_print_fields_with_no_presence": True}
    else:
        keep_defaults = {"including_default_value_fields": True}
    return json_format.MessageToDict(message, preserving_proto_field_name=True, **keep_defaults)
