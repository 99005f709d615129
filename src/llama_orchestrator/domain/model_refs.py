"""Models by name (issue 11), pure: parsing ``hf.co/<user>/<repo>[:QUANT]``, choosing the GGUF file(s) a reference
means among a repository's file names, grouping split parts, and the default context that fits a memory budget.

No I/O: the Hub client lives in ``adapters.hub``, the orchestration in ``services.model_pull``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_orchestrator.domain.errors import NotFoundError, UsageError
from llama_orchestrator.domain.routing import ModelShape, estimate_memory_mb

HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
DEFAULT_QUANT = "Q4_K_M"  # what `llama-server -hf` and Ollama pick when none is named
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
# Quantisation names as they appear in GGUF file names: Q4_K_M, IQ2_XXS, Q8_0, F16, BF16, TQ1_0, MXFP4...
_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])((?:I?Q\d+(?:_[A-Z0-9]+)*)|TQ\d_\d|BF16|F16|F32|MXFP4(?:_MOE)?)"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class HfRef:
    """A model on the Hub: ``repo`` is ``user/name``; ``quant`` or ``file`` narrow it to one GGUF (or its parts)."""

    repo: str
    quant: str | None = None
    file: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf.co/{self.repo}" + (f":{self.quant}" if self.quant else "")

    @property
    def user(self) -> str:
        return self.repo.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]


def is_hf_ref(text: str) -> bool:
    """Does ``text`` name a model on the Hub (``hf.co/...``) rather than a file or a catalog ID?"""
    return text.lower().startswith(HF_PREFIXES)


def parse_ref(text: str, *, file: str | None = None, revision: str | None = None) -> HfRef:
    """``[hf.co/]user/repo[:QUANT]`` -> HfRef. Raises UsageError with the accepted shape."""
    body = text.strip()
    for prefix in HF_PREFIXES:
        if body.lower().startswith(prefix):
            body = body[len(prefix) :]
            break
    quant = None
    if ":" in body:
        body, quant = body.rsplit(":", 1)
        quant = quant.strip() or None
    parts = body.strip("/").split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts):
        raise UsageError(
            f"{text!r} is not a model reference: expected <user>/<repo>[:QUANT], "
            "e.g. hf.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"
        )
    if quant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", quant):
        raise UsageError(f"{quant!r} is not a quantisation name (e.g. Q4_K_M, Q8_0, F16)")
    return HfRef("/".join(parts), quant, file, revision)


def quant_of(filename: str) -> str | None:
    """The quantisation a GGUF file name carries (``model-Q4_K_M.gguf`` -> ``Q4_K_M``), upper-cased; the last one
    wins (``Llama-3-8B-Q8_0.gguf``: the ``3`` and ``8B`` are not quantisations)."""
    base = filename.rsplit("/", 1)[-1]
    split = _SPLIT.match(base)
    stem = split.group("stem") if split else base.removesuffix(".gguf").removesuffix(".GGUF")
    found = _QUANT_IN_NAME.findall(stem)
    return found[-1].upper() if found else None


@dataclass(frozen=True)
class Choice:
    """What a reference resolves to: the files to bring (one, or every part of a split model), the first one being
    what llama-server is given."""

    files: tuple[str, ...]
    quant: str | None

    @property
    def primary(self) -> str:
        return self.files[0]


def group_parts(filenames: list[str]) -> dict[str, tuple[str, ...]]:
    """GGUF files grouped into models: a split model's ``…-00001-of-0000N.gguf`` parts under its first part's name,
    sorted; a single file under itself. Incomplete split sets are kept (the caller reports them)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(filenames):
        if not name.lower().endswith(".gguf"):
            continue
        split = _SPLIT.match(name.rsplit("/", 1)[-1])
        if split:
            folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
            first = f"{folder}{split.group('stem')}-00001-of-{split.group('total')}.gguf"
            groups.setdefault(first, []).append(name)
        else:
            groups.setdefault(name, []).append(name)
    return {first: tuple(sorted(parts)) for first, parts in groups.items()}


