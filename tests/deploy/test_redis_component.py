"""The shared group store for several replicas: components/redis (a Redis StatefulSet),
components/redis-external (an existing Redis) and overlays/gpu-redis.

Rendered with the real kustomize (``kubectl kustomize``). The Redis flags and probe commands of
the StatefulSet are also run against a real
``redis-server`` on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from kustomize_support import kustomize_build
from support import free_port
from test_manifests import (
    DEPLOY,
    PORT,
    allowed_hero_env_names,
    only,
    server_container,
    validate_object,
)

REDIS_PORT = 6379
OVERLAY = DEPLOY / "overlays" / "gpu-redis"
SERVER_LABELS = {"app.kubernetes.io/name": "hero-rewards", "app.kubernetes.io/component": "server"}


# --- helpers -----------------------------------------------------------------------------------

def gpu_redis() -> list[dict]:
    return kustomize_build(OVERLAY)


def redis_pod(objects: list[dict]) -> dict:
    return only(objects, "StatefulSet", "hero-rewards-redis")["spec"]["template"]["spec"]


def redis_container(objects: list[dict]) -> dict:
    (container,) = redis_pod(objects)["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    """The value after ``--name`` in redis-server's argument list (exactly once)."""
    positions = [i for i, a in enumerate(args) if a == name]
    assert len(positions) == 1, f"{name} x{len(positions)} in {args}"
    return args[positions[0] + 1]


def env_entry(container: dict, name: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry


def quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (Mi/Gi) or a Redis size (mb/gb) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", value).groups()
    return int(number) * units[unit]


def example(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "examples" / name).read_text())


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of command/args (unknown names stay as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


# --- rendering and validation ------------------------------------------------------------------

def test_gpu_redis_overlay_adds_the_redis_objects():
    objects = gpu_redis()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("StatefulSet", "hero-rewards-redis"), ("Service", "hero-rewards-redis"),
            ("Service", "hero-rewards-redis-headless"),
            ("NetworkPolicy", "hero-rewards-redis")} <= names
    # Still the gpu deployment with KEDA: the component only adds.
    assert ("ScaledObject", "hero-rewards") in names
    assert server_container(objects)["image"].endswith("-cuda")
    assert not [o for o in objects if o["kind"] == "Secret"], "the password Secret is not committed"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "hero-rewards", obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hero-rewards"


def test_gpu_redis_overlay_validates_strictly():
    objects = gpu_redis()
    for obj in objects:
        validate_object(obj)  # Kubernetes 1.28 and the newest schema; CRDs from deploy/schemas
    # The validator does look at the StatefulSet: a misspelt field is refused.
    import jsonschema

    bad = only(objects, "StatefulSet")
    bad["spec"]["volumeClaimTemplate"] = bad["spec"].pop("volumeClaimTemplates")
    with pytest.raises(jsonschema.ValidationError, match="volumeClaimTemplate"):
        validate_object(bad)


