"""The README's non-Docker path, run as written against private RabbitMQ and Redis nodes.

Every fenced block the test runs is marked in README.md by a comment line just above it,
``<!-- readme-test: NAME -->``: install, delay, batch, schedule, dlq. The commands are read
from there, so a README that drifts from the code fails here. What the test changes, and only
that: the environment points every process at private nodes; `honcho start` runs the Procfile
from a copy whose Flower and exporter ports are free ones; placeholders (`ID`, `<task-id>`,
`<name>`) get real ids; synopsis lines (`[--json]`, `a | b`) run in their shortest form; the
partner URL of the web-app example is a local receiver.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from port_for import get_port

from tests.infra import ROOT, ManagedRabbitNode, stop_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
MARKER = re.compile(r"^<!-- readme-test: (\w+) -->\n```\w*\n(.*?)^```", re.M | re.S)
PARTNER_URL = "https://partner.example/hooks"
#: The management API URL .env.example gives the local path.
LOCAL_API = "http://guest:guest@127.0.0.1:15672/api/"
#: A Redis database of its own, so nothing another test left in db 0 shows in the lists.
README_DB = 9


def readme_blocks() -> dict[str, str]:
    return dict(MARKER.findall((ROOT / "README.md").read_text()))


def runnable(line: str, ids: dict[str, str]) -> str:
    """A synopsis line in its shortest runnable form, placeholders filled in."""
    line = line.split("  #", 1)[0].strip()
    line = re.sub(r"\s*\[[^\]]*\]", "", line)  # optional parts
    line = line.split(" | ", 1)[0]  # the first of several alternatives
    for placeholder, value in ids.items():
        line = re.sub(rf"(?<![\w-]){re.escape(placeholder)}(?![\w-])", value, line)
    return line


@dataclass
class Stack:
    env: dict[str, str]
    log: Path
    #: The local stand-in for the README's partner URL, and the POSTs it received.
    partner: str
    received: list[dict[str, object]]
    ports: dict[str, int]
    dotenv: Path

    def run(self, command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=ROOT,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done

    def python(self, code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{code}\n{done.stderr}"
        return done.stdout


def receiver() -> tuple[http.server.ThreadingHTTPServer, list[dict[str, object]]]:
    """The partner's webhook endpoint: records each POST, answers 200."""
    received: list[dict[str, object]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append({"path": self.path, "body": json.loads(body or b"null")})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def procfile_with_free_ports(workdir: Path) -> tuple[Path, dict[str, int]]:
    text = (ROOT / "Procfile").read_text()
    ports = {}
    for name, port in (("flower", "5555"), ("exporter", "9808")):
        ports[name] = get_port(None)
        text = text.replace(f"--port={port}", f"--port={ports[name]}")
    path = workdir / "Procfile"
    path.write_text(text)
    return path, ports


def check_install_line(block: str) -> list[str]:
    """The install line names an extra that exists and brings honcho; returns what follows."""
    words = shlex.split(block.strip())
    install, rest = words[: words.index("&&")], words[words.index("&&") + 1 :]
    assert install[:3] == ["pip", "install", "-e"], install
    extra = re.fullmatch(r"\.\[(\w+)\]", install[3])
    assert extra, install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = extras["optional-dependencies"][extra.group(1)]
    assert any(requirement.startswith("honcho") for requirement in requirements)
    return rest


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    """The README's `honcho start`: worker, priority worker, beat, Flower and exporter."""
    blocks = readme_blocks()
    assert set(blocks) == {"install", "delay", "batch", "schedule", "dlq"}, sorted(blocks)
    assert check_install_line(blocks["install"]) == ["honcho", "start"]
    workdir = tmp_path_factory.mktemp("readme")
    rabbit = ManagedRabbitNode(workdir / "rabbit").start()
    server, received = receiver()
    backend = f"{redis_url}/{README_DB}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "CELERY_BROKER_URL": rabbit.url,
        "CELERY_RESULT_BACKEND": backend,
        "CONVEYOR_SCHEDULE_REDIS_URL": backend,
        "CELERY_REDBEAT_KEY_PREFIX": f"readme-{uuid.uuid4().hex[:8]}:",
        "CONVEYOR_HEALTH_DIR": str(workdir / "health"),
    }
    for name in ("CONVEYOR_RABBITMQ_API", "FLOWER_BROKER_API", "CONVEYOR_LOG_FORMAT"):
        env.pop(name, None)
    # The README's `cp .env.example .env`, with the local management URL made this node's
    # (honcho's .env values win over the environment).
    dotenv = workdir / ".env"
    dotenv.write_text((ROOT / ".env.example").read_text().replace(LOCAL_API, rabbit.api_url))
    log_path = workdir / "honcho.log"
    procfile, ports = procfile_with_free_ports(workdir)
    argv = [str(BIN / "honcho"), "start", "-f", str(procfile), "-d", str(ROOT)]
    argv += ["-e", str(dotenv), "--no-colour"]
    with log_path.open("ab") as log:
        honcho = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    partner = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    stack = Stack(env, log_path, partner, received, ports, dotenv)
    try:
        host = socket.gethostname()
        for node in (f"celery@{host}", f"priority@{host}"):
            wait_for(
                lambda node=node: _ready(env, node, honcho, log_path),
                90,
                interval=1,
                what=f"{node} ready under honcho (log: {log_path})",
            )
        yield stack
    finally:
        stop_process(honcho, 40)
        server.shutdown()
        rabbit.stop()


