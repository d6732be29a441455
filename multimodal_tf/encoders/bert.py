"""Text encoder ``text/bert``: a pretrained BERT from a local checkpoint in Google's layout.

The encoder is bert-for-tf2's ``BertModelLayer``, loaded with its
stock-checkpoint loader, plus BERT's pooler (Dense + tanh on ``[CLS]``,
which bert-for-tf2's layer lacks) loaded here from ``bert/pooler/dense``.
Its input is ``[CLS] ... [SEP]`` ids of the checkpoint's own ``vocab.txt``,
made in-graph by :class:`BertTextTokenizer` (the config's ``tokenizer``
method), whose vocabulary travels inside exported SavedModels as an asset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import ClassVar

from multimodal_tf.compat import import_bert, keras, tf
from multimodal_tf.config import ConfigFieldError, EncoderConfig, TextConfig, option
from multimodal_tf.data import features
from multimodal_tf.encoders.bert_checkpoint import (
    CLS,
    CONFIG_FILE,
    POOLER_BIAS,
    POOLER_KERNEL,
    SEP,
    UNK,
    read_checkpoint_dir,
)
from multimodal_tf.registry import ENCODERS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextBertConfig(EncoderConfig):
    """``text/bert``: the arguments of :class:`TextBertEncoder`."""

    input_kind: ClassVar[str] = features.CHECKPOINT_TOKEN_IDS

    name: str = "text/bert"
    checkpoint_dir: str = ""  # Google's layout: bert_config.json, bert_model.ckpt.*, vocab.txt
    freeze: bool = False  # True: a fixed feature extractor (no BERT weight trains; no dropout inside)
    lower_case: bool = True  # as the checkpoint was trained: True for "uncased_*", False for "cased_*"
    output_dim: int = option(0, minimum=0)  # Dense projection of the output; 0 = none (hidden_size wide)
    dropout_rate: float = option(0.1, minimum=0.0)  # on the pooled vector (or tokens)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.checkpoint_dir:
            raise ConfigFieldError(
                "checkpoint_dir",
                "required: a local folder with bert_config.json, bert_model.ckpt.*, vocab.txt",
            )

    def tokenizer(self, text_config: TextConfig) -> BertTextTokenizer:
        """The in-graph tokenizer of this checkpoint for ``data.text`` (its ``max_tokens``)."""
        return BertTextTokenizer(self.checkpoint_dir, text_config.max_tokens, lower_case=self.lower_case)


class BertTextTokenizer(tf.Module):
    """[B] UTF-8 strings -> int64 [B, max_tokens] ``[CLS] pieces [SEP]`` ids, 0-padded.

    tensorflow-text's ``BertTokenizer`` (BERT's basic tokenizer, then
    WordPiece) on the checkpoint's ``vocab.txt``. The vocabulary is read
    through a ``TextFileInitializer`` lookup table tracked by this module, so
    a SavedModel holding it carries ``vocab.txt`` as an asset and tokenizes
    exactly as training did after the checkpoint folder is gone. Texts
    longer than ``max_tokens - 2`` pieces are cut, keeping ``[SEP]``; an
    empty string (an absent text) gives all zeros.

    Args:
        checkpoint_dir: the BERT checkpoint folder (see ``bert_checkpoint``).
        max_tokens: ids per row, ``[CLS]`` and ``[SEP]`` included.
        lower_case: lower-case and strip accents (uncased checkpoints).
    """

    def __init__(
        self, checkpoint_dir: str, max_tokens: int, lower_case: bool = True, name: str = "tokenizer"
    ):
        super().__init__(name=name)
        import tensorflow_text as tf_text  # noqa: PLC0415  (only text/bert needs it here)

        from multimodal_tf.data.text import MAX_BYTES_PER_WORD  # noqa: PLC0415

        checkpoint = read_checkpoint_dir(checkpoint_dir)
        positions = checkpoint.config["max_position_embeddings"]
        if not 2 <= max_tokens <= positions:
            raise ValueError(
                f"data.text.max_tokens={max_tokens}: {checkpoint.config_path} allows 2 to "
                f"max_position_embeddings={positions} tokens ([CLS] and [SEP] included)"
            )
        self.max_tokens = max_tokens
        self.cls_id, self.sep_id = checkpoint.token_id(CLS), checkpoint.token_id(SEP)
        initializer = tf.lookup.TextFileInitializer(
            checkpoint.vocab_path,
            key_dtype=tf.string,
            key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
            value_dtype=tf.int64,
            value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
        )
        # Every token WordPiece emits is in the vocabulary ([UNK] included), so
        # the out-of-vocabulary bucket is never hit.
        self.vocabulary = tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=1)
        self._tokenizer = tf_text.BertTokenizer(
            self.vocabulary,
            token_out_type=tf.int64,
            unknown_token=UNK,
            max_bytes_per_word=MAX_BYTES_PER_WORD,
            lower_case=lower_case,
        )
        self._max_characters = max_tokens * (MAX_BYTES_PER_WORD + 1)

    # Autograph has nothing to convert here (no tensor-dependent Python control
    # flow), and converting tensorflow-text's code cost ~7 s per trace.
    @tf.autograph.experimental.do_not_convert
    def __call__(self, texts: tf.Tensor) -> tf.Tensor:
        from multimodal_tf.data.text import check_utf8  # noqa: PLC0415

        texts = tf.convert_to_tensor(texts, tf.string)
        # Cut before the UTF-8 check and normalisation, which scan the whole text.
        texts = tf.strings.substr(texts, 0, self._max_characters, unit="UTF8_CHAR")
        with tf.control_dependencies([check_utf8(texts)]):
            texts = tf.identity(texts)
        pieces = self._tokenizer.tokenize(texts).merge_dims(-2, -1)[:, : self.max_tokens - 2]  # [B, (N)]
        column = tf.stack([tf.shape(texts)[0], 1])  # [B, 1]
        cls = tf.fill(column, tf.constant(self.cls_id, tf.int64))
        sep = tf.fill(column, tf.constant(self.sep_id, tf.int64))
        ids = tf.concat([cls, pieces, sep], axis=1).to_tensor(default_value=0, shape=[None, self.max_tokens])
        present = tf.strings.length(texts) > 0
        return tf.where(present[:, None], ids, tf.zeros_like(ids))


@contextlib.contextmanager
def _float32_policy():
    """Layers made inside compute in float32, whatever the global mixed-precision policy.

    bert-for-tf2 adds a float32 attention mask to the attention scores and
    its LayerNorm epsilon (1e-12) underflows in float16, so BERT runs in
    float32 under mixed precision; the layer casts its output to its own
    compute dtype.
    """
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)


@ENCODERS.register("text/bert", config=TextBertConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class TextBertEncoder(keras.layers.Layer):
    """Pretrained BERT (Devlin et al. 2019) from a checkpoint in Google's layout.

    bert-for-tf2's ``BertModelLayer`` over the ids, with token type 0 and the
    attention mask ``ids != 0`` (as Google's ``run_classifier.py`` feeds a
    single segment), then BERT's pooler ``tanh(Dense([CLS]))``, dropout and
    an optional projection. All checkpoint weights are loaded when the layer
    is built; the build fails, naming them, if any model weight has no value
    of its shape in the checkpoint. With ``freeze`` BERT and the pooler do
    not train and run in inference mode (no dropout inside), so only the
    dropout and projection after them are affected by ``training``.

    Call arguments:
        tokens: int [B, T] ``[CLS] ... [SEP]`` ids of the checkpoint's
            ``vocab.txt`` (0 = [PAD]; an all-zero row = absent text), T at
            most ``max_position_embeddings``.

    Returns:
        [B, D] pooled embeddings (zeros for a row without tokens), or with
        ``sequence_output`` a tuple ([B, T, D] token vectors, bool [B, T]
        mask, True = a real token), where D is ``output_dim`` or BERT's
        ``hidden_size`` when ``output_dim`` is 0.

    Args:
        checkpoint_dir: folder with ``bert_config.json``,
            ``bert_model.ckpt.{index,data-*}`` and ``vocab.txt``.
        freeze: keep the pretrained weights fixed (feature extraction).
        lower_case: how the tokenizer normalises (recorded here so that the
            layer's config names the whole text path; the layer itself reads ids).
        output_dim: size of a Dense projection of the output; 0 = none.
        dropout_rate: dropout on the pooled vector (or token vectors).
        sequence_output: return the token sequence and its mask.
        **kwargs: standard layer arguments.
    """

    supports_sequence_output = True

    def __init__(
        self,
        checkpoint_dir: str,
        freeze: bool = False,
        lower_case: bool = True,
        output_dim: int = 0,
        dropout_rate: float = 0.1,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.checkpoint_dir = checkpoint_dir
        self.freeze = freeze
        self.lower_case = lower_case
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.sequence_output = sequence_output
        self.checkpoint = read_checkpoint_dir(checkpoint_dir)
        bert = import_bert()
        with contextlib.redirect_stdout(io.StringIO()):  # its loader prints
            params = bert.params_from_pretrained_ckpt(checkpoint_dir)
        hidden_size = self.checkpoint.config["hidden_size"]
        with _float32_policy():
            self.bert = bert.BertModelLayer.from_params(params, name="bert")
            self.pooler = keras.layers.Dense(hidden_size, activation="tanh", name="pooler")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")
        self.projection = keras.layers.Dense(output_dim, name="projection") if output_dim else None

    def build(self, input_shape):
        length = input_shape[-1]
        positions = self.checkpoint.config["max_position_embeddings"]
        if length is not None and length > positions:
            raise ValueError(
                f"{self.name}: {length} tokens per text (data.text.max_tokens), but "
                f"{self.checkpoint.config_path} allows max_position_embeddings={positions}"
            )
        if length is None:
            raise ValueError(f"{self.name}: needs a fixed number of tokens per text, got shape {input_shape}")

        # bert-for-tf2 makes its weights (and fixes its input specs) on its
        # first call, and the checkpoint can only be loaded into made weights:
        # a first call traced on [batch, length] ids, then the loading, eagerly.
        # Without autograph: converting bert-for-tf2's code tripled the time.
        @tf.function(input_signature=[tf.TensorSpec([None, length], tf.int32)], autograph=False)
        def make_weights(ids):
            with tf.name_scope(self.name):  # weight names as if made by the layer's own call
                sequence = self.bert([ids, tf.zeros_like(ids)], mask=tf.not_equal(ids, 0), training=False)
                pooled = self.pooler(sequence[:, 0])
                return pooled if self.projection is None else self.projection(pooled)

        with tf.init_scope(), _float32_policy():
            make_weights.get_concrete_function()
            self._load_checkpoint()
        self.bert.trainable = self.pooler.trainable = not self.freeze
        super().build(input_shape)

    def _load_checkpoint(self) -> None:
        """Loads every BERT and pooler weight from the checkpoint, or fails naming the missing ones."""
        bert = import_bert()
        prefix = self.checkpoint.prefix
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        scope = bert.loader.bert_prefix(self.bert)
        names = [bert.loader.map_to_stock_variable_name(w.name, scope) for w in self.bert.weights]
        pairs = list(zip(self.bert.weights, names, strict=True))
        pairs += list(zip(self.pooler.weights, (POOLER_KERNEL, POOLER_BIAS), strict=True))
        unloaded = [
            f"{weight.name} <- {name} {list(shapes.get(name, ())) or '(absent)'}, expected {weight.shape}"
            for weight, name in pairs
            if name not in shapes or list(shapes[name]) != weight.shape.as_list()
        ]
        if unloaded:
            raise ValueError(
                f"{prefix}: {len(unloaded)} model weights have no value of their shape in the checkpoint "
                f"(does it match {CONFIG_FILE}?): " + "; ".join(unloaded)
            )
        with contextlib.redirect_stdout(io.StringIO()):  # its per-weight report goes to stdout
            mismatched = bert.load_stock_weights(self.bert, prefix)
        if mismatched:  # cannot happen after the shape check above; kept as a guard
            raise ValueError(f"{prefix}: weights of other shapes: {[w.name for w, _ in mismatched]}")
        self.pooler.set_weights([reader.get_tensor(POOLER_KERNEL), reader.get_tensor(POOLER_BIAS)])
        log.info(
            "%s: loaded %d of the %d variables of %s (%d unused, e.g. the pre-training heads)",
            self.name,
            len(pairs),
            len(shapes),
            prefix,
            len(set(shapes) - {name for _, name in pairs}),
        )

    def call(self, tokens: tf.Tensor, training=None):
        ids = tf.cast(tokens, tf.int32)
        mask = tf.not_equal(ids, 0)  # [B, T]
        inner_training = False if self.freeze else training
        sequence = self.bert([ids, tf.zeros_like(ids)], mask=mask, training=inner_training)  # [B, T, H]
        if self.sequence_output:
            x = sequence
        else:
            x = self.pooler(sequence[:, 0], training=inner_training)  # [B, H]
        x = self.dropout(x, training=training)
        if self.projection is not None:
            x = self.projection(x)
        x = tf.cast(x, self.compute_dtype)
        if self.sequence_output:
            return x, mask
        has_tokens = tf.reduce_any(mask, axis=1)
        return tf.where(has_tokens[:, None], x, tf.zeros_like(x))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "checkpoint_dir": self.checkpoint_dir,
                "freeze": self.freeze,
                "lower_case": self.lower_case,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "sequence_output": self.sequence_output,
            }
        )
        return config
