"""The checkpoint's fingerprint: what makes a cached latent belong to one set of weights (in every cache key)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

__all__ = ["FINGERPRINT_CACHE", "fingerprint_checkpoint"]

# model_index.json and these folders, those present (SDXL's second encoder; SD 3's and FLUX's transformer, SD 3's
# T5): what diffusers loads. An absent folder adds nothing, so a UNet checkpoint's fingerprint is what it was.
COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
COMPONENT_FOLDERS += ("transformer", "text_encoder_3", "tokenizer_3")
# Every byte of every file is hashed (a sample let a same-size fine-tune be served the old model's latents); the
# digests are kept beside the checkpoint, keyed by (path, size, mtime_ns), so only a changed file is hashed again.
FINGERPRINT_CACHE = ".nirvana-fingerprint.json"
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


def _component_files(root: Path) -> list[Path]:
    files = [root / "model_index.json"]
    for component in COMPONENT_FOLDERS:
        # Hidden entries (e.g. huggingface_hub's .cache/) hold download metadata, not model content.
        files += sorted(
            p
            for p in (root / component).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    return files


def fingerprint_checkpoint(root: str | Path) -> str:
    """sha256 hex over every file of model_index.json and the component folders (five for SD 1.x/2.x, seven for
    SDXL and FLUX, nine for SD 3).

    Each file contributes its relative path, its size and the sha256 of all its bytes. The per-file digests are
    cached in `FINGERPRINT_CACHE` in the checkpoint folder, keyed by (path, size, mtime_ns): a file changed since
    (any of the three) is hashed again. Where the folder is read-only nothing is cached: every call hashes every
    file again (about 1 s per GB at the sha256 speed measured here). The cache file is only as trustworthy as the
    folder: whoever can write it can change the weights too.
    """
    root = Path(root)
    known = _read_digests(root)
    digests: dict[str, dict] = {}
    digest = hashlib.sha256()
    for file in _component_files(root):
        stat = file.stat()
        name = file.relative_to(root).as_posix()
        entry = known.get(name)
        if not (
            isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
        ):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256_of(file)}
        digests[name] = entry
        digest.update(f"{name}\0{stat.st_size}\0{entry['sha256']}\n".encode())
    if digests != known:
        _write_digests(root, digests)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_digests(root: Path) -> dict:
    try:
        data = json.loads((root / FINGERPRINT_CACHE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: hash everything
    return data.get("files", {}) if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}


def _write_digests(root: Path, digests: dict) -> None:
    temp = root / f".{FINGERPRINT_CACHE}.{secrets.token_hex(6)}.tmp"
    try:
        temp.write_text(json.dumps({"files": digests}, indent=1, sort_keys=True))
        os.replace(temp, root / FINGERPRINT_CACHE)
    except OSError as err:  # a read-only checkpoint: the next open hashes again
        temp.unlink(missing_ok=True)
        log.info("checkpoint fingerprint digests not cached in %s (%s): recomputed at each load", root, err)
