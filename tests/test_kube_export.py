"""`llama-orch export kubernetes`: every generated manifest validated offline against the Kubernetes OpenAPI
schemas (kubernetes-validate ships them), for cpu, cuda, rocm, vulkan, aliases and Hugging Face models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import Cli
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.kubernetes import ExportInstance, ExportOptions, container_launch, render

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.30"


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] == "Kustomization":
            assert set(doc) <= {"apiVersion", "kind", "resources", "namespace"}
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def cfg(name: str, **extra) -> InstanceConfig:
    return InstanceConfig.model_validate(
        {"name": name, "model": {"path": "m.gguf", "context_size": 2048}, "server": {"port": 8101}, **extra}
    )


CASES = {
    "cpu": cfg("cpu", gpu={"backend": "cpu"}, model={"path": "m.gguf", "threads": 4}),
    "cuda": cfg("cuda", gpu={"backend": "cuda", "device_id": 1, "layers": -1}, env={"FOO": "bar"}),
    "rocm": cfg("rocm", gpu={"backend": "rocm", "device_id": 0, "layers": 99}),
    "vulkan": cfg("vulkan", gpu={"backend": "vulkan", "device_id": 1, "layers": 10}),
    "hf": cfg(
        "hf",
        model={"path": "../../models/hf/me/tiny-GGUF/tiny-Q8_0.gguf", "source": "hf.co/me/tiny-GGUF:Q8_0"},
        aliases=["chat"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_backend_renders_valid_manifests(case: str) -> None:
    config = CASES[case]
    relpath = "hf/me/tiny-GGUF/tiny-Q8_0.gguf" if case == "hf" else "m.gguf"
    files = render(
        [ExportInstance(config, relpath, 3 * 1024**3, 4000.4)], ExportOptions(namespace="llm"), router_key="sk-test"
    )
    for docs in files.values():
        validate_all(docs)
    deployment = next(d for d in files[f"{case}.yaml"] if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    limits = container["resources"].get("limits", {})
    assert container["resources"]["requests"] == {"memory": "4001Mi"}
    env = {e["name"]: e["value"] for e in container["env"]}
    if case == "cuda":
        assert limits == {"nvidia.com/gpu": 1} and env["CUDA_VISIBLE_DEVICES"] == "0" and env["FOO"] == "bar"
    elif case == "rocm":
        assert limits == {"amd.com/gpu": 1} and env["HIP_VISIBLE_DEVICES"] == "0"
    else:
        assert limits == {}
    if case == "vulkan":
        assert env["GGML_VK_VISIBLE_DEVICES"] == "1"
    init = pod["initContainers"][0]
    if case == "hf":
        assert init["command"] == [
            "sh",
            "-c",
            f"test -f /data/models/{relpath} || exec llama-orch --home /data models pull hf.co/me/tiny-GGUF:Q8_0",
        ]
        assert container["args"][container["args"].index("--model") + 1] == "/data/models/" + relpath
        assert "router.yaml" in files
    else:
        assert init["name"] == "check-model" and "router.yaml" not in files
    assert files["kustomization.yaml"][0]["namespace"] == "llm"


def test_invalid_manifest_is_caught() -> None:
    """The validator can fail: a probe with a string period is refused."""
    files = render([ExportInstance(CASES["cpu"], "m.gguf")], ExportOptions(), router_key="k")
    deployment = next(d for d in files["cpu.yaml"] if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSeconds"] = "ten"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_all(files["cpu.yaml"])


def test_argv_is_the_one_up_builds() -> None:
    from pathlib import PurePosixPath

    from llama_orchestrator.domain.launch import build_launch

    config = CASES["cuda"]
    argv, _ = container_launch(ExportInstance(config, "m.gguf"))
    here = build_launch(
        config, PurePosixPath("/app/llama-server"), PurePosixPath("/data/models/m.gguf"), {}, platform="linux"
    )
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    swapped = list(here.argv)
    swapped[swapped.index("--host") + 1] = "0.0.0.0"
    assert argv == swapped


def test_export_all_three_instances_through_the_cli(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    docs = [
        {
            "name": "alpha",
            "model": {"path": str(tiny_model), "context_size": 1024},
            "server": {"port": 8201},
            "aliases": ["chat"],
            "healthcheck": {"path": "/health", "interval": 7, "timeout": 3, "retries": 4, "start_period": 70},
        },
        {
            "name": "beta",
            "model": {"path": str(tiny_model), "context_size": 2048},
            "server": {"port": 8202},
            "aliases": ["chat"],
            "gpu": {"backend": "cuda", "layers": -1},
        },
        {
            "name": "gamma",
            "model": {"path": str(tiny_model), "context_size": 512},
            "server": {"port": 8203},
            "gpu": {"backend": "rocm", "layers": 20},
            "healthcheck": {"path": "/v1/health"},
        },
    ]
    for doc in docs:
        cli.write_config(doc["name"], doc)
    out = tmp_path / "k8s"
    cli.run("export", "kubernetes", "--all", "-o", str(out), "--namespace", "llm", check=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha.yaml",
        "beta.yaml",
        "gamma.yaml",
        "kustomization.yaml",
        "router.yaml",
    ]
    for path in out.iterdir():
        validate_all(list(yaml.safe_load_all(path.read_text())))
    for doc in docs:
        manifests = list(yaml.safe_load_all((out / f"{doc['name']}.yaml").read_text()))
        deployment = next(d for d in manifests if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert args[args.index("--ctx-size") + 1] == str(doc["model"]["context_size"])
        assert args[args.index("--port") + 1] == str(doc["server"]["port"])
        hc = InstanceConfig.model_validate(doc).healthcheck
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == hc.path
            assert container[probe]["periodSeconds"] == hc.interval
            assert container[probe]["timeoutSeconds"] == hc.timeout
        assert container["livenessProbe"]["failureThreshold"] == hc.retries
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= hc.start_period
        assert container["resources"]["requests"]["memory"].endswith("Mi")
    router = list(yaml.safe_load_all((out / "router.yaml").read_text()))
    secret = next(d for d in router if d["kind"] == "Secret")
    settings = json.loads(secret["stringData"]["orchestrator.json"])
    assert {p["name"]: (p["url"], p["aliases"]) for p in settings["peers"]} == {
        "alpha": ("http://alpha:8201", ["chat"]),
        "beta": ("http://beta:8202", ["chat"]),
        "gamma": ("http://gamma:8203", []),
    }
    printed = cli.run("export", "kubernetes", "gamma", "-o", "-", check=True).stdout
    assert "kind: Deployment" in printed and "router.yaml" not in printed


def test_router_peers_queue_as_the_instances_do() -> None:
    """The router's peers carry each instance's slots and queue, and its orchestrator.json loads as settings."""
    from llama_orchestrator.domain.settings import Settings

    items = [
        ExportInstance(cfg("alpha", aliases=["chat"], server={"port": 8101, "parallel": 4}), "m.gguf"),
        ExportInstance(
            cfg("beta", aliases=["chat"], concurrency={"limit": 2, "queue": 5, "queue_timeout": 12.5}), "m.gguf"
        ),
    ]
    files = render(items, ExportOptions(), router_key="sk-test")
    secret = next(d for d in files["router.yaml"] if d["kind"] == "Secret")
    settings = Settings.model_validate(json.loads(secret["stringData"]["orchestrator.json"]))
    limits = {p.name: p.concurrency.model_dump() for p in settings.peers if p.concurrency}
    assert limits == {
        "alpha": {"limit": 4, "queue": 32, "queue_timeout": 60.0},  # --parallel 4, the default queue
        "beta": {"limit": 2, "queue": 5, "queue_timeout": 12.5},
    }
    for name in ("alpha.yaml", "router.yaml"):
        pod = next(d for d in files[name] if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001


def _dockerfile_instruction(text: str, name: str) -> list[str]:
    """An exec-form (JSON) instruction of the Dockerfile, its continuation lines joined."""
    joined = text.replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines() if line.strip().startswith(name + " ")]
    assert len(lines) == 1, f"one {name} expected"
    rest = lines[0][len(name) :].strip()
    if name == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + 4 :]
    return json.loads(rest)


def test_the_image_and_manifest_commands_exist(cli: Cli) -> None:
    """The image was not built here (no Docker daemon): what it and the manifests run must at least be commands
    and options this CLI has (each run with --help: an unknown command or option fails with exit 2)."""
    import shlex

    dockerfile = (Path(__file__).parents[1] / "deploy" / "Dockerfile").read_text()
    assert _dockerfile_instruction(dockerfile, "ENTRYPOINT") == []  # the base's llama-server entrypoint is cleared
    assert "\nUSER 10001\n" in dockerfile
    commands = [_dockerfile_instruction(dockerfile, "CMD")]
    check = _dockerfile_instruction(dockerfile, "HEALTHCHECK")
    assert check[:2] == ["/opt/llama-orch/bin/python", "-c"]
    compile(check[2], "HEALTHCHECK", "exec")
    assert "ENV PATH=" in dockerfile and "LLAMA_ORCH_HEALTH_URL=http://127.0.0.1:8000/healthz" in dockerfile

    items = [ExportInstance(CASES["hf"], "hf/me/tiny-GGUF/tiny-Q8_0.gguf")]
    files = render(items, ExportOptions(), router_key="k")
    for docs in files.values():
        for doc in docs:
            if doc["kind"] != "Deployment":
                continue
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"] + pod.get("initContainers", []):
                command = container["command"]
                if command[:2] == ["sh", "-c"]:
                    words = shlex.split(command[2])
                    command = words[words.index("exec") + 1 :] if "exec" in words else []
                if command and command[0] == "llama-orch":
                    commands.append(command)
    assert len(commands) == 3  # the image's, the router's and the model pull's
    for command in commands:
        result = cli.run(*command[1:], "--help", timeout=60)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    assert cli.run("daemon", "run", "--router-bogus", "--help", timeout=60).returncode == 2  # the check can fail
