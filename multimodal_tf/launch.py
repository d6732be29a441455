"""``mmtf launch``: a local cluster on 127.0.0.1 for multi-worker, PS and tuning jobs.

Every task is a separate process running the same command with its own
environment:

* ``--workers N`` (N > 1): ``TF_CONFIG`` with ``worker`` tasks 0..N-1
  (MultiWorkerMirroredStrategy; worker 0 is the chief).
* ``--ps M``: ``TF_CONFIG`` with a ``chief`` (the coordinator that runs
  ``fit``), N ``worker`` and M ``ps`` tasks (ParameterServerStrategy; the
  worker and ps tasks serve a ``tf.distribute.Server`` until stopped).
* ``--tuner-workers N``: Keras Tuner's chief/worker mode: ``KERASTUNER_TUNER_ID``
  (``chief``, ``tuner0``..), ``KERASTUNER_ORACLE_IP`` and ``_PORT``. No
  ``TF_CONFIG``: each trial trains with a single-worker strategy.

Each task logs to ``<log_dir>/<task>.log``. The cluster is torn down when any
task fails (non-zero exit or killed) or when the chief finishes; the chief's
exit code (or the failing task's) is returned. The module imports no
TensorFlow, so the launcher process stays small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
# A chief that finished leaves synchronous peers (MWMS workers, tuner workers)
# a little time to finish their own last step and exit cleanly.
FINISH_GRACE_SECONDS = 30.0
# SIGTERM first (lets Python flush logs), SIGKILL after this long.
TERMINATE_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2
TIMEOUT_EXIT_CODE = 124


@dataclasses.dataclass
class Task:
    """One process of the local cluster."""

    type: str  # chief | worker | ps | tuner
    index: int
    env: dict[str, str]
    log_path: Path
    chief: bool = False
    server: bool = False  # serves until stopped (PS cluster ps/worker tasks)
    process: subprocess.Popen | None = None
    stopped_by_launcher: bool = False

    @property
    def name(self) -> str:
        return f"{self.type}-{self.index}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held until all are found)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def resolve_command(command: Sequence[str]) -> list[str]:
    """``mmtf ...`` -> ``<this python> -m multimodal_tf.cli ...``; others unchanged."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("mmtf launch: no command given (e.g. `mmtf launch --workers 2 -- mmtf train ...`)")
    if command[0] == "mmtf":
        return [sys.executable, "-m", "multimodal_tf.cli", *command[1:]]
    return command


def plan_tasks(workers: int, ps: int, tuner_workers: int, log_dir: Path) -> list[Task]:
    """The tasks of a cluster and each one's extra environment variables."""
    if workers < 1 or ps < 0 or tuner_workers < 0:
        raise ValueError(
            f"need workers >= 1, ps >= 0, tuner_workers >= 0; got {workers}, {ps}, {tuner_workers}"
        )
    if tuner_workers and (workers > 1 or ps):
        raise ValueError(
            "--tuner-workers cannot be combined with --workers > 1 or --ps: "
            "each trial trains with a single-worker strategy"
        )
    log_dir = Path(log_dir)
    if tuner_workers:
        (port,) = free_ports(1)
        base = {"KERASTUNER_ORACLE_IP": LOOPBACK, "KERASTUNER_ORACLE_PORT": str(port)}
        tasks = [
            Task("chief", 0, {**base, "KERASTUNER_TUNER_ID": "chief"}, log_dir / "chief-0.log", chief=True)
        ]
        for index in range(tuner_workers):
            env = {**base, "KERASTUNER_TUNER_ID": f"tuner{index}"}
            tasks.append(Task("tuner", index, env, log_dir / f"tuner-{index}.log"))
        return tasks
    if workers == 1 and not ps:
        return [Task("chief", 0, {}, log_dir / "chief-0.log", chief=True)]
    roles = [("chief", 0)] if ps else []
    roles += [("worker", i) for i in range(workers)] + [("ps", i) for i in range(ps)]
    ports = iter(free_ports(len(roles)))
    cluster: dict[str, list[str]] = {}
    for task_type, _ in roles:
        cluster.setdefault(task_type, []).append(f"{LOOPBACK}:{next(ports)}")
    tasks = []
    for task_type, index in roles:
        tf_config = {"cluster": cluster, "task": {"type": task_type, "index": index}}
        chief = task_type == "chief" or (not ps and index == 0)
        tasks.append(
            Task(
                task_type,
                index,
                {"TF_CONFIG": json.dumps(tf_config)},
                log_dir / f"{task_type}-{index}.log",
                chief=chief,
                server=bool(ps) and not chief,
            )
        )
    return tasks


