"""Host-side bookkeeping of the paged KV cache: which pages are free, shared or cached.

A page holds the K/V of `page_size` consecutive positions of one sequence, in every layer. Pages are
reference counted: a full page reached by the same tokens (and adapter) can be shared by several
sequences, found through `prefix_hashes` (a chain hash: page i's key covers all tokens up to the
end of page i, so equal keys mean equal K/V). A released page that has a key stays cached until a
new page is needed and it is the least recently used unreferenced one (vLLM's automatic prefix
caching). Shared pages are always full, and a sequence only writes past its shared prefix, so a
shared page is never written again (no copy-on-write needed).
"""
from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np


def chain_hash(parent: bytes, page_tokens: Sequence[int]) -> bytes:
    """The key of a page from the key of the page before it and its own tokens."""
    return hashlib.blake2b(parent + np.asarray(page_tokens, np.int64).tobytes(), digest_size=16).digest()


def root_hash(adapter: int = 0) -> bytes:
    """The parent of a sequence's first page: sequences under different adapters share nothing."""
    return int(adapter).to_bytes(8, "little", signed=True)


def extend_hashes(hashes: list[bytes], tokens: Sequence[int], page_size: int, full_pages: int, adapter: int = 0) -> None:
    """Append the keys of pages len(hashes) .. full_pages - 1 of `tokens` to `hashes`."""
    for i in range(len(hashes), full_pages):
        hashes.append(chain_hash(hashes[-1] if hashes else root_hash(adapter), tokens[i * page_size:(i + 1) * page_size]))


class PagePool:
    """Free list, reference counts and the prefix cache of `num_pages` pages."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.refs = np.zeros(num_pages, np.int32)
        self._free: collections.deque[int] = collections.deque(range(num_pages))  # never cached
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced; LRU first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.hit_tokens = 0  # prompt tokens found in the cache
        self.query_tokens = 0  # prompt tokens looked up

    @property
    def available(self) -> int:
        """Pages an allocation can get now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        return int(np.count_nonzero(self.refs))

    def allocate(self) -> int | None:
        """A page nobody references (evicting the least recently used cached one), or None."""
        if self._free:
            page = self._free.popleft()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of `hashes`, each now referenced once more."""
        pages = []
        if self.prefix_caching:
            for h in hashes:
                page = self._by_hash.get(h)
                if page is None:
                    break
                self._evictable.pop(page, None)
                self.refs[page] += 1
                pages.append(page)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Page `page` now holds the K/V that `key` names (it is full and will not change)."""
        if self.prefix_caching and key not in self._by_hash and page not in self._hash_of:
            self._by_hash[key] = page
            self._hash_of[page] = key

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced ones become free (or evictable when cached).
        Released last-page-first, so a sequence's tail is evicted before its shared head."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise RuntimeError(f"page {page} released more often than it was taken")
            if self.refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def reset_prefix_cache(self) -> None:
        for page in list(self._evictable):
            self._free.append(page)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()
