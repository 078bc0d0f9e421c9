"""`nirvana-client`: send requests to a running nirvana-triton server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nirvana_client.client import GenerateOptions, NirvanaClient

app = typer.Typer(help="Client for a nirvana-triton server (Triton gRPC/HTTP).", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Client for a nirvana-triton server (Triton gRPC/HTTP)."""


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text prompt.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write.")] = Path("out.png"),
    url: Annotated[str, typer.Option(help="host:port of Triton (gRPC 8001, HTTP 8000 by default).")] = "",
    protocol: Annotated[str, typer.Option(help="grpc or http")] = "grpc",
    negative_prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    cache_mode: Annotated[str | None, typer.Option(help="auto | bypass | refresh")] = None,
    tenant: str | None = None,
) -> None:
    """Generate one image and print hit / skipped steps / similarity / latency."""
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    url = url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000")
    client = NirvanaClient(url, protocol)  # type: ignore[arg-type]
    try:
        res = client.generate(prompt, GenerateOptions(negative_prompt, seed, steps, guidance, cache_mode, tenant))
    except InferenceServerException as err:
        typer.echo(f"error: {err.message()}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
    Image.fromarray(res.image).save(out)
    typer.echo(
        f"{out}: hit={res.cache_hit} skipped_steps={res.skipped_steps} "
        f"similarity={res.similarity:.3f} latency_ms={res.latency_ms:.1f}"
    )


if __name__ == "__main__":
    app()
