"""Model families: which diffusers pipeline a checkpoint folder is, from its ``model_index.json`` ``_class_name``.

The UNet families' code is in the engine's top-level modules (`checkpoint`, `sdxl`); the transformer (DiT,
flow-matching) families' in `nirvana.dit`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DIT", "FAMILIES", "CheckpointError", "model_family"]


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete or malformed; the message names the folder or file."""


# model_index.json's `_class_name` -> family. SD 1.x and 2.x share one pipeline class (2.x differs in its text
# encoder, resolution and, for 768 px, v-prediction, all read from the component configs).
# SD 3.x and FLUX.1 are the transformer (flow-matching) families: `nirvana.dit`.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
_FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD 3.x", "flux": "FLUX.1"}
DIT = frozenset({"sd3", "flux"})
# Families people will try, refused with what they are rather than a failure deep in a component loader.
_KNOWN_UNSUPPORTED = {
    "PixArtAlphaPipeline": "PixArt-α",
    "StableCascadeCombinedPipeline": "Stable Cascade",
}


def model_family(root: Path, index: dict) -> str:
    """The family of a checkpoint from its ``model_index.json`` ``_class_name``; refuses one this server cannot run,
    naming it (a folder without the field is taken for SD 1.x, as diffusers itself does for old folders)."""
    name = index.get("_class_name", "StableDiffusionPipeline")
    if name in FAMILIES:
        return FAMILIES[name]
    what = _KNOWN_UNSUPPORTED.get(name, "an unknown model family")
    supported = ", ".join(f"{cls} ({_FAMILY_NAMES[family]})" for cls, family in FAMILIES.items())
    raise CheckpointError(
        f"{root / 'model_index.json'}: _class_name {name!r} is {what}, which this server does not run; "
        f"supported: {supported}"
    )
