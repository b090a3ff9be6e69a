"""The UNet and the VAE decoder compiled for inference: `Pipeline.compile()`, the CLI's `--compile` /
`--compile-backend openvino`.

"inductor" (the default): `torch.compile` traces the UNet and the decoder once per input shape and emits fused
kernels; with weight freezing the weights are constants of the graph, so on a CPU the convolution and matmul weights
are pre-packed for oneDNN/MKL once instead of reordered at every call. The first call at a new image size compiles
(a minute or more at SD sizes on a small CPU; inductor's on-disk cache makes later processes faster).

"openvino" (CPU only, the optional `openvino` package): the UNet converted to an OpenVINO graph per input shape
and run by its CPU runtime at the UNet's dtype (openvino_runtime.py). "openvino-bf16": the same, computing in
bfloat16 whatever the UNet's dtype, as OpenVINO itself does by default on CPUs with native bfloat16 (AVX-512 BF16,
AMX): a float32 model keeps float32 weights, inputs and outputs, and the picture changes by bfloat16's rounding.
Each graph may hold its own (repacked) copy of the weights, so at most MAX_OPENVINO_GRAPHS are kept per module (a
whole UNet and, with step caching, its shallow part), and once one has run, the module's weights that are views of
the checkpoint file are let go of from memory (resident.py: read back if the plain module runs); calls with
ControlNet or T2I-Adapter residuals run the plain module. The VAE decoder likewise (CompiledDecoder: a graph per
latent size, at the same precision); tiled decodes run the plain VAE.

Compiled weights must not change behind the graph's back, so a compiled graph is used only when nothing else
can change the UNet's function: in inference (no grad, eval mode), with no forward hooks (LoRAs are hooks,
see adapters/lora.py) and with the weights as they were when it was built (their version counters); otherwise
the call runs the plain module, and a changed weight or dtype rebuilds the graphs at the next call. (Weights
created under `torch.inference_mode()` have no version counters: change them in place and call compile again.)
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import InvalidInputError
from .models.unet import SHALLOW_STAGES, broadcast_timesteps, check_addition
from .openvino_runtime import compile_module, native_bfloat16, require_openvino

BACKENDS = ("inductor", "openvino", "openvino-bf16")
MAX_OPENVINO_GRAPHS = 2


class CompiledUNet:
    """Callable like `unet(x, t, context)`; runs a compiled graph where it is valid, else `unet` itself."""

    def __init__(self, unet: nn.Module, backend: str = "inductor"):
        if backend not in BACKENDS:
            raise InvalidInputError(f"unknown compile backend {backend!r}; one of: {', '.join(BACKENDS)}")
        self.openvino = backend.startswith("openvino")
        if self.openvino:
            require_openvino()
            if next(unet.parameters()).device.type != "cpu":
                raise InvalidInputError(f"the {backend} backend runs on the CPU; use inductor on other devices")
            if backend == "openvino-bf16" and not native_bfloat16():
                raise InvalidInputError("the openvino-bf16 backend needs a CPU with native bfloat16 (AVX-512 BF16 "
                                        "or AMX); this one has none: use openvino")
        self.unet = unet
        self.backend = backend
        self._compiled: Callable[..., tuple[Tensor, Tensor]] | None = None  # inductor's
        self._graphs: OrderedDict[tuple, Callable[..., tuple[Tensor, ...]]] = OrderedDict()  # openvino's, by inputs
        self._weights = _WeightsWatch(unet)

    def usable(self) -> bool:
        """Whether a call now would use a compiled graph (inference, no hooks)."""
        return _inference_only(self.unet)

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
        """`UNet.split_forward` (step caching) through a compiled graph: one graph per input shapes, per
        `shallow` and per whole / shallow call."""
        added = dict(text_embeds=text_embeds, time_ids=time_ids, **residuals)
        with_residuals = any(v is not None for v in residuals.values())
        if not self.usable() or (self.openvino and with_residuals):
            return self.unet.split_forward(x, t, context, deep, shallow, **added)
        if self._weights.changed():
            self._compiled = None
            self._graphs.clear()
        if self.openvino:
            return self._openvino(x, t, context, deep, shallow, text_embeds, time_ids)
        if self._compiled is None:
            torch._dynamo.reset()  # drop graphs holding the old frozen weights
            self._compiled = torch.compile(self.unet.split_forward, dynamic=False)
        with _frozen_weights():
            return self._compiled(x, t, context, deep, shallow, **added)

    def _openvino(self, x: Tensor, t: Tensor, context: Tensor, deep: Tensor | None, shallow: int,
                  text_embeds: Tensor | None, time_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """split_forward by the OpenVINO graph for these inputs (converted at the first such call). The time (and
        SDXL addition) embedding is computed here as the plain UNet does it: a graph computing in bfloat16 would
        round the timesteps themselves (957.3 to 956) before their sinusoid."""
        t = broadcast_timesteps(t, x)  # () -> (B,)
        check_addition(self.unet.config, x.shape[0], text_embeds, time_ids)
        emb = self.unet.embed(t, text_embeds, time_ids)  # (B,) -> (B, time_embed_dim)
        inputs = tuple(v for v in (x, emb, context, deep) if v is not None)
        key = (shallow, deep is not None) + tuple((v.shape, v.dtype) for v in inputs)
        out, new_deep = _run_graph(self._graphs, key, inputs, _precision(self.backend, x.dtype),
                                   lambda: _SplitCall(self.unet, shallow, with_deep=deep is not None))
        return out.to(x.device, x.dtype), new_deep.to(x.device, x.dtype)


class CompiledDecoder:
    """Callable like `vae.decode(z)`: compiled where it is valid (as CompiledUNet: inference, no hooks, weights as
    built), else `vae.decode` itself. inductor: `torch.compile` with the weights frozen, a graph per latent shape;
    the openvino backends: an OpenVINO graph per latent shape."""

    def __init__(self, vae: nn.Module, backend: str):
        if backend not in BACKENDS:
            raise InvalidInputError(f"unknown compile backend {backend!r}; one of: {', '.join(BACKENDS)}")
        self.vae, self.backend = vae, backend
        self._compiled: Callable[[Tensor], Tensor] | None = None  # inductor's
        self._graphs: OrderedDict[tuple, Callable[..., tuple[Tensor, ...]]] = OrderedDict()  # by latent shape, dtype
        self._weights = _WeightsWatch(vae)

    def __call__(self, z: Tensor) -> Tensor:
        """z: (B, C, h, w) unscaled latents -> (B, 3, H, W) images in [-1, 1], in z's dtype and device."""
        if not _inference_only(self.vae):
            return self.vae.decode(z)
        if self._weights.changed():
            self._graphs.clear()
            if self._compiled is not None:
                torch._dynamo.reset()  # drop graphs holding the old frozen weights (the UNet's recompile as needed)
                self._compiled = None
        if self.backend == "inductor":
            if self._compiled is None:
                self._compiled = torch.compile(self.vae.decode, dynamic=False)
            with _frozen_weights():
                return self._compiled(z)
        key = (z.shape, z.dtype)
        (images,) = _run_graph(self._graphs, key, (z,), _precision(self.backend, z.dtype), lambda: _Decode(self.vae))
        return images.to(z.device, z.dtype)


