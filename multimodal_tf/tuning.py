"""``mmtf tune``: Keras Tuner over experiment configs.

A hyperparameter is a config override: the search space (``search_space`` in
an experiment YAML, e.g. pipelines/search_space.yaml) maps each
hyperparameter name to a spec::

    learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, sampling: log, key: train.learning_rate}
    fusion: {type: choice, values: [concat, gated], key: model.fusion.name}
    dropout: {type: float, min: 0.0, max: 0.5, step: 0.1,
              key: [model.head.dropout_rate, model.fusion.dropout_rate]}

``type`` is ``choice`` (``values``, optional ``ordered``), ``int`` or
``float`` (``min``, ``max``, optional ``step``, ``sampling``:
linear | log | reverse_log) or ``boolean``; ``key`` is one config key path or
a list of them (one value sets them all). Each trial builds its model with
``models.build_model`` and trains on ``data.pipeline.make_dataset``, compiled
like ``mmtf train`` does.

Distributed tuning runs Keras Tuner's chief/worker mode from the
``KERASTUNER_*`` variables that ``mmtf launch --tuner-workers N`` sets; each
trial then trains with a single-worker strategy (default, mirrored or tpu).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from multimodal_tf import config as config_lib
from multimodal_tf import distribute, training
from multimodal_tf.cli import add_config_args
from multimodal_tf.compat import import_keras_tuner, keras
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.data.text import vocabulary_size
from multimodal_tf.models import build_model, loss_for
from multimodal_tf.registry import FUSIONS

kt = import_keras_tuner()

TUNERS = ("random", "bayesian", "hyperband")
SPEC_TYPES = ("choice", "int", "float", "boolean")
SPEC_FIELDS = {"type", "key", "values", "ordered", "min", "max", "step", "sampling"}
# How often the tuner chief checks whether every worker is done (keras-tuner's
# own loop sleeps 20 s, which would dominate small searches).
CHIEF_POLL_SECONDS = 1.0


def default_search_space(config: ExperimentConfig) -> dict[str, dict]:
    """Encoder widths/depths of the configured modalities, fusion, dropout, LR, batch size.

    pipelines/search_space.yaml spells the same space out for editing.
    """
    import multimodal_tf.fusion  # noqa: F401  (registers every fusion family)

    space: dict[str, dict] = {}
    for modality in config.model.modalities:
        key = f"model.{modality}_encoder"
        low, high = (1, 2) if modality == "text" else (2, 3)  # recurrent layers vs conv blocks
        space[f"{modality}_width"] = dict(type="choice", values=[16, 32, 64], key=f"{key}.width")
        space[f"{modality}_depth"] = dict(type="int", min=low, max=high, key=f"{key}.depth")
    space["fusion"] = dict(type="choice", values=FUSIONS.keys(), key="model.fusion.name")
    dropout_keys = ["model.head.dropout_rate", "model.fusion.dropout_rate"]
    space["dropout_rate"] = dict(type="float", min=0.0, max=0.5, step=0.1, key=dropout_keys)
    modality_keys = [f"model.modality_dropout.{m}" for m in config.model.modalities]
    space["modality_dropout"] = dict(type="float", min=0.0, max=0.3, step=0.1, key=modality_keys)
    space["learning_rate"] = dict(type="float", min=1e-4, max=1e-2, sampling="log", key="train.learning_rate")
    space["batch_size"] = dict(type="choice", values=[16, 32, 64], key="data.batch_size")
    return space


def _keys(name: str, spec: dict) -> list[str]:
    keys = spec.get("key")
    keys = [keys] if isinstance(keys, str) else keys
    if not keys or not all(isinstance(k, str) for k in keys):
        raise config_lib.ConfigError(f"search_space.{name}.key: expected a config key path or a list of them")
    return list(keys)


def declare(hp, name: str, spec: dict):
    """Declares hyperparameter ``name`` from its spec on ``hp``; returns its value."""
    where = f"search_space.{name}"
    if not isinstance(spec, dict):
        raise config_lib.ConfigError(f"{where}: expected a mapping, got {spec!r}")
    unknown = set(spec) - SPEC_FIELDS
    if unknown or spec.get("type") not in SPEC_TYPES:
        raise config_lib.ConfigError(
            f"{where}: type must be one of {SPEC_TYPES} (got {spec.get('type')!r}); "
            f"unknown fields {sorted(unknown)}; known: {sorted(SPEC_FIELDS)}"
        )
    _keys(name, spec)
    kind = spec["type"]
    try:
        if kind == "choice":
            return hp.Choice(name, list(spec["values"]), ordered=spec.get("ordered"))
        if kind == "boolean":
            return hp.Boolean(name)
        number = int if kind == "int" else float
        step = spec.get("step")
        step = None if step is None else number(step)
        method = hp.Int if kind == "int" else hp.Float
        return method(
            name, number(spec["min"]), number(spec["max"]), step=step, sampling=spec.get("sampling", "linear")
        )
    except (KeyError, TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"{where}: invalid {kind} spec {spec!r}: {e}") from None


def _yaml_scalar(value: Any) -> str:
    """A scalar as ``--set`` text that YAML reads back as the same value (1e-4 stays a float)."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def apply_values(config: ExperimentConfig, space: dict, values: dict) -> ExperimentConfig:
    """The config with each hyperparameter's value written to its key(s).

    A key of a field that the trial's encoder or fusion family lacks (e.g.
    ``model.fusion.dropout_rate`` when ``concat`` is chosen) is skipped.
    """
    overrides = [
        f"{key}={_yaml_scalar(values[name])}" for name, spec in space.items() for key in _keys(name, spec)
    ]
    return config_lib.replace(config, overrides, strict=False)


