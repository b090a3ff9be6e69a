"""A1111's Tiling: pictures that tile seamlessly. Every convolution of the UNet and the VAE pads circularly, its
padding read from the opposite edge instead of zeros, so the model sees the picture as a torus: the left edge
continues the right one and the top the bottom (the attention layers already see all positions alike)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def wrapped_edges(*modules: nn.Module) -> Iterator[None]:
    """Within: each zero-padded nn.Conv2d of `modules` pads circularly; each is restored after, whatever happens."""
    convs = [m for module in modules for m in module.modules()
             if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and any(m.padding)]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
