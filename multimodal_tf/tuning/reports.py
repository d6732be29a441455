"""What a search leaves behind: trials.csv / trials.md, objective.png, best_config.yaml."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from multimodal_tf import config as config_lib
from multimodal_tf.tuning.space import apply_values

if TYPE_CHECKING:
    from multimodal_tf.tuning.hypermodel import MultimodalHyperModel

EPOCHS_FILE = "epochs.json"


@dataclasses.dataclass
class TuneResult:
    """What ``tune`` wrote (chief / single process) or ran (worker)."""

    role: str
    project_dir: Path
    best_config: Path | None = None
    best_score: float | None = None
    num_trials: int = 0
    run_dir: Path | None = None
    export_path: Path | None = None
    epochs_trained: int = 0  # by all the search's trials, resumed ones included (budget accounting)


def trial_epochs(tuner, trial_id: str) -> int | None:
    """Epochs a finished trial trained (None: not recorded, e.g. it failed)."""
    path = Path(tuner.get_trial_dir(trial_id)) / EPOCHS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["epochs"] if path.exists() else None


def trial_rows(tuner) -> list[dict]:
    """One row per trial, best objective first (trials without a score last)."""
    oracle = tuner.oracle
    rows = []
    for number, trial_id in enumerate(oracle.start_order or sorted(oracle.trials)):
        trial = oracle.trials[trial_id]
        rows.append(
            {
                "trial": trial_id,
                "number": number,
                "status": trial.status,
                "score": trial.score,
                "best_epoch": trial.best_step + 1 if trial.score is not None else None,
                # A Hyperband trial that resumes a parent counts only its own.
                "epochs": trial_epochs(tuner, trial_id),
                **trial.hyperparameters.values,
            }
        )
    sign = -1 if oracle.objective.direction == "max" else 1
    return sorted(rows, key=lambda r: (r["score"] is None, sign * (r["score"] or 0.0)))


def _plot_objective(rows: list[dict], objective, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    scored = sorted((r["number"], r["score"]) for r in rows if r["score"] is not None)
    best, running = [], None
    for _, score in scored:
        better = running is None or (score > running if objective.direction == "max" else score < running)
        running = score if better else running
        best.append(running)
    fig, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([n + 1 for n, _ in scored], [s for _, s in scored], "o", label="trial")
    axis.plot([n + 1 for n, _ in scored], best, "-", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(objective.name)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(tuner, hypermodel: MultimodalHyperModel, out_dir: Path) -> TuneResult:
    """trials.csv / trials.md (sorted by objective), objective.png and best_config.yaml."""
    rows = trial_rows(tuner)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out_dir / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    objective = tuner.oracle.objective
    lines = [
        f"# Trials ({objective.name}, {objective.direction})",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    (out_dir / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot_objective(rows, objective, out_dir / "objective.png")
    result = TuneResult(
        "single", out_dir, num_trials=len(rows), epochs_trained=sum(r["epochs"] or 0 for r in rows)
    )
    best_trials = tuner.oracle.get_best_trials(1)
    if best_trials:
        best = apply_values(hypermodel.config, hypermodel.space, best_trials[0].hyperparameters.values)
        best = config_lib.replace(best, [f"train.output_dir={out_dir / 'best_run'}"])
        result.best_config, result.best_score = out_dir / "best_config.yaml", best_trials[0].score
        config_lib.save(best, result.best_config)
    return result
