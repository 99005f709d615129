"""Kubernetes manifests from instance configs (issue 12, SPEC §11), pure: no file access, no YAML.

Per instance a Deployment (the llama-server argv that `up` runs, built by ``domain.launch.build_launch`` with the
container's paths), a Service, and a PersistentVolumeClaim for its model. Instances with aliases add a router (a
Deployment + Service running ``llama-orch daemon run --router-only`` whose peers are the instance Services) and the
Secret holding its ``orchestrator.json``. ``render`` returns ``{file name: [documents]}`` plus a
``kustomization.yaml``; the caller writes YAML.

GPU resources by backend: cuda -> ``nvidia.com/gpu: 1``, rocm -> ``amd.com/gpu: 1`` (the device plugin picks the
physical GPU and the pod sees it as device 0, so the visible-devices variable is set to 0); vulkan, metal, cpu and
auto request no GPU: Kubernetes has no standard Vulkan device plugin (add one, or a hostPath for /dev/dri, to your
overlay) and Linux containers have no Metal, so those run on the CPU with the argv unchanged.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.launch import build_launch

CONTAINER_BINARY = "/app/llama-server"  # where ghcr.io/ggml-org/llama.cpp:server* keep it (our Dockerfile too)
DATA_DIR = "/data"  # the model volume, mounted as a llama-orch home: models/ and models/hf/<user>/<repo>/
DEFAULT_IMAGE = "ghcr.io/llama-orchestrator/llama-orchestrator:0.1.0"
ROUTER_NAME = "llama-orch-router"
ROUTER_PORT = 8000
GPU_RESOURCES = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}
_DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
GIB = 1024**3
ROUTER_VOLUME = "/var/lib/llama-orch"  # the router's emptyDir; its home is the folder ``home`` in it
IMAGE_UID = 10001  # the image's user (deploy/Dockerfile): no container runs as root
# fsGroup: the volumes (the model PVC that `models pull` fills, the router's emptyDir) are writable by that group.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID}


@dataclass(frozen=True)
class ExportInstance:
    """One instance as the export needs it: its config, where its model sits below the home's ``models/``
    (``hf/user/repo/file.gguf``, else the file name), and the measured numbers (None when the file is absent)."""

    config: InstanceConfig
    model_relpath: str
    model_bytes: int | None = None
    memory_mb: float | None = None


@dataclass(frozen=True)
class ExportOptions:
    image: str = DEFAULT_IMAGE
    namespace: str | None = None
    storage_class: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "llama-orchestrator",
    }


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def probes(config: InstanceConfig) -> dict[str, dict[str, Any]]:
    """From ``healthcheck``: a startupProbe that allows ``start_period`` plus ``retries`` failures (Docker's rule:
    failures inside start_period don't count), then liveness (``retries`` failures restart the container) and
    readiness (one failure takes the pod out of the Service: llama-server's 503 while loading keeps it unready)."""
    hc = config.healthcheck
    get = {"path": hc.path, "port": "http"}
    period, timeout = _seconds(hc.interval), _seconds(hc.timeout)
    return {
        "startupProbe": {
            "httpGet": get,
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": math.ceil(hc.start_period / period) + hc.retries,
        },
        "readinessProbe": {
            "httpGet": get,
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": 1,
            "successThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": get,
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": hc.retries,
        },
    }


def container_launch(item: ExportInstance) -> tuple[list[str], dict[str, str]]:
    """The argv and env `up` builds, with the container's binary and model path, listening on all interfaces."""
    server = item.config.server.model_copy(update={"host": "0.0.0.0"})  # noqa: S104 - the pod's own network namespace
    config = item.config.model_copy(update={"server": server})
    from pathlib import PurePosixPath

    model = PurePosixPath(DATA_DIR) / "models" / item.model_relpath
    spec = build_launch(config, PurePosixPath(CONTAINER_BINARY), model, {}, platform="linux")
    env = dict(spec.env)
    if config.gpu.backend in GPU_RESOURCES:
        for variable in _DEVICE_VARIABLES:
            if variable in env and variable not in item.config.env:
                env[variable] = "0"  # the device plugin's GPU is the pod's device 0
    return spec.argv, env


def resources(item: ExportInstance) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if item.memory_mb:
        out["requests"] = {"memory": f"{math.ceil(item.memory_mb)}Mi"}
    gpu = GPU_RESOURCES.get(item.config.gpu.backend)
    if gpu and item.config.gpu.layers != 0:
        out["limits"] = {gpu: 1}  # extended resources go in limits (requests default to them)
    return out


def _model_pull_container(item: ExportInstance, image: str) -> dict[str, Any]:
    source = item.config.model.source
    model = f"{DATA_DIR}/models/{item.model_relpath}"
    if source:
        # Once on the volume, a restart needs no Hub (``models pull`` would still ask it for the file list).
        pull = " ".join(shlex.quote(a) for a in ["llama-orch", "--home", DATA_DIR, "models", "pull", source])
        command = ["sh", "-c", f"test -f {shlex.quote(model)} || exec {pull}"]
        name = "pull-model"
    else:
        message = f"model {item.model_relpath} is missing: copy it into the PVC {item.config.name}-model at models/"
        command = ["sh", "-c", f'test -f "{model}" || {{ echo "{message}" >&2; exit 1; }}']
        name = "check-model"
    container = {
        "name": name,
        "image": image,
        "command": command,
        "volumeMounts": [{"name": "models", "mountPath": DATA_DIR}],
    }
    if source:
        container["env"] = [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}}
        ]
    return container