class LocalCluster:
    """Starts, watches and stops the processes of one local job.

    Args:
        command: the command every task runs (``mmtf ...`` runs this Python).
        workers: worker tasks (more than 1: a multi-worker cluster).
        ps: parameter-server tasks (adds a chief that coordinates).
        tuner_workers: Keras Tuner workers next to a tuner chief.
        log_dir: one ``<task>.log`` per task, plus ``cluster.json``.
        echo_chief: copy the chief's log to this process's stdout as it grows.
        env: extra environment variables for every task.
    """

    def __init__(
        self,
        command: Sequence[str],
        workers: int = 1,
        ps: int = 0,
        tuner_workers: int = 0,
        log_dir: str | Path = "runs/launch",
        echo_chief: bool = True,
        env: dict | None = None,
    ):
        self.command = resolve_command(command)
        self.log_dir = Path(log_dir)
        self.tasks = plan_tasks(workers, ps, tuner_workers, self.log_dir)
        self.echo_chief = echo_chief
        self.env = dict(env or {})
        self._echo_offset = 0

    @property
    def chief(self) -> Task:
        return next(task for task in self.tasks if task.chief)

    def task(self, name: str) -> Task:
        """The task called ``name`` (e.g. ``"worker-1"``)."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; have {[t.name for t in self.tasks]}")

    def start(self) -> None:
        """Starts every task, servers first so that clients find them up."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for task in sorted(self.tasks, key=lambda t: not t.server):
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **task.env}
            with open(task.log_path, "wb") as log:
                # Own session: the task and anything it spawns form a process
                # group that shutdown() can signal without touching others.
                task.process = subprocess.Popen(
                    self.command,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        layout = {t.name: {"pid": t.process.pid, "env": t.env, "log": str(t.log_path)} for t in self.tasks}
        (self.log_dir / "cluster.json").write_text(
            json.dumps({"command": self.command, "tasks": layout}, indent=1)
        )

    def failed_task(self) -> Task | None:
        """A task that ended with a non-zero status it was not stopped for."""
        for task in self.tasks:
            code = None if task.process is None else task.process.poll()
            if code not in (None, 0) and not task.stopped_by_launcher:
                return task
        return None

    def wait(self, timeout: float | None = None) -> int:
        """Watches the tasks until the job ends; always stops every task.

        Returns:
            0 when the chief succeeded; the exit code of the first task that
            failed (128 + signal for killed tasks); 124 on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                self._echo()
                failed = self.failed_task()
                if failed is not None:
                    return self._report_failure(failed)
                if self.chief.process.poll() == 0:
                    return self._finish()
                if deadline is not None and time.monotonic() > deadline:
                    print(
                        f"mmtf launch: timed out after {timeout:.0f} s; stopping all tasks", file=sys.stderr
                    )
                    return TIMEOUT_EXIT_CODE
                time.sleep(POLL_SECONDS)
        finally:
            self.shutdown()
            self._echo()

    def _finish(self) -> int:
        """Chief done: stop servers now, give other peers a grace period."""
        for task in self.tasks:
            if task.server:
                self._signal(task, signal.SIGTERM)
        deadline = time.monotonic() + FINISH_GRACE_SECONDS
        while time.monotonic() < deadline and any(
            t.process.poll() is None for t in self.tasks if not t.server
        ):
            time.sleep(POLL_SECONDS)
        failed = self.failed_task()
        return self._report_failure(failed) if failed else 0

    def _report_failure(self, task: Task) -> int:
        code = task.process.returncode
        exit_code = 128 - code if code < 0 else code
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        print(
            f"mmtf launch: task {task.name} {how}; stopping all tasks (log: {task.log_path})", file=sys.stderr
        )
        tail = task.log_path.read_text(errors="replace").splitlines()[-15:] if task.log_path.exists() else []
        for line in tail:
            print(f"  [{task.name}] {line}", file=sys.stderr)
        return exit_code

    def _signal(self, task: Task, signum: int) -> None:
        if task.process is None or task.process.poll() is not None:
            return
        task.stopped_by_launcher = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(task.process.pid, signum)

    def shutdown(self) -> None:
        """SIGTERM to every running task, SIGKILL to those still alive after a grace period."""
        running = [t for t in self.tasks if t.process is not None and t.process.poll() is None]
        for task in running:
            self._signal(task, signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
        for task in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                task.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for task in running:
            if task.process.poll() is None:
                self._signal(task, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    task.process.wait(timeout=5)

    def _echo(self) -> None:
        """Copies new lines of the chief's log to stdout."""
        if not self.echo_chief or not self.chief.log_path.exists():
            return
        with open(self.chief.log_path, "rb") as log:
            log.seek(self._echo_offset)
            data = log.read()
        self._echo_offset += len(data)
        if data:
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def launch(
    command: Sequence[str],
    workers: int = 1,
    ps: int = 0,
    tuner_workers: int = 0,
    log_dir: str | Path = "runs/launch",
    timeout: float | None = None,
    echo_chief: bool = True,
) -> int:
    """Runs ``command`` as a local cluster and returns its exit code (see LocalCluster)."""
    cluster = LocalCluster(command, workers, ps, tuner_workers, log_dir, echo_chief)
    with _terminate_raises():
        try:
            cluster.start()
            names = ", ".join(f"{t.name} (pid {t.process.pid})" for t in cluster.tasks)
            print(f"mmtf launch: started {names}; logs in {cluster.log_dir}", flush=True)
            code = cluster.wait(timeout)
        finally:
            cluster.shutdown()  # also when start() or wait() was interrupted
    print(f"mmtf launch: finished with exit code {code}", flush=True)
    return code


@contextlib.contextmanager
def _terminate_raises():
    """SIGTERM to the launcher unwinds (and so stops every task) instead of orphaning them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
