"""Which LoRA adapter slot each token of a forward pass uses; it travels in the attention context."""

from dataclasses import dataclass

import torch

NO_ADAPTER = -1  # the slot index of a token served by the base model (and of a padded graph lane)


@dataclass(frozen=True)
class LoRAMetadata:
    """Each token's adapter slot, in two layouts: per token (the torch reference) and grouped by slot (the Triton
    kernels, which give each program tokens of one adapter, so it reads that adapter's weights once).

        token_slots:       [ 2 -1  0  2  0 ]     slot per token of the flat batch; -1 = base model
        sorted_token_ids:  [ 2  4  0  3  1 ]     tokens of slot 0, of slot 1 (none), of slot 2, then base tokens
        slot_starts:       [ 0  2  2  4 ]        slot s's tokens: sorted_token_ids[slot_starts[s]:slot_starts[s + 1]]
    """

    token_slots: torch.Tensor  # [N] int32, adapter slot of each token, NO_ADAPTER for the base model
    sorted_token_ids: torch.Tensor  # [N] int32, token indices grouped by slot, base-model tokens last
    slot_starts: torch.Tensor  # [max_loras + 1] int32, where each slot's tokens start in sorted_token_ids
