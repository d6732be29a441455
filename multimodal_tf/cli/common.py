"""What every subcommand shares: config flags and a quiet TensorFlow import.

Nothing here imports TensorFlow at module level, so ``mmtf --help`` and
``mmtf <command> --help`` answer without loading it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# TF prints these to stderr while it is imported, on CPU and GPU hosts alike;
# they report nothing wrong (a plugin registered twice, oneDNN being on) but a
# first-time user reads them as failures.
IMPORT_NOISE = re.compile(
    r"Unable to register cu(FFT|DNN|BLAS) factory"
    r"|oneDNN custom operations are on"
    r"|TF_ENABLE_ONEDNN_OPTS"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|Could not find cuda drivers on your machine, GPU will not be used"
)
# TF >= 2.20 logs through absl, which writes every line logged before
# absl::InitializeLog() to stderr whatever TF_CPP_MIN_LOG_LEVEL says; the
# import therefore applies the level itself to lines in absl's format
# ("I0000 00:00:... file.cc:31] ..."): INFO from level 1, WARNING from level 2.
_ABSL_SEVERITY = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:")
_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}


def import_noise(line: str) -> bool:
    """Whether a line TF printed while being imported is noise to drop.

    The known harmless start-up lines always are; other absl-format lines
    are when their severity is below ``TF_CPP_MIN_LOG_LEVEL``.
    """
    if IMPORT_NOISE.search(line):
        return True
    severity = _ABSL_SEVERITY.match(line)
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    return bool(severity) and _LEVELS[severity.group(1)] < min(level, 3)


def quiet_tensorflow_logs() -> None:
    """C++ INFO and WARNING lines off unless the user chose a level (``TF_CPP_MIN_LOG_LEVEL``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def import_tensorflow() -> None:
    """Imports TensorFlow (via ``compat``) with its start-up noise filtered out of stderr.

    The lines come from C++ straight to file descriptor 2, so the descriptor
    itself is pointed at a temporary file during the import; every other
    line is written back to stderr afterwards.
    """
    if "tensorflow" in sys.modules:
        return
    quiet_tensorflow_logs()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import multimodal_tf.compat  # noqa: F401, PLC0415  (tf_keras setup, then TensorFlow)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not import_noise(line)))
            sys.stderr.flush()


def add_config_args(parser) -> None:
    """``--config`` (repeatable YAML layers) and ``--set`` overrides; read back by ``load_config``."""
    parser.add_argument(
        "--config",
        action="append",
        help="experiment YAML (see pipelines/); repeat to layer files, later ones win",
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=3")


def add_runner_args(parser, beam_help: str) -> None:
    """``--runner local|beam`` and the repeatable ``--beam-option`` (Beam pipeline options)."""
    parser.add_argument("--runner", choices=["local", "beam"], default="local", help=beam_help)
    parser.add_argument(
        "--beam-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="a Beam pipeline option, e.g. --beam-option=--runner=DataflowRunner (repeatable; "
        "default: local FnApiRunner, one process per core)",
    )


def load_config(args, extra_overrides=()):
    """The experiment config of ``--config`` files, ``extra_overrides`` and then ``--set``."""
    from multimodal_tf import config as config_lib  # noqa: PLC0415

    paths = getattr(args, "config", None) or []
    return config_lib.load(paths, list(extra_overrides) + list(getattr(args, "set", None) or []))
