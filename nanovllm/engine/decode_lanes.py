"""The running queue as one decode batch kept from step to step, for the bookkeeping of steady decoding.

Most decode steps run the same sequences as the step before, each one token longer. The
scheduler's general loops then read and write every sequence's fields, row by row, for the same
arithmetic on every row; at batch 256 that host time is several times the rest of the step's.
While no sequence joins or leaves the running queue, :class:`DecodeLanes` keeps one lane per
sequence, in batch order. Each step adds one token to every lane, so which lanes cross a block
boundary, and when one ends by length, is known from the counts the lanes start with:

    lane:              0     1     2    ...  255
    num_tokens:      1031  1281  1152   ...   999   when built; the newest (sampled, maybe pending) included
    phase:            250     0   129   ...    26   (1 - num_tokens) % block_size, for block_size 256
    num_steps_to_end: 384   765   148   ...   811   max_num_tokens - num_tokens: advances until max_tokens ends it

    after num_steps advances, a lane's newest token begins a block when num_steps % block_size == phase
    (lane 1 at 0, 256, 512, ...): it then needs that block, and the advance that made it so filled the
    block before it. The first lane to end by length ends at advance min(num_steps_to_end) = 148.

Anything else (a sequence that joins, is preempted or asks for logprobs, a stop token in the
samples) goes back to the scheduler's general loops; once a sequence ends or joins, the lanes are
rebuilt for the running queue the next step schedules.
"""

from bisect import bisect_left, bisect_right
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
        self.num_steps = 0  # advance() calls so far: every lane is this many tokens longer than when built
        # [B] int64 each; built once per change of the running queue, so with iterators rather than lists
        num_tokens = np.fromiter(map(len, self.token_lists), np.int64, num_lanes)
        max_num_tokens = np.fromiter(
            (seq.num_prompt_tokens + seq.params.max_tokens for seq in seqs), np.int64, num_lanes
        )  # the length at which max_tokens ends each sequence
        self.num_steps_to_end = max_num_tokens - num_tokens  # advances after which max_tokens ends each lane
        self.min_num_steps_to_end = int(self.num_steps_to_end.min()) if num_lanes else 0
        # Lanes sorted by phase (stable: ascending lanes within one phase), so that one phase's lanes are the
        # slice of lanes_by_phase where sorted_phases equals it, found by bisection:
        #   sorted_phases:   0  0   26  129  250 ...
        #   lanes_by_phase:  1  7  255    2    0 ...
        phases = (1 - num_tokens) % block_size
        order = np.argsort(phases, kind="stable")
        self.lanes_by_phase: list[int] = order.tolist()
        self.sorted_phases: list[int] = phases[order].tolist()
        self.rows = list(range(num_lanes))  # every row samples a real token: advance()'s answer
        self.num_new_tokens = [1] * num_lanes  # one token each: every batch's num_new_tokens
        # Sampled tokens that may end a row (EOS where not ignored, stop_token_ids): a step that samples
        # none of them ends no row, which record() checks with one set operation instead of a loop.
        self.stop_token_ids: set[int] = set().union(*[p.stop_token_ids for p in params if p.stop_token_ids])
        if not all(p.ignore_eos for p in params):
            self.stop_token_ids |= eos_token_ids
        self.has_logprobs = any(p.logprobs is not None for p in params)  # the general loop records them
        self.ended_lanes: list[int] = []  # lanes the last advance() ended by length

    def lanes_beginning_block(self) -> list[int]:
        """Lanes whose newest token begins a block: its position is a multiple of block_size."""
        phase = self.num_steps % self.block_size
        first, end = bisect_left(self.sorted_phases, phase), bisect_right(self.sorted_phases, phase)
        return self.lanes_by_phase[first:end]

    def lanes_without_slot(self) -> list[int]:
        """Lanes whose newest token begins a block they do not have yet.

        Every other token of a lane was computed, so has a slot: only a newest token that begins a block
        can lack one. The check against the block table leaves out a block already appended for this step.
        """
        return [
            lane
            for lane in self.lanes_beginning_block()
            if len(self.token_lists[lane]) > len(self.seqs[lane].block_table) * self.block_size
        ]

    def advance(self) -> tuple[list[int], list[int]]:
        """A decode step of these lanes was launched: each sequence computed its newest token and holds a
        PENDING_TOKEN for the one it samples. Returns the lanes whose computed tokens now fill a block, and
        those whose new token reaches max_tokens (the scheduler ends them; these lanes are then done)."""
        for seq, token_ids in zip(self.seqs, self.token_lists, strict=True):
            seq.num_computed_tokens += 1
            token_ids.append(PENDING_TOKEN)
        self.num_steps += 1
        if self.num_steps >= self.min_num_steps_to_end:  # at most once: ending a sequence drops the lanes
            self.ended_lanes = np.flatnonzero(self.num_steps_to_end <= self.num_steps).tolist()
        # The computed tokens fill a block exactly when the new newest token begins the next one.
        return self.lanes_beginning_block(), self.ended_lanes

    def record(self, token_ids: list[int]) -> bool:
        """Put each lane's sample in place of its PENDING_TOKEN; False if one may end its sequence (a stop token)
        or logprobs were asked, which the general loop then records (putting the same tokens again)."""
        # map() in a zero-length deque: the per-row assignment runs in C, with no Python loop.
        deque(map(setitem, self.token_lists, repeat(-1), token_ids), maxlen=0)
        if self.has_logprobs:
            return False
        # With no stop token to look for (every lane ignores EOS and has no stop_token_ids), skip the scan.
        return not self.stop_token_ids or self.stop_token_ids.isdisjoint(token_ids)
