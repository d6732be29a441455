"""Strategies, the local cluster launcher and fault-tolerant multi-worker training."""

import csv
import dataclasses
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from multimodal_tf import config as config_lib
from multimodal_tf import distribute, launch
from multimodal_tf.compat import keras
from multimodal_tf.data.cache import prepare_data
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.data.text import vocabulary_size
from multimodal_tf.models import build_model, loss_for
from multimodal_tf.recipe import supervised_dataset
from multimodal_tf.run_dir import LAST_WEIGHTS, load_trained_model
from multimodal_tf.testing import TINY_OVERRIDES, tiny_config
from multimodal_tf.testing_pretrained import tiny_pretrained_overrides, write_tiny_pretrained
from tests.conftest import one_val_example_manifest

# Image only and 10 steps an epoch keep the multi-process runs short on two
# busy cores (tracing dominates); distribution does not depend on modalities.
CLUSTER_OVERRIDES = (
    "model.modalities=[image]",
    "data.batch_size=16",
    "train.verbose=2",
    "train.early_stopping_patience=0",
)
EPOCHS = 3
LAUNCH_TIMEOUT = 240  # seconds; a hung collective fails the test instead of the suite


def train_command(manifest, run_dir, *overrides):
    """``mmtf train`` with the tiny config as ``--set`` flags."""
    sets = TINY_OVERRIDES + (f"data.manifest={manifest}", f"train.output_dir={run_dir}") + CLUSTER_OVERRIDES
    return ["mmtf", "train"] + [arg for o in sets + overrides for arg in ("--set", o)]


def task_summaries(run_dir):
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "tasks").glob("*.json"))}


def csv_epochs(path):
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


# --- Strategies in one process ----------------------------------------------------------


def test_mirrored_over_two_cpus_gives_the_default_loss_for_one_step(synth_manifest):
    # Text only and no dropout: BatchNorm (image/audio encoders) normalises
    # each replica's half batch on its own, which changes the loss by design.
    # Eager steps skip tracing the LSTM twice; the replicas still all-reduce.
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        "model.modalities=[text]",
        "model.text_encoder.dropout_rate=0.0",
        "model.head.dropout_rate=0.0",
    )
    metadata = prepare_data(config.data, progress=False)
    num_classes, vocab_size = metadata.num_classes, vocabulary_size(config.data.text, metadata.vocabulary)
    dataset = supervised_dataset(
        make_dataset(config, "train", training=False, metadata=metadata), config, num_classes
    )
    features, targets = next(iter(dataset))
    losses, weights = {}, {}
    initial = None
    for name in ("default", "mirrored"):
        strategy = distribute.make_strategy(dataclasses.replace(config.train, strategy=name))
        assert strategy.num_replicas_in_sync == (2 if name == "mirrored" else 1)
        with strategy.scope():
            model = build_model(config, num_classes, vocab_size)
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss_for(config), run_eagerly=True)
        initial = model.get_weights() if initial is None else initial
        model.set_weights(initial)
        losses[name] = float(model.train_on_batch(features, targets))
        weights[name] = model.get_weights()
    np.testing.assert_allclose(losses["mirrored"], losses["default"], rtol=1e-5)
    for after_mirrored, after_default in zip(weights["mirrored"], weights["default"], strict=True):
        np.testing.assert_allclose(after_mirrored, after_default, rtol=1e-4, atol=1e-6)


def test_unknown_strategy_names_the_known_ones():
    with pytest.raises(ValueError, match="parameter_server"):
        distribute.make_strategy(tiny_config("train.strategy=horovod").train)


# --- The launcher without TensorFlow ----------------------------------------------------


def test_plan_gives_each_task_its_tf_config(tmp_path):
    tasks = launch.plan_tasks(workers=2, ps=1, tuner_workers=0, log_dir=tmp_path)
    assert [t.name for t in tasks] == ["chief-0", "worker-0", "worker-1", "ps-0"]
    configs = [json.loads(t.env["TF_CONFIG"]) for t in tasks]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)
    addresses = [a for task_addresses in configs[0]["cluster"].values() for a in task_addresses]
    assert len(set(addresses)) == 4 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert [t.chief for t in tasks] == [True, False, False, False]
    assert [t.server for t in tasks] == [False, True, True, True]
    multi_worker = launch.plan_tasks(workers=2, ps=0, tuner_workers=0, log_dir=tmp_path)
    assert [t.name for t in multi_worker] == ["worker-0", "worker-1"] and multi_worker[0].chief


