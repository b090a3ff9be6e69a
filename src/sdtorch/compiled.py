"""The UNet through `torch.compile` (inductor) for inference: `Pipeline.compile()`, the CLI's `--compile`.

Inductor traces the UNet once per input shape and emits fused kernels; with weight freezing the weights are
constants of the graph, so on a CPU the convolution and matmul weights are pre-packed for oneDNN/MKL once
instead of reordered at every call. The first call at a new image size compiles (minutes at SD sizes on a
small CPU; inductor's on-disk cache makes later processes faster).

Frozen weights must not change behind the graph's back, so the compiled graph is used only when nothing else
can change the UNet's function: in inference (no grad, eval mode), with no forward hooks (LoRAs are hooks,
see adapters/lora.py) and with the weights as they were when it was built (their version counters); otherwise
the call runs the plain module, and a changed weight or dtype rebuilds the graph at the next call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .models.unet import SHALLOW_STAGES


class CompiledUNet:
    """Callable like `unet(x, t, context)`; runs the compiled graph where it is valid, else `unet` itself."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self._compiled: Callable[..., tuple[Tensor, Tensor]] | None = None
        self._state: tuple | None = None  # what the graph was built for: weight versions, dtype, device

    def _weights_state(self) -> tuple:
        first = next(self.unet.parameters())
        return sum(p._version for p in self.unet.parameters()), first.dtype, first.device

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.unet.modules())

    def usable(self) -> bool:
        """Whether a call now would use the compiled graph (inference, no hooks)."""
        return not (torch.is_grad_enabled() or self.unet.training or self._hooked())

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, *, text_embeds: Tensor | None = None,
                 time_ids: Tensor | None = None, **residuals: Tensor | list[Tensor] | None) -> Tensor:
        """x: (B, C, H, W), t: (B,), context: (B, L, D) (SDXL: text_embeds (B, P), time_ids (B, K)) ->
        (B, Cout, H, W), as the UNet; `residuals`: a ControlNet's and a T2I-Adapter's
        (`down_intrablock_additional_residuals`), as `UNet.forward` takes them."""
        return self.split_forward(x, t, context, text_embeds=text_embeds, time_ids=time_ids, **residuals)[0]

    def split_forward(self, x: Tensor, t: Tensor, context: Tensor, deep: Tensor | None = None,
                      shallow: int = SHALLOW_STAGES, *, text_embeds: Tensor | None = None,
                      time_ids: Tensor | None = None,
                      **residuals: Tensor | list[Tensor] | None) -> tuple[Tensor, Tensor]:
        """`UNet.split_forward` (step caching) through the compiled graph: one graph per input shapes, per
        `shallow` and per whole / shallow call."""
        added = dict(text_embeds=text_embeds, time_ids=time_ids, **residuals)
        if not self.usable():
            return self.unet.split_forward(x, t, context, deep, shallow, **added)
        state = self._weights_state()
        if self._compiled is None or state != self._state:
            torch._dynamo.reset()  # drop graphs holding the old frozen weights
            self._compiled = torch.compile(self.unet.split_forward, dynamic=False)
            self._state = state
        import torch._inductor.config as inductor_config  # here: importing inductor takes seconds

        with inductor_config.patch(freezing=True):  # read when a call compiles (compile()'s options= is not)
            return self._compiled(x, t, context, deep, shallow, **added)
