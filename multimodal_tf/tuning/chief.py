"""Keras Tuner's distributed chief, run with a short poll (touches keras-tuner internals).

``mmtf launch --tuner-workers N`` sets the ``KERASTUNER_*`` variables: the
chief serves the oracle over gRPC and the workers each run trials.
"""

from __future__ import annotations

import os
import time

# How often the tuner chief checks whether every worker is done (keras-tuner's
# own loop sleeps 20 s, which would dominate small searches).
CHIEF_POLL_SECONDS = 1.0


def serve_as_chief(tuner) -> None:
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


def role() -> str:
    """``single``, ``chief`` or ``worker`` (Keras Tuner's distributed mode)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"