class MultimodalHyperModel(kt.HyperModel):
    """Maps hyperparameters to config overrides and trains like ``mmtf train``.

    Args:
        config: the base experiment (data, model and training defaults).
        metadata: the converted dataset's metadata (classes, vocabulary, counts).
        space: the search space (see the module docstring).
    """

    def __init__(self, config: ExperimentConfig, metadata: DatasetMetadata, space: dict, **kwargs):
        super().__init__(name=config.name, tunable=True, **kwargs)
        self.config = config
        self.metadata = metadata
        self.space = space
        self.num_classes = config.model.num_classes or metadata.num_classes

    def trial_config(self, hp) -> ExperimentConfig:
        values = {name: declare(hp, name, spec) for name, spec in self.space.items()}
        return apply_values(self.config, self.space, values)

    def _steps_per_epoch(self, config: ExperimentConfig) -> int:
        return math.ceil(self.metadata.counts["train"]["examples"] / config.data.batch_size)

    def build(self, hp):
        config = self.trial_config(hp)
        training.set_seed(config.train.seed)
        model = build_model(
            config, self.num_classes, vocabulary_size(config.data.text, self.metadata.vocabulary)
        )
        model.compile(
            optimizer=training.make_optimizer(config, self._steps_per_epoch(config)),
            loss=loss_for(config),
            metrics=training.metrics_for(config),
            jit_compile=config.train.jit_compile,
            steps_per_execution=config.train.steps_per_execution,
        )
        return model

    def datasets(self, config: ExperimentConfig):
        """(train, val) datasets of the real pipeline for one trial's config."""
        drop = config.train.strategy == "tpu"  # static shapes on TPUs
        weights = training.class_weights(self.metadata, config.train.class_weights)
        train = make_dataset(config, "train", metadata=self.metadata, drop_remainder=drop)
        val = make_dataset(config, "val", training=False, metadata=self.metadata, drop_remainder=drop)
        return (
            training.supervised_dataset(train, config, self.num_classes, weights),
            training.supervised_dataset(val, config, self.num_classes),
        )

    def fit(self, hp, model, *args, **kwargs):
        config = self.trial_config(hp)
        train, val = self.datasets(config)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if config.train.early_stopping_patience > 0:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=config.train.monitor, patience=config.train.early_stopping_patience
                )
            )
        kwargs.setdefault("epochs", config.train.epochs)
        return model.fit(train, validation_data=val, callbacks=callbacks, **kwargs)


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
        "objective": objective_for(config.train.monitor),
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


EPOCHS_FILE = "epochs.json"


def _counting(tuner_class):
    """``tuner_class`` that records each trial's trained epochs in its trial directory.

    keras-tuner keeps only the best epoch's metrics, so the epochs a trial
    actually ran (after early stopping) would be lost; comparing tuners at
    the same epoch budget needs them, also for trials of a resumed search.
    """

    class Counting(tuner_class):
        def run_trial(self, trial, *args, **kwargs):
            histories = super().run_trial(trial, *args, **kwargs)
            runs = histories if isinstance(histories, list) else [histories]
            epochs = sum(len(getattr(run, "epoch", [])) for run in runs)
            path = Path(self.get_trial_dir(trial.trial_id)) / EPOCHS_FILE
            path.write_text(json.dumps({"epochs": epochs}), encoding="utf-8")
            return histories

    Counting.__name__ = Counting.__qualname__ = tuner_class.__name__
    return Counting


