"""The running queue as one decode batch kept from step to step, for the bookkeeping of steady decoding.

Most decode steps run the same sequences as the step before, each one token longer. The
scheduler's general loops then read and write every sequence's fields, row by row, for the same
arithmetic on every row; at batch 256 that host time is several times the rest of the step's.
While no sequence joins or leaves the running queue, :class:`DecodeLanes` keeps each sequence's
counts in arrays, one lane per sequence in batch order, and does that arithmetic once per step:

    lane:            0     1     2    ...  255
    num_tokens:    1031  1280  1152  ...   999   tokens, the newest (sampled, maybe still pending) included
    num_slots:     1280  1280  1280  ...  1024   KV slots the blocks hold: len(block_table) * block_size
    max_num_tokens 1415  2046  1300  ...  1810   the length at which max_tokens ends it

    a lane needs a new block when num_tokens > num_slots       (lane 1 above)
    a lane fills a block when its computed count, num_tokens - 1, is a multiple of block_size

Anything else (a sequence that joins, is preempted or asks for logprobs, a stop token in the
samples) goes back to the scheduler's general loops; once a sequence ends or joins, the lanes are
rebuilt for the running queue the next step schedules.
"""

from collections import deque
from itertools import repeat
from operator import setitem

import numpy as np

from nanovllm.engine.sequence import PENDING_TOKEN, Sequence


class DecodeLanes:
    def __init__(self, seqs: list[Sequence], block_size: int, eos_token_ids: set[int]) -> None:
        num_lanes = len(seqs)
        params = [seq.params for seq in seqs]
        self.seqs = seqs  # the running sequences, oldest first: each decode batch of these lanes holds this list
        self.block_size = block_size
        self.token_lists = [seq.token_ids for seq in seqs]  # each sequence's own token list
        # [B] int64 each; built once per change of the running queue, so with iterators rather than lists
        self.num_tokens = np.fromiter(map(len, self.token_lists), np.int64, num_lanes)
        self.num_slots = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, num_lanes) * block_size
        self.max_num_tokens = np.fromiter(
            (seq.num_prompt_tokens + seq.params.max_tokens for seq in seqs), np.int64, num_lanes
        )  # the length at which max_tokens ends each sequence
        self.rows = list(range(num_lanes))  # every row samples a real token: advance()'s answer
        self.num_new_tokens = [1] * num_lanes  # one token each: every batch's num_new_tokens
        # Sampled tokens that may end a row (EOS where not ignored, stop_token_ids): a step that samples
        # none of them ends no row, which record() checks with one set operation instead of a loop.
        self.stop_token_ids: set[int] = set().union(*[p.stop_token_ids for p in params if p.stop_token_ids])
        if not all(p.ignore_eos for p in params):
            self.stop_token_ids |= eos_token_ids
        self.has_logprobs = any(p.logprobs is not None for p in params)  # the general loop records them
        self.ended_lanes: list[int] = []  # lanes the last advance() ended by length

    def lanes_without_slot(self) -> list[int]:
        """Lanes whose newest token begins a block they do not have yet."""
        return np.flatnonzero(self.num_tokens > self.num_slots).tolist()

    def advance(self) -> tuple[list[int], list[int]]:
        """A decode step of these lanes was launched: each sequence computed its newest token and holds a
        PENDING_TOKEN for the one it samples. Returns the lanes whose computed tokens now fill a block, and
        those whose new token reaches max_tokens (the scheduler ends them; these lanes are then done)."""
        for seq, token_ids in zip(self.seqs, self.token_lists, strict=True):
            seq.num_computed_tokens += 1
            token_ids.append(PENDING_TOKEN)
        self.num_tokens += 1
        full_block_lanes = np.flatnonzero((self.num_tokens - 1) % self.block_size == 0).tolist()
        self.ended_lanes = np.flatnonzero(self.num_tokens >= self.max_num_tokens).tolist()
        return full_block_lanes, self.ended_lanes

    def record(self, token_ids: list[int]) -> bool:
        """Put each lane's sample in place of its PENDING_TOKEN; False if one may end its sequence (a stop token)
        or logprobs were asked, which the general loop then records (putting the same tokens again)."""
        # map() in a zero-length deque: the per-row assignment runs in C, with no Python loop.
        deque(map(setitem, self.token_lists, repeat(-1), token_ids), maxlen=0)
        return not self.has_logprobs and self.stop_token_ids.isdisjoint(token_ids)