def test_plan_for_distributed_tuning_sets_keras_tuner_variables(tmp_path):
    tasks = launch.plan_tasks(workers=1, ps=0, tuner_workers=2, log_dir=tmp_path)
    assert [t.env["KERASTUNER_TUNER_ID"] for t in tasks] == ["chief", "tuner0", "tuner1"]
    assert {t.env["KERASTUNER_ORACLE_IP"] for t in tasks} == {"127.0.0.1"}
    assert len({t.env["KERASTUNER_ORACLE_PORT"] for t in tasks}) == 1
    assert not any("TF_CONFIG" in t.env for t in tasks)
    with pytest.raises(ValueError, match="single-worker"):
        launch.plan_tasks(workers=2, ps=0, tuner_workers=2, log_dir=tmp_path)


def test_mmtf_commands_run_this_python():
    assert launch.resolve_command(["--", "mmtf", "train"]) == [
        sys.executable,
        "-m",
        "multimodal_tf.cli",
        "train",
    ]


def test_a_failing_task_stops_the_whole_cluster(tmp_path):
    # worker-1 fails at once; worker-0 would run for a minute if not stopped.
    script = (
        "import json, os, sys, time\n"
        "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "print('task', index, flush=True)\n"
        "sys.exit(3) if index == 1 else time.sleep(60)\n"
    )
    start = time.monotonic()
    code = launch.launch(
        [sys.executable, "-c", script], workers=2, log_dir=tmp_path, timeout=30, echo_chief=False
    )
    assert code == 3 and time.monotonic() - start < 20
    layout = json.loads((tmp_path / "cluster.json").read_text())
    for task in layout["tasks"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(task["pid"], 0)
    assert "task 1" in (tmp_path / "worker-1.log").read_text()


# --- Multi-process training (MultiWorkerMirrored, ParameterServer) -----------------------


@pytest.fixture(scope="module")
def multi_worker_run(synth_manifest, tmp_path_factory):
    """An uninterrupted 2-worker MultiWorkerMirroredStrategy run."""
    run_dir = tmp_path_factory.mktemp("multi_worker")
    prepare_data(tiny_config(f"data.manifest={synth_manifest}").data, progress=False)
    command = train_command(
        synth_manifest, run_dir / "run", f"train.epochs={EPOCHS}", "train.strategy=multi_worker"
    )
    code = launch.launch(
        command, workers=2, log_dir=run_dir / "logs", timeout=LAUNCH_TIMEOUT, echo_chief=False
    )
    assert code == 0, (run_dir / "logs" / "worker-0.log").read_text()[-3000:]
    return run_dir / "run"


@pytest.mark.slow
def test_two_worker_multi_worker_run_ends_with_identical_weights(multi_worker_run):
    summaries = task_summaries(multi_worker_run)
    assert sorted(summaries) == ["worker-0", "worker-1"]
    assert summaries["worker-0"]["epochs"] == list(range(EPOCHS)) == summaries["worker-1"]["epochs"]
    assert summaries["worker-0"]["weights_sha256"] == summaries["worker-1"]["weights_sha256"]
    history = json.loads((multi_worker_run / "history.json").read_text())
    assert len(history["loss"]) == EPOCHS and np.isfinite(history["loss"]).all()
    assert (multi_worker_run / "metrics.json").exists()
    # The chief saved the same weights (from a copy outside the strategy).
    _, _, model = load_trained_model(multi_worker_run, LAST_WEIGHTS)
    assert distribute.weights_checksum(model.get_weights()) == summaries["worker-0"]["weights_sha256"]
    assert not list((multi_worker_run / ".worker_tmp_1").rglob("*.h5"))  # worker 1 wrote no checkpoint


@pytest.mark.slow
def test_two_workers_train_bert_and_an_audio_saved_model_through_cross_attention_to_identical_weights(
    synth_manifest, tmp_path
):
    """text/bert (fine-tuned) and audio/saved_model (a YAMNet-interface SavedModel) feed their
    tokens and frames to the cross_attention fusion under MultiWorkerMirroredStrategy."""
    paths = write_tiny_pretrained(tmp_path / "pretrained")
    prepare_data(tiny_config(f"data.manifest={synth_manifest}").data, progress=False)
    run_dir = tmp_path / "run"
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={run_dir}",
        *CLUSTER_OVERRIDES,
        *tiny_pretrained_overrides(paths),
        "model.modalities=[text,audio]",
        "train.epochs=1",
        "train.strategy=multi_worker",
    )
    # The resolved config as one --config file: text/bert takes none of the
    # tiny LSTM sizes that train_command's --set flags would carry.
    config_lib.save(config, tmp_path / "config.yaml")
    command = ["mmtf", "train", "--config", str(tmp_path / "config.yaml")]
    code = launch.launch(
        command, workers=2, log_dir=tmp_path / "logs", timeout=LAUNCH_TIMEOUT, echo_chief=False
    )
    assert code == 0, (tmp_path / "logs" / "worker-0.log").read_text()[-3000:]
    summaries = task_summaries(run_dir)
    assert sorted(summaries) == ["worker-0", "worker-1"]
    assert summaries["worker-0"]["weights_sha256"] == summaries["worker-1"]["weights_sha256"]
    _, _, model = load_trained_model(run_dir, LAST_WEIGHTS)
    assert distribute.weights_checksum(model.get_weights()) == summaries["worker-0"]["weights_sha256"]
    assert model.get_layer("fusion").__class__.__name__ == "CrossAttentionFusion"
    history = json.loads((run_dir / "history.json").read_text())
    assert np.isfinite(history["loss"]).all()


