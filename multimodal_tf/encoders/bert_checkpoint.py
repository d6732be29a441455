"""A BERT checkpoint folder in Google's original layout, checked before anything is built.

The layout of Google's BERT-Base/Large releases and of the 24 "BERT
miniatures" (e.g. ``uncased_L-2_H-128_A-2``)::

    DIR/bert_config.json          hidden_size, num_hidden_layers, vocab_size, ...
    DIR/bert_model.ckpt.index     a TF1 name-based checkpoint
    DIR/bert_model.ckpt.data-*    (bert/embeddings/..., bert/encoder/layer_N/..., bert/pooler/...)
    DIR/vocab.txt                 the WordPiece vocabulary, one token a line, [PAD] first

Every mismatch is a ``ValueError`` naming the file and what was expected,
raised when the config's tokenizer or the encoder is built (never at
training time).
"""

from __future__ import annotations

import dataclasses
import json
import os

from multimodal_tf.compat import tf

CONFIG_FILE = "bert_config.json"
VOCAB_FILE = "vocab.txt"
CHECKPOINT_NAME = "bert_model.ckpt"
PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
WORD_EMBEDDINGS = "bert/embeddings/word_embeddings"
POOLER_KERNEL, POOLER_BIAS = "bert/pooler/dense/kernel", "bert/pooler/dense/bias"
CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
)
LAYOUT = f"{CONFIG_FILE}, {CHECKPOINT_NAME}.index/.data-*, {VOCAB_FILE} (Google's BERT layout)"


@dataclasses.dataclass(frozen=True)
class BertCheckpoint:
    """What a checked checkpoint folder holds.

    Attributes:
        directory: the folder.
        config: the parsed ``bert_config.json``.
        vocabulary: the tokens of ``vocab.txt`` (index = id).
    """

    directory: str
    config: dict
    vocabulary: tuple[str, ...]

    @property
    def prefix(self) -> str:
        """The checkpoint prefix (``DIR/bert_model.ckpt``)."""
        return os.path.join(self.directory, CHECKPOINT_NAME)

    @property
    def vocab_path(self) -> str:
        return os.path.join(self.directory, VOCAB_FILE)

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, CONFIG_FILE)

    def token_id(self, token: str) -> int:
        return self.vocabulary.index(token)


def read_checkpoint_dir(directory: str) -> BertCheckpoint:
    """Reads and cross-checks a BERT checkpoint folder.

    Raises:
        ValueError: the folder or one of its files is missing, the config
            lacks a key, or the vocabulary does not fit the checkpoint (its
            size differs from ``vocab_size`` or from the rows of
            ``bert/embeddings/word_embeddings``, or it lacks [PAD] first,
            [UNK], [CLS] or [SEP]).
    """
    if not directory:
        raise ValueError(f"text/bert: checkpoint_dir is empty; expected a folder with {LAYOUT}")
    if not tf.io.gfile.isdir(directory):
        raise ValueError(f"text/bert checkpoint_dir {directory!r} is not a folder; expected {LAYOUT}")
    expected = (CONFIG_FILE, VOCAB_FILE, f"{CHECKPOINT_NAME}.index")
    missing = [name for name in expected if not tf.io.gfile.exists(os.path.join(directory, name))]
    if missing:
        raise ValueError(
            f"text/bert checkpoint_dir {directory!r} lacks {', '.join(missing)}; expected {LAYOUT}"
        )
    config_path = os.path.join(directory, CONFIG_FILE)
    try:
        with tf.io.gfile.GFile(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    absent = [key for key in CONFIG_KEYS if key not in config]
    if absent:
        raise ValueError(f"{config_path}: lacks {absent}; expected BERT's config keys {list(CONFIG_KEYS)}")
    vocab_path = os.path.join(directory, VOCAB_FILE)
    with tf.io.gfile.GFile(vocab_path) as f:
        # Google's vocab.txt: one token a line; tokens never hold whitespace.
        vocabulary = tuple(line.rstrip("\r\n") for line in f)
    checkpoint = BertCheckpoint(directory, config, vocabulary)
    _check_vocabulary(checkpoint)
    return checkpoint


def _check_vocabulary(checkpoint: BertCheckpoint) -> None:
    """The vocabulary fits the config and the checkpoint's embedding table."""
    path, vocabulary = checkpoint.vocab_path, checkpoint.vocabulary
    if not vocabulary or vocabulary[0] != PAD:
        raise ValueError(f"{path}: the first token must be {PAD} (id 0 pads), got {vocabulary[:1]}")
    lacking = [token for token in (UNK, CLS, SEP) if token not in vocabulary]
    if lacking:
        raise ValueError(f"{path}: lacks the special tokens {lacking}")
    if len(vocabulary) != checkpoint.config["vocab_size"]:
        raise ValueError(
            f"{path}: {len(vocabulary)} tokens, but {checkpoint.config_path} says "
            f"vocab_size={checkpoint.config['vocab_size']}: the vocabulary belongs to another checkpoint"
        )
    shapes = tf.train.load_checkpoint(checkpoint.prefix).get_variable_to_shape_map()
    if WORD_EMBEDDINGS not in shapes:
        raise ValueError(
            f"{checkpoint.prefix}: no variable {WORD_EMBEDDINGS!r}; expected Google's BERT variable names"
        )
    rows = shapes[WORD_EMBEDDINGS][0]
    if rows != len(vocabulary):
        raise ValueError(
            f"{path}: {len(vocabulary)} tokens, but {WORD_EMBEDDINGS} in {checkpoint.prefix} has {rows} "
            "rows: the vocabulary belongs to another checkpoint"
        )
    unfit = [
        f"{name} {list(shapes[name]) if name in shapes else '(absent)'}, expected {shape}"
        for name, shape in expected_variables(checkpoint.config).items()
        if list(shapes.get(name, ())) != shape
    ]
    if unfit:
        raise ValueError(
            f"{checkpoint.prefix}: {len(unfit)} variables that {checkpoint.config_path} implies are absent "
            "or of another shape (a config of another checkpoint?): " + "; ".join(unfit)
        )


def expected_variables(config: dict) -> dict[str, list[int]]:
    """Name -> shape of every variable BERT with ``config`` reads (Google's names)."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    norm = {"LayerNorm/gamma": [hidden], "LayerNorm/beta": [hidden]}
    variables = {
        WORD_EMBEDDINGS: [config["vocab_size"], hidden],
        "bert/embeddings/token_type_embeddings": [config["type_vocab_size"], hidden],
        "bert/embeddings/position_embeddings": [config["max_position_embeddings"], hidden],
        **{f"bert/embeddings/{k}": v for k, v in norm.items()},
        POOLER_KERNEL: [hidden, hidden],
        POOLER_BIAS: [hidden],
    }
    for i in range(config["num_hidden_layers"]):
        layer = {
            **{f"attention/self/{p}/kernel": [hidden, hidden] for p in ("query", "key", "value")},
            **{f"attention/self/{p}/bias": [hidden] for p in ("query", "key", "value")},
            "attention/output/dense/kernel": [hidden, hidden],
            "attention/output/dense/bias": [hidden],
            **{f"attention/output/{k}": v for k, v in norm.items()},
            "intermediate/dense/kernel": [hidden, inner],
            "intermediate/dense/bias": [inner],
            "output/dense/kernel": [inner, hidden],
            "output/dense/bias": [hidden],
            **{f"output/{k}": v for k, v in norm.items()},
        }
        variables.update({f"bert/encoder/layer_{i}/{k}": v for k, v in layer.items()})
    return variables
