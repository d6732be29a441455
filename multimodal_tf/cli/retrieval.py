"""``mmtf index``: embed a corpus with an aligned export and write a version with ``search``."""

from __future__ import annotations


def cmd_index(args) -> int:
    from multimodal_tf.retrieval import build_index  # noqa: PLC0415

    approximate = None
    if args.approximate:
        from multimodal_tf.approximate_index import IndexOptions  # noqa: PLC0415

        approximate = IndexOptions(
            kind=args.approximate,
            hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction,
            ef_search=args.ef_search,
            nlist=args.nlist,
            nprobe=args.nprobe,
        )
    path = build_index(
        args.export,
        args.manifest,
        args.modality,
        query_modality=args.query_modality or "",
        top_k=args.top_k,
        batch_size=args.batch_size,
        approximate=approximate,
        target_serving=args.target_serving,
    )
    print(f"indexed {args.modality} corpus of {args.manifest} into {path}")
    if approximate is not None:
        print(f"{path}: approximate ({args.approximate}) `search` is served by the embedded server only")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="embed a manifest's corpus with an aligned export; write a new version with `search`"
    )
    p.add_argument("export", help="an export version directory (BASE/NAME/VERSION) of an aligned model")
    p.add_argument("--manifest", required=True, help="the corpus (rows without --modality are skipped)")
    p.add_argument("--modality", required=True, choices=("image", "text", "audio"), help="what the corpus is")
    p.add_argument("--query-modality", help="the `search` signature's input (default: an aligned partner)")
    p.add_argument(
        "--top-k", type=int, default=10, help="results per query (default 10; approximate: the default k)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="corpus embedding batch size")
    p.add_argument(
        "--target-serving",
        help="TF Serving line the version must run on (exact search only; default: the installed TF's)",
    )
    approximate = p.add_argument_group(
        "approximate search (faiss; served by the embedded server only, never by TF Serving)"
    )
    approximate.add_argument(
        "--approximate", choices=("hnsw", "ivf"), help="write a faiss index instead of exact in-graph search"
    )
    approximate.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (default 32)")
    approximate.add_argument("--ef-construction", type=int, default=40, help="HNSW build beam (default 40)")
    approximate.add_argument("--ef-search", type=int, default=64, help="HNSW query beam (default 64)")
    approximate.add_argument("--nlist", type=int, default=0, help="IVF lists (default 0: 4 sqrt(N))")
    approximate.add_argument("--nprobe", type=int, default=8, help="IVF lists scanned per query (default 8)")
    p.set_defaults(func=cmd_index)
