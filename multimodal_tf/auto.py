"""The automatic run: ``mmtf train --manifest M.csv`` with no config, within a time budget.

1. Infer a config from the manifest (:mod:`multimodal_tf.autoconfig`),
   print it with its reasons and write it as ``inferred.yaml``.
2. Train one model per modality (encoder + its own classifier, i.e. a
   one-modality ``late`` fusion model) and the intermediate-fusion model of
   the inferred config (``concat``), each with the recipe of ``mmtf train``
   (:func:`fit_candidate`, the :mod:`multimodal_tf.recipe` functions) in
   ``candidates/<name>/``.
3. Stack the per-modality models (:mod:`multimodal_tf.stacking`): a
   multimodal ``late`` fusion model whose per-modality parts are the trained
   ones and whose modality weights are fit on validation, with the ``mean``
   and the ``product`` combination.
4. Keep the fusion candidate with the lowest validation loss (a
   one-modality manifest keeps its one model), copy it to the top of the run
   directory (a normal run directory: ``mmtf evaluate`` / ``mmtf export``
   read it) and write every candidate's validation loss and accuracy to
   ``candidates.md`` / ``candidates.json``.

The budget covers everything after the command starts, conversion included.
Each training gets a share of what is left (the joint model 1.5 shares, a
per-modality model 1) and stops at a batch boundary when its share is
spent; a candidate that would not fit at all is skipped and reported.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from multimodal_tf import autoconfig, recipe, stacking
from multimodal_tf import config as config_lib
from multimodal_tf import run_dir as run_files
from multimodal_tf.budget import Deadline, format_seconds, keras_callbacks
from multimodal_tf.compat import keras
from multimodal_tf.data import profile as profile_lib
from multimodal_tf.data.cache import prepare_data

DEFAULT_BUDGET = 600.0  # a 1,000-example three-modality set on 2 CPU cores finishes in it
INFERRED_FILE, PROFILE_FILE = "inferred.yaml", "profile.json"
CANDIDATES_JSON, CANDIDATES_MD = "candidates.json", "candidates.md"
JOINT_SHARE = 1.5  # the joint model trains every encoder at once: more time than one modality
FINAL_RESERVE = 0.03  # of the budget, for stacking, the kept model's test metrics and reports
# Train every candidate only when each can train at least half as long as it
# takes to start and finish; otherwise the joint model alone.
TRIAGE_FACTOR = 1.5
STACKING_SECONDS = 2.0  # rebuilding and running one small model on 2 CPU cores, measured loaded


@dataclasses.dataclass
class Candidate:
    """One trained (or stacked, or skipped) model and its validation scores."""

    name: str
    kind: str  # "modality", "joint" or "stacked"
    run_dir: str = ""
    val_loss: float | None = None
    val_accuracy: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    stopped_by_budget: bool = False
    note: str = ""


@dataclasses.dataclass
class AutoResult:
    """What :func:`auto_train` returns: the run directory, the kept candidate's name, all candidates."""

    run_dir: Path
    kept: str
    candidates: list[Candidate]
    seconds: float


def candidate_configs(config: config_lib.ExperimentConfig, out: Path) -> list[tuple[str, str, object, float]]:
    """``(name, kind, config, share)`` of what is trained: each modality, then the joint model."""
    plans = []
    for modality in config.model.modalities:
        overrides = [
            f"model.modalities=[{modality}]",
            *stacking.LATE_FUSION,
            *[f"model.modality_dropout.{m}=0.0" for m in config_lib.MODALITIES],
            f"train.output_dir={json.dumps(str(out / 'candidates' / modality))}",
        ]
        plans.append((modality, "modality", config_lib.replace(config, overrides), 1.0))
    if len(config.model.modalities) > 1:
        name = config.model.fusion.name
        joint = config_lib.replace(config, [f"train.output_dir={json.dumps(str(out / 'candidates' / name))}"])
        plans.append((name, "joint", joint, JOINT_SHARE))
    return plans


def fit_candidate(config, metadata, callbacks=()):
    """Trains one candidate with the recipe (:mod:`multimodal_tf.recipe`) into a lean run directory.

    The recipe's model, datasets and callbacks, as ``mmtf train`` and every
    tuning trial use them, with a run directory's best-weights checkpoint
    but without its per-run extras (TensorBoard logs, plots, test metrics),
    which would cost each candidate seconds of the budget.

    Returns:
        ``(run_dir, model)``: the model holds the best epoch's weights.
    """
    run_dir = Path(config.train.output_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config_lib.save(config, run_dir / run_files.CONFIG_FILE)
    metadata.save(run_dir)
    recipe.set_seed(config.train.seed)
    model = recipe.compile_model(config, metadata)
    train_ds, val_ds, _ = recipe.datasets_for(config, metadata)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(run_dir / run_files.BEST_WEIGHTS),
        monitor=config.train.monitor,
        save_best_only=True,
        save_weights_only=True,
    )
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.train.epochs,
        callbacks=recipe.callbacks_for(config, between=[checkpoint, *callbacks]),
        verbose=0,
    )
    values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    (run_dir / run_files.HISTORY_JSON).write_text(json.dumps(values, indent=1))
    model.load_weights(str(run_dir / run_files.BEST_WEIGHTS))
    return run_dir, model


