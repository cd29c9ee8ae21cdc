"""LoRA admission: the sequences holding KV blocks use at most max_loras distinct adapters, one per device slot.

A batch is a subset of those sequences, so its adapters always fit the runner's slots, and a request whose
adapter would be one too many waits in the queue (passed over, keeping its place) until an adapter's last
sequence finishes or is preempted. Nothing fails because of load.
"""

from collections.abc import Callable, Iterable

from nanovllm.scheduler.sequence import Sequence


class LoRAAdmission:
    """The adapters in use during one scheduling pass, and whether a waiting sequence may join them."""

    def __init__(self, max_loras: int | None, holders: Callable[[], Iterable[Sequence]]) -> None:
        self.max_loras = max_loras  # None: LoRA is off, every sequence is admitted
        self._holders = holders  # the sequences holding KV blocks (running, or mid-prefill), asked on first need
        self._in_use: set[int] | None = None  # their adapters' ids

    def can_admit(self, seq: Sequence) -> bool:
        """Whether ``seq`` may take KV blocks now: base model, an adapter in use, or a slot left for its adapter."""
        if self.max_loras is None or seq.lora_request is None:
            return True
        in_use = self._adapters_in_use()
        return seq.lora_request.lora_int_id in in_use or len(in_use) < self.max_loras

    def admit(self, seq: Sequence) -> None:
        """``seq`` took its KV blocks: its adapter is in use."""
        if self.max_loras is not None and seq.lora_request is not None:
            self._adapters_in_use().add(seq.lora_request.lora_int_id)

    def _adapters_in_use(self) -> set[int]:
        if self._in_use is None:
            self._in_use = {s.lora_request.lora_int_id for s in self._holders() if s.lora_request is not None}
        return self._in_use