def _ready(env: dict[str, str], node: str, honcho: subprocess.Popen[bytes], log: Path) -> bool:
    if honcho.poll() is not None:
        pytest.fail(f"honcho exited {honcho.returncode}:\n{log.read_text()[-4000:]}")
    probe = [sys.executable, "-m", "workers.health", "ready", "--node", node]
    return subprocess.run(probe, env=env, capture_output=True).returncode == 0


def test_the_readme_web_app_schedule_and_dead_letter_examples_run_as_written(
    stack: Stack,
) -> None:
    blocks = readme_blocks()
    # The web app's example, against a local partner endpoint: both calls are delivered
    stack.python(blocks["delay"].replace(PARTNER_URL, stack.partner))
    wait_for(lambda: len(stack.received) >= 2, 30, what="both README deliveries at the receiver")
    assert {entry["path"] for entry in stack.received} == {"/hooks"}

    # Flower's Broker tab and the exporter read the management API named in .env.example
    broker_tab = f"http://127.0.0.1:{stack.ports['flower']}/broker"
    wait_for(
        lambda: all(f">{queue}<" in (_get(broker_tab) or "") for queue in ("default", "priority")),
        60,
        interval=1,
        what="the queues on Flower's Broker tab",
    )
    with_dotenv = f"honcho run -e {stack.dotenv} celery -A tasks overview --json"
    overview = json.loads(stack.run(with_dotenv).stdout)
    assert overview["queue_source"] == "management", overview
    assert all(isinstance(queue["unacked"], int) for queue in overview["queues"]), overview
    metrics = f"http://127.0.0.1:{stack.ports['exporter']}/metrics"
    wait_for(
        lambda: "conveyor_queue_messages_unacked{" in (_get(metrics) or ""),
        60,
        what="unacked counts at the exporter",
    )

    # A delayed job to cancel, and a dead letter (a task no worker knows) to list and replay
    ids = json.loads(
        stack.python(
            "import json\n"
            "from tasks import app\n"
            "from tasks.webhooks import deliver\n"
            f"later = deliver.apply_async(({stack.partner!r}, 'later', {{}}), countdown=3600)\n"
            "dead = app.send_task('readme.no_such_task')\n"
            "print(json.dumps({'later': later.id, 'dead': dead.id}))\n"
        )
    )
    wait_for(
        lambda: ids["dead"] in stack.run("celery -A tasks dlq list --json").stdout,
        60,
        interval=1,
        what="the unknown task in the dead-letter queue",
    )

    # The scheduling block as written (the cancel line gets the delayed job's id)
    stack.run(blocks["schedule"].replace("<task-id>", ids["later"]))
    listed = stack.run("celery -A tasks schedule list --json").stdout
    names = {entry["name"] for entry in json.loads(listed)}
    assert {"partner-heartbeat", "report-2am"} <= names

    # The dead-letter block, each line in its shortest form; purge answers its question
    for line in blocks["dlq"].strip().splitlines():
        given = {"<task-id>": ids["dead"], "<name>": "readme.no_such_task"}
        command = runnable(line, {**given, "<entry>": "partner-heartbeat"})
        stack.run(command, stdin="y\n")


def test_the_readme_batch_example_runs_against_the_sample_file_it_names(stack: Stack) -> None:
    lines = [line for line in readme_blocks()["batch"].strip().splitlines() if line]
    submit = runnable(lines[0], {})
    words = shlex.split(submit)
    sample = ROOT / words[words.index("submit") + 2]
    assert sample.is_file(), f"the README's sample file {sample} is not in the repository"

    done = stack.run(submit)

    [batch_id] = set(re.findall(r"\b[0-9a-f]{32}\b", done.stdout + done.stderr))
    status = json.loads(stack.run(runnable(lines[1], {"ID": batch_id})).stdout)
    assert status["state"] == "completed", status
    assert status["failed"] == 0 and status["succeeded"] == status["total"] > 0, status
    stack.run(runnable(lines[2], {"ID": batch_id}))


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None
