#!/usr/bin/env python3
"""Render a kustomization in this directory without a kustomize binary.

    python deploy/render.py deploy/overlays/gpu > hero-rewards.yaml

This is NOT kustomize. It implements exactly the subset of kustomize (v5) that the files under
deploy/ use, so that the test suite can render and validate every overlay on a machine without
kubectl/kustomize, and it refuses (raises ``Unsupported``) anything outside that subset rather
than render it differently from kustomize:

- ``Kustomization`` (kustomize.config.k8s.io/v1beta1) and ``Component`` (v1alpha1);
- ``resources`` (YAML files inside the kustomization directory, or kustomization directories),
  ``components`` (directories);
- ``configMapGenerator`` with ``files``/``literals`` and ``disableNameSuffixHash: true`` (no
  content-hash suffixes), ``options.labels``/``options.annotations``;
- ``patches`` (from ``path`` or inline ``patch``, with or without ``target``): strategic-merge
  patches with the merge keys of the Kubernetes types used here (containers, env,
  volumeMounts, volumes, ports, ...) and ``null`` = delete, or JSON 6902 operation lists;
- ``namespace`` (namespaced kinds; renames Namespace objects, as kustomize does);
- ``labels`` with ``pairs`` (metadata only: ``includeSelectors``/``includeTemplates`` false);
- ``images`` (``newName``/``newTag``/``digest`` on container and initContainer images).

Build order follows kustomize: resources, then components (each one transforms everything
accumulated so far), then this level's generators, then its transformers (patches, namespace,
labels, images). When a real kustomize is installed (``kustomize`` or ``kubectl kustomize``),
tests/deploy/test_manifests.py checks that both render every overlay identically.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KINDS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}
SUPPORTED_FIELDS = {
    "apiVersion", "kind", "metadata", "namespace", "labels", "resources", "components",
    "patches", "images", "configMapGenerator", "generatorOptions",
}
# Cluster-scoped kinds among those kustomize knows; everything else is namespaced.
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService",
    "CSIDriver", "CSINode", "Node", "ClusterIssuer", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "ClusterTriggerAuthentication",
}
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not implement."""


# --- strategic merge patch ---------------------------------------------------------------------

# (parent key, list key) -> merge key, from the patchMergeKey tags of the Kubernetes API types.
# Lists not listed here are replaced wholesale, as strategic merge does for atomic lists.
_MERGE_KEYS = {
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "ephemeralContainers"): "name",
    ("spec", "volumes"): "name",
    ("spec", "imagePullSecrets"): "name",
    ("spec", "topologySpreadConstraints"): "topologyKey",
    ("spec", "hostAliases"): "ip",
    ("containers", "env"): "name",
    ("containers", "volumeMounts"): "mountPath",
    ("containers", "volumeDevices"): "devicePath",
    ("containers", "ports"): "containerPort",
    ("initContainers", "env"): "name",
    ("initContainers", "volumeMounts"): "mountPath",
    ("initContainers", "ports"): "containerPort",
    ("spec", "ports"): "port",  # Service
}


def strategic_merge(base: Any, patch: Any, parent: str = "", key: str = "") -> Any:
    """Merge ``patch`` into ``base`` (both parsed YAML) the way ``kubectl patch --type
    strategic`` does for the types above. ``key`` is the field holding ``base``, ``parent``
    the field holding the object that holds it."""
    if isinstance(patch, dict):
        if "$patch" in patch or any(str(k).startswith("$") for k in patch):
            raise Unsupported(f"strategic-merge directives are not supported: {sorted(patch)}")
        if not isinstance(base, dict):
            return _strip_nulls(copy.deepcopy(patch))
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, key, k)
            else:
                out[k] = _strip_nulls(copy.deepcopy(v))
        return out
    if isinstance(patch, list):
        merge_key = _MERGE_KEYS.get((parent, key))
        if merge_key is None or not isinstance(base, list):
            return _strip_nulls(copy.deepcopy(patch))
        # kustomize (kyaml) order: the patch's elements first, in patch order (merged into
        # the base element with the same key), then the base elements the patch left alone.
        out, used = [], set()
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                raise Unsupported(f"list {key!r} items need their merge key {merge_key!r}")
            for i, existing in enumerate(base):
                if isinstance(existing, dict) and existing.get(merge_key) == item[merge_key]:
                    out.append(strategic_merge(existing, item, parent=key, key=key))
                    used.add(i)
                    break
            else:
                out.append(_strip_nulls(copy.deepcopy(item)))
        out.extend(copy.deepcopy(b) for i, b in enumerate(base) if i not in used)
        return out
    return patch


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


