"""``mmtf serve`` and ``mmtf predict``: argparse subcommands over the serving library.

The flags mirror ``tensorflow_model_server``'s (dashes for underscores), so a
command line moves between this server and the real one unchanged. The
serving library (and so TensorFlow) is imported when a command runs, not
when its parser is built.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import grpc
import numpy as np

from multimodal_tf.cli.common import add_config_args, add_runner_args, load_config
from multimodal_tf.signatures import (
    CLASS_ID,
    CLASS_NAME,
    CLASSES,
    CLASSIFY_SIGNATURE,
    DEFAULT_SIGNATURE,
    PROBABILITIES,
)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``serve`` (handler in ``func``) to an argparse subparsers object."""
    parser = subparsers.add_parser("serve", help="serve SavedModels over TF Serving's gRPC and REST APIs")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-base-path", help="folder of numeric version folders of one model")
    source.add_argument("--model-config-file", help="TF Serving model_config_list text proto")
    parser.add_argument("--model-name", default="mmtf", help="name of the --model-base-path model")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: pick a free one)")
    parser.add_argument(
        "--rest-api-port", type=int, default=8501, help="REST port (0: pick a free one, -1: off)"
    )
    parser.add_argument("--enable-batching", action="store_true", help="merge concurrent requests")
    parser.add_argument(
        "--batching-parameters-file", help="BatchingParameters text proto (implies --enable-batching)"
    )
    parser.add_argument("--monitoring-config-file", help="MonitoringConfig text proto (Prometheus endpoint)")
    parser.add_argument(
        "--ssl-config-file", help="SSLConfig text proto: TLS (and mutual TLS) on the gRPC and REST ports"
    )
    parser.add_argument(
        "--file-system-poll-wait-seconds", type=float, default=1.0, help="version poll interval (0: once)"
    )
    parser.add_argument(
        "--model-config-file-poll-wait-seconds",
        type=float,
        default=0.0,
        help="config re-read interval (0: never)",
    )
    parser.add_argument(
        "--grpc-max-message-bytes", type=int, default=64 << 20, help="largest request/response"
    )
    parser.add_argument("--request-timeout-seconds", type=float, help="server-side deadline per request")
    parser.add_argument(
        "--grace-seconds", type=float, default=10.0, help="time in-flight requests get on SIGTERM"
    )
    parser.add_argument(
        "--max-request-rows", type=int, help="rows per request (default: max_batch_size, or 1024)"
    )
    parser.add_argument("--max-num-load-retries", type=int, default=5, help="retries of a failed load")
    parser.add_argument("--rest-api-num-threads", type=int, default=32, help="REST worker threads")
    parser.add_argument(
        "--load-retry-interval-micros", type=int, default=60_000_000, help="wait between load retries"
    )
    parser.set_defaults(func=serve_command, serves_concurrently=True)
    return parser


