"""Cross-modal retrieval in the aligned space: embed signatures, ``mmtf index``, metrics.

* :class:`EmbeddingModule`: the ``embed_<modality>`` signatures of an export
  (raw bytes -> the serving preprocessing -> unit vectors).
* :func:`build_index`: ``mmtf index`` embeds a manifest's corpus with an
  export's own ``embed_<modality>`` and writes the next version of the
  model, with the corpus inside it and a ``search`` signature: exact top-k
  (a matmul and ``tf.math.top_k``) on the corpus variable. Every op is core
  TF, so TF Serving runs it (docs/retrieval.md gives the size limit).
  With ``approximate``: the export's SavedModel plus a faiss index in
  ``assets.extra`` (:mod:`multimodal_tf.approximate_index`), whose
  ``search`` only the embedded server runs.
* :func:`retrieval_metrics`: recall@k, median rank and mAP of a query set
  against a gallery where query i's one relevant item is gallery item i.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multimodal_tf import config as config_lib
from multimodal_tf.alignment import embedding_model
from multimodal_tf.approximate_index import IndexOptions
from multimodal_tf.compat import tf
from multimodal_tf.config import MODALITIES
from multimodal_tf.data.manifest import read_manifest
from multimodal_tf.serving_target import APPROXIMATE_SERVING_NOTE, ExportError
from multimodal_tf.signatures import (
    ASSETS_EXTRA,
    CLASSIFY_METHOD,
    CLASSIFY_SIGNATURE,
    EMBED_PREFIX,
    EMBEDDING,
    INDEX_FILE,
    SEARCH_IDS,
    SEARCH_INDICES,
    SEARCH_SCORES,
    SEARCH_SIGNATURE,
)

RECALL_AT = (1, 5, 10)


def _string_spec(name: str) -> tf.TensorSpec:
    return tf.TensorSpec([None], tf.string, name=name)


class EmbeddingModule(tf.Module):
    """``embed_<modality>`` signatures: raw [B] strings -> ``embedding`` [B, dim] unit vectors.

    The raw input goes through the export's own :class:`Preprocessor` with
    the other modalities empty, exactly as ``serving_default`` would see a
    request that holds only this modality.

    Args:
        model: the trained model (with ``model.alignment``).
        preprocessor: the export's preprocessor.
        modalities: the aligned modalities.
    """

    def __init__(self, model, preprocessor, modalities: Sequence[str]):
        super().__init__(name="embedding")
        self.preprocessor = preprocessor
        self.models = {m: embedding_model(model, m) for m in modalities}
        self.functions = {m: self._function(m) for m in modalities}

    def _function(self, modality: str):
        def embed(raw):
            empty = tf.fill(tf.shape(raw), "")
            inputs = {m: raw if m == modality else empty for m in self.preprocessor.modalities}
            model_features = self.preprocessor(inputs)
            return {EMBEDDING: self.models[modality](model_features[modality], training=False)}

        return tf.function(embed, input_signature=[_string_spec(modality)])

    def signatures(self) -> dict:
        return {f"{EMBED_PREFIX}{m}": fn.get_concrete_function() for m, fn in self.functions.items()}


def read_corpus(manifest: str | Path, modality: str, data_config) -> tuple[list[str], list[bytes]]:
    """(ids, raw bytes) of the manifest rows that have ``modality`` (file bytes or text).

    Raises:
        ValueError: no row has it, or an id repeats (naming the rows).
    """
    records = read_manifest(manifest, data_config, labelled=False).records
    ids, raw, seen = [], [], {}
    for record in records:
        cell = getattr(record, modality)
        if not cell:
            continue
        if record.id in seen:
            raise ValueError(f"{manifest}: id {record.id!r} on rows {seen[record.id]} and {record.row}")
        seen[record.id] = record.row
        if modality == "text":
            raw.append(cell)
        else:
            try:
                raw.append(Path(cell).read_bytes())
            except OSError as e:
                raise ValueError(f"{manifest} row {record.row} ({record.id}): {modality} file: {e}") from None
        ids.append(record.id)
    if not ids:
        raise ValueError(f"{manifest}: no row has a {modality} (column {modality!r} empty or missing)")
    return ids, raw


def embed_raw(signature, modality: str, raw: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
    """[N, dim] embeddings of ``raw`` through an ``embed_<modality>`` signature, in batches."""
    chunks = [
        signature(**{modality: tf.constant(list(raw[i : i + batch_size]), tf.string)})[EMBEDDING].numpy()
        for i in range(0, len(raw), batch_size)
    ]
    return np.concatenate(chunks)


class SearchModule(tf.Module):
    """An export plus a corpus: its signatures, and ``search`` over the corpus.

    Args:
        base: the loaded export (``tf.saved_model.load``); saved again whole.
        corpus: [N, dim] float32 unit vectors.
        ids: the N corpus ids.
        top_k: results per query (at most N).
        query_modalities: the aligned modalities a query may be; the first
            is ``search``'s, each also gets ``search_<modality>``.
    """

    def __init__(self, base, corpus: np.ndarray, ids: Sequence[str], top_k: int, query_modalities):
        super().__init__(name="search")
        self.base = base
        # Variables, not constants: a graph constant over 2 GB cannot be saved.
        self.corpus = tf.Variable(corpus.astype(np.float32), trainable=False, name="corpus")
        self.ids = tf.Variable(tf.constant(list(ids), tf.string), trainable=False, name="corpus_ids")
        self.top_k = min(top_k, len(ids))
        self.query_modalities = tuple(query_modalities)
        self.functions = {m: self._function(m) for m in self.query_modalities}

    def _function(self, modality: str):
        embed = self.base.signatures[f"{EMBED_PREFIX}{modality}"]

        def search(raw):
            queries = embed(**{modality: raw})[EMBEDDING]
            scores = tf.matmul(queries, self.corpus, transpose_b=True)  # cosine: both are unit vectors
            top = tf.math.top_k(scores, k=self.top_k)
            return {
                SEARCH_IDS: tf.gather(self.ids, top.indices),
                SEARCH_SCORES: top.values,
                SEARCH_INDICES: top.indices,
            }

        return tf.function(search, input_signature=[_string_spec(modality)])

    def signatures(self) -> dict:
        signatures = dict(self.base.signatures)
        for i, (modality, fn) in enumerate(self.functions.items()):
            concrete = fn.get_concrete_function()
            signatures[f"{SEARCH_SIGNATURE}_{modality}"] = concrete
            if i == 0:
                signatures[SEARCH_SIGNATURE] = concrete
        return signatures


def build_index(
    export_dir: str | Path,
    manifest: str | Path,
    modality: str,
    query_modality: str = "",
    top_k: int = 10,
    batch_size: int = 64,
    approximate: IndexOptions | None = None,
    target_serving: str | None = None,
) -> Path:
    """``mmtf index``: embeds the corpus and writes the next version with ``search``.

    Args:
        export_dir: an export version (``BASE/NAME/VERSION``) of an aligned model.
        manifest: the corpus; rows without ``modality`` are skipped.
        modality: what the corpus is (``image``, ``text``, ``audio``).
        query_modality: ``search``'s input; default the first modality aligned
            with ``modality``. Every aligned modality also gets ``search_<m>``.
        top_k: results per query (an approximate ``search`` takes ``k`` per request; this is its default).
        batch_size: corpus embedding batch size.
        approximate: the faiss index's options:
            write a faiss index instead of the in-graph corpus (served by the
            embedded server only); None: exact search.
        target_serving: the TF Serving line the version must run on (see
            :func:`check_ops`); None: the installed TF's. With ``approximate``
            naming one is an error: TF Serving cannot run faiss.

    Returns:
        The new version's directory (``BASE/NAME/<highest + 1>``).
    """
    from multimodal_tf.export import check_ops, next_version, set_method_name, staged_version  # noqa: PLC0415

    export_dir = Path(export_dir)
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if approximate is not None and target_serving:
        raise ExportError(
            f"--approximate {approximate.kind} with --target-serving {target_serving}: "
            f"{APPROXIMATE_SERVING_NOTE}; drop --target-serving (or --approximate for exact search)"
        )
    config = config_lib.load([export_dir / ASSETS_EXTRA / "config.yaml"], strict=False)
    alignment = config.model.alignment
    partners = [m for pair in alignment.pairs if modality in pair for m in pair if m != modality]
    if not alignment.enabled or modality not in alignment.modalities:
        raise ValueError(
            f"{export_dir}: the model aligns {alignment.modalities or 'nothing'}, not {modality!r}"
        )
    queries = [query_modality] if query_modality else []
    queries += [m for m in MODALITIES if m in alignment.modalities and m not in queries]
    if query_modality and query_modality not in alignment.modalities:
        raise ValueError(
            f"--query-modality {query_modality!r} is not aligned; aligned: {alignment.modalities}"
        )
    if not query_modality:  # the partner first, so "search" takes another modality
        queries.sort(key=lambda m: (m not in partners, m == modality))
    ids, raw = read_corpus(manifest, modality, config.data)
    base = tf.saved_model.load(str(export_dir))
    if approximate is not None and SEARCH_SIGNATURE in base.signatures:
        raise ValueError(f"{export_dir} is already an indexed version (it has `search`); index its export")
    corpus = embed_raw(base.signatures[f"{EMBED_PREFIX}{modality}"], modality, raw, batch_size)
    info = {"source": str(export_dir), "manifest": str(manifest), "modality": modality}
    info |= {"size": len(ids), "dim": int(corpus.shape[1]), "top_k": min(top_k, len(ids)), "queries": queries}
    model_dir = export_dir.parent
    version = next_version(model_dir)
    with staged_version(model_dir, version) as tmp:
        if approximate is not None:
            _write_approximate(export_dir, tmp, corpus, ids, approximate, info)
        else:
            module = SearchModule(base, corpus, ids, top_k, queries)
            tf.saved_model.save(module, str(tmp), signatures=module.signatures())
            set_method_name(tmp, CLASSIFY_SIGNATURE, CLASSIFY_METHOD)
            check_ops(tmp, target_serving)
            shutil.copytree(export_dir / ASSETS_EXTRA, tmp / ASSETS_EXTRA, dirs_exist_ok=True)
        (tmp / ASSETS_EXTRA / INDEX_FILE).write_text(json.dumps(info, indent=1))
    return model_dir / str(version)


def _write_approximate(
    export_dir: Path, tmp: Path, corpus: np.ndarray, ids, options: IndexOptions, info: dict
) -> None:
    """The export's SavedModel unchanged (its ``embed_*`` embed the queries) plus a faiss index.

    The SavedModel files are copied, not re-saved: the version's graph is
    the export's, byte for byte, so whatever ran the export runs this one.
    The index goes to ``assets.extra/``, which the SavedModel loader (and
    so TF Serving) ignores apart from the warmup file.
    """
    from multimodal_tf import approximate_index  # noqa: PLC0415

    shutil.copytree(export_dir, tmp, dirs_exist_ok=True)
    index, params = approximate_index.build(corpus, options)
    keys = ("modality", "queries", "top_k", "source")
    approximate_index.write(tmp / ASSETS_EXTRA, index, params, options.kind, ids, {k: info[k] for k in keys})


def ranks_of(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1-based rank of gallery item i for query i (ties counted against it), [N]."""
    scores = queries @ gallery.T
    positive = np.diag(scores)[:, None]
    return 1 + (scores > positive).sum(axis=1) + ((scores == positive).sum(axis=1) - 1)