def scores_from_history(run_dir: Path) -> tuple[float, float, int]:
    """(val loss, val accuracy) of the best checkpoint (lowest val loss) and the epochs run."""
    history = json.loads((run_dir / run_files.HISTORY_JSON).read_text())
    losses = history["val_loss"]
    best = min(range(len(losses)), key=losses.__getitem__)
    return float(losses[best]), float(history["val_accuracy"][best]), len(losses)


class _Estimates:
    """Seconds a training spends outside its batches: start-up (build, trace) and finish (validation, files).

    Conservative first guesses, then the largest seen: under-estimating
    overruns the budget, over-estimating only leaves a little unused.
    """

    def __init__(self, budget: float):
        self.start = min(20.0, 0.25 * budget)
        self.finish = min(5.0, 0.05 * budget)

    def update(self, start: float, finish: float) -> None:
        self.start, self.finish = max(self.start, start), max(self.finish, finish)


def _reserve(budget: Deadline, plans, models: dict) -> float:
    """Seconds kept back for after training: the kept model's metrics, and stacking if it will run."""
    modalities = [p[0] for p in plans if p[1] == "modality" and p[0] in models]
    stacked = len(modalities) >= 2
    # Stacking rebuilds and runs two stacked models; the kept model is rebuilt for its metrics.
    models_to_run = 1 + (2 + len(modalities) if stacked else 0)
    return FINAL_RESERVE * (budget.seconds or 0) + STACKING_SECONDS * models_to_run


def triage(plans, available: float, estimates: _Estimates):
    """The plans that fit: all of them, or only the joint model when each would mostly start and finish.

    A candidate that spends most of its share building and tracing learns
    little; with one model's time, the joint model (which sees every
    modality) is the better use of it.
    """
    overhead = estimates.start + estimates.finish
    if len(plans) > 1 and available < TRIAGE_FACTOR * overhead * len(plans):
        return [p for p in plans if p[1] == "joint"] or plans[:1]
    return plans


def _train_candidates(plans, metadata, budget: Deadline, bar, progress: bool):
    """Trains the planned candidates in turn; returns them (skipped ones too) and the trained models."""
    stop_class, progress_class = keras_callbacks()
    estimates = _Estimates(budget.seconds or 1e9)
    chosen = triage(plans, budget.remaining() - _reserve(budget, plans, {p[0]: 0 for p in plans}), estimates)
    results = [
        Candidate(p[0], p[1], p[2].train.output_dir, note="skipped: too short a budget")
        for p in plans
        if p not in chosen
    ]
    models = {}
    for index, (name, kind, config, share) in enumerate(chosen):
        shares = sum(plan[3] for plan in chosen[index:])
        planned = {**models, **{p[0]: 0 for p in chosen[index:]}}
        available = budget.remaining() - _reserve(budget, chosen, planned)
        overhead = estimates.start + estimates.finish  # paid by every candidate, whatever its share
        batches = (available - overhead * (len(chosen) - index)) * share / shares
        candidate = Candidate(name, kind, config.train.output_dir)
        results.append(candidate)
        if batches < 1.0:
            candidate.note = f"skipped: {format_seconds(max(0, available))} left of the budget"
            continue
        stop = stop_class(budget.sub(estimates.start + batches))
        callbacks = [stop] + ([progress_class(bar, budget, name)] if progress else [])
        started = time.monotonic()
        run_dir, models[name] = fit_candidate(config, metadata, callbacks)
        ended = time.monotonic()
        candidate.seconds = ended - started
        candidate.stopped_by_budget = stop.stopped
        candidate.val_loss, candidate.val_accuracy, candidate.epochs = scores_from_history(run_dir)
        if stop.first_batch_end is not None:
            estimates.update(stop.first_batch_end - started, ended - stop.last_batch_end)
    order = [p[0] for p in plans]
    return sorted(results, key=lambda c: order.index(c.name)), models


