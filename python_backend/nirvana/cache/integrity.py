"""Which latent a cache entry may serve, and how a hit names the entry so that a bad latent can be removed later.

A latent is served only if its blob is intact, bound to the entry's row, cache key, tenant partition and K
(`latents.Binding`: a blob copied or written under another row's key is refused), finite, and shaped as the request
needs (`load_checked`). A hit names its entry by blob key and the first 16 hex digits of the tensors' digest
(`entry_id`), so `ApproximateCache.invalidate` removes exactly the latent that served the hit: an id is only
accepted in the form a lookup gives (`parse_entry_id`), and an entry rewritten since (a refresh) is left alone
(`still_served`), since its new latent is not the one that failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nirvana.cache.latents import Binding, BlobCorrupt, BlobMissing, LatentBlob, LatentStore
from nirvana.cache.records import PromptRecord, blob_key
from nirvana.cache.validation import check_latents

# blob key . tensors' digest prefix; K only as `blob_key` writes it (no leading zero), so one entry has one id
_ENTRY_ID_RE = re.compile(r"([0-9a-f]{16})-k([1-9][0-9]{0,4})\.([0-9a-f]{16})")


@dataclass(frozen=True)
class EntryRef:
    """One cached latent as an entry id names it: row, K and the digest prefix of the tensors that served."""

    row_id: int
    k: int
    digest: str

    @property
    def key(self) -> str:
        return blob_key(self.row_id, self.k)


def load_checked(
    latents: LatentStore, record: PromptRecord, k: int, expected_shapes: dict[str, tuple[int, ...]] | None
) -> LatentBlob:
    """The entry's latent; BlobMissing, BlobCorrupt (damaged or bound elsewhere) or InvalidLatent (non-finite, or
    shaped other than `expected_shapes`) if it must not be served."""
    blob = latents.get(blob_key(record.id, k), expect=Binding(record.id, record.cache_key, record.tenant, k))
    check_latents(blob.tensors, expected_shapes)
    return blob


def entry_id(row_id: int, k: int, blob: LatentBlob) -> str:
    return f"{blob_key(row_id, k)}.{blob.digest[:16]}"


def parse_entry_id(value: object) -> EntryRef:
    """ValueError unless `value` is an id in the form `entry_id` gives."""
    found = _ENTRY_ID_RE.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError(f"not a cache entry id: {str(value)[:80]!r}")
    row, k, digest = found.groups()
    return EntryRef(int(row, 16), int(k), digest)


def still_served(latents: LatentStore, ref: EntryRef) -> bool:
    """Whether the latent stored for `ref` is still the one it names: False once rewritten since; True if gone or
    damaged (the entry is unusable all the same)."""
    try:
        return latents.get(ref.key).digest[:16] == ref.digest
    except (BlobMissing, BlobCorrupt):
        return True
