"""`nirvana` command line: generate in-process, export a model repository, calibrate the cache thresholds.

The development commands of `nirvana_dev` are registered too: `serve`, `demo`, `make-tiny-model` and `bench`.
They run tritonserver from the pytriton wheel, which only the `dev` extra installs (`pip install -e .[dev]`);
without it they stop with that instruction. The Docker image never uses them: there Triton is the image's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from nirvana.threads import set_thread_policy

set_thread_policy()  # before anything imports torch

import typer  # noqa: E402

from nirvana_cli.calibration.command import calibrate_cmd  # noqa: E402
from nirvana_cli.dev import register as register_dev_commands  # noqa: E402
from nirvana_cli.generate import generate  # noqa: E402
from nirvana_cli.support import CacheDir, ConfigFile, MilvusUri, console, engine_config, setup_logging  # noqa: E402

app = typer.Typer(help="NIRVANA approximate caching for Stable Diffusion, served by Triton.", no_args_is_help=True)
app.command("calibrate")(calibrate_cmd)
app.command()(generate)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="diffusers-format checkpoint folder.", exists=True)],
    out: Annotated[Path, typer.Option(help="Model repository to write.")],
    profile: Annotated[
        str, typer.Option(help="cpu: ONNX in python models; gpu: TensorRT plans (needs a GPU); torch: torch modules.")
    ] = "cpu",
    cache_dir: CacheDir = Path(".nirvana-cache"),
    milvus_uri: MilvusUri = None,
    config: ConfigFile = None,
    verbose: bool = False,
) -> None:
    """Export and check the sub-models and write a complete Triton model repository."""
    from nirvana_export.repository import PROFILES, write_repository

    setup_logging(verbose)
    if profile not in PROFILES:
        raise typer.BadParameter(f"profile={profile!r}: choose one of {PROFILES}")
    # The cache lives in CACHE_DIR/cache, beside what `nirvana serve` keeps in CACHE_DIR (repository, server copy).
    engine = engine_config(checkpoint, cache_dir / "cache", config, milvus_uri)
    write_repository(checkpoint, out, profile, engine.model_dump(mode="json"))
    console.print(f"model repository ({profile}) written to {out}")


register_dev_commands(app)


if __name__ == "__main__":
    app()
