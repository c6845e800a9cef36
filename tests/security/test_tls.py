"""Broker TLS: a private node with a TLS-only listener and a throwaway CA (trustme)."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from port_for import get_port

import celeryconfig
from tests.infra import ROOT, ManagedRabbitNode, TlsFiles, WorkerProcess
from tests.monitoring.conftest import FLOWER_PASSWORD, FLOWER_USER, start_flower
from tests.security.beat import beat_sends_a_task_the_worker_runs

pytestmark = pytest.mark.integration

PRODUCE = "from tests.worker_tasks import add\nprint(add.delay(2, 3).get(timeout=20))\n"
#: What py-amqp reports when the server drops a connection that did not start with TLS.
PLAIN_TEXT_REFUSED = re.compile(
    r"OperationalError: .*"
    r"(Connection reset by peer|Server unexpectedly closed connection|Socket closed)"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("localhost", "127.0.0.1")
    files = TlsFiles(
        ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem"
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.cert))
    server.private_key_pem.write_to_path(str(files.key))
    for path in (files.cert, files.key):
        path.chmod(0o644)  # the broker runs as this user, but be explicit
    return files


@pytest.fixture(scope="module")
def tls_rabbit(
    tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedRabbitNode]:
    # The management API is served over HTTPS with the same certificate, for Flower's test.
    node = ManagedRabbitNode(tmp_path_factory.mktemp("tls-rabbit"), tls=tls_files).start()
    yield node
    node.stop()


def producer(
    broker_url: str, result_backend: str, ca: Path | None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend}
    env.pop("CONVEYOR_BROKER_TLS_CA", None)
    if ca is not None:
        env["CONVEYOR_BROKER_TLS_CA"] = str(ca)
    return subprocess.run(
        [sys.executable, "-c", PRODUCE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_a_task_round_trip_runs_over_verified_tls(
    tls_rabbit: ManagedRabbitNode,
    tls_files: TlsFiles,
    result_backend: str,
    tmp_path: Path,
) -> None:
    # Given a worker that reaches the broker over amqps:// and verifies it against the CA
    worker = WorkerProcess(
        broker_url=tls_rabbit.url,
        result_backend=result_backend,
        workdir=tmp_path,
        name="tls-worker",
        env={"CONVEYOR_BROKER_TLS_CA": str(tls_files.ca)},
    ).start()
    try:
        # When a producer, also over TLS, sends a task, then the result comes back
        done = producer(tls_rabbit.url, result_backend, tls_files.ca)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "5"
        # And every connection the broker has (the worker's, at least) is a TLS one
        listed = json.loads(tls_rabbit.ctl("list_connections", "ssl", "--formatter", "json"))
        assert listed and all(row["ssl"] is True for row in listed), listed
    finally:
        worker.stop()


def test_plain_text_is_refused_by_a_tls_only_broker(
    tls_rabbit: ManagedRabbitNode, result_backend: str
) -> None:
    # The node listens for AMQP over TLS only: no plain-text listener at all
    status = json.loads(tls_rabbit.ctl("status", "--formatter", "json"))
    protocols = {listener["protocol"] for listener in status["listeners"]}
    assert "amqp/ssl" in protocols and "amqp" not in protocols, protocols
    # and a plain-text client speaking AMQP to it is cut off during the handshake
    plain = tls_rabbit.url.replace("amqps://", "amqp://")
    done = producer(plain, result_backend, None)
    assert done.returncode != 0
    assert PLAIN_TEXT_REFUSED.search(done.stderr), done.stderr[-2000:]


def test_a_broker_signed_by_another_ca_fails_with_a_clear_error(
    tls_rabbit: ManagedRabbitNode, result_backend: str, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    done = producer(tls_rabbit.url, result_backend, other)
    assert done.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr


def test_the_broker_certificate_is_verified_by_default() -> None:
    env = {**os.environ, "CELERY_BROKER_URL": "amqps://u:p@broker.example:5671/conveyor"}
    code = (
        "import celeryconfig as c\n"
        "print(c.broker_use_ssl['cert_reqs'], c.broker_use_ssl['server_hostname'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [str(ssl.CERT_REQUIRED), "broker.example"]


DECLARE = (
    "from tasks import app\n"
    "with app.connection_for_write() as connection:\n"
    "    for queue in app.conf.task_queues:\n"
    "        queue.bind(connection.default_channel).declare()\n"
)


def test_flower_reads_the_management_api_over_https_verified_with_the_broker_ca(
    tls_rabbit: ManagedRabbitNode,
    tls_files: TlsFiles,
    result_backend: str,
    tmp_path: Path,
) -> None:
    # Given the task queues on a TLS-only broker whose management API is HTTPS only
    env = {
        **os.environ,
        "CELERY_BROKER_URL": tls_rabbit.url,
        "CELERY_RESULT_BACKEND": result_backend,
        "CONVEYOR_BROKER_TLS_CA": str(tls_files.ca),
    }
    subprocess.run([sys.executable, "-c", DECLARE], cwd=ROOT, env=env, check=True, timeout=60)
    assert tls_rabbit.api_url.startswith("https://")

    # When Flower, with compose's command, runs against it with the private CA
    port = get_port(None)
    flower = start_flower(
        tmp_path,
        tls_rabbit,
        result_backend,
        port,
        CONVEYOR_BROKER_TLS_CA=str(tls_files.ca),
        FLOWER_PERSISTENT="false",
    )
    try:
        credentials = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/broker",
            headers={"Authorization": f"Basic {credentials}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            page = response.read().decode()
    finally:
        flower.stop()

    # Then the broker page lists the queues with the figures the API returned, and the API
    # call was made with certificate verification (it fails without the CA: see below)
    assert "management API call failed" not in flower.log(), flower.log()[-2000:]
    for queue in celeryconfig.conveyor_queue_names:
        assert f"<td>{queue}</td>" in page, page[-3000:]


def test_flower_management_api_options_use_the_broker_ca_and_never_skip_verification() -> None:
    from monitoring.flower import management_api_tls

    amqp_options = {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": "/ca.pem", "certfile": None}
    assert management_api_tls(amqp_options) == {"validate_cert": True, "ca_certs": "/ca.pem"}
    assert management_api_tls(False) == {"validate_cert": True}
    with_client = {**amqp_options, "certfile": "/c.pem", "keyfile": "/k.pem"}
    assert management_api_tls(with_client)["client_cert"] == "/c.pem"


SNAPSHOT = (
    "from tasks import app\n"
    "from monitoring import queue_stats\n"
    "snap = queue_stats.snapshot(app)\n"
    "print(snap.source, ' '.join(sorted(snap.queues)))\n"
)


def test_the_exporter_reads_an_https_management_api_verified_with_the_broker_ca(
    tls_rabbit: ManagedRabbitNode, tls_files: TlsFiles, result_backend: str, tmp_path: Path
) -> None:
    # Given the task queues on a TLS-only broker whose management API is HTTPS only
    env = {
        **os.environ,
        "CELERY_BROKER_URL": tls_rabbit.url,
        "CELERY_RESULT_BACKEND": result_backend,
        "CONVEYOR_BROKER_TLS_CA": str(tls_files.ca),
        "CONVEYOR_RABBITMQ_API": tls_rabbit.api_url,
    }
    subprocess.run([sys.executable, "-c", DECLARE], cwd=ROOT, env=env, check=True, timeout=60)
    # When the exporter's queue reader asks it, trusting the broker's CA
    done = subprocess.run(
        [sys.executable, "-c", SNAPSHOT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    # Then the figures come from the management API, for every task queue
    assert done.returncode == 0, done.stderr
    source, *queues = done.stdout.split()
    assert source == "management"
    assert set(celeryconfig.conveyor_queue_names) <= set(queues)
    # And with another CA the same call fails verification instead of trusting the API
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    done = subprocess.run(
        [sys.executable, "-c", SNAPSHOT], cwd=ROOT,
        env={**env, "CONVEYOR_BROKER_TLS_CA": str(other)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr


def test_the_management_api_context_verifies_and_sends_the_client_certificate(
    ca: trustme.CA, tmp_path: Path
) -> None:
    from monitoring.queue_stats import management_api_context

    client = ca.issue_cert("conveyor-client")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = management_api_context(
        {
            "ca_certs": str(tmp_path / "ca.pem"),
            "certfile": str(tmp_path / "client.pem"),
            "keyfile": str(tmp_path / "client.key"),
        }
    )
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # Only the private CA is trusted (the system store is not added to it)
    (trusted,) = context.get_ca_certs()
    assert trusted["subject"] == trusted["issuer"]
    # A plain-text broker still verifies an https:// API, against the system store
    assert management_api_context(False).verify_mode == ssl.CERT_REQUIRED
    # A client key that does not match its certificate is an error, not ignored
    with pytest.raises(ssl.SSLError):
        management_api_context(
            {"certfile": str(tmp_path / "client.pem"), "keyfile": str(tmp_path / "ca.pem")}
        )


def test_beat_sends_its_tasks_over_verified_tls(
    tls_rabbit: ManagedRabbitNode,
    tls_files: TlsFiles,
    result_backend: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    tls = {"CONVEYOR_BROKER_TLS_CA": str(tls_files.ca)}
    worker = WorkerProcess(
        broker_url=tls_rabbit.url,
        result_backend=result_backend,
        workdir=tmp_path,
        name="tls-beat-worker",
        env=tls,
    ).start()
    try:
        beat_sends_a_task_the_worker_runs(worker, tls_rabbit.url, redis_url, tmp_path / "beat", tls)
    finally:
        worker.stop()
