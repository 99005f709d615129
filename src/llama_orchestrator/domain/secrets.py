"""Which environment variables hold secrets, and how they are shown: masked, whatever front end shows them.

An instance's ``env`` goes to llama-server as it is (``LLAMA_API_KEY``, ``HF_TOKEN``, ...); only what is shown
(`describe`, ``/api``, the dashboard) is masked. The mask has a fixed length, so it does not tell the key's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def is_secret_name(name: str) -> bool:
    """True for names that look like they hold a secret: ``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``
    (any case), and two kin (``PASSWD``, ``CREDENTIAL``)."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the values of secret-looking names replaced by ``***`` (an empty value stays empty: nothing
    to hide, and it shows that the variable is set to nothing)."""
    return {name: (MASK if value and is_secret_name(name) else value) for name, value in env.items()}


def is_secret_flag(flag: str) -> bool:
    """``--api-key``, ``--hf-token``: a llama-server option whose value is a secret. The option's last word
    decides: ``--api-key-file`` names a file and ``--draft-token-delay`` a number, neither is secret."""
    if not flag.startswith("-"):
        return False
    last = flag.lstrip("-").replace("_", "-").rsplit("-", 1)[-1]
    return is_secret_name(last)


def mask_args(args: list[str]) -> list[str]:
    """``args`` with the values of secret options masked: ``--api-key sk-x`` and ``--api-key=sk-x``."""
    out: list[str] = []
    for arg in args:
        flag, equals, _ = arg.partition("=")
        if out and is_secret_flag(out[-1]) and out[-1] == out[-1].partition("=")[0]:
            out.append(MASK)
        elif equals and is_secret_flag(flag):
            out.append(f"{flag}={MASK}")
        else:
            out.append(arg)
    return out


def mask_document(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of an instance config document with its ``env`` and the values of secret ``args`` masked (the rest
    is not secret)."""
    masked = dict(document)
    if isinstance(document.get("env"), Mapping):
        masked["env"] = mask_env(document["env"])
    if isinstance(document.get("args"), list):
        masked["args"] = mask_args([str(a) for a in document["args"]])
    return masked