def trial_epochs(tuner, trial_id: str) -> int | None:
    """Epochs a finished trial trained (None: not recorded, e.g. it failed)."""
    path = Path(tuner.get_trial_dir(trial_id)) / EPOCHS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["epochs"] if path.exists() else None


def _serve_as_chief(tuner) -> None:
    """keras-tuner's chief loop (oracle_chief.start_server), polling every second."""
    from concurrent import futures  # noqa: PLC0415

    import grpc  # noqa: PLC0415
    from keras_tuner.src import protos  # noqa: PLC0415
    from keras_tuner.src.distribute import oracle_chief  # noqa: PLC0415

    tuner.save()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(tuner.oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.add_insecure_port(f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}")
    server.start()
    try:
        # Done when the oracle has told a worker to stop and no worker is left.
        while not (servicer.stop_triggered and oracle_chief.exit_chief(tuner.oracle)):
            time.sleep(CHIEF_POLL_SECONDS)
    finally:
        server.stop(grace=5).wait(timeout=10)


def _role() -> str:
    """``single``, ``chief`` or ``worker`` (Keras Tuner's distributed mode)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


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


def tune(
    config: ExperimentConfig,
    tuner_name: str = "random",
    max_trials: int = 10,
    directory: str | Path = "runs/tune",
    export_best: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Runs (or resumes) a search; the chief / single process writes the reports."""
    if config.train.strategy in distribute.CLUSTER_STRATEGIES:
        raise ValueError(
            f"mmtf tune: trials train with one worker; train.strategy {config.train.strategy!r} "
            "is not supported (use default, mirrored or tpu; mmtf launch --tuner-workers to scale)"
        )
    space = config.search_space or default_search_space(config)
    role = _role()
    metadata = training.prepare_data(config, progress=progress and role != "worker")
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    hypermodel = MultimodalHyperModel(config, metadata, space)
    strategy = distribute.make_strategy(config.train) if config.train.strategy != "default" else None
    tuner = make_tuner(tuner_name, hypermodel, directory, max_trials, strategy)
    project_dir = Path(tuner.project_dir)
    verbose = config.train.verbose
    if role == "chief":
        tuner.oracle.verbose = verbose
        _serve_as_chief(tuner)
    else:
        tuner.search(verbose=verbose if verbose != 1 or os.isatty(1) else 2)
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


def cmd_tune(args) -> int:
    paths = [*(args.config or []), *([args.search_space] if args.search_space else [])]
    overrides = list(args.set or [])
    if args.manifest:
        overrides.insert(0, f"data.manifest={args.manifest}")
    config = config_lib.load(paths, overrides)
    result = tune(config, args.tuner, args.max_trials, args.directory, args.export_best)
    if result.role == "worker":
        print(f"tuner worker {os.environ.get('KERASTUNER_TUNER_ID')}: done")
        return 0
    print(f"{result.num_trials} trials; best score {result.best_score}; reports in {result.project_dir}")
    print(f"best config: {result.best_config} (mmtf train --config {result.best_config})")
    if result.export_path:
        print(f"trained {result.run_dir}; exported {result.export_path}")
    return 0


def add_tune_parser(subparsers):
    """Adds ``mmtf tune`` to the CLI."""
    parser = subparsers.add_parser("tune", help="hyperparameter search (Keras Tuner) over a config")
    add_config_args(parser)
    parser.add_argument(
        "--search-space", help="YAML with a search_space section (pipelines/search_space.yaml)"
    )
    parser.add_argument("--manifest", help="shortcut for --set data.manifest=...")
    parser.add_argument("--tuner", choices=TUNERS, default="random")
    parser.add_argument(
        "--max-trials", type=int, default=10, help="random/bayesian (hyperband: from train.epochs)"
    )
    parser.add_argument("--directory", default="runs/tune", help="results; re-running resumes")
    parser.add_argument("--export-best", action="store_true", help="train the best config and export it")
    parser.set_defaults(func=cmd_tune)
    return parser
