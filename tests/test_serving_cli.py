"""``mmtf serve`` / ``mmtf predict``: parsers, manifest predictions, and SIGTERM shutdown."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import serving_helpers as helpers

from multimodal_tf.cli import serving as cli
from multimodal_tf.serving import Client, ModelServer, ModelSpec
from multimodal_tf.serving.local import LocalModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cli_models")
    helpers.make_test_savedmodel(base, "m", 1)
    return base / "m"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_manifest")
    (folder / "media").mkdir()
    inputs = helpers.make_inputs(5, seed=11)
    rows = []
    for i in range(5):
        (folder / "media" / f"{i}.png").write_bytes(inputs["image"][i])
        (folder / "media" / f"{i}.wav").write_bytes(inputs["audio"][i])
        rows.append([f"r{i}", f"media/{i}.png", inputs["text"][i].decode(), f"media/{i}.wav", "cat"])
    (folder / "media" / "notes.txt").write_text("a blue bird")
    (folder / "media" / "bad.png").write_bytes(b"not a png")
    rows[1][3] = ""  # no audio
    rows[2][2] = "media/notes.txt"  # text from a file
    rows.append(["bad", "media/bad.png", "", "", "dog"])
    rows.append(["missing", "media/missing.png", "x", "", "dog"])
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["id", "image", "text", "audio", "label"], *rows])
    return path


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli.add_serve_parser(subparsers)
    cli.add_predict_parser(subparsers)
    return parser.parse_args(argv)


def test_parsers_take_tf_serving_flags():
    args = _parse(
        "serve",
        "--model-config-file",
        "c.config",
        "--port",
        "9000",
        "--rest-api-port",
        "-1",
        "--batching-parameters-file",
        "b.txt",
        "--monitoring-config-file",
        "m.config",
        "--file-system-poll-wait-seconds",
        "2",
        "--grpc-max-message-bytes",
        "1024",
        "--request-timeout-seconds",
        "5",
    )
    assert (args.port, args.rest_api_port, args.host, args.grpc_max_message_bytes) == (
        9000,
        -1,
        "127.0.0.1",
        1024,
    )
    assert args.func is cli.serve_command
    with pytest.raises(SystemExit):
        _parse("serve", "--model-base-path", "x", "--model-config-file", "y")
    args = _parse("predict", "--server", "127.0.0.1:8500", "--image", "x.png", "--text", "hi")
    assert (args.server, args.model_name, args.func) == ("127.0.0.1:8500", "mmtf", cli.predict_command)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_manifest_in_process(model_dir, manifest, tmp_path):
    output = tmp_path / "preds.csv"
    args = _parse(
        "predict",
        "--saved-model",
        str(model_dir / "1"),
        "--manifest",
        str(manifest),
        "--output",
        str(output),
        "--batch-size",
        "3",
    )
    assert args.func(args) == 1  # two rows failed
    rows = {r["id"]: r for r in _read_csv(output)}
    assert list(rows) == ["r0", "r1", "r2", "r3", "r4", "bad", "missing"]
    assert list(rows["r0"]) == ["id", "label", "predicted", "prob_cat", "prob_dog", "prob_bird", "error"]
    for key in ("r0", "r1", "r2", "r3", "r4"):
        assert rows[key]["error"] == "" and rows[key]["predicted"] in helpers.CLASS_NAMES
        assert abs(sum(float(rows[key][f"prob_{n}"]) for n in helpers.CLASS_NAMES) - 1) < 1e-4
    assert "not a PNG" in rows["bad"]["error"]
    assert "missing.png" in rows["missing"]["error"]
    # The text cell naming a .txt file was read from it.
    expected = LocalModel(model_dir).predict(
        images=[str(manifest.parent / "media/2.png")],
        texts=["a blue bird"],
        audios=[str(manifest.parent / "media/2.wav")],
    )
    assert float(rows["r2"]["prob_cat"]) == pytest.approx(float(expected["probabilities"][0][0]), abs=1e-5)


def test_predict_through_server_matches_in_process(model_dir, manifest, tmp_path, capsys):
    with ModelServer(
        [ModelSpec("m", str(model_dir))], port=0, rest_api_port=None, file_system_poll_wait_seconds=0
    ) as server:
        served, local = tmp_path / "served.csv", tmp_path / "local.csv"
        args = _parse(
            "predict",
            "--server",
            server.grpc_target,
            "--model-name",
            "m",
            "--manifest",
            str(manifest),
            "--output",
            str(served),
        )
        args.func(args)
        args = _parse(
            "predict", "--saved-model", str(model_dir), "--manifest", str(manifest), "--output", str(local)
        )
        args.func(args)
        for a, b in zip(_read_csv(served), _read_csv(local), strict=True):
            assert a["predicted"] == b["predicted"] and a["error"] == b["error"] or "missing" in a["id"]
            assert np.allclose(
                [float(a[k] or 0) for k in a if k.startswith("prob_")],
                [float(b[k] or 0) for k in b if k.startswith("prob_")],
                atol=1e-5,
            )
        image = manifest.parent / "media" / "0.png"
        args = _parse(
            "predict",
            "--server",
            server.grpc_target,
            "--model-name",
            "m",
            "--image",
            str(image),
            "--text",
            "a red cat",
        )
        capsys.readouterr()
        assert args.func(args) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["class_name"] in helpers.CLASS_NAMES and set(result["probabilities"]) == set(
            helpers.CLASS_NAMES
        )
        args = _parse("predict", "--server", server.grpc_target, "--model-name", "nope", "--text", "x")
        assert args.func(args) == 1
        assert "NOT_FOUND" in capsys.readouterr().err


def test_serve_command_stops_gracefully_on_sigterm(model_dir, tmp_path):
    port = helpers.free_port()
    command = [
        sys.executable,
        "-m",
        "multimodal_tf.cli",
        "serve",
        "--model-base-path",
        str(model_dir),
        "--model-name",
        "m",
        "--port",
        str(port),
        "--rest-api-port",
        "-1",
        "--grace-seconds",
        "5",
        "--batching-parameters-file",
        str(REPO / "serving" / "batching_parameters.txt"),
    ]
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
    try:
        # Connect only once the server says it listens: a gRPC channel that
        # tried to connect across this process's fork (Popen) may never recover.
        deadline = time.monotonic() + 120
        while f"gRPC 127.0.0.1:{port}" not in Path(log.name).read_text() and process.poll() is None:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with Client(f"127.0.0.1:{port}", "m", timeout_seconds=10) as client:
            client.wait_until_available(timeout_seconds=30)
            assert client.predict(texts=["a red cat"])["probabilities"].shape == (1, 3)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
        with Client(f"127.0.0.1:{port}", "m", timeout_seconds=2) as client, pytest.raises(grpc.RpcError):
            client.status()
    finally:
        output = helpers.stop_and_read_log(process, log)
    assert "server stopped" in output, output[-2000:]


def test_predict_manifest_reads_the_configured_columns(model_dir, manifest, tmp_path):
    with open(manifest, newline="") as f:
        rows = list(csv.reader(f))
    rows[0] = ["key", "picture", "caption", "sound", "label"]
    renamed = manifest.parent / "renamed.csv"  # next to the media its rows name
    with open(renamed, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    config = tmp_path / "columns.yaml"
    config.write_text("data:\n  columns: {id: key, image: picture, text: caption, audio: sound}\n")
    default, custom = tmp_path / "default.csv", tmp_path / "custom.csv"
    for path, extra in ((default, [str(manifest)]), (custom, [str(renamed), "--config", str(config)])):
        args = _parse(
            "predict", "--saved-model", str(model_dir / "1"), "--output", str(path), "--manifest", *extra
        )
        assert args.func(args) == 1  # the same two bad rows
    assert _read_csv(custom) == _read_csv(default)
    args = _parse("predict", "--saved-model", str(model_dir / "1"), "--manifest", str(renamed))
    with pytest.raises(ValueError, match="missing columns.*'id'"):
        args.func(args)  # without the config, the id column is not found: named in the error
