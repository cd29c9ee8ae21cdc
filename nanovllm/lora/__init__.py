"""LoRA adapters: PEFT directories read and checked, kept in host memory, moved into device slots per batch."""