def _is_auxiliary(name: str) -> bool:
    # Vision projectors and imatrix files sit beside the model; they are never "the" model.
    base = name.rsplit("/", 1)[-1].lower()
    return base.startswith("mmproj") or "imatrix" in base


def choose_files(filenames: list[str], ref: HfRef) -> Choice:
    """The GGUF model ``ref`` names among a repository's files, as llama.cpp's ``-hf`` picks it:

    ``file`` given: that file (and its other parts if split). ``quant`` given: the model whose name carries that
    quantisation, case-insensitive. Neither: Q4_K_M when present, else the only model. Raises NotFoundError with
    the available choices otherwise."""
    groups = {first: parts for first, parts in group_parts(filenames).items() if not _is_auxiliary(first)}
    if not groups:
        raise NotFoundError(f"{ref.repo} has no GGUF file (files: {', '.join(sorted(filenames)[:20]) or 'none'})")
    if ref.file:
        for first, parts in groups.items():
            if ref.file in parts or ref.file.lower() == first.lower():
                return Choice(parts, quant_of(first))
        raise NotFoundError(f"{ref.repo} has no file {ref.file!r}; {_choices(groups)}")
    wanted = (ref.quant or DEFAULT_QUANT).upper()
    matches = [first for first in groups if quant_of(first) == wanted]
    if len(matches) == 1:
        return Choice(groups[matches[0]], wanted)
    if len(matches) > 1:
        raise NotFoundError(f"{ref.repo} has several {wanted} files: pick one with --file; {_choices(groups)}")
    if ref.quant:
        raise NotFoundError(f"{ref.repo} has no {wanted} file; {_choices(groups)}")
    if len(groups) == 1:
        first = next(iter(groups))
        return Choice(groups[first], quant_of(first))
    raise NotFoundError(
        f"{ref.repo} has several models and no {DEFAULT_QUANT}: name one with "
        f"{ref.repo}:QUANT or --file; {_choices(groups)}"
    )


def _choices(groups: dict[str, tuple[str, ...]]) -> str:
    lines = []
    for first in sorted(groups):
        quant = quant_of(first)
        lines.append(
            f"{first}"
            + (f" (:{quant})" if quant else "")
            + (f" [{len(groups[first])} parts]" if len(groups[first]) > 1 else "")
        )
    return "choose from: " + ", ".join(lines)


# -- context -----------------------------------------------------------------------------------------------------

MIN_CONTEXT = 512
FALLBACK_CONTEXT = 4096  # when the model does not say its trained context
MAX_CONTEXT = 1_048_576  # the config's upper bound


def default_context(trained: int | None, file_bytes: int, shape: ModelShape | None, budget_mb: float | None) -> int:
    """The model's trained context, lowered (in steps of 256 tokens) until the memory estimate fits ``budget_mb``;
    never below MIN_CONTEXT (``init`` warns when even that does not fit)."""
    context = min(trained or FALLBACK_CONTEXT, MAX_CONTEXT)
    context = max(MIN_CONTEXT, context)
    if budget_mb is None or estimate_memory_mb(file_bytes, context, shape) <= budget_mb:
        return context
    # The estimate grows with the context: bisect over multiples of 256 for the largest that fits.
    low, high = MIN_CONTEXT // 256, context // 256  # low fits (checked below), high does not
    if estimate_memory_mb(file_bytes, low * 256, shape) > budget_mb:
        return MIN_CONTEXT
    while high - low > 1:
        middle = (low + high) // 2
        if estimate_memory_mb(file_bytes, middle * 256, shape) <= budget_mb:
            low = middle
        else:
            high = middle
    return low * 256


def catalog_id_ok(text: str) -> bool:
    """Catalog IDs: lowercase letters, digits, dots, dashes and underscores, starting with a letter or digit, no
    slash (so an ID never reads as a reference or a path)."""
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", text))
