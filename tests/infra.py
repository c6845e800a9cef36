"""Real infrastructure for the tests: private RabbitMQ and Redis nodes and worker processes.

Nodes are started from the installed binaries on free loopback ports, so a test can stop, kill
or freeze them without touching the machine's own services.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from port_for import get_port
from pytest_rabbitmq.factories.executor import RabbitMqExecutor

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RABBITMQ_BIN = Path(os.environ.get("CONVEYOR_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def require(condition: bool, reason: str) -> None:
    """Skip on a laptop without the service; under CI a missing service is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll until predicate() is truthy and return it; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a server certificate, its key and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path


class RabbitNode:
    """A private RabbitMQ node with its own config file, data directory and ports."""

    def __init__(
        self,
        workdir: Path,
        *,
        consumer_timeout_ms: int = 1_800_000,
        tls: TlsFiles | None = None,
        node_prefix: str = "conveyor-test",
        home: Path | None = None,
    ) -> None:
        require(
            (RABBITMQ_BIN / "rabbitmq-server").exists(),
            f"rabbitmq-server not found in {RABBITMQ_BIN} (apt-get install rabbitmq-server)",
        )
        self.port = get_port(None)
        self.dist_port = get_port(None, [self.port])
        self.node_name = f"{node_prefix}-{self.port}@localhost"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "rabbitmq.conf"
        # The machine's /etc/rabbitmq config pins 5672; a private file replaces it.
        if tls is None:
            listeners = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        else:
            # TLS only: no plain-text listener at all, peers verified against the CA.
            listeners = (
                "listeners.tcp = none\n"
                f"listeners.ssl.local = 127.0.0.1:{self.port}\n"
                f"ssl_options.cacertfile = {tls.ca}\n"
                f"ssl_options.certfile = {tls.cert}\n"
                f"ssl_options.keyfile = {tls.key}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        config.write_text(
            listeners + f"consumer_timeout = {consumer_timeout_ms}\nloopback_users = none\n"
        )
        (workdir / "plugins").write_text("[].\n")
        env_file = workdir / "rabbitmq-env.conf"
        env_file.write_text("")
        self.executor = RabbitMqExecutor(
            str(RABBITMQ_BIN / "rabbitmq-server"),
            "127.0.0.1",
            self.port,
            self.dist_port,
            str(RABBITMQ_BIN / "rabbitmqctl"),
            logpath=workdir / "logs",
            path=workdir,
            plugin_path=workdir,
            node_name=self.node_name,
        )
        self.executor._envvars.update(
            {
                "RABBITMQ_CONFIG_FILE": str(config),
                "RABBITMQ_CONF_ENV_FILE": str(env_file),
                "RABBITMQ_NODENAME": self.node_name,
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        if home is not None:
            # The Erlang cookie lives in HOME: nodes that must talk share one.
            self.executor._envvars["HOME"] = str(home)
        self.workdir = workdir
        scheme = "amqps" if tls else "amqp"
        self.url = f"{scheme}://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> RabbitNode:
        self.executor.start()
        return self

    def stop(self) -> None:
        self.executor.stop()

    def enable_management(self, tls: TlsFiles | None = None) -> str:
        """Turn the management plugin on (before start); returns its API URL.

        With `tls` the API is served over HTTPS only, with the broker's certificate.
        """
        self.management_port = get_port(None, [self.port, self.dist_port])
        if tls is None:
            listener = (
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            )
        else:
            listener = (
                "management.ssl.ip = 127.0.0.1\n"
                f"management.ssl.port = {self.management_port}\n"
                f"management.ssl.cacertfile = {tls.ca}\n"
                f"management.ssl.certfile = {tls.cert}\n"
                f"management.ssl.keyfile = {tls.key}\n"
            )
        with (self.workdir / "rabbitmq.conf").open("a") as config:
            config.write(listener + "collect_statistics_interval = 1000\n")
        (self.workdir / "plugins").write_text("[rabbitmq_management].\n")
        scheme = "http" if tls is None else "https"
        return f"{scheme}://guest:guest@127.0.0.1:{self.management_port}/api/"

    def ctl(self, *args: str) -> str:
        return self.executor.rabbitctl_output("-n", self.node_name, *args)

    def set_memory_watermark(self, fraction: float) -> None:
        """0 raises the memory alarm at once (every publisher is blocked); 0.4 clears it."""
        self.ctl("set_vm_memory_high_watermark", str(fraction))

    def queues(self) -> dict[str, dict[str, Any]]:
        """name -> {"type", "arguments", "messages"} from rabbitmqctl."""
        import json

        out = self.ctl(
            "list_queues", "name", "type", "arguments", "messages", "--formatter", "json"
        )
        rows = json.loads(out)
        return {
            row["name"]: {
                "type": row["type"],
                # rabbitmqctl's JSON gives arguments as [name, type, value] triples.
                "arguments": {name: value for name, _type, value in row["arguments"]},
                "messages": row["messages"],
            }
            for row in rows
        }


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM (a graceful stop), then SIGKILL the process group if it outlives `timeout`."""
    if process is None or process.poll() is not None:
        return process.returncode if process else None
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait(10)


def compose_command(service: str) -> list[str]:
    """The command compose.yaml runs for `service`: tests run exactly this, plus test flags."""
    spec = yaml.safe_load((ROOT / "compose.yaml").read_text())
    command = spec["services"][service]["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


@dataclass
class WorkerProcess:
    """A real `celery -A tasks worker` process, started with compose.yaml's worker command."""

    broker_url: str
    result_backend: str
    workdir: Path
    name: str = "worker"
    concurrency: int = 2
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    service: str = "worker"
    #: Module of extra tasks the worker loads (test-only or benchmark tasks).
    include: str = "tests.worker_tasks"

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node = f"{self.name}-{os.getpid()}@localhost"
        self.log_path = self.workdir / f"{self.name}.log"
        self.health_dir = self.workdir / "health"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        command = compose_command(self.service)
        assert command[0] == "celery"
        celery = str(Path(sys.executable).with_name("celery"))
        return [
            celery,
            *command[1:],
            f"--hostname={self.node}",
            f"--include={self.include}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_RESULT_BACKEND": self.result_backend,
            "CELERY_WORKER_CONCURRENCY": str(self.concurrency),
            "CONVEYOR_HEALTH_DIR": str(self.health_dir),
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        # An empty URL means "not from the environment" (for example from a *_FILE secret).
        for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            if not env[key]:
                del env[key]
        return env

    def start(self, timeout: float = 60) -> WorkerProcess:
        from workers.health import check

        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: (
                self._exited_early()
                or check("ready", self.node, 60, directory=self.health_dir) is None
            ),
            timeout,
            what=f"worker {self.node} to become ready (log: {self.log_path})",
        )
        return self

    def _exited_early(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the worker and its pool processes, as an OOM killer or a crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 40) -> int | None:
        return stop_process(self.process, timeout)


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


class ManagedRabbitNode(RabbitNode):
    """A private node with the management plugin: its HTTP API listens on a free loopback port.

    Statistics are collected every second (RabbitMQ's default is 5 s) so that tests comparing
    the API's figures with rabbitmqctl's do not wait long for them to settle.
    """

    def __init__(self, workdir: Path, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.api_url = self.enable_management(kwargs.get("tls"))

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """name -> ready, unacked, consumers, straight from rabbitmqctl."""
        import json

        out = self.ctl(
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "--formatter",
            "json",
        )
        return {
            row["name"]: {
                "ready": row["messages_ready"],
                "unacked": row["messages_unacknowledged"],
                "consumers": row["consumers"],
            }
            for row in json.loads(out)
        }


class ChaosRabbitNode(RabbitNode):
    """A private node the chaos tests may kill, freeze, restart and alarm.

    `extra_config` lines are appended to the node's rabbitmq.conf (for example a small
    `max_message_size`); the data directory survives restarts, as a real node's disk would.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        consumer_timeout_ms: int = 1_800_000,
        extra_config: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(workdir, consumer_timeout_ms=consumer_timeout_ms, **kwargs)
        if extra_config:
            with (workdir / "rabbitmq.conf").open("a") as config:
                config.write(extra_config.rstrip("\n") + "\n")

    def beam_pid(self) -> int:
        """The Erlang VM's pid (rabbitmq-server is a wrapper script around it)."""
        return int(self.ctl("eval", "list_to_integer(os:getpid()).").strip())

    def kill9(self) -> None:
        """Crash the node as a power cut or the OOM killer would: no clean shutdown."""
        pid = self.beam_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _pid_alive(pid), 30, what="the killed node to exit")
        # The wrapper script exits with the VM; let the executor forget its process.
        self.executor.stop()

    def restart(self) -> None:
        """Start the node again on the same data directory and ports."""
        self.executor.start()

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")

    def close_all_connections(self, reason: str = "chaos") -> None:
        self.ctl("close_all_connections", reason)

    def freeze(self) -> int:
        """SIGSTOP the VM: TCP stays open but nothing answers (a half-open broker)."""
        pid = self.beam_pid()
        os.kill(pid, signal.SIGSTOP)
        return pid

    @staticmethod
    def thaw(pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def message_counts(self) -> dict[str, int]:
        return {name: int(row["messages"] or 0) for name, row in self.queues().items()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (a worker's pool processes), read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may contain spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


class RedisServer:
    """A private redis-server on a free port that a test may freeze or stop and restart."""

    def __init__(self, workdir: Path) -> None:
        require(redis_server_available(), "redis-server not found (apt-get install redis-server)")
        self.port = get_port(None)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        import redis

        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "yes",
            ],
            stdout=(self.workdir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(ping, 30, what="private redis-server")
        client.close()
        return self

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def probe_path_for(worker: WorkerProcess, kind: str) -> Path:
    """The worker's liveness/readiness file; a killed worker leaves a stale one behind."""
    from workers.health import probe_path

    return probe_path(worker.node, kind, worker.health_dir)