def retrieval_metrics(queries: np.ndarray, gallery: np.ndarray) -> dict:
    """recall@1/5/10, median rank and mAP, each with its chance level.

    Query i's one relevant item is gallery item i, so average precision is
    1 / rank and mAP is the mean reciprocal rank. Chance (a random ranking
    of N items): recall@k = k / N, median rank (N + 1) / 2, mAP = H_N / N.
    """
    ranks = ranks_of(queries, gallery)
    n = len(ranks)
    metrics = {"count": n}
    for k in RECALL_AT:
        metrics[f"recall@{k}"] = float(np.mean(ranks <= k))
        metrics[f"chance_recall@{k}"] = min(k, n) / n
    metrics["median_rank"] = float(np.median(ranks))
    metrics["chance_median_rank"] = (n + 1) / 2
    metrics["mAP"] = float(np.mean(1.0 / ranks))
    metrics["chance_mAP"] = float(np.sum(1.0 / np.arange(1, n + 1)) / n)
    return metrics


def split_embeddings(model, config, metadata, split: str) -> tuple[dict, dict]:
    """Unit embeddings and presence flags of every aligned modality on ``split``.

    Returns:
        ``(embeddings, presence)``: modality -> [N, dim] float32 and [N] bool.
    """
    from multimodal_tf.data.features import presence_name  # noqa: PLC0415
    from multimodal_tf.data.pipeline import make_dataset  # noqa: PLC0415

    modalities = config.model.alignment.modalities
    embedders = {m: embedding_model(model, m) for m in modalities}
    embeddings = {m: [] for m in modalities}
    presence = {m: [] for m in modalities}
    for x, _ in make_dataset(config, split, training=False, metadata=metadata):
        for m in modalities:
            embeddings[m].append(embedders[m](x[m], training=False).numpy())
            presence[m].append(x[presence_name(m)].numpy() > 0)
    return (
        {m: np.concatenate(v) for m, v in embeddings.items()},
        {m: np.concatenate(v) for m, v in presence.items()},
    )


