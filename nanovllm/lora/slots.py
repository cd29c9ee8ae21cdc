"""Which adapter each of the max_loras device slots holds; a batch's adapters get slots, least recently used out."""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotAssignment:
    """Where one batch's adapters are."""

    slot_of: dict[int, int]  # lora_int_id -> its slot, for every adapter of the batch
    to_load: list[tuple[int, int]]  # (slot, lora_int_id): adapters that must be copied into their slot first


class AdapterSlots:
    """The device slots' contents. An adapter stays in its slot until a batch needs the slot for another.

    max_loras = 2, held (least recently used first): {7: slot 0, 3: slot 1}
    batch needs {3, 9}: 3 stays in slot 1; 9 takes slot 0 from 7, the least recently used not needed
    """

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.held: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recently used first
        self.free_slots = list(range(max_loras))  # slots holding no adapter

    def assign(self, lora_ids: list[int]) -> SlotAssignment:
        """Slots for a batch's distinct adapters; more than max_loras is an error (the scheduler admits fewer)."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(
                f"a batch needs {len(lora_ids)} adapters but there are max_loras={self.max_loras} slots; the "
                "scheduler should not have admitted them together"
            )
        needed = set(lora_ids)
        to_load = []
        for lora_id in lora_ids:
            if lora_id not in self.held:
                slot = self.free_slots.pop(0) if self.free_slots else self._evict(needed)
                self.held[lora_id] = slot
                to_load.append((slot, lora_id))
            self.held.move_to_end(lora_id)
        return SlotAssignment({lora_id: self.held[lora_id] for lora_id in lora_ids}, to_load)

    def _evict(self, needed: set[int]) -> int:
        """Free the slot of the least recently used adapter this batch does not need."""
        victim = next(lora_id for lora_id in self.held if lora_id not in needed)
        return self.held.pop(victim)
