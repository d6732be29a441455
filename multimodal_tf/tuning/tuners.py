"""Keras Tuner tuners over the hypermodel, and ``tune``: run or resume a search."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf import distribute, training
from multimodal_tf import targets as targets_lib
from multimodal_tf.budget import Deadline, keras_callbacks
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.cache import prepare_data
from multimodal_tf.tuning import chief
from multimodal_tf.tuning.hypermodel import MultimodalHyperModel, kt
from multimodal_tf.tuning.reports import EPOCHS_FILE, TuneResult, write_reports
from multimodal_tf.tuning.space import default_search_space

TUNERS = ("random", "bayesian", "hyperband")
REPORT_SHARE = 0.2  # of a time budget, kept for the stopped trial's validation and the reports


def objective_for(monitor: str):
    """Keras Tuner objective for ``train.monitor`` (accuracy/AUC up, losses down)."""
    direction = (
        "max" if any(word in monitor for word in ("acc", "auc", "f1", "precision", "recall")) else "min"
    )
    return kt.Objective(monitor, direction=direction)


def make_tuner(
    name: str,
    hypermodel: MultimodalHyperModel,
    directory: str | Path,
    max_trials: int,
    strategy=None,
    project_name: str | None = None,
):
    """A RandomSearch / BayesianOptimization / Hyperband tuner that resumes from ``directory``."""
    config = hypermodel.config
    common = {
        "objective": objective_for(targets_lib.monitor(config)),
        "directory": str(directory),
        "project_name": project_name or config.name,
        "overwrite": False,  # re-running continues the search
        "seed": config.train.seed,
        "distribution_strategy": strategy,
    }
    if name == "random":
        return _counting(kt.RandomSearch)(hypermodel, max_trials=max_trials, **common)
    if name == "bayesian":
        return _counting(kt.BayesianOptimization)(hypermodel, max_trials=max_trials, **common)
    if name == "hyperband":
        return _counting(kt.Hyperband)(hypermodel, max_epochs=config.train.epochs, factor=3, **common)
    raise ValueError(f"unknown tuner {name!r}; known: {', '.join(TUNERS)}")


def _counting(tuner_class):
    """``tuner_class`` that records each trial's trained epochs in its trial directory.

    keras-tuner keeps only the best epoch's metrics, so the epochs a trial
    actually ran (after early stopping) would be lost; comparing tuners at
    the same epoch budget needs them, also for trials of a resumed search.
    """

    class Counting(tuner_class):
        deadline = None  # a budget.Deadline: no trial starts that could not train past its start-up
        stop_record = None  # the deadline callback's record (first batch times), set by tune
        startup = 0.0  # the longest a trial took from its start to its first trained batch

        def pre_create_trial(self):
            super().pre_create_trial()
            # A trial starts only if it could train at least as long as it
            # takes to start (the longest start so far); less would only score
            # a barely trained model.
            if self.deadline is not None and self.deadline.remaining() <= 2 * self.startup:
                # The oracle answers STOPPED once it holds max_trials trials,
                # so the search ends cleanly and keeps its best trial.
                self.oracle.max_trials = max(1, len(self.oracle.trials))

        def run_trial(self, trial, *args, **kwargs):
            started = time.monotonic()
            histories = super().run_trial(trial, *args, **kwargs)
            first = (self.stop_record or {}).get("first_batch_end")
            if first is not None and first > started:
                self.startup = max(self.startup, first - started)
            runs = histories if isinstance(histories, list) else [histories]
            epochs = sum(len(getattr(run, "epoch", [])) for run in runs)
            path = Path(self.get_trial_dir(trial.trial_id)) / EPOCHS_FILE
            path.write_text(json.dumps({"epochs": epochs}), encoding="utf-8")
            return histories

    Counting.__name__ = Counting.__qualname__ = tuner_class.__name__
    return Counting


def tune(
    config: ExperimentConfig,
    tuner_name: str = "random",
    max_trials: int = 10,
    directory: str | Path = "runs/tune",
    export_best: bool = False,
    progress: bool = True,
    time_budget: float | None = None,
    started: float | None = None,
) -> TuneResult:
    """Runs (or resumes) a search; the chief / single process writes the reports.

    ``time_budget`` (seconds from ``started``, default now) ends the search
    cleanly: the running trial stops at its next batch (its best epoch so
    far is scored), no trial starts after it, and the best trial is kept.
    It bounds the search; ``export_best`` then trains the best config anew.
    """
    if config.train.strategy in distribute.CLUSTER_STRATEGIES:
        raise ValueError(
            f"mmtf tune: trials train with one worker; train.strategy {config.train.strategy!r} "
            "is not supported (use default, mirrored or tpu; mmtf launch --tuner-workers to scale)"
        )
    # Counted from the call (data preparation too), less what the last
    # trial's validation and the reports take after the search stops.
    deadline = Deadline(time_budget and time_budget - min(10.0, REPORT_SHARE * time_budget), started)
    space = config.search_space or default_search_space(config)
    role = chief.role()
    metadata = prepare_data(config.data, progress=progress and role != "worker")
    hypermodel = MultimodalHyperModel(config, metadata, space)
    strategy = distribute.make_strategy(config.train) if config.train.strategy != "default" else None
    tuner = make_tuner(tuner_name, hypermodel, directory, max_trials, strategy)
    project_dir = Path(tuner.project_dir)
    verbose = config.train.verbose
    if role == "chief":
        tuner.oracle.verbose = verbose
        chief.serve_as_chief(tuner)
    else:
        callbacks = []
        if time_budget:
            tuner.deadline, tuner.stop_record = deadline, {}
            callbacks.append(keras_callbacks()[0](deadline, tuner.stop_record))
        tuner.search(verbose=verbose if verbose != 1 or os.isatty(1) else 2, callbacks=callbacks)
    if role == "worker":
        return TuneResult(role, project_dir)
    result = write_reports(tuner, hypermodel, project_dir)
    result.role = role
    if export_best:
        from multimodal_tf.export import export_run  # noqa: PLC0415

        best = config_lib.load([result.best_config])
        result.run_dir = training.train(best, progress=progress)
        result.export_path = export_run(result.run_dir, best.export.base_path, best.export.model_name)
    return result
