"""Every cached entry in LCBFU eviction order, kept up to date as entries come, go and are hit.

Eviction used to sort every entry each time the cache went over its budget, while the admission waited: its worst
admission took 0.3 s at 30k entries (`nirvana bench overhead`), and the sort grows with the cache. This keeps the
order instead, over every entry and per tenant partition (the per-tenant budget evicts inside one): a change costs
a few O(log n) steps, and choosing victims reads the order from its start, only as far as needed.

The order is the policy's (`LCBFUPolicy.victims`): each prompt's best `keep_per_prompt` entries are *kept* and come
after every other entry ("free"); within each class, `policy.eviction_order` (score = hits × K, then last access,
then prompt id and K). The key leaves out `hits` and `nbytes`, the policy's last tie-breaks: (prompt id, K) already
tells any two entries apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

from nirvana.cache.records import EntryMeta

OrderKey = tuple[int, float, int, int]  # (score, last_access, prompt_id, k)
_ALL = None  # the lists over every tenant


class EvictionOrder:
    """Entries by LCBFU order, over everything and per tenant. Not thread-safe: the mirror's lock guards it."""

    def __init__(self, keep_per_prompt: int) -> None:
        self.keep_per_prompt = keep_per_prompt
        self._lists: dict[tuple[str | None, bool], SortedList] = {}  # (tenant or _ALL, kept) → keys
        self._prompts: dict[int, tuple[str, dict[int, OrderKey]]] = {}  # prompt id → (tenant, K → key)

    def __len__(self) -> int:
        return sum(len(keys) for _, keys in self._prompts.values())

    def put(self, tenant: str, prompt_id: int, k: int, entry: EntryMeta) -> None:
        """Enter an entry, or move it after its hit count or last access changed."""
        tenant, keys = self._prompts.setdefault(prompt_id, (tenant, {}))
        self._unlist(tenant, keys)
        keys[k] = _key(prompt_id, k, entry)
        self._list(tenant, keys)

    def replace(self, tenant: str, prompt_id: int, entries: dict[int, EntryMeta]) -> None:
        """Replace all of a prompt's entries (a merge with what other replicas stored): listed once."""
        found = self._prompts.pop(prompt_id, None)
        if found is not None:
            self._unlist(*found)
        if entries:
            keys = _keys(prompt_id, entries)
            self._prompts[prompt_id] = (tenant, keys)
            self._list(tenant, keys)

    def put_many(self, prompts: Iterable[tuple[str, int, dict[int, EntryMeta]]]) -> None:
        """`replace` each (tenant, prompt id, entries), a prompt id given twice the last one (as in the mirror); into
        an empty order, one sort for all instead of an insertion per entry."""
        if self._prompts:
            for tenant, prompt_id, entries in prompts:
                self.replace(tenant, prompt_id, entries)
            return
        for tenant, prompt_id, entries in prompts:
            if entries:
                self._prompts[prompt_id] = (tenant, _keys(prompt_id, entries))
            else:
                self._prompts.pop(prompt_id, None)
        lists: dict[tuple[str | None, bool], list[OrderKey]] = {}
        for tenant, keys in self._prompts.values():
            for key, kept in self._classes(keys):
                lists.setdefault((_ALL, kept), []).append(key)
                lists.setdefault((tenant, kept), []).append(key)
        self._lists = {owner: SortedList(keys) for owner, keys in lists.items()}

    def remove(self, prompt_id: int, k: int) -> None:
        found = self._prompts.get(prompt_id)
        if found is None or k not in found[1]:
            return
        tenant, keys = found
        self._unlist(tenant, keys)
        del keys[k]
        if keys:
            self._list(tenant, keys)
        else:
            del self._prompts[prompt_id]

    def clear(self) -> None:
        self._lists, self._prompts = {}, {}

    def first(self, tenant: str | None = None) -> Iterator[tuple[int, int]]:
        """(prompt id, K) of the entries (of one tenant partition's, if given), the first to evict first. The caller
        holds the mirror's lock until it stops iterating."""
        free, kept = (self._lists.get((tenant, kept), ()) for kept in (False, True))
        return ((prompt_id, k) for _, _, prompt_id, k in itertools.chain(free, kept))

    def _classes(self, keys: dict[int, OrderKey]) -> Iterator[tuple[OrderKey, bool]]:
        """Each key of one prompt with whether it is kept (among the prompt's best `keep_per_prompt`)."""
        ordered = sorted(keys.values())
        cut = max(0, len(ordered) - self.keep_per_prompt)
        return ((key, i >= cut) for i, key in enumerate(ordered))

    def _list(self, tenant: str, keys: dict[int, OrderKey]) -> None:
        for key, kept in self._classes(keys):
            for owner in (_ALL, tenant):
                self._lists.setdefault((owner, kept), SortedList()).add(key)

    def _unlist(self, tenant: str, keys: dict[int, OrderKey]) -> None:
        for key, kept in self._classes(keys):
            for owner in (_ALL, tenant):
                order = self._lists[(owner, kept)]
                order.remove(key)
                if not order:
                    del self._lists[(owner, kept)]


def _key(prompt_id: int, k: int, entry: EntryMeta) -> OrderKey:
    return (entry.hits * k, entry.last_access, prompt_id, k)


def _keys(prompt_id: int, entries: dict[int, EntryMeta]) -> dict[int, OrderKey]:
    return {k: _key(prompt_id, k, entry) for k, entry in entries.items()}
