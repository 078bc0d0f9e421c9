"""What every `nirvana` command shares: the console, logging set-up, JSON output and the common options."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console(stderr=True)

CacheDir = Annotated[Path, typer.Option(help="Cache directory: milvus-lite file and latent store.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="JSON or TOML EngineConfig file.", exists=True)]
MilvusUri = Annotated[
    str | None, typer.Option(help="Milvus server URI, e.g. http://host:19530 (default: a milvus-lite file).")
]


def setup_logging(verbose: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def emit(report: dict, json_path: Path | None) -> None:
    """Print a benchmark's figures and, when asked, write them as JSON."""
    text = json.dumps(report, indent=2)
    typer.echo(text)
    if json_path:
        json_path.write_text(text + "\n")


def engine_config(
    checkpoint: Path, cache_dir: Path, config: Path | None, milvus_uri: str | None = None, **overrides: Any
) -> Any:
    """The validated `EngineConfig` of a command: checkpoint, cache dir and Milvus URI over the `--config` file;
    a bad value is a usage error naming the field."""
    from nirvana.config import ConfigError, load_config

    cache: dict[str, str] = {"dir": str(cache_dir.resolve())}
    if milvus_uri:
        cache["milvus_uri"] = milvus_uri
    data: dict[str, Any] = {"checkpoint": str(checkpoint.resolve()), "cache": cache}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return load_config(data, config)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
