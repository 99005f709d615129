"""`llama-orch export kubernetes`: reads the instance configs and their model files (size, GGUF shape for the
memory estimate), asks ``domain.kubernetes`` for the manifests and renders them as YAML files."""

from __future__ import annotations

import secrets
from pathlib import Path

from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.kubernetes import ExportInstance, ExportOptions, render
from llama_orchestrator.domain.routing import estimate_memory_mb
from llama_orchestrator.services.instances import InstanceService


def export_instance(service: InstanceService, config: InstanceConfig) -> ExportInstance:
    from llama_orchestrator.services.router_catalog import model_shape

    model = config.model_path(service.home.config_path(config.name).parent)
    models_dir = (service.home.root / "models").resolve()
    try:
        relpath = model.resolve().relative_to(models_dir).as_posix()  # hf/<user>/<repo>/<file> for pulled ones
    except ValueError:
        relpath = model.name
    try:
        size = model.stat().st_size
    except OSError:
        return ExportInstance(config, relpath)  # exported anyway: the PVC is filled in the cluster
    return ExportInstance(
        config, relpath, size, estimate_memory_mb(size, config.model.context_size, model_shape(model))
    )


def kubernetes_files(
    service: InstanceService, names: list[str], options: ExportOptions, router_key: str | None = None
) -> dict[str, str]:
    """``{file name: YAML text}`` for the named instances."""
    import yaml

    items = [export_instance(service, service.load(name)) for name in names]
    key = router_key or "sk-" + secrets.token_urlsafe(24)
    files = render(items, options, router_key=key)

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # plain YAML, no &anchors for shared dicts
            return True

    return {
        name: yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False)
        for name, docs in files.items()
    }


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        if name == "router.yaml":
            path.chmod(0o600)  # its Secret holds the router's API key
        written.append(path)
    return written
