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

from nirvana_cli.calibrate import calibrate_cmd  # noqa: E402
from nirvana_cli.dev import register as register_dev_commands  # noqa: E402
from nirvana_cli.support import CacheDir, ConfigFile, MilvusUri, console, engine_config, setup_logging  # noqa: E402

app = typer.Typer(help="NIRVANA approximate caching for Stable Diffusion, served by Triton.", no_args_is_help=True)
app.command("calibrate")(calibrate_cmd)


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts, generated in order.")],
    checkpoint: Annotated[Path, typer.Option(help="diffusers-format checkpoint folder.", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Where PNGs are written.")] = Path("out"),
    cache_dir: CacheDir = Path(".nirvana-cache"),
    config: ConfigFile = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str = "",
    cache_mode: Annotated[str, typer.Option(help="auto | bypass | refresh")] = "auto",
    tenant: str = "default",
    scheduler: Annotated[str | None, typer.Option(help="auto, ddim, euler, euler_a, dpmpp")] = None,
    adapters_dir: Annotated[
        Path | None, typer.Option(help="Folder of LoRA adapters (<name>/pytorch_lora_weights.safetensors).")
    ] = None,
    lora: Annotated[str, typer.Option(help='Adapters and scales, e.g. "ink:0.8,glow:0.5" (with --adapters-dir).')] = "",
    verbose: bool = False,
) -> None:
    """Generate images in-process (no server) and show what the cache did for each prompt."""
    from PIL import Image

    from nirvana.adapters import AdapterError
    from nirvana.pipeline import Pipeline
    from nirvana.request import RequestError

    setup_logging(verbose)
    adapters = {"dir": str(adapters_dir.resolve())} if adapters_dir else None
    try:
        pipe = Pipeline(engine_config(checkpoint, cache_dir, config, scheduler=scheduler, adapters=adapters))
    except AdapterError as err:
        raise typer.BadParameter(str(err), param_hint="--adapters-dir") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for i, prompt in enumerate(prompts):
            try:
                res = pipe.generate(
                    prompt,
                    negative_prompt=negative_prompt,
                    seed=seed,
                    steps=steps,
                    guidance=guidance,
                    cache_mode=cache_mode,
                    tenant=tenant,
                    lora=lora,
                )
            except RequestError as err:
                raise typer.BadParameter(str(err)) from None
            path = out_dir / f"{i:03d}.png"
            Image.fromarray(res.image).save(path)
            hit = f"HIT K={res.skipped_steps} from {res.matched_prompt!r}" if res.cache_hit else f"miss ({res.reason})"
            sim = "-" if res.similarity != res.similarity else f"{res.similarity:.3f}"  # NaN: no search ran
            console.print(f"{path}  similarity={sim}  {hit}  {res.timings_ms['total_ms']:.0f} ms")
    finally:
        pipe.close()


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
