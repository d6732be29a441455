"""Hyperband vs random search at the same epoch budget, side by side, in one run.

    python benchmarks/tuning.py --config pipelines/emoji3.yaml --max-epochs 9

Hyperband (``max_epochs``, factor 3) runs first; its epoch budget (epochs
actually trained, after early stopping) then sets how many random-search
trials of ``max_epochs`` epochs run, so both spend about the same training.
Both use the same search space (``--search-space``, default
``pipelines/search_space.yaml``), data pipeline, seed and objective
(validation accuracy). Prints best objective, trials, epochs and wall time
of each. Results go to ``--directory`` (re-running resumes both searches).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "pipelines" / "emoji3.yaml"))
    parser.add_argument("--search-space", default=str(REPO / "pipelines" / "search_space.yaml"))
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--directory", default="runs/tune_compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from multimodal_tf import config as config_lib
    from multimodal_tf.tuning import tune

    overrides = [f"train.epochs={args.max_epochs}", "train.verbose=0", *args.set]
    config = config_lib.load([args.config, args.search_space], overrides)
    rows = []
    start = time.perf_counter()
    hyperband = tune(config, "hyperband", directory=Path(args.directory) / "hyperband", progress=False)
    rows.append(("hyperband", hyperband, time.perf_counter() - start))
    random_trials = max(1, math.ceil(hyperband.epochs_trained / args.max_epochs))
    start = time.perf_counter()
    random = tune(config, "random", random_trials, Path(args.directory) / "random", progress=False)
    rows.append(("random", random, time.perf_counter() - start))

    print(f"\n{config.name}: best {config.train.monitor}, max {args.max_epochs} epochs per trial")
    print(f"  {'tuner':<12}{'best':>8}{'trials':>8}{'epochs':>8}{'wall s':>9}")
    for name, result, seconds in rows:
        print(
            f"  {name:<12}{result.best_score:>8.4f}{result.num_trials:>8}{result.epochs_trained:>8}{seconds:>9.0f}"
        )
    print(f"  hyperband / random best: {rows[0][1].best_score / rows[1][1].best_score:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