@pytest.mark.slow
def test_two_workers_finish_when_the_val_split_has_one_example(synth_manifest, tmp_path):
    """Fewer val examples than workers: no worker runs dry (that would hang the collectives)."""
    manifest, _ = one_val_example_manifest(synth_manifest, synth_manifest.parent / "one_val_example.csv")
    prepare_data(tiny_config(f"data.manifest={manifest}").data, progress=False)
    run_dir = tmp_path / "run"
    command = train_command(manifest, run_dir, "train.epochs=1", "train.strategy=multi_worker")
    code = launch.launch(
        command, workers=2, log_dir=tmp_path / "logs", timeout=LAUNCH_TIMEOUT, echo_chief=False
    )
    assert code == 0, (tmp_path / "logs" / "worker-1.log").read_text()[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["val_loss"]) == 1 and np.isfinite(history["val_loss"]).all()


@pytest.mark.slow
def test_killed_worker_job_resumes_from_the_last_backup(synth_manifest, multi_worker_run, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(synth_manifest, run_dir, f"train.epochs={EPOCHS}", "train.strategy=multi_worker")
    cluster = launch.LocalCluster(command, workers=2, log_dir=tmp_path / "logs_killed", echo_chief=False)
    cluster.start()
    try:
        # The chief's backup appears when the first epoch has ended.
        backup = run_dir / "backup" / "chief" / "checkpoint"
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not backup.exists():
            assert cluster.failed_task() is None and cluster.chief.process.poll() is None
            assert time.monotonic() < deadline, "no backup written"
            time.sleep(0.05)
        os.kill(cluster.task("worker-1").process.pid, signal.SIGKILL)
        code = cluster.wait(timeout=60)
    finally:
        cluster.shutdown()
    assert code == 128 + signal.SIGKILL
    assert all(task.process.poll() is not None for task in cluster.tasks)
    completed = csv_epochs(run_dir / "history.csv")
    assert 1 <= len(completed) < EPOCHS, completed

    code = launch.launch(
        command, workers=2, log_dir=tmp_path / "logs_resumed", timeout=LAUNCH_TIMEOUT, echo_chief=False
    )
    assert code == 0, (tmp_path / "logs_resumed" / "worker-0.log").read_text()[-3000:]
    summaries = task_summaries(run_dir)
    first = summaries["worker-0"]["epochs"][0]
    # Resumes after the last epoch whose backup was written (the CSV row of an
    # epoch is written just before its backup, so it may be one ahead).
    assert first >= 1 and completed[-1] <= first <= completed[-1] + 1, (first, completed)
    assert summaries["worker-0"]["epochs"][-1] == EPOCHS - 1
    assert summaries["worker-0"]["weights_sha256"] == summaries["worker-1"]["weights_sha256"]
    assert f"Epoch {first + 1}/{EPOCHS}" in (tmp_path / "logs_resumed" / "worker-0.log").read_text()
    resumed = json.loads((run_dir / "history.json").read_text())
    uninterrupted = json.loads((multi_worker_run / "history.json").read_text())
    assert len(resumed["loss"]) == EPOCHS - first
    assert abs(resumed["loss"][-1] - uninterrupted["loss"][-1]) < 0.15, (resumed, uninterrupted)
    assert abs(resumed["val_loss"][-1] - uninterrupted["val_loss"][-1]) < 0.25, (resumed, uninterrupted)
    assert not (run_dir / "backup" / "chief" / "checkpoint").exists()  # removed after a finished run


@pytest.mark.slow
def test_parameter_server_cluster_with_one_ps_and_two_workers_trains(synth_manifest, tmp_path):
    prepare_data(tiny_config(f"data.manifest={synth_manifest}").data, progress=False)
    run_dir = tmp_path / "run"
    command = train_command(synth_manifest, run_dir, "train.epochs=2", "train.strategy=parameter_server")
    code = launch.launch(
        command, workers=2, ps=1, log_dir=tmp_path / "logs", timeout=LAUNCH_TIMEOUT, echo_chief=False
    )
    assert code == 0, (tmp_path / "logs" / "chief-0.log").read_text()[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    assert list(task_summaries(run_dir)) == ["chief-0"]  # workers and ps only serve
    assert "serving at" in (tmp_path / "logs" / "ps-0.log").read_text()
