"""Input bounds inside the graph: image size from the header, text cut to a budget.

These run in the preprocessing every exported signature calls, so the real
TF Serving is protected as well as the embedded server and conversion.
"""

import io
import struct

import numpy as np
import pytest
import tensorflow_text as tf_text
from PIL import Image

from multimodal_tf.compat import tf
from multimodal_tf.config import DataConfig, ImageConfig, TextConfig
from multimodal_tf.data import image, text
from multimodal_tf.data.manifest import Record
from multimodal_tf.data.validate import check_record


def _encoded(width: int, height: int, fmt: str, mode: str = "RGB", **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt,mode,save_args",
    [
        ("PNG", "RGB", {}),
        ("PNG", "1", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "L", {"progressive": True}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("BMP", "L", {}),
    ],
)
def test_image_size_from_the_header_matches_pillow(fmt, mode, save_args):
    data = _encoded(301, 7, fmt, mode, **save_args)
    reference = Image.open(io.BytesIO(data)).size  # (width, height)
    assert image.image_size(tf.constant(data)).numpy().tolist() == [reference[1], reference[0]]


def test_image_size_of_a_top_down_bmp():
    data = bytearray(_encoded(40, 25, "BMP"))
    data[22:26] = struct.pack("<i", -25)  # the DIB header's negative height: rows stored top-down
    assert image.image_size(tf.constant(bytes(data))).numpy().tolist() == [25, 40]


def test_a_small_file_declaring_a_huge_canvas_is_refused_before_decoding():
    # A real, valid 1-bit PNG: ~50 KB on disk, 400 megapixels decoded.
    bomb = _encoded(20000, 20000, "PNG", "1")
    assert len(bomb) < 100_000
    decode = tf.function(lambda data: image.decode_image(data, ImageConfig()))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"20000 x 20000 pixels .* data\.image\.max_pixels = 16777216"
    ):
        decode(tf.constant(bomb))


def test_the_pixel_limit_is_inclusive_and_zero_disables_it():
    data = _encoded(40, 30, "PNG")
    exact = ImageConfig(height=8, width=8, max_pixels=1200)
    assert image.decode_image(tf.constant(data), exact).shape == (8, 8, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="30 x 40 pixels"):
        image.decode_image(tf.constant(data), ImageConfig(height=8, width=8, max_pixels=1199))
    unlimited = ImageConfig(height=8, width=8, max_pixels=0)
    assert image.decode_image(tf.constant(data), unlimited).shape == (8, 8, 3)


def test_validation_names_the_record_and_the_size_of_an_oversized_image(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_encoded(300, 200, "PNG"))

    record = Record(
        row=7,
        id="row-7",
        image=str(path),
        text=b"",
        text_path="",
        audio="",
        label="a",
        label_name="",
        split="train",
    )
    config = DataConfig(image=ImageConfig(max_pixels=300 * 200 - 1))
    problems = check_record(record, ["a"], config)
    assert [(p.record_id, p.field) for p in problems] == [("row-7", "image")]
    assert problems[0].reason.startswith(
        "cannot decode image: image: 200 x 300 pixels (height x width) is over"
    )
    assert check_record(record, ["a"], DataConfig()) == []


def _vocabulary():
    words = ["red", "green", "blue", "cat", "dog", "sky", "é"]
    return list(text.RESERVED_TOKENS) + words + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


@pytest.mark.parametrize("tokenizer", ["wordpiece", "ngrams"])
def test_cutting_long_text_to_the_budget_keeps_every_token_the_model_sees(tokenizer):
    config = TextConfig(max_tokens=6, tokenizer=tokenizer, hash_buckets=97)
    tokenizer_module = text.TextTokenizer(_vocabulary(), config)
    words = ["red", "green", "blue", "cat", "dog", "sky", "é", "x" * 100]
    rng = np.random.default_rng(0)
    long_texts = [" ".join(rng.choice(words, 30_000)) for _ in range(3)]
    assert all(len(t) > 10 * text.max_characters(config) for t in long_texts)
    ids = tokenizer_module(tf.constant(long_texts)).numpy()
    # Reference: the same tokenizer on the first words only (no cut needed).
    heads = [" ".join(t.split()[: config.max_tokens]) for t in long_texts]
    np.testing.assert_array_equal(ids, tokenizer_module(tf.constant(heads)).numpy())
    if tokenizer == "wordpiece":  # and tf-text's own tokenizer on the uncut text
        reference = tf_text.FastBertTokenizer(
            vocab=_vocabulary(), token_out_type=tf.int64, lower_case_nfd_strip_accents=True
        )
        full = reference.tokenize(tf.constant(long_texts))
        if full.ragged_rank > 1:
            full = full.merge_dims(-2, -1)
        np.testing.assert_array_equal(ids, full.to_tensor()[:, : config.max_tokens].numpy())


def test_the_cut_never_splits_a_character_and_invalid_utf8_inside_the_budget_is_still_refused():
    config = TextConfig(max_tokens=2)
    tokenizer_module = text.TextTokenizer(_vocabulary(), config)
    # Multi-byte characters across the cut point: a byte cut would leave
    # half a character and fail the UTF-8 check.
    ids = tokenizer_module(tf.constant(["é" * 5000])).numpy()
    assert ids.shape == (1, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not valid UTF-8"):
        tokenizer_module(tf.constant([b"red \xff cat"]))


def test_bytes_past_the_budget_are_never_read():
    # Invalid UTF-8 far past the budget: the whole-text check used to reject
    # this (after scanning all of it); now only the first characters are read.
    config = TextConfig(max_tokens=4)
    tokenizer_module = text.TextTokenizer(_vocabulary(), config)
    tail = b"\xff" * 10
    data = b"red cat " * (text.max_characters(config) // 8 + 10) + tail
    ids = tokenizer_module(tf.constant([data])).numpy()
    np.testing.assert_array_equal(ids, tokenizer_module(tf.constant(["red cat red cat"])).numpy())
