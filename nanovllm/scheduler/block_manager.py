"""Fixed-size KV-cache blocks with reference counts and prefix caching.

The KV cache is cut into blocks of ``block_size`` token slots. Each sequence owns a list
of block ids (its block table). Two sequences whose prompts start with the same tokens can
share the blocks of that prefix: every *full*, *computed* block is registered under a
chained hash of its tokens,

    hash(block i) = xxh64(hash(block i-1) || token ids of block i)

so a hash names the whole prefix up to and including the block, not just its own tokens. The first block's
parent is the sequence's LoRA adapter's hash (:func:`root_hash`): one prompt under two adapters never shares KV.
A freed block keeps its hash and stays findable until it is handed out again; free blocks
are handed out least recently freed first, so the prefixes used last survive longest.
"""

import struct
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from nanovllm.outputs import PrefixCacheStats
from nanovllm.scheduler.sequence import Sequence

NO_PARENT_HASH = 0  # the "previous block hash" fed to the first block of a base-model sequence
LORA_HASH_TAG = b"lora"  # prefixed to an adapter id when it is hashed into a first block's parent


@dataclass
class Block:
    block_id: int  # index into the KV cache's first dimension
    ref_count: int = 0  # sequences whose block table holds this block
    hash: int | None = None  # chained prefix hash, set once the block is full and its KV computed
    token_ids: tuple[int, ...] = ()  # the tokens behind ``hash``, to rule out hash collisions


def chain_hash(parent_hash: int, token_ids: list[int]) -> int:
    """The prefix hash of a block: its parent's hash followed by its own token ids (8 bytes each, little-endian).

    struct packs a list of ints twice as fast as array("q", ...): decode steps hash a block on most steps.
    """
    return xxhash.xxh64_intdigest(struct.pack(f"<Q{len(token_ids)}q", parent_hash, *token_ids))


def root_hash(seq: Sequence) -> int:
    """The "previous block hash" of a sequence's first block: its LoRA adapter's, or NO_PARENT_HASH."""
    if seq.lora_request is None:
        return NO_PARENT_HASH
    return xxhash.xxh64_intdigest(LORA_HASH_TAG + struct.pack("<q", seq.lora_request.lora_int_id))


class BlockManager:
    """Hands out KV-cache blocks to sequences and finds cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Free blocks in the order they were freed: the first is the least recently used.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Block ids and hashes of the longest run of the sequence's leading blocks found in the cache.

        Only blocks that end before the last token count: the last token is always computed,
        so that the step that finishes a prompt has a query to sample from.
        """
        if not self.enable_prefix_caching:
            return [], []
        block_ids: list[int] = []
        hashes: list[int] = []
        parent = root_hash(seq)
        for block_idx in range((seq.num_tokens - 1) // self.block_size):
            token_ids = seq.block_token_ids(block_idx, self.block_size)
            parent = chain_hash(parent, token_ids)
            block_id = self.hash_to_block_id.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return block_ids, hashes

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of the sequence's tokens can be had now."""
        cached_ids, _ = self._find_cached_prefix(seq)
        num_new = seq.num_blocks_needed(self.block_size) - len(cached_ids)
        num_cached_but_free = sum(1 for block_id in cached_ids if self.blocks[block_id].ref_count == 0)
        return self.num_free_blocks - num_cached_but_free >= num_new

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, "allocate() takes a sequence that holds no blocks"
        cached_ids, hashes = self._find_cached_prefix(seq)
        for block_id in cached_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
        seq.block_table = list(cached_ids)
        seq.block_hashes = hashes
        seq.num_cached_tokens = seq.num_computed_tokens = len(cached_ids) * self.block_size
        while len(seq.block_table) < seq.num_blocks_needed(self.block_size):
            seq.block_table.append(self._take_free_block())
        self.stats.num_queried_tokens += seq.num_tokens
        self.stats.num_hit_tokens += seq.num_cached_tokens

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token has a slot, or a free block can give it one."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the sequence's newest token has a slot: a new block when the last one is full."""
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_free_block())

    def register_computed(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose KV is now computed, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full_computed = seq.num_computed_tokens // self.block_size
        for block_idx in range(len(seq.block_hashes), num_full_computed):
            parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq)
            token_ids = seq.block_token_ids(block_idx, self.block_size)
            block_hash = chain_hash(parent, token_ids)
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_table[block_idx]]
            if block.hash is None and block_hash not in self.hash_to_block_id:
                block.hash, block.token_ids = block_hash, tuple(token_ids)
                self.hash_to_block_id[block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; cached ones stay findable until they are handed out again."""
        # Last block first, so a shared prefix is freed last and therefore evicted last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _take_free_block(self) -> int:
        """Hand out the least recently freed block, evicting its cached prefix if it had one."""
        if not self.free_block_ids:
            raise RuntimeError("no free KV-cache block; the scheduler must check can_allocate/can_append first")
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
