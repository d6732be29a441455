"""Tiny BERT checkpoints in Google's original layout, and BERT's forward pass in NumPy.

For tests, the example pipeline and benchmarks: no pretrained BERT can be
downloaded here, so :func:`write_tiny_bert_checkpoint` writes a seeded random
one with exactly the files and TF1 variable names of Google's releases, and
:func:`bert_forward` is an independent reference for what the encoder must
compute on it (Devlin et al. 2019; Google's ``modeling.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# [PAD] first and [unused0] before [UNK], as in Google's vocab.txt, so the
# special ids are not simply 0..4.
TINY_VOCABULARY = (
    "[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "a", "is", "red", "green", "blue", "cat", "dog", "thing", "play",
    "hello", "world", "un", "happy", "very", "small", "big", "car",
    "##s", "##ing", "##ed", "##y", "##aff", "##able",
    ".", ",", "!", "?", "'", "-", "1", "2", "##1", "##2",
)  # fmt: skip
TINY_BERT_CONFIG = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 16,
    "initializer_range": 0.02,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "type_vocab_size": 2,
    "vocab_size": len(TINY_VOCABULARY),
}


def tiny_bert_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random float32 values under Google's BERT variable names.

    Includes the pre-training heads (``cls/...``) a released checkpoint has
    and the encoder does not use.
    """
    rng = np.random.default_rng(seed)
    hidden, inner = config["hidden_size"], config["intermediate_size"]

    def normal(*shape, scale=0.2):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    def layer_norm(prefix):
        return {f"{prefix}/LayerNorm/gamma": 1.0 + normal(hidden), f"{prefix}/LayerNorm/beta": normal(hidden)}

    weights = {
        "bert/embeddings/word_embeddings": normal(config["vocab_size"], hidden, scale=1.0),
        "bert/embeddings/token_type_embeddings": normal(config["type_vocab_size"], hidden, scale=1.0),
        "bert/embeddings/position_embeddings": normal(config["max_position_embeddings"], hidden, scale=1.0),
        **layer_norm("bert/embeddings"),
        "bert/pooler/dense/kernel": normal(hidden, hidden, scale=0.5),
        "bert/pooler/dense/bias": normal(hidden),
        "cls/predictions/output_bias": normal(config["vocab_size"]),
        "cls/seq_relationship/output_weights": normal(2, hidden),
        "cls/seq_relationship/output_bias": normal(2),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"bert/encoder/layer_{i}"
        for part in ("query", "key", "value"):
            weights[f"{layer}/attention/self/{part}/kernel"] = normal(hidden, hidden, scale=0.5)
            weights[f"{layer}/attention/self/{part}/bias"] = normal(hidden)
        weights[f"{layer}/attention/output/dense/kernel"] = normal(hidden, hidden, scale=0.5)
        weights[f"{layer}/attention/output/dense/bias"] = normal(hidden)
        weights.update(layer_norm(f"{layer}/attention/output"))
        weights[f"{layer}/intermediate/dense/kernel"] = normal(hidden, inner, scale=0.5)
        weights[f"{layer}/intermediate/dense/bias"] = normal(inner)
        weights[f"{layer}/output/dense/kernel"] = normal(inner, hidden, scale=0.5)
        weights[f"{layer}/output/dense/bias"] = normal(hidden)
        weights.update(layer_norm(f"{layer}/output"))
    return weights


def write_tiny_bert_checkpoint(
    directory: str | Path,
    config: dict | None = None,
    vocabulary: tuple[str, ...] = TINY_VOCABULARY,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
) -> Path:
    """Writes ``bert_config.json``, ``vocab.txt`` and ``bert_model.ckpt.*`` to ``directory``.

    The checkpoint is a TF1 name-based one, written with ``SaveV2`` (the op
    ``tf.compat.v1.train.Saver`` uses), as Google's releases are.

    Args:
        directory: the folder (created).
        config: ``bert_config.json`` content; default: TINY_BERT_CONFIG.
        vocabulary: the ``vocab.txt`` tokens.
        seed: seed of :func:`tiny_bert_weights`.
        weights: the variables to write instead of :func:`tiny_bert_weights`.

    Returns:
        The folder.
    """
    from multimodal_tf.compat import tf  # noqa: PLC0415  (keeps this module light)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(config or TINY_BERT_CONFIG)
    (directory / "bert_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "vocab.txt").write_text("".join(f"{token}\n" for token in vocabulary), encoding="utf-8")
    weights = tiny_bert_weights(config, seed) if weights is None else weights
    names = sorted(weights)
    tf.raw_ops.SaveV2(
        prefix=str(directory / "bert_model.ckpt"),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(weights[name]) for name in names],
    )
    return directory


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-12) * gamma + beta


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation, as Google's original ``modeling.py`` computes it."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def bert_forward(
    weights: dict[str, np.ndarray], config: dict, ids: np.ndarray, gelu=gelu_tanh
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's forward pass in float64 NumPy, one segment (token type 0), mask ``ids != 0``.

    Returns:
        (last hidden layer [B, T, H], pooled output ``tanh(W [CLS] + b)`` [B, H]).
    """
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    ids = np.asarray(ids)
    batch, length = ids.shape
    heads = config["num_attention_heads"]
    size = config["hidden_size"] // heads
    x = (
        w["bert/embeddings/word_embeddings"][ids]
        + w["bert/embeddings/token_type_embeddings"][0]
        + w["bert/embeddings/position_embeddings"][:length]
    )
    x = _layer_norm(x, w["bert/embeddings/LayerNorm/gamma"], w["bert/embeddings/LayerNorm/beta"])
    adder = (1.0 - (ids != 0)[:, None, None, :]) * -10000.0  # [B, 1, 1, T]
    for i in range(config["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}"

        def dense(v, name, p=p):
            return v @ w[f"{p}/{name}/kernel"] + w[f"{p}/{name}/bias"]

        def split(v):  # [B, T, H] -> [B, heads, T, size]
            return v.reshape(batch, length, heads, size).transpose(0, 2, 1, 3)

        q, k, v = (split(dense(x, f"attention/self/{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + adder
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities = scores / scores.sum(-1, keepdims=True)
        context = (probabilities @ v).transpose(0, 2, 1, 3).reshape(batch, length, heads * size)
        attention = _layer_norm(
            dense(context, "attention/output/dense") + x,
            w[f"{p}/attention/output/LayerNorm/gamma"],
            w[f"{p}/attention/output/LayerNorm/beta"],
        )
        inner = gelu(dense(attention, "intermediate/dense"))
        x = _layer_norm(
            dense(inner, "output/dense") + attention,
            w[f"{p}/output/LayerNorm/gamma"],
            w[f"{p}/output/LayerNorm/beta"],
        )
    pooled = np.tanh(x[:, 0] @ w["bert/pooler/dense/kernel"] + w["bert/pooler/dense/bias"])
    return x, pooled
