"""`config validate` and `config lint`: every check of SPEC §3 over one or all instances."""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llama_orchestrator.adapters.binaries import resolve_binary
from llama_orchestrator.adapters.config_files import read_document, validate_document
from llama_orchestrator.adapters.ports import is_port_free
from llama_orchestrator.domain.config import InstanceConfig, dialect_warnings
from llama_orchestrator.domain.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, OrchestratorError
from llama_orchestrator.domain.states import ACTIVE

if TYPE_CHECKING:
    from llama_orchestrator.services.instances import InstanceService


@dataclass
class CheckReport:
    name: str
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema_ok: bool = True

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        if not self.schema_ok:
            return EXIT_USAGE
        return EXIT_FAILED if self.errors else EXIT_OK

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "ok": self.ok, "errors": self.errors, "warnings": self.warnings}


def check_instances(svc: InstanceService, names: list[str] | None, *, lint: bool) -> list[CheckReport]:
    chosen = names if names is not None else svc.names()
    loaded: dict[str, InstanceConfig] = {}
    reports: list[CheckReport] = []
    for name in chosen:
        path = svc.home.config_path(name)
        report = CheckReport(name, str(path))
        reports.append(report)
        if not path.is_file():
            report.errors.append("no such instance (config.json not found)")
            report.schema_ok = False
            continue
        try:
            document = read_document(path)
            loaded[name] = validate_document(document, str(path), expected_name=name)
        except ConfigError as exc:
            report.errors += [str(p) for p in exc.problems]
            report.schema_ok = False
            continue
        if lint:
            report.warnings += dialect_warnings(document)
    # Ports are compared across every instance in the home, not only the ones checked.
    by_port: dict[int, list[str]] = defaultdict(list)
    for name in svc.names():
        try:
            config = loaded.get(name) or svc.load(name)
        except OrchestratorError:
            continue
        by_port[config.server.port].append(name)
    for report in reports:
        checked = loaded.get(report.name)
        if checked is None:
            continue
        _check_runtime(svc, checked, report, by_port)
        if lint:
            report.warnings += _lint(checked)
    return reports


def _check_runtime(
    svc: InstanceService, config: InstanceConfig, report: CheckReport, by_port: dict[int, list[str]]
) -> None:
    model = config.model_path(svc.home.config_path(config.name).parent)
    if not model.is_file():
        report.errors.append(f"model.path: file {str(model)!r} not found")
    elif not os.access(model, os.R_OK):
        report.errors.append(f"model.path: file {str(model)!r} is not readable")
    else:
        with open(model, "rb") as handle:
            if handle.read(4) != b"GGUF":
                report.errors.append(f"model.path: {str(model)!r} is not a GGUF file")
    others = [n for n in by_port[config.server.port] if n != config.name]
    if others:
        report.errors.append(f"server.port: {config.server.port} is also used by {', '.join(others)}")
    row = svc.refresh(config.name)
    if row.status not in ACTIVE and not is_port_free(config.server.port, config.server.host):
        report.errors.append(f"server.port: {config.server.port} is in use by another program right now")
    log_dir = svc.home.log_dir(config.name)
    probe_dir = log_dir if log_dir.exists() else _existing_parent(log_dir)
    if not os.access(probe_dir, os.W_OK):
        report.errors.append(f"logs: folder {log_dir} is not writable")
    try:
        binary = resolve_binary(config.binary, svc.home.registry_path, backend=config.gpu.backend)
    except OrchestratorError as exc:
        report.errors.append(f"binary: {exc}")
        return
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            report.errors.append(f"binary: {binary} --version failed: {(result.stderr or result.stdout)[-300:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        report.errors.append(f"binary: {binary} does not run: {exc}")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _lint(config: InstanceConfig) -> list[str]:
    warnings = []
    cores = os.cpu_count() or 1
    if config.model.threads and config.model.threads > cores:
        warnings.append(f"model.threads: {config.model.threads} is more than this machine's {cores} cores")
    if config.server.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(f"server.host: {config.server.host} exposes llama-server beyond this machine, with no API key")
    if config.gpu.backend == "cpu" and config.gpu.layers not in (0,):
        warnings.append("gpu.layers is set but gpu.backend is cpu: the layers stay on the CPU")
    if config.restart.policy == "never":
        warnings.append("restart.policy is never: the daemon will not restart this instance when it dies")
    if config.server.parallel > 1 and config.model.context_size // config.server.parallel < 512:
        warnings.append(
            f"model.context_size {config.model.context_size} split over {config.server.parallel} slots leaves "
            f"{config.model.context_size // config.server.parallel} tokens per request"
        )
    return warnings