def serve_command(args) -> int:
    from multimodal_tf.serving import config as config_lib
    from multimodal_tf.serving.server import ModelServer, exit_process
    from multimodal_tf.serving.tls import load_ssl_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    batching = None
    if args.batching_parameters_file:
        batching = config_lib.load_batching_parameters(args.batching_parameters_file)
    elif args.enable_batching:
        batching = config_lib.BatchingOptions()
    metrics_path = (
        config_lib.load_monitoring_config(args.monitoring_config_file)
        if args.monitoring_config_file
        else None
    )
    tls = load_ssl_config(args.ssl_config_file) if args.ssl_config_file else None
    models = config_lib.single_model(args.model_name, args.model_base_path) if args.model_base_path else None
    server = ModelServer(
        models,
        model_config_file=args.model_config_file,
        host=args.host,
        port=args.port,
        rest_api_port=None if args.rest_api_port < 0 else args.rest_api_port,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        batching=batching,
        metrics_path=metrics_path,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        request_timeout_seconds=args.request_timeout_seconds,
        max_request_rows=args.max_request_rows,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_seconds=args.load_retry_interval_micros / 1e6,
        rest_workers=args.rest_api_num_threads,
        tls=tls,
    )
    try:
        server.start()
    except OSError as e:
        print(f"mmtf serve: {e}", file=sys.stderr)
        return 1
    print(f"gRPC {server.grpc_target}  REST {server.rest_url or 'off'}", flush=True)
    server.serve_until_signal(args.grace_seconds)
    exit_process(0)


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``predict`` (handler in ``func``) to an argparse subparsers object."""
    parser = subparsers.add_parser("predict", help="query a model server (or a SavedModel in-process)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--server", help="HOST:PORT of a TF Serving gRPC endpoint")
    target.add_argument("--saved-model", help="run this SavedModel (version or model folder) in-process")
    parser.add_argument("--model-name", default="mmtf")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--version", type=int)
    choice.add_argument("--version-label")
    parser.add_argument("--signature-name", default=DEFAULT_SIGNATURE)
    parser.add_argument("--image", help="image file")
    parser.add_argument("--text", help="text (a .txt path is read)")
    parser.add_argument("--audio", help="16-bit PCM WAV file")
    parser.add_argument(
        "--manifest",
        help="CSV with id and media columns (data.columns of --config) and an optional label; "
        "paths relative to it",
    )
    parser.add_argument("--output", help="predictions CSV (with --manifest; default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per request")
    add_runner_args(
        parser, "beam: --manifest over Apache Beam's RunInference (with --saved-model and --output)"
    )
    parser.add_argument("--timeout-seconds", type=float, default=30.0, help="deadline per request")
    parser.add_argument(
        "--ssl-root-certs", help="PEM file of the CA that signs the server's certificate (TLS)"
    )
    parser.add_argument("--ssl-client-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--ssl-client-key", help="PEM private key of --ssl-client-cert")
    add_config_args(parser)  # data.columns and data.text.source for --manifest
    parser.set_defaults(func=predict_command, serves_concurrently=True)
    return parser


def _predictor(args):
    if args.saved_model:
        from multimodal_tf.serving.local import LocalModel

        return LocalModel(args.saved_model, max_batch=args.batch_size)
    from multimodal_tf.serving.client import Client
    from multimodal_tf.serving.tls import channel_credentials

    credentials = None
    if args.ssl_root_certs or args.ssl_client_cert or args.ssl_client_key:
        credentials = channel_credentials(args.ssl_root_certs, args.ssl_client_cert, args.ssl_client_key)
    return Client(
        args.server,
        args.model_name,
        timeout_seconds=args.timeout_seconds,
        max_batch=args.batch_size,
        credentials=credentials,
    )


def _error_text(error: Exception) -> str:
    from multimodal_tf.serving.errors import ServingError  # noqa: PLC0415

    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, ServingError):
        return f"{error.code.name}: {error.message}"
    return f"{type(error).__name__}: {error}"


def _is_input_error(error: Exception) -> bool:
    """A bad input (one row's fault), as opposed to an unreachable server or missing model."""
    from multimodal_tf.serving.errors import ServingError  # noqa: PLC0415

    if isinstance(error, grpc.RpcError):
        return error.code() == grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, ServingError):
        return error.code == grpc.StatusCode.INVALID_ARGUMENT
    return isinstance(error, OSError | ValueError | TypeError)


def class_names(predictor, signature_name: str = CLASSIFY_SIGNATURE) -> list[str] | None:
    """Class names in probability order, from the classify signature (None if it has none)."""
    from multimodal_tf.compat import tf  # noqa: PLC0415
    from multimodal_tf.serving.errors import ServingError  # noqa: PLC0415

    try:
        result = predictor.classify([tf.train.Example()], signature_name=signature_name)
    except (grpc.RpcError, ServingError, ValueError):
        return None
    return [str(name) for name in result[CLASSES][0]]


def _text_cell(cell: str, base: Path) -> str:
    """The manifest's "auto" rule: a cell naming an existing .txt file is read from it."""
    candidate = base / cell.strip()
    if cell.strip().endswith(".txt") and candidate.is_file():
        return candidate.read_text(encoding="utf-8").strip()
    return cell


def read_prediction_manifest(path: str | Path, args=None) -> list[dict]:
    """Rows of a manifest to predict, read by ``data.manifest`` (``data.columns`` of ``--config``).

    Only the id column and one media column are required; media paths are
    resolved against the manifest's folder and a text cell naming a .txt file
    is read from it (``data.text.source``).
    """
    from multimodal_tf.data.manifest import read_manifest  # noqa: PLC0415

    config = load_config(args or argparse.Namespace())
    manifest = read_manifest(path, config.data, labelled=False)
    return [
        {
            "id": r.id,
            "image": r.image or None,
            "text": r.text or None,  # bytes as read: the model gets them unchanged
            "audio": r.audio or None,
            "label": r.label or None,
        }
        for r in manifest.records
    ]


