"""The Hugging Face Hub, through the ``huggingface_hub`` library (imported only when a pull runs).

``HF_ENDPOINT`` is read when a client is made, not when the library is imported, so a mirror (or the tests' fake
Hub) can be chosen per call. ``HF_TOKEN`` and a saved ``hf auth login`` are what the library uses by itself when no
token is passed. Every library error becomes a ``HubError`` whose message says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from llama_orchestrator.domain.errors import OrchestratorError

if TYPE_CHECKING:
    from huggingface_hub.utils import tqdm as hf_tqdm

DEFAULT_ENDPOINT = "https://huggingface.co"
Progress = Callable[[str, int, int | None], None]  # (file name, bytes done, total bytes)
CHUNK_BYTES = 1024 * 1024


class HubError(OrchestratorError):
    """The Hub could not be reached, or said no (unknown repo, revision or file, no access). Exit 1."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files only (GGUF files always are on the Hub)


@dataclass(frozen=True)
class RepoListing:
    repo: str
    commit: str
    files: dict[str, RemoteFile]


def endpoint_from_env() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


class HubClient:
    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self.endpoint = (endpoint or endpoint_from_env()).rstrip("/")
        self.token = token or None  # None: the library reads HF_TOKEN, else the saved login

    def listing(self, repo: str, revision: str | None = None) -> RepoListing:
        """Every file of ``repo`` at ``revision`` (default: main) with size and sha256, and the commit it is at."""
        from huggingface_hub import HfApi

        with _translated(self.endpoint, repo, revision):
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                repo, revision=revision, files_metadata=True
            )
        files = {}
        for sibling in info.siblings or []:
            sha = sibling.lfs.sha256 if sibling.lfs else None
            files[sibling.rfilename] = RemoteFile(sibling.rfilename, sibling.size, sha)
        return RepoListing(repo, info.sha or revision or "main", files)

    def download(
        self,
        repo: str,
        filename: str,
        commit: str,
        local_dir: Path,
        sha256: str | None,
        on_progress: Progress | None = None,
    ) -> Path:
        """Download one file to ``local_dir/<filename>.<sha>.incomplete``, resuming (HTTP Range) what an
        interrupted pull left there. Returns that file; the caller verifies it and moves it in place.

        ``hf_hub_download`` is not used for the transfer itself: since huggingface_hub 1.x it writes to a file
        unique to each process and deletes it on failure, so a killed pull started again from zero. Its own
        pieces are: ``hf_hub_url``, ``get_hf_file_metadata`` (HEAD, redirects, ETag, size) and ``http_get`` (the
        streamed GET with ``resume_size``, retries and the size check)."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        incomplete = incomplete_path(local_dir, filename, sha256)
        with _translated(self.endpoint, repo, commit, filename):
            url = hf_hub_url(repo, filename, revision=commit, endpoint=self.endpoint)
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
            incomplete.parent.mkdir(parents=True, exist_ok=True)
            for stale in incomplete.parent.glob(f"{Path(filename).name}.*.incomplete"):
                if stale != incomplete:
                    stale.unlink(missing_ok=True)  # an older version of the file: its bytes are of no use
            resume = incomplete.stat().st_size if incomplete.exists() else 0
            if meta.size is not None and resume > meta.size:
                incomplete.unlink()
                resume = 0
            # Written to disk every CHUNK_BYTES (the library's default is 10 MiB): what a kill can lose.
            constants.DOWNLOAD_CHUNK_SIZE = CHUNK_BYTES
            with open(incomplete, "ab") as handle:
                http_get(
                    meta.location,
                    handle,
                    resume_size=resume,
                    headers=build_hf_headers(token=self.token),
                    expected_size=meta.size,
                    displayed_filename=filename,
                    tqdm_class=_progress_class(filename, on_progress),
                )
        return incomplete


def _progress_class(filename: str, on_progress: Progress | None) -> type[hf_tqdm]:
    """A tqdm class that draws nothing and reports (done, total) to ``on_progress``: the front end draws."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Reporter(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            kwargs.pop("name", None)
            self._done = int(kwargs.get("initial") or 0)
            self._total = kwargs.get("total")
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # the library's __init__ is unannotated
            if on_progress:
                on_progress(filename, self._done, self._total)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if on_progress:
                on_progress(filename, self._done, self._total)
            return None

    return Reporter


class _translated:
    """Turns the library's exceptions into HubError with the repository, revision and endpoint named."""

    def __init__(self, endpoint: str, repo: str, revision: str | None, filename: str | None = None) -> None:
        self.endpoint, self.repo, self.revision, self.filename = endpoint, repo, revision, filename

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:  # never swallows: returns False or raises a HubError
        if exc is None or isinstance(exc, (OrchestratorError, KeyboardInterrupt)):
            return False
        from huggingface_hub import errors

        where = f"on {self.endpoint}"
        if isinstance(exc, errors.GatedRepoError):
            raise HubError(
                f"{self.repo} is gated {where}: accept its terms on the Hub, then set HF_TOKEN or run `hf auth login`"
            ) from exc
        if isinstance(exc, errors.RepositoryNotFoundError):
            raise HubError(
                f"no model repository {self.repo!r} {where} (check the name; a private repo needs "
                "HF_TOKEN or `hf auth login`)"
            ) from exc
        if isinstance(exc, errors.RevisionNotFoundError):
            raise HubError(f"{self.repo} has no revision {self.revision!r} {where}") from exc
        if isinstance(exc, (errors.EntryNotFoundError,)) and not isinstance(exc, errors.LocalEntryNotFoundError):
            raise HubError(f"{self.repo} has no file {self.filename!r} {where}") from exc
        if isinstance(exc, errors.HfHubHTTPError):
            raise HubError(f"the Hub {where} answered an error: {exc}") from exc
        if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
            raise HubError(f"cannot reach the Hub {where}: offline (HF_HUB_OFFLINE is set, or no network)") from exc
        http_error: type[Exception]
        try:
            import httpx2  # what huggingface_hub 2.x speaks through

            http_error = httpx2.HTTPError
        except ImportError:  # pragma: no cover - older releases use httpx
            import httpx

            http_error = httpx.HTTPError

        if isinstance(exc, (http_error, ConnectionError, TimeoutError)):
            raise HubError(
                f"cannot reach the Hub {where}: {str(exc) or type(exc).__name__} (offline? HF_ENDPOINT names a mirror)"
            ) from exc
        if isinstance(exc, OSError) and self.filename:
            raise HubError(
                f"the download of {self.filename} {where} failed: {exc}; `llama-orch models pull` again resumes it"
            ) from exc
        return False


def incomplete_path(local_dir: Path, filename: str, sha256: str | None) -> Path:
    tag = (sha256 or "nosha")[:16]
    return local_dir / f"{filename}.{tag}.incomplete"


def partial_bytes(local_dir: Path, filename: str, sha256: str | None) -> int:
    """Bytes an interrupted download of ``filename`` left in ``local_dir`` (what a resumed pull will not fetch)."""
    try:
        return incomplete_path(local_dir, filename, sha256).stat().st_size
    except OSError:
        return 0


def forget_download(local_dir: Path, filename: str, sha256: str | None) -> None:
    """Remove what a download of ``filename`` left in ``local_dir`` (after it was moved away or rejected)."""
    incomplete_path(local_dir, filename, sha256).unlink(missing_ok=True)
