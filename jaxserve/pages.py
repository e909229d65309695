"""PageAllocator: which KV-cache page belongs to whom. Free list, ref counts, prefix-cache hashes.

Host side, plain Python (no jax). The Scheduler owns one; the device cache only ever sees page ids.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

import numpy as np


def hash_page(parent_hash: int | None, token_ids: Seq[int], lora_int_id: int = 0) -> int:
    """Content hash of one full page, chained over its parent page's hash (None for the first page).

    The first page of a LoRA adapter's sequence (lora_int_id > 0) also hashes the adapter, so
    no page is ever shared between adapters (their K/V differ). 128 bits of sha256:
    deterministic across processes and collision-free in practice.
    """
    h = hashlib.sha256()
    h.update(b"root" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    if parent_hash is None and lora_int_id:
        h.update(b"lora" + lora_int_id.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest()[:16], "little")


class PageAllocator:
    """Pool of `num_pages` KV pages of `page_size` slots each, with automatic prefix caching.

    Every page is in exactly one state:
      free       ref 0, no hash           -> in `_free` (FIFO)
      evictable  ref 0, holds a hash      -> in `_evictable` (LRU first); reusable by prefix hits
      used       ref > 0 (hash optional)  -> owned by one or more sequences
    `allocate` takes free pages first, then evicts the least recently freed cached pages.
    A full page is cached under `hash_page(parent_hash, its tokens)`; only full pages are ever
    shared, and nobody writes to a full page, so sharing needs no copy-on-write.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"{num_pages=} must be >= 1")
        if page_size < 1:
            raise ValueError(f"{page_size=} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._hash: list[int | None] = [None] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._page_of_hash: dict[int, int] = {}

    # ---- queries ----------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages `allocate` can hand out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages currently registered in the prefix cache (used or evictable)."""
        return len(self._page_of_hash)

    @property
    def usage(self) -> float:
        """Fraction of pages held by at least one sequence (0.0 .. 1.0)."""
        return 1.0 - self.num_free_pages / self.num_pages

    def ref_count(self, page_id: int) -> int:
        return self._ref[page_id]

    def page_hash(self, page_id: int) -> int | None:
        """The prefix-cache hash a page is registered under, or None."""
        return self._hash[page_id]

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free_pages

    def match_prefix(self, token_ids: Seq[int], lora_int_id: int = 0) -> list[int]:
        """Longest chain of cached full pages that prefixes `token_ids`, as page ids.

        Never covers the whole sequence: at least one token is left to compute, so the step that
        finishes the prompt has logits to sample from. Does not acquire the pages (see `acquire`).
        """
        if not self.enable_prefix_caching:
            return []
        ps = self.page_size
        pages: list[int] = []
        parent = None
        for i in range((len(token_ids) - 1) // ps):
            parent = hash_page(parent, token_ids[i * ps:(i + 1) * ps], lora_int_id)
            page = self._page_of_hash.get(parent)
            if page is None:
                break
            pages.append(page)
        return pages

    # ---- mutations --------------------------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        """Hand out `num` pages with ref count 1; evicts LRU cached pages when the free list is short."""
        if num > self.num_free_pages:
            raise RuntimeError(f"cannot allocate {num=} pages, only {self.num_free_pages} free")
        pages = []
        for _ in range(num):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of_hash[self._hash[page]]
                self._hash[page] = None
            self._ref[page] = 1
            pages.append(page)
        return pages

    def acquire(self, pages: Seq[int]) -> None:
        """Take one more reference on pages found by `match_prefix` (they may be evictable)."""
        for page in pages:
            assert self._hash[page] is not None, f"acquire of uncached page {page}"
            if self._ref[page] == 0:
                del self._evictable[page]
            self._ref[page] += 1

    def free(self, pages: Seq[int]) -> None:
        """Drop one reference per page. Unreferenced cached pages become evictable, others free.

        Walks the pages back to front so a sequence's tail pages (least likely to be shared)
        are the first to be evicted.
        """
        for page in reversed(pages):
            assert self._ref[page] > 0, f"double free of page {page}"
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if self._hash[page] is None:
                    self._free.append(page)
                else:
                    self._evictable[page] = None

    def register_full_page(self, page_id: int, parent_hash: int | None,
                           token_ids: Seq[int], lora_int_id: int = 0) -> int:
        """Record that `page_id` now holds the K/V of `token_ids` (a full page) after `parent_hash`.

        Returns the page's hash (the parent hash for the next page). If another page already
        holds the same content, this page stays unregistered; the hash is still returned.
        """
        assert len(token_ids) == self.page_size, f"{len(token_ids)=} != {self.page_size=}"
        assert self._ref[page_id] > 0, f"register of unowned page {page_id}"
        h = hash_page(parent_hash, token_ids, lora_int_id)
        if not self.enable_prefix_caching:
            return h
        if self._hash[page_id] is not None:
            assert self._hash[page_id] == h, f"page {page_id} re-registered with other content"
        elif h not in self._page_of_hash:
            self._hash[page_id] = h
            self._page_of_hash[h] = page_id
        return h

    def reset_prefix_cache(self) -> None:
        """Forget every cached page that nobody holds (evictable pages become free)."""
        while self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of_hash[self._hash[page]]
            self._hash[page] = None
            self._free.append(page)

    def check_integrity(self) -> None:
        """Assert the bookkeeping invariants; raises AssertionError naming the broken one."""
        free, evictable = set(self._free), set(self._evictable)
        used = {p for p in range(self.num_pages) if self._ref[p] > 0}
        assert len(free) == len(self._free), f"duplicate pages in free list: {list(self._free)}"
        assert all(r >= 0 for r in self._ref), f"negative ref counts: {self._ref}"
        assert not free & evictable, f"pages both free and evictable: {free & evictable}"
        assert not (free | evictable) & used, f"free pages with refs: {(free | evictable) & used}"
        assert len(free) + len(evictable) + len(used) == self.num_pages, (
            f"free {len(free)} + evictable {len(evictable)} + used {len(used)}"
            f" != total {self.num_pages}")
        assert all(self._hash[p] is None for p in free), "free page still holds a hash"
        assert all(self._hash[p] is not None for p in evictable), "evictable page without hash"
        for h, page in self._page_of_hash.items():
            assert self._hash[page] == h, f"hash map points at page {page} with another hash"
        num_hashed = sum(h is not None for h in self._hash)
        assert num_hashed == len(self._page_of_hash), (
            f"{num_hashed} pages hold hashes but the map has {len(self._page_of_hash)}")