def _predict_rows(predictor, rows: list[dict], args) -> list[dict | Exception]:
    """Outputs per row; a chunk with a bad input is retried row by row so only that row fails."""
    kwargs = {
        "version": args.version,
        "version_label": args.version_label,
        "signature_name": args.signature_name,
    }
    try:
        outputs = predictor.predict(
            images=[r["image"] for r in rows],
            texts=[r["text"] for r in rows],
            audios=[r["audio"] for r in rows],
            **kwargs,
        )
        return [{name: value[i] for name, value in outputs.items()} for i in range(len(rows))]
    except Exception as e:
        if not _is_input_error(e):
            raise
        if len(rows) == 1:
            return [e]
    return [result for row in rows for result in _predict_rows(predictor, [row], args)]


def prediction_header(has_label: bool, names, width: int) -> list[str]:
    """The predictions CSV's header; ``names`` are the class names (numbers when unknown)."""
    names = names if names and len(names) == width else [str(i) for i in range(width)]
    return (
        ["id"] + (["label"] if has_label else []) + ["predicted"] + [f"prob_{n}" for n in names] + ["error"]
    )


def prediction_line(row: dict, result, has_label: bool, width: int) -> list[str]:
    """One row's CSV cells: the prediction, or empty cells and the error."""
    line = [row["id"]] + ([row["label"] or ""] if has_label else [])
    if isinstance(result, Exception):
        return line + [""] + [""] * width + [_error_text(result)]
    name = result[CLASS_NAME]
    line += [name.decode() if isinstance(name, bytes) else str(name)]
    return line + [f"{p:.6f}" for p in np.asarray(result[PROBABILITIES]).tolist()] + [""]


def _write_predictions(rows, results, names, output) -> int:
    has_label = any(r["label"] not in (None, "") for r in rows)
    width = next((len(r[PROBABILITIES]) for r in results if isinstance(r, dict)), len(names or []))
    writer = csv.writer(output)
    writer.writerow(prediction_header(has_label, names, width))
    for row, result in zip(rows, results, strict=True):
        writer.writerow(prediction_line(row, result, has_label, width))
    return sum(isinstance(result, Exception) for result in results)


def _predict_manifest(predictor, args) -> int:
    rows = read_prediction_manifest(args.manifest, args)
    results = []
    for start in range(0, len(rows), args.batch_size):
        results += _predict_rows(predictor, rows[start : start + args.batch_size], args)
    names = class_names(predictor)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", newline="", encoding="utf-8") as f:
            failures = _write_predictions(rows, results, names, f)
        print(f"wrote {len(rows)} predictions to {args.output} ({failures} failed)")
    else:
        failures = _write_predictions(rows, results, names, sys.stdout)
    return 1 if failures else 0


def _predict_on_beam(args) -> int:
    if not (args.manifest and args.saved_model and args.output):
        raise ValueError("--runner beam needs --manifest, --saved-model and --output")
    from multimodal_tf.serving.beam_predict import predict_with_beam  # noqa: PLC0415

    failures = predict_with_beam(
        args.saved_model, args.manifest, args.output, args, args.batch_size, args.beam_option
    )
    print(f"wrote predictions to {args.output} ({failures} failed)")
    return 1 if failures else 0


def predict_command(args) -> int:
    from multimodal_tf.serving.errors import ServingError  # noqa: PLC0415

    if not args.manifest and not (args.image or args.text or args.audio):
        raise ValueError("give --image/--text/--audio or --manifest")
    if args.runner == "beam":
        return _predict_on_beam(args)
    try:
        predictor = _predictor(args)
        if args.manifest:
            return _predict_manifest(predictor, args)
        text = _text_cell(args.text, Path.cwd()) if args.text else None
        kwargs = {
            "version": args.version,
            "version_label": args.version_label,
            "signature_name": args.signature_name,
        }
        outputs = predictor.predict(images=[args.image], texts=[text], audios=[args.audio], **kwargs)
    except (grpc.RpcError, ServingError) as e:
        print(f"mmtf predict: {_error_text(e)}", file=sys.stderr)
        return 1
    names = class_names(predictor)
    probabilities = outputs[PROBABILITIES][0].tolist()
    keys = names if names and len(names) == len(probabilities) else list(range(len(probabilities)))
    name = outputs[CLASS_NAME][0]
    result = {
        CLASS_NAME: name.decode() if isinstance(name, bytes) else str(name),
        CLASS_ID: int(outputs[CLASS_ID][0]),
        PROBABILITIES: {str(k): round(p, 6) for k, p in zip(keys, probabilities, strict=True)},
    }
    print(json.dumps(result, indent=2))
    return 0