# --- JSON 6902 ---------------------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise Unsupported(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op["path"])
        parent, last = _walk(doc, parts[:-1]), parts[-1]
        if kind in ("add", "replace"):
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if kind == "add":
                    parent.insert(len(parent) if last == "-" else int(last), value)
                else:
                    parent[int(last)] = value
            else:
                if kind == "replace" and last not in parent:
                    raise KeyError(f"replace of missing path {op['path']}")
                parent[last] = value
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise Unsupported(f"JSON 6902 op {kind!r} is not supported")
    return doc


# --- the build ---------------------------------------------------------------------------------

def _load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= d.keys():
            raise Unsupported(f"{path}: not a Kubernetes object (apiVersion/kind/metadata)")
        if d["kind"].endswith("List"):
            raise Unsupported(f"{path}: List objects are not supported")
    return docs


def _kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            with (directory / name).open() as f:
                k = yaml.safe_load(f) or {}
            unknown = set(k) - SUPPORTED_FIELDS
            if unknown:
                raise Unsupported(f"{directory}: kustomization fields not supported: "
                                  f"{sorted(unknown)}")
            return k
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _inside(root: Path, path: Path) -> Path:
    """kustomize's default load restrictor: files must live under the kustomization root."""
    resolved = (root / path).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise Unsupported(f"{path} is outside the kustomization root {root}")
    return resolved


