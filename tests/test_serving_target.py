"""``mmtf export --target-serving``: the graph keeps to the ops of the TF Serving line it targets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tensorflow_text as tf_text

from multimodal_tf import export
from multimodal_tf.compat import tf


def _save(path, fn) -> None:
    """Saves a one-signature SavedModel whose graph runs ``fn`` on a [None] string input."""

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, x):
            return {"y": fn(x)}

    module = Module()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _utf8_binarize(x):
    # TFText>Utf8Binarize arrived in tensorflow-text 2.13: the 2.12.1 that
    # tensorflow/serving 2.17-2.19 embed does not have it.
    return tf_text.utf8_binarize(x)


def _round_robin_trim(x):
    words = tf.strings.split(x)
    return tf_text.RoundRobinTrimmer(max_seq_length=4).trim([words, words])[0].to_tensor()


@pytest.mark.parametrize(
    ("fn", "op"), [(_utf8_binarize, "TFText>Utf8Binarize"), (_round_robin_trim, "TFText>RoundRobin")]
)
def test_ops_missing_from_the_2_17_serving_image_fail_the_check_by_name(tmp_path, fn, op):
    _save(tmp_path, fn)
    assert any(name.startswith(op) for name in export.graph_ops(tmp_path))
    with pytest.raises(export.ExportError, match=rf"TF Serving 2\.17 .*tensorflow-text 2\.12\.1.*{op}"):
        export.check_ops(tmp_path, "2.17")
    export.check_ops(tmp_path, "2.21")  # 2.20+ images embed the tf-text of their own TF


def test_ops_2_12_has_pass_for_every_target(tmp_path):
    tokenizer = tf_text.FastWordpieceTokenizer(["[UNK]", "a", "##b"], token_out_type=tf.int64)
    _save(tmp_path, lambda x: tokenizer.tokenize(tf_text.case_fold_utf8(x)).to_tensor())
    for target in ("2.17", "2.21"):
        export.check_ops(tmp_path, target)


def test_op_list_is_what_the_wheel_scan_says():
    # The committed list (tools/text_ops_from_wheel.py on the 2.12.1 wheel) is
    # a subset of today's tf-text ops that lacks exactly the newer ones.
    version, ops = export.target_text_ops("2.17")
    assert version == "2.12.1"
    installed = export.installed_text_ops()
    assert ops < installed
    missing = installed - ops
    assert "TFText>Utf8Binarize" in missing and "TFText>RoundRobinTrim" in missing
    assert {"FastWordpieceTokenizeWithOffsets", "WordpieceTokenizeWithOffsets", "NormalizeUTF8"} <= ops
    assert export.target_text_ops("2.21")[1] == installed


def test_unknown_target_is_a_one_line_cli_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "multimodal_tf.cli", "export", str(tmp_path), "--target-serving", "1.15"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "unknown --target-serving '1.15'" in result.stderr and "Traceback" not in result.stderr
