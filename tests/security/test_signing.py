"""Optional message signing (Celery's auth serializer), switched on by configuration."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trustme
from kombu import Connection, Exchange, Producer

from tests.infra import ROOT, RabbitNode, WorkerProcess, wait_for

pytestmark = pytest.mark.integration

PRODUCE = "from tests.worker_tasks import add\nprint(add.delay(6, 7).get(timeout=20))\n"


@pytest.fixture(scope="module")
def signing_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("signing")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("conveyor-signer", key_type=trustme.KeyType.RSA)
    (directory / "store").mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(directory / "store" / "signer.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    return {
        "CONVEYOR_SIGNING": "on",
        "CONVEYOR_SIGNING_KEY": str(directory / "key.pem"),
        "CONVEYOR_SIGNING_CERT": str(directory / "cert.pem"),
        "CONVEYOR_SIGNING_CERT_STORE": str(directory / "store" / "*.pem"),
    }


@pytest.fixture(scope="module")
def signing_worker(
    signing_env: dict[str, str],
    broker_url: str,
    result_backend: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> WorkerProcess:
    worker = WorkerProcess(
        broker_url=broker_url,
        result_backend=result_backend,
        workdir=tmp_path_factory.mktemp("signing-worker"),
        name="signing-worker",
        env=signing_env,
    ).start()
    yield worker  # type: ignore[misc]
    worker.stop()


def produce(
    env: dict[str, str], broker_url: str, result_backend: str
) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": result_backend,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", PRODUCE],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_signed_task_runs(
    signing_worker: WorkerProcess, signing_env: dict[str, str], broker_url: str, result_backend: str
) -> None:
    done = produce(signing_env, broker_url, result_backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "13"


def tampered(env: dict[str, str], body: object, old: bytes, new: bytes) -> bytes:
    """Sign `body` as a producer with the key would, then change it in transit."""
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    serializer = SecureSerializer(
        PrivateKey(Path(env["CONVEYOR_SIGNING_KEY"]).read_text()),
        Certificate(Path(env["CONVEYOR_SIGNING_CERT"]).read_text()),
        FSCertStore(env["CONVEYOR_SIGNING_CERT_STORE"]),
        "sha256",
    )
    signed = base64.b64decode(serializer.serialize(body))
    assert old in signed
    return base64.b64encode(signed.replace(old, new))


def dead_letters(rabbit: RabbitNode) -> int:
    return int(rabbit.queues()["conveyor.dead_letter"]["messages"])


def test_unsigned_and_tampered_messages_are_dead_lettered_and_the_worker_stays_up(
    signing_worker: WorkerProcess,
    signing_env: dict[str, str],
    rabbit: RabbitNode,
    broker_url: str,
    result_backend: str,
) -> None:
    before = dead_letters(rabbit)
    exchange = Exchange("conveyor", type="topic")
    headers = {"task": "tests.add", "lang": "py", "argsrepr": "", "kwargsrepr": ""}
    with Connection(broker_url) as connection:
        producer = Producer(connection)
        # An unsigned JSON task, as a producer without the key would send
        producer.publish(
            json.dumps([[1, 2], {}, {}]),
            exchange=exchange,
            routing_key="default",
            content_type="application/json",
            content_encoding="utf-8",
            headers={**headers, "id": str(uuid.uuid4())},
            serializer=None,
        )
        # A correctly signed task whose arguments were changed after signing
        producer.publish(
            tampered(signing_env, [[6, 7], {}, {}], b"[[6, 7]", b"[[6, 9]"),
            exchange=exchange,
            routing_key="default",
            content_type="application/data",
            content_encoding="utf-8",
            headers={**headers, "id": str(uuid.uuid4())},
            serializer=None,
        )
    wait_for(lambda: dead_letters(rabbit) >= before + 2, 30, what="both messages dead-lettered")
    # The worker is still up and still runs signed tasks
    assert signing_worker.process is not None and signing_worker.process.poll() is None
    done = produce(signing_env, broker_url, result_backend)
    assert done.stdout.strip() == "13", done.stderr
