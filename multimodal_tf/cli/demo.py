"""``mmtf demo``: synthetic data -> train -> evaluate -> export -> serve -> query."""

from __future__ import annotations


def cmd_demo(args) -> int:
    from multimodal_tf.demo import run_demo  # noqa: PLC0415

    return run_demo(
        args.out, manifest=args.manifest, overrides=args.set or [], num_examples=args.num_examples
    )


def add_parser(subparsers) -> None:
    """Adds ``mmtf demo``."""
    p = subparsers.add_parser("demo", help="synthetic data -> train -> evaluate -> export -> serve -> query")
    p.add_argument("--out", default="runs/demo_job")
    p.add_argument("--manifest", help="use this manifest instead of the synthetic set")
    p.add_argument(
        "--num-examples", type=int, default=2400, help="size of the synthetic set (without --manifest)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the demo config")
    p.set_defaults(func=cmd_demo, serves_concurrently=True)
