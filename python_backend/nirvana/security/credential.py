"""The deployment's internal credential: what lets an orchestrator's BLS request into an internal model.

Triton serves every model of a repository to every client, so the python models that only other models should
call (`cache`, the sub-models, `adapters`) check that each request carries this secret as a request parameter
(`INTERNAL_PARAMETER`). The orchestrators attach it to every BLS request (`nirvana.runtime.bls`). A client cannot
learn it: it is read from a file (a Kubernetes Secret, or one generated beside the repository), never from a model
config, which Triton's model-config API would show.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

__all__ = [
    "INTERNAL_PARAMETER",
    "MIN_SECRET_CHARS",
    "CredentialError",
    "DuplicateParameterError",
    "carries_secret",
    "ensure_secret_file",
    "read_parameters",
    "read_secret",
]

INTERNAL_PARAMETER = "nirvana-internal"
MIN_SECRET_CHARS = 16


class CredentialError(ValueError):
    """A secret file is missing, unreadable or too short; the message names the file."""


class DuplicateParameterError(ValueError):
    """A request names one parameter twice: a client trying to shadow a header the server forwards."""


def read_secret(path: Path, what: str = "security.internal_secret_file") -> str:
    """The secret in `path`, whitespace stripped; raises CredentialError naming `what` and the path."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as err:
        raise CredentialError(f"{what}={str(path)!r}: cannot be read ({err.strerror})") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise CredentialError(f"{what}={str(path)!r}: holds {len(secret)} characters, needs ≥ {MIN_SECRET_CHARS}")
    return secret


def ensure_secret_file(path: Path) -> Path:
    """`path`, holding a fresh random secret (owner-only, 0600) unless it holds one already."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path


def read_parameters(text: str | None) -> dict[str, object]:
    """A request's parameters (the JSON text `request.parameters()` gives) as a dict.

    Triton merges forwarded headers and client-sent request parameters into one JSON object, keeping both when the
    names collide, so a duplicate is refused rather than resolved: it can only be a client shadowing a header."""

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        found: dict[str, object] = {}
        for key, value in pairs:
            if key in found:
                raise DuplicateParameterError(f"request parameter {key!r} is given more than once")
            found[key] = value
        return found

    if not text:
        return {}
    try:
        parameters = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError:
        return {}
    return parameters if isinstance(parameters, dict) else {}


def carries_secret(parameters: dict[str, object], secret: str) -> bool:
    """Whether the request's parameters carry `secret` (constant-time comparison)."""
    sent = parameters.get(INTERNAL_PARAMETER)
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(), secret.encode())