def instance_documents(item: ExportInstance, options: ExportOptions) -> list[dict[str, Any]]:
    config = item.config
    name = config.name
    labels = {**_labels(name, "llama-server"), **options.labels}
    argv, env = container_launch(item)
    container = {
        "name": "llama-server",
        "image": options.image,
        "command": argv[:1],
        "args": argv[1:],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": "http", "containerPort": config.server.port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "models", "mountPath": DATA_DIR}],
        **probes(config),
    }
    res = resources(item)
    if res:
        container["resources"] = res
    size_gib = max(1, math.ceil((item.model_bytes or 0) * 1.2 / GIB))
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": f"{size_gib}Gi"}},
    }
    if options.storage_class:
        pvc_spec["storageClassName"] = options.storage_class
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-model", "labels": labels},
            "spec": pvc_spec,
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},  # one pod at a time on the RWO volume
                "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": POD_SECURITY,
                        "initContainers": [_model_pull_container(item, options.image)],
                        "containers": [container],
                        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-model"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "selector": {"app.kubernetes.io/name": name},
                "ports": [{"name": "http", "port": config.server.port, "targetPort": "http"}],
            },
        },
    ]


def router_settings(items: list[ExportInstance], api_key: str) -> dict[str, Any]:
    """The router's ``orchestrator.json``: every instance Service as a peer (llama-server answers /v1 itself),
    with its aliases, so the router serves the same names, aliases and replicas as one node does."""
    return {
        "api": {
            "host": "0.0.0.0",  # noqa: S104 - the router pod serves its Kubernetes Service
            "port": ROUTER_PORT,
            "api_keys": [api_key],
            "allowed_hosts": ["*"],
        },
        "peers": [
            {
                "name": i.config.name,
                "url": f"http://{i.config.name}:{i.config.server.port}",
                "aliases": list(i.config.aliases),
                "concurrency": peer_concurrency(i.config),
            }
            for i in items
        ],
    }


def peer_concurrency(config: InstanceConfig) -> dict[str, Any]:
    """The instance's slots and queue, for the router's peer (``PeerSettings.concurrency``): a plain llama-server
    has no queue of its own, so the router keeps the one the daemon would keep for this instance."""
    queue = config.concurrency
    return {"limit": config.concurrency_limit, "queue": queue.queue, "queue_timeout": queue.queue_timeout}


def router_documents(items: list[ExportInstance], options: ExportOptions, api_key: str) -> list[dict[str, Any]]:
    """A Secret with ``orchestrator.json`` (it holds the key), copied into the router's home by an init container
    (the home must be private and writable), the router Deployment and its Service on port 8000."""
    labels = {**_labels(ROUTER_NAME, "router"), **options.labels}
    settings = json.dumps(router_settings(items, api_key), indent=2) + "\n"
    # The home is a folder the init container makes inside the volume: the volume's own root belongs to root, and
    # the non-root user could not make it private (llama-orch wants its home 0700, orchestrator.json 0600).
    home = f"{ROUTER_VOLUME}/home"
    mounts = [{"name": "home", "mountPath": ROUTER_VOLUME}]
    copy = {
        "name": "settings",
        "image": options.image,
        "command": [
            "sh",
            "-c",
            f"mkdir -p -m 700 {home} && cp /etc/llama-orch/orchestrator.json {home}/ "
            f"&& chmod 600 {home}/orchestrator.json",
        ],
        "volumeMounts": [*mounts, {"name": "settings", "mountPath": "/etc/llama-orch", "readOnly": True}],
    }
    container = {
        "name": "router",
        "image": options.image,
        "command": ["llama-orch", "--home", home, "daemon", "run", "--router-only"],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{ROUTER_NAME}-settings", "labels": labels},
            "type": "Opaque",
            "stringData": {"orchestrator.json": settings},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": ROUTER_NAME, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": ROUTER_NAME}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": POD_SECURITY,
                        "initContainers": [copy],
                        "containers": [container],
                        "volumes": [
                            {"name": "home", "emptyDir": {}},
                            {"name": "settings", "secret": {"secretName": f"{ROUTER_NAME}-settings"}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ROUTER_NAME, "labels": labels},
            "spec": {
                "selector": {"app.kubernetes.io/name": ROUTER_NAME},
                "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http"}],
            },
        },
    ]


def render(items: list[ExportInstance], options: ExportOptions, *, router_key: str) -> dict[str, list[dict[str, Any]]]:
    """``{file name: documents}``: ``<instance>.yaml`` each, ``router.yaml`` when any instance has aliases (its
    clients send ``router_key`` as their Bearer key),
    and ``kustomization.yaml`` listing them (with the namespace when one is given)."""
    files: dict[str, list[dict[str, Any]]] = {}
    for item in sorted(items, key=lambda i: i.config.name):
        files[f"{item.config.name}.yaml"] = instance_documents(item, options)
    if any(i.config.aliases for i in items):
        files["router.yaml"] = router_documents(items, options, router_key)
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    if options.namespace:
        kustomization["namespace"] = options.namespace
    files["kustomization.yaml"] = [kustomization]
    return files
