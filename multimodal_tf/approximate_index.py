"""Approximate nearest-neighbour search over a corpus of unit vectors (faiss HNSW or IVF).

The faiss-specific half of ``mmtf index --approximate``: build an index,
write it with its corpus ids and a small JSON description into a version's
``assets.extra/``, read it back (checking the three agree) and search it.
faiss has no TensorFlow op, so this index can never be part of a SavedModel
graph: the embedded server runs it in Python next to the SavedModel's
``embed_<modality>`` signature (:mod:`multimodal_tf.serving.approximate_search`);
TF Serving cannot (:func:`multimodal_tf.serving_target.check_ops` says so).

faiss is imported lazily: it is the optional ``[optimize]`` extra and only
approximate versions need it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multimodal_tf.signatures import (
    APPROXIMATE_IDS_FILE,
    APPROXIMATE_INDEX_FILE,
    APPROXIMATE_INFO_FILE,
    ASSETS_EXTRA,
)

HNSW, IVF = "hnsw", "ivf"
KINDS = (HNSW, IVF)
METRIC = "inner_product"  # = cosine on the unit vectors of the shared space


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - faiss-cpu is in the default lock
        raise ImportError(
            "an approximate index needs faiss-cpu (pip install 'multimodal-tf[optimize]')"
        ) from e
    return faiss


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    """How ``mmtf index --approximate`` builds and searches its index.

    Defaults are those of benchmarks/retrieval.py (docs/benchmarks.md):

    Attributes:
        kind: ``hnsw`` (graph; no training) or ``ivf`` (k-means lists).
        hnsw_m: HNSW neighbours per node (memory and build time grow with it).
        ef_construction: HNSW beam width while adding.
        ef_search: HNSW beam width per query (recall vs latency); at least k
            is used (faiss takes max(efSearch, k)).
        nlist: IVF lists; 0 = round(4 * sqrt(N)), at most N.
        nprobe: IVF lists scanned per query (recall vs latency).
    """

    kind: str = HNSW
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    nlist: int = 0
    nprobe: int = 8

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--approximate {self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise ValueError(f"--nlist must be >= 0 (0 = 4 sqrt(N)), got {self.nlist}")

    def params(self, count: int) -> dict:
        """The parameters this kind uses for a corpus of ``count`` (what the JSON records)."""
        if self.kind == HNSW:
            return {"M": self.hnsw_m, "efConstruction": self.ef_construction, "efSearch": self.ef_search}
        nlist = self.nlist or max(1, min(count, round(4 * math.sqrt(count))))
        if nlist > count:  # k-means cannot make more centroids than points
            raise ValueError(f"--nlist {nlist} is larger than the corpus ({count} vectors)")
        return {"nlist": nlist, "nprobe": min(self.nprobe, nlist)}


def build(vectors: np.ndarray, options: IndexOptions):
    """A faiss index (inner product) over ``vectors`` [N, dim] float32; returns (index, params)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    params = options.params(count)
    if options.kind == HNSW:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = params["nprobe"]
    index.add(vectors)
    return index, params


def write(extra_dir: Path, index, params: dict, kind: str, ids: Sequence[str], info: dict) -> None:
    """Writes the index, its ids and the JSON description into ``extra_dir`` (a version's assets.extra)."""
    faiss = _faiss()
    extra_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(extra_dir / APPROXIMATE_INDEX_FILE))
    (extra_dir / APPROXIMATE_IDS_FILE).write_text(json.dumps(list(ids)), encoding="utf-8")
    description = {"kind": kind, "params": params, "count": int(index.ntotal), "dim": int(index.d)}
    description |= {"metric": METRIC, "faiss": faiss.__version__, **info}
    (extra_dir / APPROXIMATE_INFO_FILE).write_text(json.dumps(description, indent=1), encoding="utf-8")


def is_approximate(version_dir: str | Path) -> bool:
    """Whether a version folder holds an approximate index (its JSON description)."""
    return (Path(version_dir) / ASSETS_EXTRA / APPROXIMATE_INFO_FILE).is_file()


class ApproximateIndex:
    """A loaded approximate index: ``search`` is safe from many threads at once.

    faiss CPU indexes are thread-safe for concurrent searches (faiss wiki,
    "Threads and asynchronous calls"; search releases the GIL); only
    changing the index needs a lock. Nothing changes it after loading: the
    search parameters (efSearch, nprobe) go with each call as faiss
    ``SearchParameters`` instead of being set on the shared index.

    Args:
        version_dir: the version folder (its ``assets.extra`` holds the files).

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: the files disagree (count, dim, kind, metric).
    """

    def __init__(self, version_dir: str | Path):
        faiss = _faiss()
        extra = Path(version_dir) / ASSETS_EXTRA
        paths = {
            name: extra / name
            for name in (APPROXIMATE_INFO_FILE, APPROXIMATE_INDEX_FILE, APPROXIMATE_IDS_FILE)
        }
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"approximate index file missing: {path}")
        self.info = json.loads(paths[APPROXIMATE_INFO_FILE].read_text(encoding="utf-8"))
        self.kind, self.dim, self.count = self.info.get("kind"), self.info.get("dim"), self.info.get("count")
        self.index = faiss.read_index(str(paths[APPROXIMATE_INDEX_FILE]))
        self.ids = np.array(
            [i.encode("utf-8") for i in json.loads(paths[APPROXIMATE_IDS_FILE].read_text(encoding="utf-8"))]
            + [b""],  # position -1: faiss's label for "fewer than k results"
            dtype=object,
        )
        self._check(paths)
        params = self.info["params"]
        if self.kind == HNSW:
            self.search_parameters = faiss.SearchParametersHNSW(efSearch=params["efSearch"])
        else:
            self.search_parameters = faiss.SearchParametersIVF(nprobe=params["nprobe"])

    def _check(self, paths: dict) -> None:
        where = paths[APPROXIMATE_INFO_FILE]
        if self.kind not in KINDS or self.info.get("metric") != METRIC:
            raise ValueError(
                f"{where}: kind {self.kind!r} / metric {self.info.get('metric')!r} not supported"
            )
        if self.index.d != self.dim or self.index.ntotal != self.count:
            raise ValueError(
                f"{paths[APPROXIMATE_INDEX_FILE]} has {self.index.ntotal} vectors of dim {self.index.d}; "
                f"{where} says {self.count} of dim {self.dim}"
            )
        if len(self.ids) - 1 != self.count:
            raise ValueError(
                f"{paths[APPROXIMATE_IDS_FILE]} has {len(self.ids) - 1} ids for {self.count} vectors"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, k] bytes, scores [B, k] float32, indices [B, k] int32) of the k best per query.

        Where the index finds fewer than k items (IVF probing small lists),
        the rest are id ``b""``, index -1 and faiss's score for "none".

        Raises:
            ValueError: k outside [1, N], or queries not [B, dim].
        """
        if not 1 <= k <= self.count:
            raise ValueError(f"k must be in [1, {self.count}] (the corpus size), got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {list(queries.shape)}; the index holds dim {self.dim}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, indices = self.index.search(queries, k, params=self.search_parameters)
        return self.ids[indices], scores, indices.astype(np.int32)