def _frozen_weights() -> contextlib.AbstractContextManager:
    """Inductor's weight freezing, on while a torch.compile'd call runs: read when a call compiles (compile()'s
    options= does not take it)."""
    import torch._inductor.config as inductor_config  # here: importing inductor takes seconds

    return inductor_config.patch(freezing=True)


def _precision(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The arithmetic an OpenVINO backend computes in for a model of this dtype."""
    return torch.bfloat16 if backend == "openvino-bf16" else dtype


def _run_graph(graphs: OrderedDict, key: tuple, inputs: tuple[Tensor, ...], precision: torch.dtype,
               module: Callable[[], nn.Module]) -> tuple[Tensor, ...]:
    """Run the OpenVINO graph kept under `key` in `graphs` on `inputs`, converting `module()` at `precision` first
    when there is none; at most MAX_OPENVINO_GRAPHS are kept, the least recently used dropped."""
    run = graphs.get(key)
    if run is None:
        run = graphs[key] = compile_module(module(), inputs, precision=precision)
        while len(graphs) > MAX_OPENVINO_GRAPHS:
            graphs.popitem(last=False)
    else:
        graphs.move_to_end(key)
    return run(*inputs)


class _WeightsWatch:
    """Says when a module's weights (`_weights_state`) changed since the last look: the graphs built from them are
    stale then (the first look: nothing is built yet)."""

    def __init__(self, module: nn.Module):
        self.module, self._state = module, None

    def changed(self) -> bool:
        state = _weights_state(self.module)
        changed, self._state = state != self._state, state
        return changed


def _weights_state(module: nn.Module) -> tuple:
    """What a compiled graph of `module` was built for: its weights' memory (new tensors assigned, as
    Pipeline.load_vae does, live elsewhere), their version counters, dtype and device."""
    params = list(module.parameters())
    # weights made in inference mode carry no version counter: their in-place changes are not seen
    versions = sum(0 if p.is_inference() else p._version for p in params)
    return tuple(p.data_ptr() for p in params), versions, params[0].dtype, params[0].device


def _inference_only(module: nn.Module) -> bool:
    """Whether a call of `module` now may use a compiled graph: no grad, eval mode, no forward hooks (LoRAs)."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    return not (torch.is_grad_enabled() or module.training or hooked)


class _SplitCall(nn.Module):
    """`UNet.split_forward` with its optional inputs fixed, taking tensors only (for tracing):
    (x, emb, context[, deep]) -> (output, deep features), emb the UNet's `embed` of the timesteps (and SDXL's
    added conditioning)."""

    def __init__(self, unet: nn.Module, shallow: int, with_deep: bool):
        super().__init__()
        self.unet, self.shallow, self.with_deep = unet, shallow, with_deep

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, *deep: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.zeros(x.shape[0])  # checked for its shape only: emb carries the timesteps
        return self.unet.split_forward(x, t, context, deep[0] if self.with_deep else None, self.shallow, emb=emb)


class _Decode(nn.Module):
    """`vae.decode` as a module's forward (for tracing): (B, C, h, w) latents -> (B, 3, H, W) images."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)
