"""Gradient (activation) checkpointing (Chen et al. 2016): a block's inner activations are dropped after
its forward and recomputed in backward, trading one extra forward of the block for memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointable(nn.Module):
    """A block that recomputes its forward in backward when `gradient_checkpointing` is on, the module is
    training and gradients are enabled (as diffusers' blocks do); the results and gradients do not change."""

    gradient_checkpointing = False

    def __call__(self, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # non-reentrant: works with hooks (LoRA), DDP and inputs that need no grad; RNG state is replayed
            return checkpoint(super().__call__, *args, use_reentrant=False)
        return super().__call__(*args)


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch checkpointing of every `Checkpointable` block in `model`; returns how many there are."""
    blocks = [m for m in model.modules() if isinstance(m, Checkpointable)]
    for block in blocks:
        block.gradient_checkpointing = enabled
    return len(blocks)
