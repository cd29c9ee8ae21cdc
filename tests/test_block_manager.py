"""Block manager unit tests: no model, no GPU."""

from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.sequence import Sequence

BLOCK_SIZE = 16


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence(token_ids, SamplingParams())


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    """Pretend a forward pass computed every token's KV, as the scheduler's postprocess records it."""
    seq.num_computed_tokens = seq.num_tokens
    manager.register_computed(seq)


def test_allocate_gives_enough_blocks_and_free_returns_them() -> None:
    """Guards against off-by-one block counts (a token without a slot) and leaked blocks."""
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(33)))  # 2 full blocks + 1 token
    manager.allocate(seq)
    assert len(seq.block_table) == 3, seq.block_table
    assert manager.num_free_blocks == 5
    manager.free(seq)
    assert manager.num_free_blocks == 8
    assert seq.block_table == [] and seq.num_computed_tokens == 0


def test_blocks_register_only_after_compute() -> None:
    """Guards against registering a block's hash before its KV exists (a reader would see garbage)."""
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq(list(range(40)))
    manager.allocate(first)
    second = make_seq(list(range(40)))
    manager.allocate(second)  # same prompt, but nothing of the first is computed yet
    assert second.num_cached_tokens == 0, second.num_cached_tokens
    compute_all(manager, first)
    third = make_seq(list(range(40)))
    manager.allocate(third)
    assert third.num_cached_tokens == 2 * BLOCK_SIZE, third.num_cached_tokens
    assert third.block_table[:2] == first.block_table[:2], (third.block_table, first.block_table)
    assert manager.blocks[first.block_table[0]].ref_count == 2


def test_fully_cached_prompt_still_computes_its_last_block() -> None:
    """Guards against a zero-length query: a prompt of exactly k blocks, all cached, must compute something."""
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq(list(range(2 * BLOCK_SIZE)))
    manager.allocate(first)
    compute_all(manager, first)
    again = make_seq(list(range(2 * BLOCK_SIZE)))
    manager.allocate(again)
    assert again.num_computed_tokens == BLOCK_SIZE < again.num_tokens, again.num_computed_tokens


def test_freed_blocks_stay_cached_until_evicted_lru_first() -> None:
    """Guards against dropping a freed prefix at once, and against evicting the most recent prefix first."""
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    old = make_seq([1] * (BLOCK_SIZE + 1))
    manager.allocate(old)
    compute_all(manager, old)
    manager.free(old)
    new = make_seq([2] * (BLOCK_SIZE + 1))
    manager.allocate(new)
    compute_all(manager, new)
    manager.free(new)
    # Both prefixes are free yet findable. Taking two blocks evicts the old prefix's blocks first.
    taker = make_seq([3] * (BLOCK_SIZE + 1))
    manager.allocate(taker)
    old_again = make_seq([1] * (BLOCK_SIZE + 1))
    new_again = make_seq([2] * (BLOCK_SIZE + 1))
    assert manager._find_cached_prefix(old_again)[0] == [], "the least recently freed prefix should be evicted"
    assert len(manager._find_cached_prefix(new_again)[0]) == 1, "the recently freed prefix should survive"


def test_can_allocate_counts_cached_free_blocks_once() -> None:
    """Guards against over-committing: a cached block that is free cannot also serve as a fresh block."""
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_seq(list(range(2 * BLOCK_SIZE + 1)))
    manager.allocate(first)
    compute_all(manager, first)
    manager.free(first)
    same_prefix_longer = make_seq(list(range(2 * BLOCK_SIZE)) + [7] * (BLOCK_SIZE + 1))
    # Needs 4 blocks: 2 cached (free) + 2 new, but only 3 exist.
    assert not manager.can_allocate(same_prefix_longer)
    same_prefix = make_seq(list(range(2 * BLOCK_SIZE)) + [7])
    assert manager.can_allocate(same_prefix)
    manager.allocate(same_prefix)
    assert same_prefix.num_cached_tokens == 2 * BLOCK_SIZE


def test_append_slot_adds_a_block_only_at_a_block_boundary() -> None:
    """Guards against a decode token written past the end of its last block."""
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    seq = make_seq(list(range(BLOCK_SIZE)))
    manager.allocate(seq)
    compute_all(manager, seq)
    seq.token_ids.append(99)  # a sampled token at position BLOCK_SIZE needs a second block
    assert manager.can_append(seq)
    manager.append_slot(seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(100)
    manager.append_slot(seq)
    assert len(seq.block_table) == 2, "position BLOCK_SIZE + 1 still fits in the second block"


def test_hit_counter_and_disabled_caching() -> None:
    """Guards against a hit counter that lies, and against caching when it is turned off."""
    for enabled, expected_hits in ((True, BLOCK_SIZE), (False, 0)):
        manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=enabled)
        first = make_seq(list(range(BLOCK_SIZE + 4)))
        manager.allocate(first)
        compute_all(manager, first)
        second = make_seq(list(range(BLOCK_SIZE + 4)))
        manager.allocate(second)
        stats = manager.stats
        assert stats.num_hit_tokens == expected_hits, (enabled, stats)
        assert stats.num_queried_tokens == 2 * (BLOCK_SIZE + 4), stats
