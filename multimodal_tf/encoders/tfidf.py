"""Text encoder ``text/tfidf``: TF-IDF of word and character n-grams, then a linear projection.

The classic text-classification baseline (scikit-learn's ``TfidfVectorizer``
plus a linear model): word n-grams and character n-grams within word
boundaries (``char_wb``), sublinear term frequency, smoothed IDF and L2
normalisation, computed inside the model from the raw UTF-8 text.

The vocabulary and IDF are learned from the train split's texts when the
model is built for training (:meth:`TextTFIDFEncoder.adapt`, called by
``recipe.compile_model``), not at conversion: n-gram ranges and vocabulary
size are model hyperparameters a tuner may vary, so conversion stays
encoder-agnostic. They are stored as non-trainable weights (each term as a
63-bit FarmHash fingerprint, sorted, with its IDF), so every checkpoint,
reloaded run and exported SavedModel carries them, and the serving graph
needs no lookup table, asset or tf-text op: only core TF string ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigFieldError, EncoderConfig, option
from multimodal_tf.data import features
from multimodal_tf.registry import ENCODERS

# Fingerprints are in [0, EMPTY_SLOT): an unused vocabulary slot holds
# EMPTY_SLOT (with IDF 0), which no term hashes to.
EMPTY_SLOT = 2**63 - 1
# Word terms and character n-grams are kept apart ("ab" the word is not
# "ab" the n-gram): each is fingerprinted with its prefix.
WORD_PREFIX, CHAR_PREFIX = "w ", "c "


@dataclasses.dataclass(frozen=True)
class TextTFIDFConfig(EncoderConfig):
    """``text/tfidf``: the arguments of :class:`TextTFIDFEncoder`."""

    input_kind: ClassVar[str] = features.TEXT_STRINGS

    name: str = "text/tfidf"
    word_ngram_range: tuple[int, int] = (1, 2)  # word n-gram lengths (inclusive); [0, 0] = none
    char_ngram_range: tuple[int, int] = (2, 4)  # char_wb n-gram lengths (inclusive); [0, 0] = none
    max_features: int = option(20000, minimum=1)  # vocabulary size: the most frequent terms
    min_df: int = option(1, minimum=1)  # a term must occur in this many train texts
    sublinear_tf: bool = True  # tf -> 1 + ln(tf)
    lower_case: bool = True
    output_dim: int = option(64, minimum=1)
    hidden_units: int = option(0, minimum=0)  # 0: a linear projection; else one ReLU layer first
    l2: float = option(1e-4, minimum=0.0)  # L2 penalty on the projection kernels (weight decay)
    dropout_rate: float = option(0.0, minimum=0.0)  # on the TF-IDF vector

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("word_ngram_range", "char_ngram_range"):
            value = tuple(getattr(self, key))
            if len(value) != 2 or not (value == (0, 0) or 1 <= value[0] <= value[1]):
                raise ConfigFieldError(
                    key, f"expected [min, max] with 1 <= min <= max, or [0, 0]; got {value}"
                )
        if tuple(self.word_ngram_range) == (0, 0) and tuple(self.char_ngram_range) == (0, 0):
            raise ConfigFieldError("word_ngram_range", "word and char n-grams are both off ([0, 0])")


def term_fingerprints(terms: tf.Tensor) -> tf.Tensor:
    """Term strings (prefixed) -> int64 fingerprints in [0, EMPTY_SLOT)."""
    return tf.strings.to_hash_bucket_fast(terms, EMPTY_SLOT)


def char_wb_ngrams(words: tf.RaggedTensor, low: int, high: int) -> tf.RaggedTensor:
    """ragged [B, W] words -> ragged [B, G] character n-grams of each word padded with spaces.

    scikit-learn's ``char_wb`` exactly: a padded word shorter than an n-gram
    length gives itself once, at the first such length, and nothing longer.
    """
    padded_words = tf.strings.join([" ", words.flat_values, " "])  # [N]
    chars = tf.strings.unicode_split(padded_words, "UTF-8")  # ragged [N, C]
    lengths = chars.row_lengths()
    # At least ``high`` columns, so every length has one slice (a short word's).
    grid = tf.concat([chars.to_tensor(default_value=""), tf.fill([tf.shape(lengths)[0], high], "")], 1)
    width = tf.shape(grid, out_type=tf.int64)[1]
    per_length = []
    for n in range(low, high + 1):
        first_fit = tf.equal(tf.maximum(lengths, low), n)
        count = tf.where(lengths > n, lengths - n + 1, tf.cast(first_fit, tf.int64))
        grams = tf.strings.join([grid[:, k : width - n + 1 + k] for k in range(n)])  # [N, width - n + 1]
        per_length.append(tf.RaggedTensor.from_tensor(grams, lengths=count))
    grams = tf.concat(per_length, axis=1)  # ragged [N, G]
    return tf.RaggedTensor.from_row_splits(grams, words.row_splits).merge_dims(1, 2)  # [B, G']


def analyze(
    texts: tf.Tensor, word_ngram_range: Sequence[int], char_ngram_range: Sequence[int], lower_case: bool
) -> tf.RaggedTensor:
    """[B] UTF-8 strings -> ragged [B, T] int64 term fingerprints (one per occurrence).

    Words are runs of letters, digits and ``_`` (Python's ``\\w+``); word
    n-grams join them with a space; character n-grams are ``char_wb``'s on
    those words.
    """
    if lower_case:
        texts = tf.strings.lower(texts, encoding="utf-8")
    words = tf.strings.split(tf.strings.regex_replace(texts, r"[^\pL\pN_]+", " "))  # ragged [B, W]
    terms = []
    if tuple(word_ngram_range) != (0, 0):
        low, high = word_ngram_range
        grams = tf.strings.ngrams(words, ngram_width=tuple(range(low, high + 1)), separator=" ")
        terms.append(grams.with_flat_values(tf.strings.join([WORD_PREFIX, grams.flat_values])))
    if tuple(char_ngram_range) != (0, 0):
        grams = char_wb_ngrams(words, *char_ngram_range)
        terms.append(grams.with_flat_values(tf.strings.join([CHAR_PREFIX, grams.flat_values])))
    terms = tf.concat(terms, axis=1) if len(terms) > 1 else terms[0]
    return terms.with_flat_values(term_fingerprints(terms.flat_values))


def learn_vocabulary(
    documents: np.ndarray, terms: np.ndarray, num_documents: int, max_features: int, min_df: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted fingerprints [V], smoothed IDF [V]) of the training documents' terms.

    Like ``TfidfVectorizer``: terms in at least ``min_df`` documents, the
    ``max_features`` with the highest total count (ties: lower fingerprint),
    ``idf = ln((1 + n) / (1 + df)) + 1`` over the n documents.

    Args:
        documents: int [M] the document index of each term occurrence.
        terms: int64 [M] the fingerprint of each occurrence.
        num_documents: n.
        max_features: the most terms kept.
        min_df: the fewest documents a kept term occurs in.
    """
    vocabulary, totals = np.unique(terms, return_counts=True)
    pairs = np.unique(np.stack([np.asarray(documents, np.int64), terms], axis=1), axis=0)
    _, document_counts = np.unique(pairs[:, 1], return_counts=True)  # same sorted terms
    kept = document_counts >= min_df
    vocabulary, totals, document_counts = vocabulary[kept], totals[kept], document_counts[kept]
    order = np.lexsort((vocabulary, -totals))[:max_features]  # by count, then fingerprint
    order = order[np.argsort(vocabulary[order])]  # stored sorted, for the in-graph binary search
    idf = np.log((1.0 + num_documents) / (1.0 + document_counts[order])) + 1.0
    return vocabulary[order].astype(np.int64), idf.astype(np.float32)


@ENCODERS.register("text/tfidf", config=TextTFIDFConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class TextTFIDFEncoder(keras.layers.Layer):
    """TF-IDF of word and character n-grams, L2-normalised, then a Dense projection.

    Before training, :meth:`adapt` learns the vocabulary and IDF from the
    train split's texts; they are the layer's non-trainable weights
    ``vocabulary`` (int64 [max_features], sorted fingerprints, unused slots
    ``EMPTY_SLOT``) and ``idf`` (float32 [max_features], 0 in unused slots).

    Call arguments:
        texts: string [B] UTF-8 texts; an empty string means absent.

    Returns:
        [B, output_dim] float embeddings (linear); zeros for a text with no
        vocabulary term (an absent text among them), so missing text adds
        nothing, whatever the bias.

    Args:
        word_ngram_range: word n-gram lengths [min, max]; [0, 0]: none.
        char_ngram_range: ``char_wb`` n-gram lengths [min, max]; [0, 0]: none.
        max_features: vocabulary slots.
        min_df: fewest train texts a kept term occurs in.
        sublinear_tf: use ``1 + ln(tf)`` for the term frequency.
        lower_case: lower-case before analysing.
        output_dim: embedding size.
        hidden_units: 0: linear projection; else a ReLU layer of this width first.
        l2: L2 penalty on the projection kernels.
        dropout_rate: dropout on the TF-IDF vector.
        **kwargs: standard layer arguments.
    """

    def __init__(
        self,
        word_ngram_range: Sequence[int] = (1, 2),
        char_ngram_range: Sequence[int] = (2, 4),
        max_features: int = 20000,
        min_df: int = 1,
        sublinear_tf: bool = True,
        lower_case: bool = True,
        output_dim: int = 64,
        hidden_units: int = 0,
        l2: float = 1e-4,
        dropout_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.word_ngram_range = tuple(word_ngram_range)
        self.char_ngram_range = tuple(char_ngram_range)
        self.max_features = max_features
        self.min_df = min_df
        self.sublinear_tf = sublinear_tf
        self.lower_case = lower_case
        self.output_dim = output_dim
        self.hidden_units = hidden_units
        self.l2 = l2
        self.dropout_rate = dropout_rate
        regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
        self.hidden = (
            keras.layers.Dense(hidden_units, "relu", kernel_regularizer=regularizer, name="hidden")
            if hidden_units
            else None
        )
        self.projection = keras.layers.Dense(output_dim, kernel_regularizer=regularizer, name="projection")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape) -> None:
        empty = keras.initializers.Constant(EMPTY_SLOT)
        self.vocabulary = self.add_weight("vocabulary", [self.max_features], "int64", empty, trainable=False)
        self.idf = self.add_weight("idf", [self.max_features], "float32", "zeros", trainable=False)
        super().build(input_shape)

    def analyze(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings -> ragged [B, T] term fingerprints (see :func:`analyze`)."""
        return analyze(texts, self.word_ngram_range, self.char_ngram_range, self.lower_case)

    def adapt(self, texts: Iterable[bytes | str], batch_size: int = 1024) -> int:
        """Learns the vocabulary and IDF from training texts; returns the terms kept.

        Empty texts (absent) are skipped: they are not documents.
        """
        if not self.built:
            self.build(tf.TensorShape([None]))
        texts = [t for t in texts if len(t)]
        documents, terms = [], []
        for start in range(0, len(texts), batch_size):
            batch = self.analyze(tf.constant(texts[start : start + batch_size]))
            documents.append(batch.value_rowids().numpy() + start)
            terms.append(batch.flat_values.numpy())
        keys, idf = learn_vocabulary(
            np.concatenate(documents or [np.zeros(0, np.int64)]),
            np.concatenate(terms or [np.zeros(0, np.int64)]),
            len(texts),
            self.max_features,
            self.min_df,
        )
        padding = self.max_features - len(keys)
        self.vocabulary.assign(np.concatenate([keys, np.full(padding, EMPTY_SLOT, np.int64)]))
        self.idf.assign(np.concatenate([idf, np.zeros(padding, np.float32)]))
        return len(keys)

    def tfidf(self, texts: tf.Tensor) -> tf.Tensor:
        """[B] strings -> float32 [B, max_features] L2-normalised TF-IDF (vocabulary order)."""
        terms = self.analyze(tf.reshape(texts, [-1]))
        flat = terms.flat_values
        slot = tf.minimum(tf.searchsorted(self.vocabulary, flat, out_type=tf.int64), self.max_features - 1)
        known = tf.equal(tf.gather(self.vocabulary, slot), flat)
        batch = terms.nrows()
        cell = tf.boolean_mask(terms.value_rowids() * self.max_features + slot, known)  # [B * V] index
        counts = tf.math.unsorted_segment_sum(tf.ones_like(cell, tf.float32), cell, batch * self.max_features)
        counts = tf.reshape(counts, [batch, self.max_features])
        if self.sublinear_tf:
            counts = tf.where(counts > 0, 1.0 + tf.math.log(tf.maximum(counts, 1.0)), 0.0)
        return tf.math.l2_normalize(counts * self.idf, axis=1)

    def call(self, texts: tf.Tensor, training=None) -> tf.Tensor:
        x = self.tfidf(texts)
        has_terms = tf.reduce_any(x > 0, axis=1, keepdims=True)  # [B, 1]
        x = self.dropout(x, training=training)
        if self.hidden is not None:
            x = self.hidden(x)
        x = self.projection(x)
        return tf.where(has_terms, x, tf.zeros_like(x))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "word_ngram_range": self.word_ngram_range,
                "char_ngram_range": self.char_ngram_range,
                "max_features": self.max_features,
                "min_df": self.min_df,
                "sublinear_tf": self.sublinear_tf,
                "lower_case": self.lower_case,
                "output_dim": self.output_dim,
                "hidden_units": self.hidden_units,
                "l2": self.l2,
                "dropout_rate": self.dropout_rate,
            }
        )
        return config
