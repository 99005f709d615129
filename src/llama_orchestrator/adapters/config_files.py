"""Reading and writing instance config files, with errors that name the file, the field and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from llama_orchestrator.adapters.home import create_private, make_private_dir, readable_by_others
from llama_orchestrator.domain.config import InstanceConfig, normalize_dialects
from llama_orchestrator.domain.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from llama_orchestrator.domain.settings import Settings


def read_document(path: Path) -> Any:
    """The parsed JSON of ``path``; a syntax error names its line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [ConfigProblem("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read: {exc}")]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            str(path), [ConfigProblem(f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}")]
        ) from None


def load_config(path: Path, expected_name: str | None = None) -> InstanceConfig:
    """Load and validate one config file; raises ConfigError listing every problem."""
    document = read_document(path)
    return validate_document(document, str(path), expected_name)


def validate_document(document: Any, source: str, expected_name: str | None = None) -> InstanceConfig:
    if not isinstance(document, dict):
        raise ConfigError(source, [ConfigProblem("", f"expected a JSON object, got {type(document).__name__}")])
    try:
        config = InstanceConfig.from_document(document)
    except ValidationError as exc:
        raise ConfigError(source, problems_from(exc, normalize_dialects(document))) from None
    if expected_name is not None and config.name != expected_name:
        raise ConfigError(
            source,
            [ConfigProblem("name", f"is {config.name!r} but the folder is {expected_name!r}: make them the same")],
        )
    return config


def problems_from(exc: ValidationError, document: Any, model: type[BaseModel] | None = None) -> list[ConfigProblem]:
    """The problems of ``document`` as ``model`` (default: an instance config) validated it."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        where = ".".join(loc) or "(top level)"
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown field" + _suggestion(loc, model or InstanceConfig)
        elif kind == "missing":
            message = "required field is missing"
        elif where == "name" and kind == "string_pattern_mismatch":
            message = (
                f"{json.dumps(error.get('input'))} is not a valid instance name: use 1-63 lowercase letters, digits "
                "and dashes, starting and ending with a letter or digit"
            )
        else:
            message = error["msg"]
            if not isinstance(error["input"], dict | list):  # errors() always carries the input
                message += f" (got {json.dumps(error['input'])})"
        problems.append(ConfigProblem(where, message))
    return problems


def _suggestion(loc: list[str], root: type[BaseModel]) -> str:
    """For an unknown key, the closest allowed key of the section it sits in ("did you mean ...?")."""
    import difflib  # here: every command loads configs, few have a typo to explain

    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return ""
    allowed = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], allowed, n=1)
    if close:
        return f": did you mean {close[0]!r}?"
    return f": allowed fields are {', '.join(sorted(allowed))}"


def write_new_config(path: Path, config: InstanceConfig) -> None:
    """Write a config that must not exist yet, atomically: no half-written file, no overwrite, even in a race."""
    import tempfile  # here: only `init` writes a new config

    make_private_dir(path.parent)
    text = json.dumps(config.to_document(), indent=2) + "\n"
    # mkstemp makes the file 0600: an instance's env may hold tokens.
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)  # fails with FileExistsError if someone else got there first
        except (AttributeError, NotImplementedError, PermissionError):  # pragma: no cover - filesystems without links
            if path.exists():
                raise FileExistsError(path) from None
            os.rename(tmp, path)  # on Windows rename also refuses to overwrite
            tmp = ""
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def load_settings(path: Path) -> Settings:
    """``orchestrator.json``: the defaults when the file does not exist; ConfigError naming the field otherwise."""
    from llama_orchestrator.domain.settings import Settings

    if not path.exists():
        return Settings()
    document = read_document(path)
    try:
        settings = Settings.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(str(path), problems_from(exc, document, Settings)) from None
    _refuse_open_keys(path, settings)
    return settings


def record_api_port(path: Path, port: int) -> None:
    """Write ``api.port`` into ``orchestrator.json`` (created 0600 when missing), keeping everything else in it:
    the port a daemon chose for its home is the one every later daemon and CLI of that home uses."""
    document = read_document(path) if path.exists() else {}
    if not isinstance(document.get("api"), dict):
        document["api"] = {}
    document["api"]["port"] = port
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = create_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(document, indent=2) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_open_keys(path: Path, settings: Settings) -> None:
    """Keys in a file others can read are keys others have: refuse it, as ssh refuses an open private key."""
    if not (settings.api.api_keys or settings.api.control_keys or any(p.api_key for p in settings.peers)):
        return
    mode = readable_by_others(path)
    if mode is not None:
        raise ConfigError(
            str(path),
            [
                ConfigProblem(
                    "api", f"holds keys but its permissions {mode:04o} let other users read it: run `chmod 600 {path}`"
                )
            ],
        )