def _ident(obj: dict) -> tuple[str, str, str, str]:
    group = obj["apiVersion"].rpartition("/")[0]
    return (group, obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def build(directory: Path | str, accumulated: Optional[list[dict]] = None,
          component: bool = False) -> list[dict]:
    directory = Path(directory)
    k = _kustomization(directory)
    expected = "Component" if component else "Kustomization"
    if k.get("kind", "Kustomization") != expected:
        raise Unsupported(f"{directory}: expected a {expected}, found {k.get('kind')}")
    if k.get("apiVersion", KINDS[expected]) != KINDS[expected]:
        raise Unsupported(f"{directory}: apiVersion {k.get('apiVersion')} for {expected}")

    objects = copy.deepcopy(accumulated or [])
    for entry in k.get("resources") or []:
        path = directory / entry
        if path.is_dir():
            objects.extend(build(path))
        else:
            objects.extend(_load_docs(_inside(directory, Path(entry))))
    for entry in k.get("components") or []:
        objects = build(directory / entry, objects, component=True)

    objects.extend(_generate_configmaps(directory, k))
    _check_unique(objects, directory)

    for patch in k.get("patches") or []:
        objects = _apply_patch(directory, patch, objects)
    if k.get("namespace"):
        _set_namespace(objects, k["namespace"])
    for spec in k.get("labels") or []:
        _add_labels(objects, spec)
    for image in k.get("images") or []:
        _set_images(objects, image)
    _check_unique(objects, directory)
    return objects


def _check_unique(objects: list[dict], directory: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        ident = _ident(obj)
        if ident in seen:
            raise ValueError(f"{directory}: duplicate resource {ident}")
        seen.add(ident)


def _generate_configmaps(directory: Path, k: dict) -> Iterable[dict]:
    global_options = k.get("generatorOptions") or {}
    for gen in k.get("configMapGenerator") or []:
        unknown = set(gen) - {"name", "files", "literals", "options", "namespace", "behavior"}
        if unknown or gen.get("behavior", "create") != "create":
            raise Unsupported(f"configMapGenerator {gen.get('name')}: {sorted(unknown)} / "
                              f"behavior {gen.get('behavior')}")
        options = {**global_options, **(gen.get("options") or {})}
        if not options.get("disableNameSuffixHash"):
            raise Unsupported(f"configMapGenerator {gen['name']}: name-suffix hashes are not "
                              "implemented; set options.disableNameSuffixHash: true")
        data: dict[str, str] = {}
        for entry in gen.get("files") or []:
            key, _, rel = entry.rpartition("=") if "=" in entry else ("", "", entry)
            path = _inside(directory, Path(rel))
            data[key or path.name] = path.read_text()
        for literal in gen.get("literals") or []:
            key, _, value = literal.partition("=")
            data[key] = value
        metadata: dict[str, Any] = {"name": gen["name"]}
        if gen.get("namespace"):
            metadata["namespace"] = gen["namespace"]
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        if options.get("annotations"):
            metadata["annotations"] = dict(options["annotations"])
        yield {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise Unsupported(f"patch target selectors not supported: {sorted(unknown)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"],
              "name": obj["metadata"]["name"], "namespace": obj["metadata"].get("namespace", "")}
    return all(wanted[key] == value for key, value in target.items())


def _apply_patch(directory: Path, entry: dict, objects: list[dict]) -> list[dict]:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown or ("path" in entry) == ("patch" in entry):
        raise Unsupported(f"patch entry {entry}: need exactly one of path/patch")
    text = (_inside(directory, Path(entry["path"])).read_text() if "path" in entry
            else entry["patch"])
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise Unsupported(f"patch {entry.get('path', '<inline>')}: exactly one document expected")
    patch = docs[0]
    if isinstance(patch, list):  # JSON 6902
        if "target" not in entry:
            raise ValueError("a JSON 6902 patch needs a target")
        hits = [i for i, o in enumerate(objects) if _matches(o, entry["target"])]
        for i in hits:
            objects[i] = json6902(objects[i], patch)
    else:
        if "target" in entry:
            target = entry["target"]
        else:
            group, _, version = patch["apiVersion"].rpartition("/")
            target = {"group": group, "version": version, "kind": patch["kind"],
                      "name": patch["metadata"]["name"]}
            if patch["metadata"].get("namespace"):
                target["namespace"] = patch["metadata"]["namespace"]
        hits = [i for i, o in enumerate(objects) if _matches(o, target)]
        for i in hits:
            body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
            body["metadata"] = {k: v for k, v in patch["metadata"].items()
                                if k not in ("name", "namespace")}
            objects[i] = strategic_merge(objects[i], body)
    if not hits:
        raise ValueError(f"patch {entry.get('path', '<inline>')} matches no resource")
    return objects


def _set_namespace(objects: list[dict], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        elif obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            raise Unsupported("namespace rewriting of RoleBinding subjects is not implemented")


def _add_labels(objects: list[dict], spec: dict) -> None:
    if spec.get("includeSelectors") or spec.get("includeTemplates") or set(spec) - {
            "pairs", "includeSelectors", "includeTemplates"}:
        raise Unsupported(f"labels entry {spec}: only metadata labels are implemented")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(spec.get("pairs") or {})


def _split_image(image: str) -> tuple[str, str, str]:
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def _set_images(objects: list[dict], spec: dict) -> None:
    if set(spec) - {"name", "newName", "newTag", "digest"}:
        raise Unsupported(f"images entry {spec}")
    for obj in objects:
        path = POD_TEMPLATE_PATHS.get(obj["kind"])
        if path is None:
            continue
        pod = obj
        for p in path:
            pod = pod.get(p) or {}
        for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            name, tag, digest = _split_image(container.get("image", ""))
            if name != spec["name"]:
                continue
            name = spec.get("newName", name)
            if "digest" in spec:
                container["image"] = f"{name}@{spec['digest']}"
            else:
                tag = str(spec.get("newTag", tag))
                container["image"] = name + (f":{tag}" if tag else "") + (
                    f"@{digest}" if digest and "newTag" not in spec else "")


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(sys.argv[0]).name} KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(build(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
