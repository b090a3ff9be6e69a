"""int8 dynamic quantisation of the UNet's linear layers: `Pipeline.quantize("int8")`, the CLI's `--quantize int8`.

Each linear layer of the UNet's transformer blocks (attention q/k/v/out, the feed-forward projections, SD2's
linear proj_in/out) becomes an `Int8Linear`: its weight stored as int8 with one scale per output channel
(symmetric: scale = max |w| / 127), and at each call its input rows (tokens) quantised the same way with their own
scale (dynamic), multiplied in int32 by `torch._int_mm` (VNNI / AMX kernels on x86 CPUs) and rescaled to the input's
dtype. Convolutions, time embeddings and the text encoder and VAE stay as they were. The picture changes by int8's
rounding; the linear weights take a quarter of their float32 memory (half of bfloat16's). Quantising is one-way:
load the model again for the float weights back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import InvalidInputError

QUANTIZE_MODES = ("int8",)


def _symmetric_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: (R, C) float -> (int8 (R, C), float32 scale (R, 1)) with x ~= int8 * scale, one scale per row."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (R, 1)
    return (x / scale).round_().to(torch.int8), scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (per output channel) and int8 inputs (per row, at each call); no gradients."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _symmetric_int8(linear.weight.detach())  # (N, K), (N, 1)
        self.register_buffer("weight_int8", weight.t().contiguous())  # (K, N): torch._int_mm's right operand
        self.register_buffer("weight_scale", scale.reshape(-1))  # (N,) float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., K) float -> (..., N) in x's dtype."""
        rows, row_scale = _symmetric_int8(x.reshape(-1, self.in_features))  # (M, K) int8, (M, 1)
        # (M, N): the exact int32 sums, rescaled by row scale x column scale in one product. (Written so, not as two
        # multiplications in turn: torch.compile with weight freezing rewrites that form into a oneDNN int8 kernel
        # that runs ~1000x slower on CPUs here.)
        out = torch._int_mm(rows, self.weight_int8).float() * (row_scale * self.weight_scale)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_unet(unet: nn.Module, mode: str) -> int:
    """Replace the linear layers of `unet`'s transformer blocks (see the module docstring) in place; returns how many.
    IP-Adapter projections (`*_ip`) are left as they are, so adapters still load into them."""
    if mode not in QUANTIZE_MODES:
        raise InvalidInputError(f"unknown quantisation {mode!r}; one of: {', '.join(QUANTIZE_MODES)}")
    targets = []
    for name, module in unet.named_modules():
        if "transformer_blocks" not in name and not name.endswith(("proj_in", "proj_out")):
            continue
        if isinstance(module, nn.Linear) and not name.endswith("_ip"):
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, Int8Linear(getattr(parent, child)))
    return len(targets)
