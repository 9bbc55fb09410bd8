"""The KV pool's blocks: who holds which, and the prefix cache.

A request holds the blocks it has filled or is filling (its block table). A full block whose tokens are
known is registered in the prefix cache under a key chained over the request's tokens,

    key(block j) = H(key(block j-1), tokens of block j, adapter)

so equal keys mean equal keys/values: a later request whose prompt starts with the same tokens takes the
blocks instead of computing them. Blocks are reference-counted; a block no request holds stays cached
(its contents intact) on an LRU list and is reused, oldest first, only when no never-cached block is free.
Block 0 is the pool's scratch block (model/network/kv_cache.py) and is never handed out.
"""

from __future__ import annotations

import collections
import hashlib

from model.network.kv_cache import SCRATCH


def block_key(prev: bytes | None, tokens, adapter=None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\0")
    h.update(repr(adapter).encode())
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.empty = collections.deque(b for b in range(num_blocks) if b != SCRATCH)  # free, nothing cached
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # free, cached; LRU first
        self.key_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self.empty) + len(self.evictable)

    @property
    def used(self) -> int:
        return self.usable - self.free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int:
        """A free block (never-cached ones first, then the least recently used cached one, which leaves the
        cache); the caller holds it."""
        if self.empty:
            b = self.empty.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.block_of[self.key_of.pop(b)]
        self.ref[b] = 1
        return b

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block; unreferenced cached blocks become evictable (most recently
        used last; a table's later blocks first, so a prefix's head outlives its tail), the others free."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self.evictable[b] = None
                else:
                    self.empty.append(b)

    def lookup(self, tokens: list[int], adapter=None) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding a prefix of `tokens` (full blocks only, and never all of `tokens`: the
        last token must be computed to give logits), taken by the caller, and their keys."""
        if not self.prefix_caching:
            return [], []
        n = (len(tokens) - 1) // self.block_size
        blocks, keys, prev = [], [], None
        for j in range(n):
            prev = block_key(prev, tokens[j * self.block_size:(j + 1) * self.block_size], adapter)
            b = self.block_of.get(prev)
            if b is None:
                break
            blocks.append(b)
            keys.append(prev)
        for b in blocks:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        self.query_tokens += len(tokens)
        self.hit_tokens += len(blocks) * self.block_size
        return blocks, keys

    def unlookup(self, blocks: list[int], tokens: int) -> None:
        """Undoes a `lookup` whose request did not start after all."""
        self.release(blocks)
        self.query_tokens -= tokens
        self.hit_tokens -= len(blocks) * self.block_size

    def register(self, blocks: list[int], keys: list[bytes], tokens: list[int], computed: int, adapter=None):
        """Registers the full blocks among the first `computed` tokens (whose keys/values are in `blocks`)
        that are not yet; `keys` (the chain so far) grows in place."""
        if not self.prefix_caching:
            return
        while len(keys) < computed // self.block_size:
            j = len(keys)
            key = block_key(keys[-1] if keys else None, tokens[j * self.block_size:(j + 1) * self.block_size],
                            adapter)
            keys.append(key)
            b = blocks[j]
            if key not in self.block_of and b not in self.key_of:
                self.block_of[key], self.key_of[b] = b, key

    def reset(self) -> None:
        """Forgets the cache (the pool's contents were lost); every block must have been released."""
        self.__init__(self.num_blocks, self.block_size, self.prefix_caching)

    def stats(self) -> dict:
        return {"blocks_total": self.usable, "blocks_used": self.used, "blocks_free": self.free,
                "blocks_cached": len(self.key_of), "block_size": self.block_size,
                "prefix_cache_hit_rate": self.hit_tokens / self.query_tokens if self.query_tokens else 0.0}
