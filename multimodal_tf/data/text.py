"""In-graph text preprocessing: UTF-8 check, normalisation, WordPiece ids.

Uses tensorflow-text's FastBertTokenizer (basic BERT normalisation and
splitting, then WordPiece) — its ops are linked into TF Serving and need no
lookup table to be tracked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tensorflow as tf
import tensorflow_text as tf_text

from multimodal_tf.config import TextConfig

PAD, UNK = "[PAD]", "[UNK]"
RESERVED_TOKENS = (PAD, UNK, "[CLS]", "[SEP]", "[MASK]")


def build_vocabulary(texts: Iterable[str], config: TextConfig) -> list[str]:
    """Learns a WordPiece vocabulary from training texts (tf-text's builder)."""
    from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as builder

    texts = [t for t in texts if t]
    if not texts:
        # No training text (e.g. an image+audio set): a character-level
        # vocabulary keeps the tokenizer valid for any later text input.
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
        return list(RESERVED_TOKENS) + letters + [f"##{c}" for c in letters]
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(1024)
    vocab = builder.bert_vocab_from_dataset(
        dataset,
        vocab_size=config.vocab_size,
        reserved_tokens=list(RESERVED_TOKENS),
        bert_tokenizer_params={"lower_case": config.lower_case},
        # Small corpora: keep words seen twice (the default floor of 10 keeps
        # only characters on a few thousand short texts).
        learn_params={"lower_thresh": 2},
    )
    return list(vocab)


def check_utf8(texts: tf.Tensor) -> tf.Operation:
    """Asserts every string is valid UTF-8 (re-encoding changes invalid bytes)."""
    clean = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    return tf.debugging.Assert(tf.reduce_all(tf.equal(clean, texts)), ["text: not valid UTF-8"])


class TextTokenizer(tf.Module):
    """Strings -> fixed-length int64 WordPiece ids (0 = padding).

    Args:
        vocabulary: WordPiece vocabulary, reserved tokens first.
        config: text preprocessing settings.
    """

    def __init__(self, vocabulary: Sequence[str], config: TextConfig, name: str = "tokenizer"):
        super().__init__(name=name)
        if list(vocabulary[:2]) != [PAD, UNK]:
            raise ValueError(f"vocabulary must start with {PAD}, {UNK}; got {vocabulary[:2]}")
        self.vocabulary = list(vocabulary)
        self.config = config
        self._tokenizer = tf_text.FastBertTokenizer(
            vocab=self.vocabulary,
            token_out_type=tf.int64,
            unknown_token=UNK,
            lower_case_nfd_strip_accents=config.lower_case,
        )

    def __call__(self, texts: tf.Tensor) -> tf.Tensor:
        """[B] UTF-8 strings -> [B, max_tokens] int64 ids (empty string -> zeros)."""
        with tf.control_dependencies([check_utf8(texts)]):
            texts = tf.identity(texts)
        ids = self._tokenizer.tokenize(texts)
        if isinstance(ids, tf.RaggedTensor) and ids.ragged_rank > 1:
            ids = ids.merge_dims(-2, -1)
        return ids.to_tensor(default_value=0, shape=[None, self.config.max_tokens])

    def detokenize(self, ids) -> list[str]:
        """Ids -> WordPiece strings joined back into words (for checks and debugging)."""
        words = []
        for row in ids:
            pieces = [self.vocabulary[i] for i in row if i != 0]
            text = ""
            for piece in pieces:
                text += piece[2:] if piece.startswith("##") else (" " + piece if text else piece)
            words.append(text)
        return words
