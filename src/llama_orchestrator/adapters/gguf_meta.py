"""GGUF metadata for `describe` and `models list`, read with the ``gguf`` package (imported only when needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader


@dataclass(frozen=True)
class GgufInfo:
    path: str
    size_bytes: int
    architecture: str | None
    name: str | None
    context_length: int | None
    parameters: int | None
    file_type: str | None
    tensor_count: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field_value(reader: GGUFReader, key: str) -> Any:  # a GGUF field holds a scalar, a string or a list
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def read_gguf_info(path: Path) -> GgufInfo:
    """Raises ValueError when the file is not a GGUF file."""
    from gguf import GGUFReader
    from gguf.constants import LlamaFileType

    reader = GGUFReader(str(path), "r")
    arch = _field_value(reader, "general.architecture")
    context = _field_value(reader, f"{arch}.context_length") if arch else None
    file_type = _field_value(reader, "general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    return GgufInfo(
        path=str(path),
        size_bytes=path.stat().st_size,
        architecture=arch,
        name=_field_value(reader, "general.name"),
        context_length=int(context) if context is not None else None,
        parameters=parameters,
        file_type=file_type_name,
        tensor_count=len(reader.tensors),
    )
