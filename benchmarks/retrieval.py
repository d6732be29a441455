"""Exact in-graph top-k (what ``mmtf index``'s ``search`` runs) vs faiss approximate indexes.

Corpus: N unit vectors of dimension 64 (the default ``model.alignment.dim``
is 64) drawn around 1,000 random cluster centres, so that neighbours are
structured as in a trained embedding space rather than uniform on the
sphere; queries are corpus points plus noise. For each N:

- exact, TF: ``tf.math.top_k(queries @ corpus^T)`` in a ``tf.function`` on a
  corpus ``tf.Variable`` -- the ``search`` signature minus the query's
  embedding; latency of one query (p50 of 200) and of a batch of 64;
- faiss ``IndexFlatIP`` (exact, reference for recall), ``IndexHNSWFlat``
  (M=32, efSearch=64) and ``IndexIVFFlat`` (nlist=4 sqrt(N), nprobe=8):
  build seconds, one-query latency, recall@10 against exact search.

Run: python benchmarks/retrieval.py [--sizes 10000 100000] [--exact-only 1000000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from multimodal_tf.compat import tf

DIM, K, NUM_QUERIES, BATCH = 64, 10, 200, 64


def corpus_and_queries(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    corpus = centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.integers(0, n, NUM_QUERIES)] + 0.3 * rng.normal(size=(NUM_QUERIES, DIM)).astype(
        np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return corpus, queries.astype(np.float32)


def _p50_ms(fn, inputs) -> float:
    fn(inputs[0])  # trace / warm up
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def exact_tf(corpus: np.ndarray, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    variable = tf.Variable(corpus, trainable=False)

    @tf.function(input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    def search(q):
        return tf.math.top_k(tf.matmul(q, variable, transpose_b=True), k=K)

    one = _p50_ms(lambda q: search(q).indices.numpy(), [queries[i : i + 1] for i in range(NUM_QUERIES)])
    batches = [queries[i : i + BATCH] for i in range(0, NUM_QUERIES - BATCH + 1, BATCH)]
    batch = _p50_ms(lambda q: search(q).indices.numpy(), batches)
    return {"query_ms": one, "batch64_ms": batch}, search(queries).indices.numpy()


def faiss_row(name: str, index, corpus, queries, exact_ids) -> dict:
    start = time.perf_counter()
    if not index.is_trained:
        index.train(corpus)
    index.add(corpus)
    build = time.perf_counter() - start
    one = _p50_ms(lambda q: index.search(q, K), [queries[i : i + 1] for i in range(NUM_QUERIES)])
    _, ids = index.search(queries, K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exact_ids, strict=True)])
    return {"index": name, "build_s": build, "query_ms": one, "recall@10": float(recall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--exact-only", type=int, nargs="*", default=[1_000_000], help="sizes for exact TF only"
    )
    args = parser.parse_args()
    print(
        f"dim {DIM}, k {K}, {NUM_QUERIES} queries; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads"
    )
    print("| N | method | build s | 1 query ms (p50) | batch 64 ms | recall@10 |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes + args.exact_only:
        corpus, queries = corpus_and_queries(n)
        exact, exact_ids = exact_tf(corpus, queries)
        size_mb = corpus.nbytes / 2**20
        print(
            f"| {n:,} | exact, TF matmul + top_k ({size_mb:.0f} MB) | - | {exact['query_ms']:.2f} | "
            f"{exact['batch64_ms']:.2f} | 1.000 |"
        )
        if n in args.exact_only:
            continue
        hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 64
        nlist = int(4 * np.sqrt(n))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = 8
        for name, index in (
            ("faiss IndexFlatIP (exact)", faiss.IndexFlatIP(DIM)),
            ("faiss HNSW32, efSearch 64", hnsw),
            (f"faiss IVF{nlist}, nprobe 8", ivf),
        ):
            row = faiss_row(name, index, corpus, queries, exact_ids)
            print(
                f"| {n:,} | {row['index']} | {row['build_s']:.1f} | {row['query_ms']:.2f} | - | "
                f"{row['recall@10']:.3f} |"
            )


if __name__ == "__main__":
    main()
