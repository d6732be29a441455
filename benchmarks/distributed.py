"""Training throughput per strategy: default vs mirrored vs 2-worker multi_worker.

The same config and data train with each strategy; examples/s is the median
of the epochs after the first (which traces the graphs), as logged by
callbacks.Throughput (global examples, validation included). ``mirrored``
splits this host's CPU into two logical devices; ``multi_worker`` runs two
local processes through ``mmtf launch``. Overhead = default rate / rate.

    python benchmarks/distributed.py [--examples 480] [--epochs 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from multimodal_tf.compat import tf

# Before TensorFlow initialises its devices: two logical CPUs for mirrored.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

from multimodal_tf import launch  # noqa: E402
from multimodal_tf.data.cache import prepare_data  # noqa: E402
from multimodal_tf.data.synthetic import synthesize  # noqa: E402
from multimodal_tf.testing import TINY_OVERRIDES, tiny_config  # noqa: E402
from multimodal_tf.training import train  # noqa: E402

LAUNCH_TIMEOUT = 600  # seconds; the whole benchmark stays bounded


def steady_rate(run_dir: Path) -> float:
    rates = json.loads((run_dir / "history.json").read_text())["examples_per_second"]
    return statistics.median(rates[1:] or rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=480, help="synthetic examples")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--work-dir", help="default: a temporary folder")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mmtf_bench_"))
    manifest = synthesize(work / "data", num_examples=args.examples, seed=0)
    overrides = (
        f"data.manifest={manifest}",
        f"data.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        "train.early_stopping_patience=0",
        "train.lr_schedule=constant",
    )
    prepare_data(tiny_config(*overrides).data, progress=False)
    results = {}
    for strategy in ("default", "mirrored"):
        start = time.perf_counter()
        run = train(
            tiny_config(*overrides, f"train.strategy={strategy}", f"train.output_dir={work / strategy}")
        )
        results[strategy] = (steady_rate(run), time.perf_counter() - start)
    start = time.perf_counter()
    sets = (
        TINY_OVERRIDES
        + overrides
        + ("train.strategy=multi_worker", f"train.output_dir={work / 'multi_worker'}")
    )
    command = ["mmtf", "train"] + [arg for o in sets for arg in ("--set", o)]
    code = launch.launch(command, workers=2, log_dir=work / "logs", timeout=LAUNCH_TIMEOUT, echo_chief=False)
    if code != 0:
        print(f"multi_worker run failed ({code}); see {work / 'logs'}", file=sys.stderr)
        return code
    results["multi_worker x2"] = (steady_rate(work / "multi_worker"), time.perf_counter() - start)

    base = results["default"][0]
    print(
        f"\n{args.examples} synthetic examples, global batch {args.batch_size}, {args.epochs} epochs, tiny model"
    )
    print(f"{'strategy':<16} {'examples/s':>11} {'overhead':>9} {'wall s':>7}")
    for name, (rate, wall) in results.items():
        print(f"{name:<16} {rate:>11,.0f} {base / rate:>8.2f}x {wall:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