def retrieval_report(model, config, metadata, split: str) -> list[dict]:
    """:func:`retrieval_metrics` for each aligned pair, both directions, on ``split``.

    The queries and the gallery are the split's examples that have both
    modalities of the pair; each query's relevant item is its own example.
    """
    embeddings, presence = split_embeddings(model, config, metadata, split)
    rows = []
    for first, second in config.model.alignment.pairs:
        both = presence[first] & presence[second]
        for query, gallery in ((first, second), (second, first)):
            metrics = retrieval_metrics(embeddings[query][both], embeddings[gallery][both])
            rows.append({"query": query, "gallery": gallery, **metrics})
    return rows


def retrieval_markdown(rows: list[dict]) -> str:
    """The report's retrieval table (value / chance)."""
    lines = [
        "## Retrieval (query -> gallery; value / chance)",
        "",
        "| query -> gallery | N | R@1 | R@5 | R@10 | median rank | mAP |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[f'recall@{k}']:.3f} / {row[f'chance_recall@{k}']:.3f}" for k in RECALL_AT]
        cells.append(f"{row['median_rank']:.1f} / {row['chance_median_rank']:.1f}")
        cells.append(f"{row['mAP']:.3f} / {row['chance_mAP']:.3f}")
        lines.append(f"| {row['query']} -> {row['gallery']} | {row['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
