"""In-graph text preprocessing: UTF-8 check, normalisation, token ids.

Two tokenizers (``data.text.tokenizer``):

- ``wordpiece``: tensorflow-text's FastBertTokenizer (basic BERT
  normalisation and splitting, then WordPiece) over the vocabulary built at
  conversion — its ops are linked into TF Serving and need no lookup table.
- ``ngrams``: every word and its character n-grams (words padded with
  ``<``/``>``, as fastText and scikit-learn's ``char_wb`` do), hashed into
  ``hash_buckets`` ids with FarmHash (core TF ops only). Unseen words still
  share n-grams with seen ones, which is what short texts (emoji or product
  names, labels) need.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import tensorflow as tf
import tensorflow_text as tf_text

from multimodal_tf.config import TextConfig

PAD, UNK = "[PAD]", "[UNK]"
RESERVED_TOKENS = (PAD, UNK, "[CLS]", "[SEP]", "[MASK]")
TOKENIZERS = ("wordpiece", "ngrams")
# FastBertTokenizer's max_bytes_per_word: a longer word becomes one [UNK].
MAX_BYTES_PER_WORD = 100


def max_characters(config: TextConfig) -> int:
    """Characters of a text that can reach its first ``max_tokens`` tokens.

    Each kept token comes from a word of at most ``MAX_BYTES_PER_WORD`` bytes
    (so as many characters) plus a separator, so cutting the text here
    changes no token of ordinary text (long runs of separators aside), while
    a 50 MB request costs no more than a short one.
    """
    return config.max_tokens * (MAX_BYTES_PER_WORD + 1)


def vocabulary_size(config: TextConfig, vocabulary: Sequence[str]) -> int:
    """Number of token ids the tokenizer emits (ids are < this; 0 = padding)."""
    if config.tokenizer == "ngrams":
        return config.hash_buckets + 1
    return len(vocabulary)


def count_words(texts: Iterable[str], config: TextConfig) -> collections.Counter:
    """Word counts of texts after BERT's basic splitting (what the WordPiece learner reads).

    Counts of disjoint parts of a corpus add up to the counts of the whole,
    so the Beam converter sums them in a combine (data/beam_convert.py).
    """
    from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer

    texts = [t for t in texts if t]
    counts: collections.Counter = collections.Counter()
    if not texts:
        return counts
    tokenizer = BasicTokenizer(lower_case=config.lower_case)
    for start in range(0, len(texts), 1024):
        words = tokenizer.tokenize(tf.constant(texts[start : start + 1024]))
        counts.update(word.decode("utf-8") for word in words.flat_values.numpy())
    return counts


def vocabulary_from_counts(counts: collections.Counter, config: TextConfig) -> list[str]:
    """Learns a WordPiece vocabulary from word counts (tf-text's learner)."""
    from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib as learner

    if not counts:
        # No training text (e.g. an image+audio set): a character-level
        # vocabulary keeps the tokenizer valid for any later text input.
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
        return list(RESERVED_TOKENS) + letters + [f"##{c}" for c in letters]
    vocab = learner.learn(
        # Sorted, so the vocabulary does not depend on the order texts came in.
        sorted(counts.items()),
        config.vocab_size,
        list(RESERVED_TOKENS),
        # Small corpora: keep words seen twice (the default floor of 10 keeps
        # only characters on a few thousand short texts).
        lower_thresh=2,
    )
    return list(vocab)


def build_vocabulary(texts: Iterable[str], config: TextConfig) -> list[str]:
    """Learns a WordPiece vocabulary from training texts.

    The same steps as tf-text's ``bert_vocab_from_dataset`` (basic BERT
    splitting, word counts, WordPiece learner), split in two so that the
    counting can run as a distributed combine.
    """
    return vocabulary_from_counts(count_words(texts, config), config)


def check_utf8(texts: tf.Tensor) -> tf.Operation:
    """Asserts every string is valid UTF-8 (re-encoding changes invalid bytes)."""
    clean = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    return tf.debugging.Assert(tf.reduce_all(tf.equal(clean, texts)), ["text: not valid UTF-8"])


def clean_texts(texts: tf.Tensor, config: TextConfig) -> tf.Tensor:
    """[B] strings cut to ``max_characters`` and checked to be valid UTF-8.

    The cut comes first because the UTF-8 check and normalisation scan the
    whole text: a 50 MB request then costs no more than a short one.
    """
    texts = tf.strings.substr(texts, 0, max_characters(config), unit="UTF8_CHAR")
    with tf.control_dependencies([check_utf8(texts)]):
        return tf.identity(texts)


class TextTokenizer(tf.Module):
    """Strings -> fixed-length int64 WordPiece ids (0 = padding).

    Args:
        vocabulary: WordPiece vocabulary, reserved tokens first.
        config: text preprocessing settings.
    """

    def __init__(self, vocabulary: Sequence[str], config: TextConfig, name: str = "tokenizer"):
        super().__init__(name=name)
        if config.tokenizer not in TOKENIZERS:
            raise ValueError(f"data.text.tokenizer: unknown {config.tokenizer!r}; choose one of {TOKENIZERS}")
        if list(vocabulary[:2]) != [PAD, UNK]:
            raise ValueError(f"vocabulary must start with {PAD}, {UNK}; got {vocabulary[:2]}")
        self.vocabulary = list(vocabulary)
        self.config = config
        self.vocab_size = vocabulary_size(config, vocabulary)
        if config.tokenizer == "ngrams":
            low, high = (tuple(config.ngram_range) + (0, 0))[:2]
            if len(config.ngram_range) != 2 or not 1 <= low <= high:
                raise ValueError(
                    f"data.text.ngram_range: expected [min, max] with 1 <= min <= max, got {config.ngram_range}"
                )
            if config.hash_buckets < 1:
                raise ValueError(f"data.text.hash_buckets: must be >= 1, got {config.hash_buckets}")
            self._tokenizer = None
        else:
            self._tokenizer = tf_text.FastBertTokenizer(
                vocab=self.vocabulary,
                max_bytes_per_word=MAX_BYTES_PER_WORD,
                token_out_type=tf.int64,
                unknown_token=UNK,
                lower_case_nfd_strip_accents=config.lower_case,
            )

    def __call__(self, texts: tf.Tensor) -> tf.Tensor:
        """[B] UTF-8 strings -> [B, max_tokens] int64 ids (empty string -> zeros)."""
        texts = clean_texts(texts, self.config)
        if self._tokenizer is None:
            ids = self._ngram_ids(texts)
        else:
            ids = self._tokenizer.tokenize(texts)
            if isinstance(ids, tf.RaggedTensor) and ids.ragged_rank > 1:
                ids = ids.merge_dims(-2, -1)
        return ids.to_tensor(default_value=0, shape=[None, self.config.max_tokens])

    def _ngram_ids(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings -> ragged [B, T] ids: all the words first, then their n-grams.

        Words come first so that truncation to ``max_tokens`` drops n-grams
        before it drops words.
        """
        if self.config.lower_case:
            texts = tf.strings.lower(texts, encoding="utf-8")
        # Words = runs of letters, digits and marks; everything else separates.
        texts = tf.strings.regex_replace(texts, r"[^\pL\pN\pM]+", " ")
        words = tf.strings.split(texts)  # ragged [B, W]
        bounded = tf.strings.join(["<", words.flat_values, ">"])  # [N]
        chars = tf.strings.unicode_split(bounded, "UTF-8")  # ragged [N, C]
        lengths = chars.row_lengths()
        padded = chars.to_tensor(default_value="")
        per_word = []
        low, high = self.config.ngram_range
        for n in range(low, high + 1):
            count = tf.maximum(lengths - n + 1, 0)
            width = tf.maximum(tf.shape(padded, out_type=tf.int64)[1] - n + 1, 0)
            grams = tf.strings.join([padded[:, k : k + width] for k in range(n)])  # [N, width]
            per_word.append(tf.RaggedTensor.from_tensor(grams, lengths=count))
        grams = tf.concat(per_word, axis=1)  # ragged [N, G]
        grams = tf.RaggedTensor.from_row_splits(grams, words.row_splits).merge_dims(1, 2)  # [B, G']
        tokens = tf.concat([words.with_flat_values(bounded), grams], axis=1)
        return tokens.with_flat_values(
            tf.strings.to_hash_bucket_fast(tokens.flat_values, self.config.hash_buckets) + 1
        )

    def detokenize(self, ids) -> list[str]:
        """Ids -> WordPiece strings joined back into words (for checks and debugging).

        Raises:
            ValueError: for the ``ngrams`` tokenizer, whose hashes cannot be inverted.
        """
        if self._tokenizer is None:
            raise ValueError("ngrams token ids are hashes and cannot be detokenized")
        words = []
        for row in ids:
            pieces = [self.vocabulary[i] for i in row if i != 0]
            text = ""
            for piece in pieces:
                text += piece[2:] if piece.startswith("##") else (" " + piece if text else piece)
            words.append(text)
        return words
