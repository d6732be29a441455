"""``mmtf index``: embed a corpus with an aligned export and write a version with ``search``."""

from __future__ import annotations


def cmd_index(args) -> int:
    from multimodal_tf.retrieval import build_index  # noqa: PLC0415

    path = build_index(
        args.export,
        args.manifest,
        args.modality,
        query_modality=args.query_modality or "",
        top_k=args.top_k,
        batch_size=args.batch_size,
    )
    print(f"indexed {args.modality} corpus of {args.manifest} into {path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="embed a manifest's corpus with an aligned export; write a new version with `search`"
    )
    p.add_argument("export", help="an export version directory (BASE/NAME/VERSION) of an aligned model")
    p.add_argument("--manifest", required=True, help="the corpus (rows without --modality are skipped)")
    p.add_argument("--modality", required=True, choices=("image", "text", "audio"), help="what the corpus is")
    p.add_argument("--query-modality", help="the `search` signature's input (default: an aligned partner)")
    p.add_argument("--top-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="corpus embedding batch size")
    p.set_defaults(func=cmd_index)
