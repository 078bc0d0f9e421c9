"""Served ControlNets in a repository: ``unet_control`` (the checkpoint's UNet with residual inputs) and a
``controlnet_<name>`` model per folder of the configuration's ``controlnets.dir``, each exported to ONNX, checked
against its torch module, and laid out with a config rendered from `nirvana.contract.controlnet`.

Each is a model of its own (own instance group, dynamic batching like the ``unet``): a ControlNet can be given more
instances, or other GPUs, than the UNet it feeds — the split SwiftDiffusion serves ControlNets with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from nirvana.addons.controlnet import ControlNetCatalog, ControlNetError
from nirvana.addons.controlnet_graphs import ControlNetGraph, UNetControlGraph
from nirvana.checkpoint import load_checkpoint, load_checkpoint_info
from nirvana.contract.controlnet import CONTROLNET_PREFIX, UNET_CONTROL_MODEL, control_specs
from nirvana.contract.specs import ModelSpec
from nirvana_export.onnx_export import TOLERANCES, check_graph, export_graph

__all__ = [
    "control_model_specs",
    "export_control_models",
    "remove_stale",
    "served_controlnets",
]


def control_model_specs(
    checkpoint_dir: Path, controlnets_dir: Path, unet_max_batch: int
) -> tuple[dict[str, ModelSpec], dict[str, str]]:
    """The specs of ``unet_control`` and of each ControlNet in ``controlnets_dir``, and each ControlNet's digest."""
    checkpoint = load_checkpoint_info(checkpoint_dir)
    catalog = ControlNetCatalog(controlnets_dir, checkpoint.image_size)
    if not catalog.folders:
        raise ControlNetError(f"controlnets folder {controlnets_dir} holds no ControlNet (<name>/config.json)")
    return control_specs(checkpoint, catalog.folders, unet_max_batch), catalog.digests


def served_controlnets(
    checkpoint_dir: Path, engine_config: dict, unet_max_batch: int
) -> tuple[dict[str, ModelSpec], dict]:
    """The served ControlNets' specs and what the repository manifest stamps of them (folder, weight digests);
    none without a ``controlnets.dir`` in the engine configuration."""
    folder = (engine_config.get("controlnets") or {}).get("dir")
    if not folder:
        return {}, {}
    specs, digests = control_model_specs(checkpoint_dir, Path(folder), unet_max_batch)
    return specs, {"dir": str(Path(folder).resolve()), "digests": digests}


def remove_stale(out: Path) -> None:
    """Remove every served-ControlNet model from a repository (a configuration without them must not serve them)."""
    shutil.rmtree(out / UNET_CONTROL_MODEL, ignore_errors=True)
    for folder in out.glob(CONTROLNET_PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def export_control_models(
    checkpoint_dir: Path, controlnets_dir: Path, specs: dict[str, ModelSpec], staging: Path
) -> dict[str, Path]:
    """Export and check every model of ``specs`` to ``staging/<name>/model.onnx``; returns name → file."""
    from diffusers import ControlNetModel

    catalog_root = Path(controlnets_dir)
    paths = {}
    for name, spec in specs.items():
        if name == UNET_CONTROL_MODEL:
            graph: nn.Module = UNetControlGraph(load_checkpoint(checkpoint_dir).unet)
        else:
            folder = catalog_root / name.removeprefix(CONTROLNET_PREFIX)
            graph = ControlNetGraph(ControlNetModel.from_pretrained(folder, local_files_only=True))
        graph = graph.eval()
        path = export_graph(graph, spec, staging / name / "model.onnx")
        check_graph(graph, spec, path, *TOLERANCES["unet"])
        paths[name] = path
    return paths
