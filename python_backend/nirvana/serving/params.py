"""What a python model reads from Triton's `initialize` arguments: its parameters and the engine config path."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def engine_config_path(args: dict[str, Any], params: dict[str, str]) -> Path:
    """The `engine_config` parameter, relative to this model's directory (`cache` reads the `nirvana` model's)."""
    path = Path(params.get("engine_config", "engine.json"))
    return path if path.is_absolute() else Path(args["model_repository"]) / path


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The `parameters` of a config.pbtxt (as Triton passes it, JSON-decoded): name → string value."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