def test_statefulset_services_and_ports_agree():
    objects = gpu_redis()
    statefulset = only(objects, "StatefulSet", "hero-rewards-redis")
    assert statefulset["spec"]["replicas"] == 1
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = redis_container(objects)["ports"]
    assert (port["name"], port["containerPort"]) == ("redis", REDIS_PORT)
    headless = only(objects, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    regular = only(objects, "Service", "hero-rewards-redis")
    assert regular["spec"].get("clusterIP") != "None"
    for service in (headless, regular):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (service_port,) = service["spec"]["ports"]
        assert (service_port["port"], service_port["targetPort"]) == (REDIS_PORT, "redis")
    # The redis pods are not hero-rewards server pods (Service, PDB, NetworkPolicy, monitor).
    assert not SERVER_LABELS.items() <= pod_labels.items()
    monitor = only(objects, "ServiceMonitor")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= \
        regular["metadata"]["labels"].items(), "Prometheus must not scrape Redis as hero-rewards"


# --- the Redis pod -----------------------------------------------------------------------------

def test_redis_persists_to_a_volume_claim():
    objects = gpu_redis()
    statefulset = only(objects, "StatefulSet", "hero-rewards-redis")
    container = redis_container(objects)
    args = container["args"]
    assert container["command"] == ["redis-server"]
    assert flag(args, "--appendonly") == "yes"
    assert flag(args, "--appendfsync") in ("everysec", "always")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert quantity_bytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2**30
    (mount,) = container["volumeMounts"]  # the claim is the only volume: nothing else writable
    assert mount["name"] == claim["metadata"]["name"]
    assert flag(args, "--dir") == mount["mountPath"]
    assert "volumes" not in redis_pod(objects), "no emptyDir: the AOF must outlive the pod"
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == \
        {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # Full memory fails writes (-> 503) instead of evicting open groups or sigma-bar series,
    # and leaves the memory limit room for the fork of an AOF rewrite.
    assert flag(args, "--maxmemory-policy") == "noeviction"
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    assert quantity_bytes(flag(args, "--maxmemory")) <= limit // 2


def test_redis_runs_non_root_and_read_only():
    objects = gpu_redis()
    pod = redis_pod(objects)
    container = redis_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["fsGroup"], "the volume must be writable for the non-root user"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The official image, pinned to a Redis 7 release (never a floating latest).
    assert re.fullmatch(r"redis:7\.\d+\.\d+-alpine(@sha256:[0-9a-f]{64})?", container["image"]), \
        container["image"]
    resources = container["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[section].keys()
    assert resources["requests"]["memory"] == resources["limits"]["memory"], \
        "memory request = limit: Redis is not evicted for using what it was promised"


def test_redis_probes_ping_with_the_password_from_the_environment():
    container = redis_container(gpu_redis())
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[name]["exec"]["command"]
        script = " ".join(command)
        assert "redis-cli" in script and " ping" in script, (name, command)
        assert f"-p {REDIS_PORT}" in script
        assert " -a " not in script and "--pass" not in script, "no password on a command line"
    # redis-cli reads REDISCLI_AUTH, from the same Secret key as --requirepass.
    assert env_entry(container, "REDISCLI_AUTH")["valueFrom"] == \
        env_entry(container, "REDIS_PASSWORD")["valueFrom"]


def test_redis_password_comes_from_a_secret():
    objects = gpu_redis()
    container = redis_container(objects)
    secret = example("redis-password-secret.example.yaml")
    (key,) = secret["stringData"]
    assert "REPLACE-ME" in secret["stringData"][key]
    assert flag(container["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    ref = env_entry(container, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key)
    assert "optional" not in ref, "Redis must not start without a password"
    # No ConfigMap carries a password or a --requirepass.
    for cm in (o for o in objects if o["kind"] == "ConfigMap"):
        text = yaml.safe_dump(cm).lower()
        assert "requirepass" not in text and "password" not in text, cm["metadata"]["name"]

    # The server reads the same Secret key as a file.
    server = server_container(objects)
    path = Path(env_entry(server, "HERO_GROUP_STORE_PASSWORD_FILE")["value"])
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert mount["readOnly"] is True
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["items"] == [{"key": key, "path": path.name}]


def test_the_server_points_at_the_redis_service():
    objects = gpu_redis()
    server = server_container(objects)
    url = urlsplit(env_entry(server, "HERO_GROUP_STORE")["value"])
    assert url.scheme == "redis"
    assert url.password is None, "the password comes from the Secret file, not the URL"
    service = only(objects, "Service", "hero-rewards-redis")
    # A short name: resolved in the pod's namespace, whatever namespace the overlay sets.
    assert (url.hostname, url.port) == (service["metadata"]["name"],
                                        service["spec"]["ports"][0]["port"])
    assert re.fullmatch(r"/\d+", url.path)
    assert {"HERO_GROUP_STORE", "HERO_GROUP_STORE_PASSWORD_FILE"} <= allowed_hero_env_names(), \
        "hero_service.config.Settings has no group_store fields"


# --- network policy ----------------------------------------------------------------------------

def test_only_the_server_pods_reach_redis_and_only_on_its_port():
    objects = gpu_redis()
    policy = only(objects, "NetworkPolicy", "hero-rewards-redis")
    redis_labels = only(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    server_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not policy["spec"].get("egress"), "Redis talks to nobody"
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "same namespace only (no namespaceSelector, no ipBlock)"
    assert peer["podSelector"]["matchLabels"] == SERVER_LABELS
    assert SERVER_LABELS.items() <= server_labels.items()
    assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [(REDIS_PORT, "TCP")]
    (container_port,) = redis_container(objects)["ports"]
    assert container_port["containerPort"] == REDIS_PORT

    # The server's own policy lets it out to the pods of its namespace (any port): Redis.
    server_policy = only(objects, "NetworkPolicy", "hero-rewards")
    to_namespace = [rule for rule in server_policy["spec"]["egress"]
                    if {"podSelector": {}} in rule.get("to", [])]
    assert to_namespace and not any(rule.get("ports") for rule in to_namespace), \
        server_policy["spec"]["egress"]
    # ... and nobody but the server pods is admitted to Redis: the server's ingress is port 8000.
    assert {p["port"] for r in server_policy["spec"]["ingress"] for p in r["ports"]} == {PORT}


# --- components/redis-external ------------------------------------------------------------------

@pytest.fixture(scope="module")
def external(tmp_path_factory) -> list[dict]:
    """base + cpu + redis-external, as a user's own overlay would combine them."""
    root = tmp_path_factory.mktemp("overlay")
    def rel(p: str) -> str:
        return os.path.relpath(DEPLOY / p, root)  # kustomize refuses absolute paths

    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "hero-rewards",
        "resources": [rel("base")],
        "components": [rel("components/cpu"), rel("components/redis-external")],
    }))
    return kustomize_build(root)


def test_external_redis_url_comes_from_a_secret(external):
    for obj in external:
        validate_object(obj)
    assert not [o for o in external if o["kind"] in ("StatefulSet", "Secret")]
    server = server_container(external)
    secret = example("redis-external-secret.example.yaml")
    ref = env_entry(server, "HERO_GROUP_STORE")["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "url")
    assert "optional" not in ref
    assert urlsplit(secret["stringData"]["url"]).scheme in ("redis", "rediss")
    password = env_entry(server, "HERO_GROUP_STORE_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert (password["name"], password["key"], password["optional"]) == \
        (secret["metadata"]["name"], "password", True)
    assert all("REPLACE-ME" in v for v in secret["stringData"].values())
    for cm in (o for o in external if o["kind"] == "ConfigMap"):
        assert "HERO_GROUP_STORE" not in cm["data"], "an env entry from the Secret decides"
    assert {"HERO_GROUP_STORE", "HERO_GROUP_STORE_PASSWORD"} <= allowed_hero_env_names()


def test_external_redis_egress_is_opened_for_the_server_pods(external):
    egress = only(external, "NetworkPolicy", "hero-rewards-group-store-egress")
    assert egress["spec"]["podSelector"]["matchLabels"] == SERVER_LABELS
    assert egress["spec"]["policyTypes"] == ["Egress"], "must not replace the ingress rules"
    (rule,) = egress["spec"]["egress"]
    assert REDIS_PORT in {p["port"] for p in rule["ports"]}
    assert {p["protocol"] for p in rule["ports"]} == {"TCP"}


# --- the StatefulSet's flags and probes against a real redis-server ----------------------------

def _probe(command: list[str], port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = [part.replace(f"-p {REDIS_PORT}", f"-p {port}") for part in command]
    return subprocess.run(script, env=env, capture_output=True, text=True, timeout=10)


@pytest.fixture()
def redis_from_manifest(tmp_path):
    """redis-server started with the StatefulSet's command and args, as the kubelet would (its
    $(VAR) expansion), on a free loopback port and a temporary --dir."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli not on PATH (make install-dev installs them)")
    container = redis_container(gpu_redis())
    password = "test-password-for-the-manifest"
    env = {"REDIS_PASSWORD": password}
    port = free_port()
    argv = container["command"] + [kubelet_expand(a, env) for a in container["args"]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--dir") + 1] = str(tmp_path)
    argv += ["--bind", "127.0.0.1"]  # the pod listens on its own address; the test on loopback
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    probe_env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": password}
    try:
        deadline = time.monotonic() + 20
        while _probe(container["readinessProbe"]["exec"]["command"], port, probe_env).returncode:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "redis-server did not become ready"
            time.sleep(0.1)
        yield container, port, probe_env, process, tmp_path, password
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_manifest_flags_start_redis_and_probes_pass(redis_from_manifest):
    container, port, env, process, data_dir, password = redis_from_manifest
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        result = _probe(container[name]["exec"]["command"], port, env)
        assert result.returncode == 0, (name, result.stdout, result.stderr)

    def cli(*args: str) -> str:
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], env=env,
                              capture_output=True, text=True, timeout=10).stdout.strip()

    assert cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
    assert cli("config", "get", "maxmemory-policy").split() == ["maxmemory-policy", "noeviction"]
    assert cli("set", "hero-test", "1") == "OK"
    assert list(data_dir.rglob("*.aof")), "the AOF is written under --dir (the volume)"
    # The password is not in the process's command line (ps), though it was an argument.
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert cmdline and password.encode() not in cmdline, cmdline


def test_probes_fail_without_the_password(redis_from_manifest):
    container, port, env, _, _, _ = redis_from_manifest
    for auth in ({}, {"REDISCLI_AUTH": "wrong"}):
        probe_env = {"PATH": env["PATH"], **auth}
        # redis-cli exits 0 even on an error reply: the probes compare the reply itself.
        plain = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "ping"],
                               env=probe_env, capture_output=True, text=True, timeout=10)
        assert plain.returncode == 0 and "PONG" not in plain.stdout, plain.stdout
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            result = _probe(container[name]["exec"]["command"], port, probe_env)
            assert result.returncode != 0, (name, auth, result.stdout)


def test_a_loading_redis_is_alive_but_not_ready(tmp_path):
    """After a restart Redis replays its AOF and answers LOADING: the liveness and startup
    probes must not restart it for that, the readiness probe must keep traffic away. A LOADING
    reply is hard to produce on demand, so a stand-in redis-cli prints Redis's exact reply."""
    container = redis_container(gpu_redis())
    fake = tmp_path / "redis-cli"
    fake.write_text("#!/bin/sh\necho 'LOADING Redis is loading the dataset in memory'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    outcome = {name: _probe(container[name]["exec"]["command"], REDIS_PORT, env).returncode
               for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert outcome["startupProbe"] == 0 and outcome["livenessProbe"] == 0, outcome
    assert outcome["readinessProbe"] != 0, outcome
