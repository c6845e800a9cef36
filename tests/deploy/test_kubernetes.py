"""deploy/kubernetes validates offline and agrees with compose.yaml, celeryconfig and the broker.

Core objects are checked against the Kubernetes OpenAPI schemas that the kubernetes-validate
package ships (strict: unknown fields are errors), KEDA's objects against the CRD schemas
vendored in tests/deploy/schemas. No cluster is needed.
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import celeryconfig
from tests.infra import ROOT, compose_command, require

MANIFESTS = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "schemas"
#: The oldest Kubernetes the manifests promise to work on (policy/v1 PDBs, KEDA 2.16's floor)
#: and the newest whose schemas the package ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KEDA_SCHEMAS = {
    "ScaledObject": "keda.sh_scaledobjects.v1alpha1.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.v1alpha1.yaml",
}
#: Margin between the worker's soft shutdown and Kubernetes' SIGKILL: requeueing the tasks
#: still running and closing the connection happen after the soft-shutdown timeout.
SHUTDOWN_MARGIN = 10


def load_manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]
    return objects


OBJECTS = load_manifests()


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def containers(kind: str = "Deployment") -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in OBJECTS:
        if obj["kind"] == kind:
            for container in obj["spec"]["template"]["spec"]["containers"]:
                yield obj["metadata"]["name"], container


def strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden, as `kubectl apply --validate=strict` does for
    CRDs (the API server would otherwise prune a misspelt field without a word)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def keda_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = strict(yaml.safe_load((SCHEMAS / KEDA_SCHEMAS[kind]).read_text()))
    validator_class = jsonschema.validators.validator_for(schema, jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


def validation_errors(obj: dict[str, Any], version: str) -> list[str]:
    if obj["apiVersion"].startswith("keda.sh/"):
        validator = keda_validator(obj["kind"])
        return [
            f"{'.'.join(map(str, error.path))}: {error.message}"
            for error in validator.iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


# --- Schemas ---------------------------------------------------------------------------------


def test_every_manifest_file_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    present = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "obj", OBJECTS, ids=[f"{o['kind']}/{o['metadata']['name']}" for o in OBJECTS]
)
def test_each_object_validates_against_its_schema(obj: dict[str, Any], version: str) -> None:
    assert validation_errors(obj, version) == []


def test_the_keda_objects_are_there_and_the_schemas_are_the_vendored_crds() -> None:
    kinds = {o["kind"] for o in OBJECTS if o["apiVersion"] == "keda.sh/v1alpha1"}
    assert kinds == set(KEDA_SCHEMAS)
    for name in KEDA_SCHEMAS.values():
        header = (SCHEMAS / name).read_text().split("\ntype:", 1)[0]
        assert "kedacore/" in header, f"{name} does not name its source"
        assert re.search(r"commit\s+(#\s+)?[0-9a-f]{40}", header), (
            f"{name} does not name its commit"
        )


def test_the_kustomization_renders_objects_that_validate_too() -> None:
    # kubectl's built-in kustomize, offline: what `kubectl apply -k` would send.
    require(shutil.which("kubectl") is not None, "kubectl not installed")
    done = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert sorted(o["kind"] for o in rendered) == sorted(o["kind"] for o in OBJECTS)
    for obj in rendered:
        assert validation_errors(obj, KUBERNETES_VERSIONS[-1]) == [], obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "conveyor"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "conveyor", obj["metadata"]["name"]
        if obj["kind"] == "Deployment":
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            assert container["image"] == "conveyor:local"


@pytest.mark.parametrize(
    ("kind", "name", "break_it"),
    [
        # A misspelt field, a wrong type and a missing required field: each must be caught.
        (
            "Deployment",
            "conveyor-worker",
            lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriod=40),
        ),
        ("Deployment", "conveyor-worker", lambda o: o["spec"].update(replicas="two")),
        ("PodDisruptionBudget", "conveyor-worker", lambda o: o["spec"].update(maxUnavailable=[1])),
        ("ScaledObject", "conveyor-worker", lambda o: o["spec"].update(minReplicaCount="1")),
        ("ScaledObject", "conveyor-worker", lambda o: o["spec"].update(cooldownPeriode=300)),
        ("ScaledObject", "conveyor-worker", lambda o: o["spec"]["triggers"][0].pop("metadata")),
        (
            "ScaledObject",
            "conveyor-worker",
            lambda o: o["spec"]["triggers"][0]["metadata"].update(value=20),
        ),
        (
            "TriggerAuthentication",
            "conveyor-rabbitmq-monitor",
            lambda o: o["spec"]["secretTargetRef"][0].pop("key"),
        ),
    ],
)
def test_the_validation_rejects_a_broken_object(kind: str, name: str, break_it: Any) -> None:
    broken = copy.deepcopy(find(kind, name))
    break_it(broken)
    assert validation_errors(broken, KUBERNETES_VERSIONS[-1]), "a broken object validated"


# --- Agreement with the rest of Conveyor -----------------------------------------------------


def test_commands_are_the_ones_compose_runs() -> None:
    commands = {name: container["command"] for name, container in containers()}
    assert commands["conveyor-worker"] == compose_command("worker")
    assert commands["conveyor-beat"] == compose_command("beat")
    assert commands["conveyor-flower"] == compose_command("flower")
    assert commands["conveyor-exporter"] == compose_command("exporter")


def test_the_worker_outlives_its_soft_shutdown_before_it_is_killed() -> None:
    pod = find("Deployment", "conveyor-worker")["spec"]["template"]["spec"]
    soft = celeryconfig.worker_soft_shutdown_timeout
    assert celeryconfig.worker_enable_soft_shutdown_on_idle
    assert pod["terminationGracePeriodSeconds"] >= soft + SHUTDOWN_MARGIN


def test_the_worker_probes_run_the_health_command_and_answer_from_its_files(
    tmp_path: Path,
) -> None:
    (_, worker) = next(item for item in containers() if item[0] == "conveyor-worker")
    probes = {
        kind: worker[kind]["exec"]["command"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"] == ["python", "-m", "workers.health", "live"]
    assert probes["readinessProbe"] == ["python", "-m", "workers.health", "ready"]
    # The same readiness check as compose's worker healthcheck.
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["worker"]["healthcheck"]["test"][1:] == probes["readinessProbe"]

    env = {"CONVEYOR_HEALTH_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, *command[1:]]
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    # Before the worker has written its files, every probe fails with a reason (not a usage
    # error); once they exist, each passes. The node name defaults to celery@<pod hostname>.
    for command in probes.values():
        done = run(command)
        assert done.returncode == 1, done.stderr
        assert "missing" in done.stdout + done.stderr
    for kind in ("live", "ready"):
        (tmp_path / f"celery@{socket.gethostname()}.{kind}").touch()
    for command in probes.values():
        done = run(command)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_beat_probe_is_compose_healthcheck_and_http_probes_hit_served_ports() -> None:
    (_, beat) = next(item for item in containers() if item[0] == "conveyor-beat")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    healthcheck = compose["services"]["beat"]["healthcheck"]["test"]
    assert healthcheck[0] == "CMD-SHELL"
    # Live and ready by the same ping: a rollout waits for the new beat's loop to answer.
    for kind in ("livenessProbe", "readinessProbe"):
        assert beat[kind]["exec"]["command"] == ["sh", "-c", healthcheck[1].replace("$$", "$")]
        assert beat[kind]["timeoutSeconds"] > 10, "longer than the ping's own --timeout"
    for name, container in containers():
        ports = {port["name"] for port in container.get("ports", [])}
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            if "httpGet" in container.get(kind, {}):
                assert container[kind]["httpGet"]["port"] in ports, f"{name} {kind}"
    flower = dict(containers())["conveyor-flower"]
    assert flower["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_the_scaled_queues_are_the_queues_the_worker_serves_and_the_broker_defines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for role in ("ADMIN", "PRODUCER", "WORKER", "MONITOR", "EXPORTER"):
        monkeypatch.setenv(f"CONVEYOR_{role}_PASSWORD", f"pw-{role.lower()}")
    sys.path.insert(0, str(ROOT / "deploy" / "rabbitmq"))
    try:
        import definitions
    finally:
        sys.path.remove(str(ROOT / "deploy" / "rabbitmq"))
    defined = definitions.definitions()
    defined_queues = {q["name"] for q in defined["queues"] if q["vhost"] == "conveyor"}

    scaled = find("ScaledObject", "conveyor-worker")
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    # The management API, counting unacknowledged (running) tasks too.
    assert metadata["protocol"] == "http" and metadata["excludeUnacknowledged"] == "false"
    assert metadata["useRegex"] == "true" and metadata["operation"] == "sum"
    pattern = re.compile(metadata["queueName"])
    matched = {name for name in defined_queues if pattern.search(name)}
    served = next(a for a in compose_command("worker") if a.startswith("--queues="))
    assert matched == set(served.split("=", 1)[1].split(","))
    # Not the dead-letter or unroutable queues, nor the delayed-delivery queues.
    for other in ("conveyor.dead_letter", "conveyor.unroutable", "celery_delayed_0"):
        assert not pattern.search(other), other

    assert scaled["spec"]["scaleTargetRef"]["name"] == "conveyor-worker"
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    auth = find("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert [ref["parameter"] for ref in auth["spec"]["secretTargetRef"]] == ["host"]


def test_only_the_worker_is_autoscaled_and_beat_keeps_a_standby() -> None:
    targets = [o["spec"]["scaleTargetRef"]["name"] for o in OBJECTS if o["kind"] == "ScaledObject"]
    assert targets == ["conveyor-worker"]
    assert not [o for o in OBJECTS if o["kind"] == "HorizontalPodAutoscaler"]
    assert find("Deployment", "conveyor-beat")["spec"]["replicas"] == 2


def test_selectors_match_their_pods_and_each_scaled_deployment_has_a_budget() -> None:
    labels = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in OBJECTS
        if o["kind"] == "Deployment"
    }
    for obj in OBJECTS:
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels[obj["metadata"]["name"]].items()
        if obj["kind"] in ("PodDisruptionBudget", "Service"):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= pod.items() for pod in labels.values()), obj
    budgets = {o["metadata"]["name"] for o in OBJECTS if o["kind"] == "PodDisruptionBudget"}
    assert {"conveyor-worker", "conveyor-beat"} <= budgets


def test_no_secret_is_written_in_the_manifests() -> None:
    text = "\n".join(path.read_text() for path in MANIFESTS.glob("*.yaml"))
    # A password in a URL, other than a <placeholder> in a comment.
    assert not re.search(r"://[^/\s:@]+:(?!<)[^@\s]+@", text), "a URL with a password"
    assert "kind: Secret\n" not in text
    sensitive = re.compile(r"PASSWORD|SECRET|AUTH|URL$|BACKEND|_API$")
    for name, container in containers():
        for var in container.get("env", []):
            if sensitive.search(var["name"]) and not var["name"].endswith("_FILE"):
                assert "valueFrom" in var, f"{name}: {var['name']} is a literal"
        for source in container.get("envFrom", []):
            assert "configMapRef" in source
    config = find("ConfigMap", "conveyor")["data"]
    assert not [key for key in config if sensitive.search(key)]


def test_every_secret_the_manifests_read_is_documented() -> None:
    used: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                used.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for obj in OBJECTS:
        walk(obj)
        for volume in obj.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                for item in source["secret"]["items"]:
                    used.add((source["secret"]["name"], item["key"]))
        for ref in obj.get("spec", {}).get("secretTargetRef", []):
            used.add((ref["name"], ref["key"]))
    assert len(used) >= 6
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for name, key in sorted(used):
        assert f"{name}" in docs and f"{key}=" in docs, f"{name}/{key} not in docs/kubernetes.md"


def test_the_configmap_holds_settings_compose_gives_every_service() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    shared = set(compose["x-app"]["environment"])
    config = set(find("ConfigMap", "conveyor")["data"])
    assert config - shared == {"CONVEYOR_HEALTH_DIR"}


def test_every_file_a_container_is_told_to_read_is_mounted() -> None:
    config = find("ConfigMap", "conveyor")["data"]
    for obj in OBJECTS:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            env = {**config, **{v["name"]: v.get("value") for v in container.get("env", [])}}
            files = {name: value for name, value in env.items() if name.endswith("_FILE")}
            assert {"CELERY_BROKER_URL_FILE", "CELERY_RESULT_BACKEND_FILE"} <= set(files)
            for name, path in files.items():
                directory, filename = path.rsplit("/", 1)
                sources = mounts[directory]["projected"]["sources"]
                paths = {item["path"] for s in sources for item in s["secret"]["items"]}
                assert filename in paths, f"{obj['metadata']['name']}: {name}={path}"
            if obj["metadata"]["name"] == "conveyor-worker":
                # The probe files live where the worker writes them.
                assert "emptyDir" in mounts[config["CONVEYOR_HEALTH_DIR"]]