def _keep(candidates: list[Candidate], out: Path) -> Candidate:
    """Copies the best fusion candidate (lowest val loss) to the top of ``out``."""
    scored = [c for c in candidates if c.val_loss is not None]
    fusions = [c for c in scored if c.kind != "modality"] or scored
    if not fusions:
        raise RuntimeError(
            "the time budget ended before any model finished training: give a larger --time-budget"
        )
    kept = min(fusions, key=lambda c: c.val_loss)
    source = Path(kept.run_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in (run_files.CONFIG_FILE, run_files.METADATA_FILE, run_files.BEST_WEIGHTS):
        shutil.copy(source / name, out / name)
    shutil.copy(source / run_files.BEST_WEIGHTS, out / run_files.LAST_WEIGHTS)
    return kept


def write_report(out: Path, candidates: list[Candidate], kept: Candidate, seconds: float, budget) -> None:
    """``candidates.json`` and ``candidates.md``: every candidate's validation scores, the kept one marked."""
    rows = [dataclasses.asdict(c) | {"kept": c is kept} for c in candidates]
    (out / CANDIDATES_JSON).write_text(
        json.dumps(
            {"kept": kept.name, "seconds": seconds, "budget_seconds": budget, "candidates": rows}, indent=1
        )
    )
    lines = [
        f"# Candidates ({format_seconds(seconds)} of a {format_seconds(budget or 0)} budget)",
        "",
        "Kept: the fusion candidate with the lowest validation loss.",
        "",
        "| candidate | kind | val loss | val accuracy | epochs | seconds | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        loss = "–" if c.val_loss is None else f"{c.val_loss:.4f}"
        accuracy = "–" if c.val_accuracy is None else f"{c.val_accuracy:.4f}"
        note = "; ".join(
            filter(
                None, ["**kept**" if c is kept else "", "budget stop" if c.stopped_by_budget else "", c.note]
            )
        )
        lines.append(f"| {c.name} | {c.kind} | {loss} | {accuracy} | {c.epochs} | {c.seconds:.1f} | {note} |")
    (out / CANDIDATES_MD).write_text("\n".join(lines) + "\n")


def _stack_all(config, metadata, candidates, models, out: Path, bar) -> None:
    """Adds the stacked late-fusion candidates when two or more modalities were trained."""
    trained = {c.name: models[c.name] for c in candidates if c.kind == "modality" and c.name in models}
    if len(trained) < 2:
        return
    bar.set_description_str("stacking the per-modality models")
    bar.refresh()
    val = stacking.predictions(config, metadata, trained, "val")
    for combine in stacking.COMBINATIONS:
        stacked_dir = out / "candidates" / f"late_{combine}"
        scores = stacking.stack(config, metadata, trained, combine, stacked_dir, val)
        models[f"late_{combine}"] = scores["model"]
        weights = ", ".join(f"{m} {w:.2f}" for m, w in scores["weights"].items())
        candidates.append(
            Candidate(
                f"late_{combine}",
                "stacked",
                str(stacked_dir),
                scores["loss"],
                scores["accuracy"],
                seconds=scores["seconds"],
                note=f"weights {weights}",
            )
        )


def auto_train(
    manifest: str | Path,
    output_dir: str | Path = "runs/auto",
    time_budget: float | None = DEFAULT_BUDGET,
    progress: bool = True,
    started: float | None = None,
    overrides: tuple[str, ...] = (),
) -> AutoResult:
    """Infers a config, trains the candidates within ``time_budget`` seconds and keeps the best.

    Args:
        manifest: the CSV manifest (docs/data.md).
        output_dir: the run directory to write.
        time_budget: seconds for everything (None: no limit).
        progress: print the inferred config and show a progress bar.
        started: ``time.monotonic()`` when the budget began (the CLI passes
            its own start, so TensorFlow's import counts too); default now.
        overrides: ``--set``-style changes applied to the inferred config.

    Returns:
        The run directory (a normal one, holding the kept model), the kept
        candidate's name, every candidate and the seconds it all took.

    Raises:
        ManifestError / ProfileError: the manifest or a sampled file is bad
            (the message names the record and field).
    """
    from tqdm import tqdm  # noqa: PLC0415

    budget = Deadline(time_budget, started)
    out = Path(output_dir)
    profile = profile_lib.profile_manifest(manifest)
    config = config_lib.replace(autoconfig.infer_config(profile, str(out)), overrides)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(config, out / INFERRED_FILE)
    (out / PROFILE_FILE).write_text(json.dumps(dataclasses.asdict(profile), indent=1, ensure_ascii=False))
    if progress:
        print(autoconfig.explain(profile, str(out)))
        print(f"inferred config: {out / INFERRED_FILE} (mmtf train --config {out / INFERRED_FILE})")
    metadata = prepare_data(config.data, progress=progress)
    total = round(time_budget) if time_budget else None
    with tqdm(
        total=total, unit="s", disable=not progress, file=sys.stderr, bar_format="{desc} {bar} {postfix}"
    ) as bar:
        plans = candidate_configs(config, out)
        candidates, models = _train_candidates(plans, metadata, budget, bar, progress)
        _stack_all(config, metadata, candidates, models, out, bar)
        kept = _keep(candidates, out)
        val = {"loss": kept.val_loss, "accuracy": kept.val_accuracy}
        stacking.write_final_metrics(out, models.get(kept.name), val)
        bar.n = min(bar.total or 0, round(budget.elapsed(), 1))
        bar.set_description_str(f"kept {kept.name}")
    write_report(out, candidates, kept, budget.elapsed(), time_budget)
    return AutoResult(out, kept.name, candidates, budget.elapsed())
