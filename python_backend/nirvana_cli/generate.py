"""`nirvana generate`: images in-process (no server), with what the cache did for each prompt. Its own module so
that `nirvana demo --in-process` (`nirvana_cli.dev`) calls it without importing the CLI's entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nirvana_cli.support import CacheDir, ConfigFile, console, engine_config, setup_logging


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

    from nirvana.addons.lora import AdapterError
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
