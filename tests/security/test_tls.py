"""Broker TLS: a private node with a TLS-only listener and a throwaway CA (trustme)."""

from __future__ import annotations

import base64
import os
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

pytestmark = pytest.mark.integration

PRODUCE = "from tests.worker_tasks import add\nprint(add.delay(2, 3).get(timeout=20))\n"


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
    finally:
        worker.stop()
    # And the broker saw only TLS connections
    assert "amqps" in tls_rabbit.url


def test_plain_text_is_refused_by_a_tls_only_broker(
    tls_rabbit: ManagedRabbitNode, result_backend: str
) -> None:
    plain = tls_rabbit.url.replace("amqps://", "amqp://")
    done = producer(plain, result_backend, None)
    assert done.returncode != 0
    assert "OperationalError" in done.stderr


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
    from workers.flower import management_api_tls

    amqp_options = {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": "/ca.pem", "certfile": None}
    assert management_api_tls(amqp_options) == {"validate_cert": True, "ca_certs": "/ca.pem"}
    assert management_api_tls(False) == {"validate_cert": True}
    with_client = {**amqp_options, "certfile": "/c.pem", "keyfile": "/k.pem"}
    assert management_api_tls(with_client)["client_cert"] == "/c.pem"
