"""`MilvusConnection`'s credential: `cache.milvus_token_file` is read once and sent to Milvus, never logged.

pymilvus is replaced at its API boundary (the `MilvusIndex` the connection opens, and the `MilvusClient` that index
opens): no Milvus server runs here.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from nirvana.cache import connection as connection_module
from nirvana.cache import index as index_module
from nirvana.cache.connection import MilvusConnection, MilvusCredentialError, read_milvus_token
from nirvana.config import CacheConfig

URI = "http://milvus:19530"
TOKEN = "nirvana:s3cret-Pa55word"


class _Index:
    """Stands for `MilvusIndex`: records how it was opened; `fail` makes the open raise an error echoing the token."""

    opened: ClassVar[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []
    fail = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Index.opened.append((args, kwargs))
        if _Index.fail:
            raise ConnectionError(f"auth refused for token={kwargs.get('token')}")
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_index(monkeypatch: pytest.MonkeyPatch) -> type[_Index]:
    _Index.opened, _Index.fail = [], False
    monkeypatch.setattr(connection_module, "MilvusIndex", _Index)
    return _Index


def _connection(config: CacheConfig) -> tuple[MilvusConnection, list[Any]]:
    published: list[Any] = []

    def publish(index: Any) -> bool:
        published.append(index)
        return True

    conn = MilvusConnection(
        config, 8, prepare=lambda index: None, discard=lambda: None, publish=publish, closed=threading.Event()
    )
    return conn, published


def _config(tmp_path: Path, token_file: Path | None) -> CacheConfig:
    return CacheConfig(dir=tmp_path / "cache", milvus_uri=URI, milvus_token_file=token_file)


def test_the_token_file_is_read_once_stripped_and_sent(tmp_path: Path, fake_index: type[_Index]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")  # as `kubectl create secret --from-file` or an editor may leave it
    conn, published = _connection(_config(tmp_path, token_file))
    token_file.unlink()  # read at construction: a reconnect does not need the file any more
    assert conn.connect() and conn.connect()
    assert [kwargs for _, kwargs in fake_index.opened] == [{"token": TOKEN}, {"token": TOKEN}]
    assert fake_index.opened[0][0][0] == URI and len(published) == 2


def test_without_a_token_file_no_credential_is_sent(tmp_path: Path, fake_index: type[_Index]) -> None:
    conn, _ = _connection(_config(tmp_path, None))
    assert conn.connect()
    assert fake_index.opened[0][1] == {"token": None}


def test_a_missing_token_file_is_an_error_naming_the_field_and_path(tmp_path: Path, fake_index: type[_Index]) -> None:
    missing = tmp_path / "absent" / "token"
    with pytest.raises(MilvusCredentialError, match=r"cache\.milvus_token_file: cannot read '.*absent/token'"):
        _connection(_config(tmp_path, missing))
    assert not fake_index.opened  # no attempt to connect without the credential


def test_an_empty_token_file_is_an_error_naming_the_field_and_path(tmp_path: Path, fake_index: type[_Index]) -> None:
    empty = tmp_path / "token"
    empty.write_text(" \n\t\n")
    with pytest.raises(MilvusCredentialError, match=rf"cache\.milvus_token_file: '{empty}' is empty"):
        _connection(_config(tmp_path, empty))
    assert read_milvus_token(None) is None


def test_the_token_never_reaches_the_log(
    tmp_path: Path, fake_index: type[_Index], caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    conn, published = _connection(_config(tmp_path, token_file))
    fake_index.fail = True
    with caplog.at_level(logging.DEBUG):
        assert not conn.connect()
    assert "unavailable" in caplog.text and "<milvus token>" in caplog.text
    assert TOKEN not in caplog.text and TOKEN.split(":", 1)[1] not in caplog.text
    assert not published


def test_the_token_reaches_the_pymilvus_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the real MilvusIndex down to pymilvus's `MilvusClient(uri, token=...)`."""
    clients: list[dict[str, Any]] = []

    class _Client:
        def __init__(self, uri: str, **kwargs: Any) -> None:
            clients.append({"uri": uri, **kwargs})

        def __getattr__(self, name: str) -> Any:
            raise ConnectionError("no Milvus here")  # any call: the open fails after the client is made

        def close(self) -> None:
            pass

    monkeypatch.setattr(index_module, "MilvusClient", _Client)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # connect() logs and swallows errors: open the index as it does, so that any error surfaces here.
    with pytest.raises(ConnectionError, match="no Milvus here"):
        index_module.MilvusIndex(URI, "c", 8, token=read_milvus_token(token_file))
    assert clients and clients[0]["uri"] == URI and clients[0]["token"] == TOKEN
