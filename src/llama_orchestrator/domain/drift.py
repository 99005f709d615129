"""Config drift: which config a process was started with, and whether the declared one still matches it.

Pure. At every start the instance records ``fingerprint(config)`` (a hash and the canonical copy it hashes); `ps`
compares it with the config file now, `describe` shows ``config_diff`` of the two, and `up` recreates a running
instance whose fingerprint changed (as compose recreates a service whose definition changed).

Only the sections that reach the llama-server process count (its argv, environment and binary). Health checks,
restart policy, log limits and the router's fields (aliases, ttl, pinned, concurrency) are read live by the
supervisor and the router, so changing them must not restart a loaded model; they still show in the diff.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from llama_orchestrator.domain.config import InstanceConfig

# The parts of a config that the running process is made of: change one and only a new process applies it.
PROCESS_FIELDS = ("model", "server", "gpu", "env", "args", "binary")


@dataclass(frozen=True)
class Fingerprint:
    hash: str  # sha256 of the canonical JSON of PROCESS_FIELDS
    document: str  # the whole config as canonical JSON: what `describe` diffs against


def canonical_json(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(config: InstanceConfig) -> Fingerprint:
    document = config.model_dump(mode="json", by_alias=False, exclude={"schema_ref"})
    process = {key: document.get(key) for key in PROCESS_FIELDS}
    digest = hashlib.sha256(canonical_json(process).encode()).hexdigest()
    return Fingerprint(digest, canonical_json(document))


def config_changed(recorded_hash: str | None, config: InstanceConfig | None) -> bool:
    """Whether the process runs another config than the file declares. Unknown (no record, e.g. a process started
    by an older version, or no loadable config) is not drift: nothing can be said."""
    if recorded_hash is None or config is None:
        return False
    return fingerprint(config).hash != recorded_hash


@dataclass(frozen=True)
class FieldChange:
    path: str  # dotted, e.g. "model.context_size"
    running: Any  # the value the process was started with (None: absent)
    declared: Any  # the value in the config file now (None: absent)
    needs_recreate: bool  # part of PROCESS_FIELDS: only a recreate applies it


def config_diff(recorded_document: str | None, config: InstanceConfig) -> list[FieldChange]:
    """The leaves that differ between the recorded copy and ``config``, sorted by path."""
    if recorded_document is None:
        return []
    try:
        running = json.loads(recorded_document)
    except ValueError:
        return []
    declared = json.loads(fingerprint(config).document)
    changes: list[FieldChange] = []
    _walk("", running, declared, changes)
    return sorted(changes, key=lambda c: c.path)


def _walk(prefix: str, running: Any, declared: Any, out: list[FieldChange]) -> None:
    if isinstance(running, dict) and isinstance(declared, dict):
        for key in sorted(set(running) | set(declared)):
            _walk(f"{prefix}.{key}" if prefix else key, running.get(key), declared.get(key), out)
        return
    if running != declared:
        top = prefix.split(".", 1)[0]
        out.append(FieldChange(prefix, running, declared, top in PROCESS_FIELDS))
