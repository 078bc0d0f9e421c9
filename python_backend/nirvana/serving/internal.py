"""The door of an internal model: a request without the deployment's internal credential is refused first.

Every python model other than `nirvana`/`nirvana_stream` builds one `InternalGate` in `initialize` and asks it about
each request before reading a tensor. The refusal names nothing internal: to a client it reads as a model that is
not served to it. The secret's file is the model's `internal_secret_file` parameter (relative paths from the model's
folder), so every model of a repository reads the same one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from nirvana.security.credential import DuplicateParameterError, carries_secret, read_parameters, read_secret

log = logging.getLogger("nirvana.security")

SECRET_PARAMETER = "internal_secret_file"
REFUSAL = "this model is not served to clients; send requests to 'nirvana' or 'nirvana_stream'"


def secret_path(args: dict[str, Any], params: dict[str, str]) -> Path:
    """The model's `internal_secret_file` parameter, relative to its folder; CredentialError-style error if absent."""
    if SECRET_PARAMETER not in params:
        raise ValueError(f"model {args.get('model_name')!r}: parameter {SECRET_PARAMETER!r} is missing from its config")
    path = Path(params[SECRET_PARAMETER])
    return path if path.is_absolute() else Path(args["model_repository"]) / path


class InternalGate:
    """`refusal(request)` → None for our own callers, else the error response to send."""

    def __init__(self, pb_utils: Any, args: dict[str, Any], params: dict[str, str]) -> None:
        self._pb, self._secret = pb_utils, read_secret(secret_path(args, params))
        self._model = args.get("model_name", "?")
        self._lock = threading.Lock()
        self.refused = 0

    def allows(self, request: Any) -> bool:
        try:
            return carries_secret(read_parameters(request.parameters()), self._secret)
        except DuplicateParameterError:
            return False

    def refusal(self, request: Any) -> Any | None:
        if self.allows(request):
            return None
        with self._lock:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:  # a prober must not flood the log
                log.warning("model %s refused %d requests without the internal credential", self._model, self.refused)
        pb = self._pb
        return pb.InferenceResponse(error=pb.TritonError(REFUSAL, pb.TritonError.UNAVAILABLE))
