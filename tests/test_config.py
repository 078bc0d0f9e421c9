"""Configuration is validated once, with errors that name the field and the value."""

import json

import pytest

from nirvana.config import ConfigError, load_config


def test_defaults_and_file_merge(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"checkpoint": "m", "cache": {"max_entries": 50, "selection": {"reference_steps": 40}}}))
    cfg = load_config({"cache": {"flush_interval_s": 2.5}}, path)
    assert cfg.cache.max_entries == 50 and cfg.cache.flush_interval_s == 2.5
    assert cfg.cache.selection.selector().k_opt(0.96, 40) == 25
    assert cfg.cache.resolved_milvus_uri.endswith("milvus.db")


def test_toml_file(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('checkpoint = "m"\n[cache]\nthresholds_note = 1\n')
    with pytest.raises(ConfigError, match=r"cache\.thresholds_note"):
        load_config(path=path)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"cache": {"max_entries": 0}}, "cache.max_entries=0"),
        ({"cache": {"milvus_uri": "ftp://x"}}, "cache.milvus_uri='ftp://x'"),
        ({"cache": {"selection": {"thresholds": [[0.5, 5], [0.9, 20]]}}}, "0.9"),
        ({"cache": {"max_entries": 3}}, "max_entries=3 is smaller"),
        ({"embedder": "word2vec"}, "embedder='word2vec'"),
        ({"cache": {"latent_dtype": "int8"}}, "cache.latent_dtype='int8'"),
        ({"default_steps": -1}, "default_steps=-1"),
    ],
)
def test_bad_values_are_named(data, needle) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"checkpoint": "m", **data})
    assert needle in str(err.value)


def test_unreadable_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json"):
        load_config(path=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid json"):
        load_config(path=bad)
