"""`nirvana-client generate --stream`: a rich progress bar over the streamed events, previews written as PNGs."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nirvana_client.client import GenerateOptions, GenerateResult, NirvanaClient
from nirvana_client.stream import StreamEvent, generate_stream


def cache_line(data: dict) -> str:
    """The cache event in a few words: `hit K=10 sim=0.962` or `miss (below-threshold)`."""
    if data["hit"]:
        return f"hit K={data['skipped_steps']} sim={data['similarity']:.3f}"
    return f"miss ({data['reason']})"


def generate_with_progress(
    client: NirvanaClient,
    prompt: str,
    options: GenerateOptions,
    previews: Path | None = None,
    preview_every: int = 1,
) -> tuple[GenerateResult, list[StreamEvent]]:
    """Stream one request, showing the steps as they run; previews (one PNG each, `step-<i>.png`) go to `previews`."""
    from PIL import Image

    if previews is not None:
        previews.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("waiting for the cache", total=None)

        def show(event: StreamEvent) -> None:
            if event.event == "cache":
                k, steps = event.data["skipped_steps"], event.data["steps"]
                bar.update(task, description=cache_line(event.data), total=steps, completed=k)
            elif event.event == "progress":
                bar.update(task, completed=event.data["step"])
                if event.preview is not None and previews is not None:
                    Image.fromarray(event.preview).save(previews / f"step-{event.data['step']:03d}.png")

        return generate_stream(client, prompt, options, preview_every if previews else 0, on_event=show)
