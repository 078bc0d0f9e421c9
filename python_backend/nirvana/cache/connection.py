"""The Milvus connection: open the index, fill the mirror from it, publish it; retry while Milvus is unreachable.

Milvus is the store of record, but the cache must not keep the server from starting or serving: when Milvus is
down at open, requests are served uncached (`ApproximateCache.index` is None) and a background thread retries
with exponential backoff, from half a second up to `reconnect_interval_s`.

A Milvus server with authentication on takes a credential (`cache.milvus_token_file`: "user:password" or an API
token). It is read once, at construction: a missing or empty file is a configuration error raised at once, not a
connection failure to retry forever. The credential is never logged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from nirvana.cache.index import MilvusIndex
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)


class MilvusCredentialError(ValueError):
    """`cache.milvus_token_file` is set but holds no usable credential."""


def read_milvus_token(path: Path | None) -> str | None:
    """The credential in `path` ("user:password" or a token), surrounding whitespace stripped; None when unset."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        # The error names the file, never its content.
        raise MilvusCredentialError(f"cache.milvus_token_file: cannot read {str(path)!r}: {err}") from err
    if not token:
        raise MilvusCredentialError(f"cache.milvus_token_file: {str(path)!r} is empty")
    return token


class MilvusConnection:
    """Opens `MilvusIndex` for a cache.

    `prepare(index)` fills the mirror from the new index (it may raise: the connection then counts as failed);
    `discard()` empties the mirror after such a failure; `publish(index)` hands the index to the cache, and returns
    False when the cache was closed meanwhile (the index is then closed here, so no client leaks). Retrying stops
    when `closed` is set.
    """

    def __init__(
        self,
        config: CacheConfig,
        dim: int,
        prepare: Callable[[MilvusIndex], None],
        discard: Callable[[], None],
        publish: Callable[[MilvusIndex], bool],
        closed: threading.Event,
    ) -> None:
        self.config, self.dim = config, dim
        self._prepare, self._discard, self._publish, self._closed = prepare, discard, publish, closed
        self._token = read_milvus_token(config.milvus_token_file)

    def open(self) -> bool:
        """Connect now; on failure keep retrying in the background. Returns whether the first attempt succeeded."""
        if self.connect():
            return True
        threading.Thread(target=self._reconnect_loop, name="milvus-reconnect", daemon=True).start()
        return False

    def connect(self) -> bool:
        """One attempt: open Milvus, prepare, publish. On failure log, stay uncached, and return False."""
        uri = self.config.resolved_milvus_uri
        index = None
        try:
            # token None: no credential (milvus-lite, or a server without authentication).
            index = MilvusIndex(
                uri,
                self.config.collection,
                self.dim,
                self.config.flush_interval_s,
                self.config.rpc_timeout_s,
                token=self._token,
            )
            self._prepare(index)
        except Exception as err:
            if index is not None:
                with contextlib.suppress(Exception):
                    index.close()
            self._discard()
            log.warning(
                "Milvus at %s unavailable (%s): serving uncached, retrying (at most every %.0f s)",
                uri,
                self._redact(err),
                self.config.reconnect_interval_s,
            )
            return False
        if not self._publish(index):  # closed while we were connecting
            index.close()
        return True

    def _redact(self, err: Exception) -> str:
        """The error's text without the credential (a client error may echo what it was given)."""
        text = str(err)
        if self._token:
            text = text.replace(self._token, "<milvus token>")
            _, sep, password = self._token.partition(":")
            if sep and password:  # "user:password": the password alone too
                text = text.replace(password, "<milvus password>")
        return text

    def _reconnect_loop(self) -> None:
        # Back off from half a second: right after a restart the previous process may hold milvus-lite's lock
        # for a moment, and requests are served uncached until we get in.
        delay = min(0.5, self.config.reconnect_interval_s)
        while not self._closed.wait(delay):
            if self.connect():
                log.warning("Milvus at %s is back: caching resumed", self.config.resolved_milvus_uri)
                return
            delay = min(delay * 2, self.config.reconnect_interval_s)
