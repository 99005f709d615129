"""`llama-orch export kubernetes`: parse, call ``services.kube_export``, write or print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(help="Write what runs here as another engine's manifests (Kubernetes).", no_args_is_help=True)


@export_app.command("kubernetes")
def kubernetes(
    names: Annotated[list[str] | None, typer.Argument(help="Instances to export.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every instance.")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write (`-` prints).")] = "k8s",
    namespace: Annotated[str | None, typer.Option(help="Namespace in kustomization.yaml.")] = None,
    image: Annotated[str | None, typer.Option(help="Container image (built from deploy/Dockerfile).")] = None,
    storage_class: Annotated[str | None, typer.Option(help="storageClassName of the model volumes.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the manifests; write nothing.")] = False,
) -> None:
    """Kustomize folder: per instance a Deployment, Service and model PVC; a router for the aliases.

    Example: llama-orch export kubernetes --all -o k8s && kubectl apply -k k8s
    """
    from llama_orchestrator.cli.app import local_only, resolve_names, say, service
    from llama_orchestrator.domain.kubernetes import DEFAULT_IMAGE, ExportOptions
    from llama_orchestrator.services.kube_export import kubernetes_files, write_files

    local_only("export kubernetes")
    svc = service()
    chosen = svc.names() if all_ and not names else resolve_names(names or [], all_)
    if not chosen:
        from llama_orchestrator.domain.errors import UsageError

        raise UsageError(f"no instances in {svc.home.root} to export (`llama-orch init` creates one)")
    options = ExportOptions(image=image or DEFAULT_IMAGE, namespace=namespace, storage_class=storage_class)
    files = kubernetes_files(svc, chosen, options)
    if dry_run or output == "-":
        for name, text in files.items():
            sys.stdout.write(f"# {name}\n---\n{text}")
        return
    for path in write_files(files, Path(output)):
        say(f"wrote {path}")
    if "router.yaml" in files:
        say("router.yaml holds the router's API key (Secret llama-orch-router-settings): keep it private")
