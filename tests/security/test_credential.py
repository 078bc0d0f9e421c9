"""The internal credential: read from a file, generated owner-only, compared in constant time, never shadowed."""

from __future__ import annotations

import stat

import pytest

from nirvana.security.credential import (
    INTERNAL_PARAMETER,
    CredentialError,
    DuplicateParameterError,
    carries_secret,
    ensure_secret_file,
    read_parameters,
    read_secret,
)


def test_a_generated_secret_is_owner_only_and_kept(tmp_path) -> None:
    path = ensure_secret_file(tmp_path / "deep" / "internal.secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = read_secret(path)
    assert len(secret) == 64 and read_secret(ensure_secret_file(path)) == secret  # not replaced on the next start


def test_an_unusable_secret_file_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(CredentialError, match=r"security\.internal_secret_file=.*cannot be read"):
        read_secret(tmp_path / "absent")
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(CredentialError, match="holds 4 characters"):
        read_secret(short)


def test_only_the_exact_secret_is_carried() -> None:
    secret = "s" * 32
    assert carries_secret({INTERNAL_PARAMETER: secret}, secret)
    for sent in ({}, {INTERNAL_PARAMETER: "s" * 31}, {INTERNAL_PARAMETER: 5}, {"other": secret}):
        assert not carries_secret(sent, secret)


def test_parameters_named_twice_are_refused() -> None:
    assert read_parameters('{"a": "1"}') == {"a": "1"} and read_parameters("") == {} and read_parameters("[1]") == {}
    with pytest.raises(DuplicateParameterError, match="'a'"):
        read_parameters('{"a": "1", "a": "2"}')
