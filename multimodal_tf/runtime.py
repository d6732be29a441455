"""Process settings that must be made before TensorFlow is imported.

TensorFlow 2.17's oneDNN kernels corrupt the heap when one graph holding
several oneDNN convolution stacks (our image and audio encoders) runs on
several threads at once with different batch sizes: the process aborts with
``free(): invalid next size (fast)`` / ``corrupted size vs. prev_size`` in
seconds (docs/serving-crash.md has the investigation). Any server does
exactly that. TF turns those kernels on by default only on CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX, so the crash follows the machine,
not the code: a model tested on one host dies in production on another.
TF 2.21 with oneDNN on did not crash in the same test; versions between
were not measured and are treated as affected.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# The first TensorFlow release measured without the crash.
FIXED_IN = (2, 21)

log = logging.getLogger(__name__)


def tensorflow_version() -> tuple[int, int] | None:
    """(major, minor) of the installed TensorFlow, read without importing it."""
    try:
        version = importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        return None
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def onednn_is_safe(version: tuple[int, int] | None = None) -> bool:
    """Whether concurrent inference with oneDNN kernels is safe on this TensorFlow."""
    version = version or tensorflow_version()
    return version is None or version >= FIXED_IN


def protect_concurrent_inference() -> bool:
    """Turns TF's oneDNN kernels off where they crash under concurrent requests.

    Call before TensorFlow is imported (servers, in-process batch prediction).
    A user's own ``TF_ENABLE_ONEDNN_OPTS=1`` is overridden too, with a
    warning: a crash takes every client down, while the measured cost of
    the plain Eigen kernels is small (docs/benchmarks.md).

    Returns:
        True if oneDNN is off for this process (or never was a risk).
    """
    if onednn_is_safe():
        return True
    if "tensorflow" in sys.modules:
        if os.environ.get(ONEDNN_VARIABLE) != "0":
            log.warning(
                "TensorFlow was imported before multimodal_tf could set %s=0; on TF < %d.%d its "
                "oneDNN kernels can abort the process under concurrent requests. Set %s=0 in the "
                "environment.",
                ONEDNN_VARIABLE,
                *FIXED_IN,
                ONEDNN_VARIABLE,
            )
            return False
        return True
    if os.environ.get(ONEDNN_VARIABLE, "0") != "0":
        log.warning(
            "%s=%s overridden to 0: on TF < %d.%d oneDNN kernels abort the process under concurrent "
            "requests of different batch sizes",
            ONEDNN_VARIABLE,
            os.environ[ONEDNN_VARIABLE],
            *FIXED_IN,
        )
    os.environ[ONEDNN_VARIABLE] = "0"
    return True
