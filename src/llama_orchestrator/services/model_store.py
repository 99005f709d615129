"""Models by name (issue 11): pull from the Hub, the catalog of seed 004, remove, and resolving a reference to the
local file an instance runs.

Layout, all under the home's ``models/`` folder (the one place `models list` already reads):

    models/hf/<user>/<repo>/<file>.gguf     pulled files, under their Hub names (every part of a split model)
    models/.partial/<user>/<repo>/          downloads in progress (``<file>.<sha>.incomplete``, resumed with
                                            HTTP Range): a file leaves it only once its sha256 matches
    models/catalog.json                     catalog IDs -> references (written atomically, 0600)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llama_orchestrator.adapters.home import Home
from llama_orchestrator.adapters.hub import HubClient, HubError, Progress, forget_download, partial_bytes
from llama_orchestrator.domain.errors import InUseError, NotFoundError, OrchestratorError, UsageError
from llama_orchestrator.domain.model_refs import HfRef, catalog_id_ok, choose_files, is_hf_ref, parse_ref, quant_of

DISK_MARGIN = 64 * 1024 * 1024  # room left beside a pull: logs and the database keep writing


def models_root(home: Home) -> Path:
    return home.root / "models"


def hf_root(home: Home) -> Path:
    return models_root(home) / "hf"


def partial_root(home: Home) -> Path:
    return models_root(home) / ".partial"


def catalog_path(home: Home) -> Path:
    return models_root(home) / "catalog.json"


@dataclass
class PullResult:
    ref: HfRef
    files: list[Path]
    downloaded: list[str] = field(default_factory=list)  # names fetched now (the others were there already)
    bytes_fetched: int = 0

    @property
    def primary(self) -> Path:
        return self.files[0]

    def as_dict(self) -> dict:
        return {
            "reference": str(self.ref),
            "path": str(self.primary),
            "files": [str(p) for p in self.files],
            "downloaded": self.downloaded,
            "bytes_fetched": self.bytes_fetched,
        }


# -- the catalog ---------------------------------------------------------------------------------------------


class ModelCatalog:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.path = catalog_path(home)

    def read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise OrchestratorError(f"cannot read the model catalog {self.path}: {exc}") from None
        models = data.get("models") if isinstance(data, dict) else None
        return {k: v for k, v in (models or {}).items() if isinstance(v, dict) and isinstance(v.get("repo"), str)}

    def write(self, models: dict[str, dict]) -> None:
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".catalog.", suffix=".tmp", dir=self.path.parent)  # 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"models": models}, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def register(self, model_id: str, repo: str, name: str | None = None, file: str | None = None) -> dict:
        if not catalog_id_ok(model_id):
            raise UsageError(
                f"{model_id!r} is not a catalog ID: lowercase letters, digits, '.', '-', '_' (no slash), e.g. qwen-0.5b"
            )
        ref = parse_ref(repo, file=file)
        models = self.read()
        entry = {"repo": f"{ref.repo}" + (f":{ref.quant}" if ref.quant else ""), "name": name or model_id}
        if file:
            entry["file"] = file
        models[model_id] = entry
        self.write(models)
        return entry

    def unregister(self, model_id: str) -> dict:
        models = self.read()
        if model_id not in models:
            raise NotFoundError(f"no catalog entry {model_id!r} (see `llama-orch models catalog`)")
        entry = models.pop(model_id)
        self.write(models)
        return entry

    def ref(self, model_id: str) -> HfRef | None:
        entry = self.read().get(model_id)
        return parse_ref(entry["repo"], file=entry.get("file")) if entry else None


# -- resolving references ------------------------------------------------------------------------------------


def resolve(home: Home, text: str, *, file: str | None = None, revision: str | None = None) -> HfRef:
    """A catalog ID, or ``[hf.co/]user/repo[:QUANT]``."""
    if not is_hf_ref(text) and "/" not in text:
        ref = ModelCatalog(home).ref(text)
        if ref is None:
            raise NotFoundError(
                f"{text!r} is neither a catalog ID (see `llama-orch models catalog`) nor a "
                "reference <user>/<repo>[:QUANT]"
            )
        return HfRef(ref.repo, ref.quant, file or ref.file, revision)
    return parse_ref(text, file=file, revision=revision)


def repo_dir(home: Home, ref: HfRef) -> Path:
    return hf_root(home) / ref.user / ref.name


def local_files(home: Home, ref: HfRef) -> list[Path] | None:
    """The pulled files ``ref`` names, first part first, when every one of them is here; else None."""
    folder = repo_dir(home, ref)
    if not folder.is_dir():
        return None
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf") if p.is_file()]
    try:
        choice = choose_files(names, ref)
    except NotFoundError:
        return None
    paths = [folder / name for name in choice.files]
    return paths if all(p.is_file() for p in paths) else None


def reference_of(home: Home, path: Path) -> str | None:
    """``hf.co/user/repo:QUANT`` for a file pulled into the home, else None."""
    try:
        rel = path.absolute().relative_to(hf_root(home))
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 3:
        return None
    quant = quant_of(parts[-1])
    return f"hf.co/{parts[0]}/{parts[1]}" + (f":{quant}" if quant else "")


# -- pull ------------------------------------------------------------------------------------------------------


def pull(
    home: Home,
    ref: HfRef,
    *,
    client: HubClient | None = None,
    on_progress: Progress | None = None,
    on_plan: Callable[[list[tuple[str, int | None]]], None] | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> PullResult:
    """Bring the file(s) ``ref`` names into ``models/hf/<user>/<repo>/``. Files already there are kept; a download
    interrupted before resumes from where it stopped; each file is checked against the Hub's sha256 before it
    appears under its name. Raises HubError (exit 1) when the Hub is unreachable or says no, or a checksum does
    not match; OrchestratorError when the disk has not the room."""
    client = client or HubClient()
    listing = client.listing(ref.repo, ref.revision)
    choice = choose_files(list(listing.files), ref)
    final_dir = repo_dir(home, ref)
    staging = partial_root(home) / ref.user / ref.name
    wanted = [listing.files[name] for name in choice.files]
    missing = [f for f in wanted if not _present(final_dir / f.name, f.size)]
    if on_plan:
        on_plan([(f.name, f.size) for f in missing])
    need = sum(max(0, (f.size or 0) - partial_bytes(staging, f.name, f.sha256)) for f in missing)
    if missing:
        _check_space(models_root(home), need, free_bytes)
    result = PullResult(HfRef(ref.repo, choice.quant, ref.file, ref.revision), [final_dir / n for n in choice.files])
    for remote in missing:
        before = partial_bytes(staging, remote.name, remote.sha256)
        staging.mkdir(parents=True, exist_ok=True)
        staged = client.download(ref.repo, remote.name, listing.commit, staging, remote.sha256, on_progress)
        _verify(staged, remote.sha256, staging, remote.name, client.endpoint)
        target = final_dir / remote.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # only a verified file gets the model's name
        result.downloaded.append(remote.name)
        result.bytes_fetched += max(0, target.stat().st_size - before)
    _prune_empty(staging, partial_root(home))
    return result


def _present(path: Path, size: int | None) -> bool:
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except OSError:
        return False


def _check_space(folder: Path, need: int, free_bytes: Callable[[Path], int] | None) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = free_bytes(probe) if free_bytes else shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise OrchestratorError(
            f"not enough disk space in {folder}: the pull needs {_human(need)} and "
            f"{_human(free)} is free (keeping {_human(DISK_MARGIN)} spare); nothing was "
            "downloaded"
        )


def _verify(path: Path, sha256: str | None, staging: Path, name: str, endpoint: str) -> None:
    if not sha256:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    if digest.hexdigest() != sha256.lower():
        forget_download(staging, name, sha256)
        raise HubError(
            f"{name}: checksum mismatch (sha256 {digest.hexdigest()}, the Hub on {endpoint} says "
            f"{sha256}); the download was deleted, nothing was installed. Pull again; if it repeats, the "
            "mirror serves a corrupt file"
        )


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` (when it holds no model and no interrupted download, only the library's bookkeeping) and
    then its empty parents up to ``stop``."""
    try:
        if folder.is_dir() and not any(p.suffix in (".gguf", ".incomplete") for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        while folder != stop and folder.parent != folder:
            folder = folder.parent
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    except OSError:
        pass


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# -- rm --------------------------------------------------------------------------------------------------------


def users_of(home: Home, files: list[Path]) -> list[str]:
    """Instances whose config names one of ``files``."""
    from llama_orchestrator.adapters.config_files import load_config

    keys = {os.path.normcase(os.path.realpath(p)) for p in files}
    users = []
    for name in home.instance_names():
        config_path = home.config_path(name)
        try:
            config = load_config(config_path, expected_name=name)
        except OrchestratorError:
            continue
        if os.path.normcase(os.path.realpath(config.model_path(config_path.parent))) in keys:
            users.append(name)
    return users


def remove(home: Home, text: str) -> list[Path]:
    """Delete the pulled files a reference or catalog ID names (every part). Refuses while an instance uses them."""
    ref = resolve(home, text)
    files = local_files(home, ref)
    if files is None:
        raise NotFoundError(f"{text!r} is not pulled (see `llama-orch models list`)")
    users = users_of(home, files)
    if users:
        raise InUseError(
            f"{text} is used by instance(s) {', '.join(users)}: remove them "
            f"(`llama-orch rm {users[0]}`) or point them at another model first"
        )
    for path in files:
        path.unlink(missing_ok=True)
    _prune_empty(files[0].parent, hf_root(home))
    return files


def catalog_rows(home: Home) -> list[dict]:
    rows = []
    for model_id, entry in sorted(ModelCatalog(home).read().items()):
        ref = parse_ref(entry["repo"], file=entry.get("file"))
        files = local_files(home, ref)
        rows.append(
            {
                "id": model_id,
                "name": entry.get("name") or model_id,
                "repo": entry["repo"],
                "downloaded": files is not None,
                "path": str(files[0]) if files else None,
                "size_bytes": sum(p.stat().st_size for p in files) if files else None,
            }
        )
    return rows


# -- context and memory ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    context_size: int
    estimated_mb: float
    budget_mb: float | None  # router.memory_budget_mb, else the RAM available now
    trained_context: int | None


def model_bytes(path: Path) -> int:
    """The size of a model, every part of a split one included."""
    from llama_orchestrator.domain.model_refs import group_parts

    if "-00001-of-" in path.name:
        parts = group_parts([p.name for p in path.parent.glob("*.gguf")]).get(path.name, (path.name,))
        return sum((path.parent / p).stat().st_size for p in parts if (path.parent / p).is_file())
    return path.stat().st_size


def memory_budget_mb(home: Home) -> float | None:
    from llama_orchestrator.adapters.config_files import load_settings

    try:
        budget = load_settings(home.settings_path).router.memory_budget_mb
    except OrchestratorError:
        budget = None
    if budget:
        return float(budget)
    try:
        import psutil

        return psutil.virtual_memory().available / (1024 * 1024)
    except Exception:  # noqa: BLE001 - no figure (a platform psutil cannot read): no cap
        return None


def memory_plan(
    home: Home,
    path: Path,
    context_size: int | None = None,
    *,
    budget_mb: float | None = None,
    trained: int | None = None,
) -> MemoryPlan:
    """The context ``init`` gives ``path`` (its trained context capped by the budget, unless one is chosen) and the
    estimated memory at it (the router's estimate: weights + f16 KV cache + overhead)."""
    from llama_orchestrator.domain.model_refs import default_context
    from llama_orchestrator.domain.routing import estimate_memory_mb
    from llama_orchestrator.services.router_catalog import model_shape

    if trained is None:
        try:
            from llama_orchestrator.adapters.gguf_meta import read_gguf_info

            trained = read_gguf_info(path).context_length
        except Exception:  # noqa: BLE001 - not a readable GGUF (the reader raises anything): the fallback context
            trained = None
    budget = budget_mb if budget_mb is not None else memory_budget_mb(home)
    size = model_bytes(path)
    shape = model_shape(path)
    context = context_size or default_context(trained, size, shape, budget)
    return MemoryPlan(context, estimate_memory_mb(size, context, shape), budget, trained)
