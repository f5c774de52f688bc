"""Reference-counted page manager over the paged KV pool (spec.PageLayout, kv_cache.PageAllocator).

A page id is shared by all layers. Pages carry a reference count so that several sequences can
share a prefix (`fork`); a page returns to the allocator when its last reference goes. The
operations the scheduler uses: can_allocate / allocate_for (grow a sequence's table to hold
n tokens), free (drop all of a sequence's references), and `check` for leak tests.

`first_page` reserves pool pages below it: the engine keeps page 0 as a scratch page that padded
rows of a CUDA-graph batch may write, so the pool tensor has num_pages + first_page pages.
"""
from __future__ import annotations

from ..kv_cache import KVPoolExhausted, PageAllocator
from .sequence import Sequence


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, first_page: int = 0):
        self.page_size = page_size
        self.first_page = first_page
        self.allocator = PageAllocator(num_pages)
        self.refcount = [0] * (num_pages + first_page)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs so its table covers `num_tokens` tokens."""
        return max(0, pages_for(num_tokens, self.page_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.pages_needed(seq, num_tokens) + reserve <= self.num_free

    def allocate_for(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover `num_tokens` tokens (all-or-nothing)."""
        n = self.pages_needed(seq, num_tokens)
        if n == 0:
            return
        pages = [p + self.first_page for p in self.allocator.allocate(n)]   # all-or-nothing
        for p in pages:
            self.refcount[p] = 1
        seq.block_table.extend(pages)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares the parent's full pages (read-only prefix); the partial last page, if
        any, is not shared (the child recomputes those tokens)."""
        if child.block_table:
            raise ValueError("fork target already owns pages")
        full = parent.num_computed // self.page_size
        for p in parent.block_table[:full]:
            self.refcount[p] += 1
        child.block_table = parent.block_table[:full]
        child.num_computed = full * self.page_size

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; pages whose count reaches 0 go back to the pool."""
        released = []
        for p in seq.block_table:
            if self.refcount[p] <= 0:
                raise RuntimeError(f"page {p} of {seq.request_id!r} has no reference to drop")
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                released.append(p)
        self.allocator.free([p - self.first_page for p in released])
        seq.block_table = []

    def check(self, live: list[Sequence] = ()) -> None:
        """Consistency: refcounts equal the references held by `live`, used pages == referenced.
        With no live sequences every page must be free (no leaks)."""
        want = [0] * (self.num_pages + self.first_page)
        for s in live:
            for p in s.block_table:
                want[p] += 1
        if want != self.refcount:
            bad = [i for i, (a, b) in enumerate(zip(want, self.refcount)) if a != b][:8]
            raise AssertionError(f"page refcounts disagree with live sequences at pages {bad}")
        used = sum(1 for c in self.refcount if c > 0)
        if used != self.num_used:
            raise AssertionError(f"{self.num_used} pages allocated but {used} referenced")


__all__ = ["BlockManager", "KVPoolExhausted", "pages_for"]
