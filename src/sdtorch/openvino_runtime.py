"""sdtorch's own modules run by OpenVINO's CPU runtime: the `openvino` backend of `Pipeline.compile`.

`openvino.convert_model` traces a module on example inputs into an OpenVINO graph (its weights copied in), and
`compile_model` builds it for this CPU at a compute precision: float32, or bfloat16 / float16 where the CPU has
them natively (AVX-512 BF16, AMX). Inputs and outputs cross as float32 numpy arrays; the graph is static in
the example's shapes. The `openvino` package is optional (`pip install openvino`). Compiled graphs are kept on disk
for later processes (openvino_cache.py).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import openvino_cache
from .errors import InvalidInputError
from .resident import release_file_pages

PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def require_openvino() -> None:
    """Raise InvalidInputError with the remedy when the `openvino` package is not installed."""
    if importlib.util.find_spec("openvino") is None:
        raise InvalidInputError("the openvino backend needs the `openvino` package: pip install openvino")


def native_bfloat16() -> bool:
    """Whether OpenVINO's CPU runtime computes bfloat16 natively here (AVX-512 BF16 or AMX)."""
    require_openvino()
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_module(module: nn.Module, example: tuple[Tensor, ...],
                   precision: torch.dtype | None = torch.float32) -> Callable[..., tuple[Tensor, ...]]:
    """`module` (called as module(*example), returning a tensor or a tuple of tensors) converted and compiled for
    this CPU, computing at `precision` (None: OpenVINO's default, bfloat16 where native), on torch's thread count.
    Returns run(*inputs) -> outputs: inputs of the example's shapes (any float dtype: sent as float32; integer inputs
    keep their dtype), outputs float32 tensors.
    A module whose weights are not float32 is traced as they are, its float inputs cast to their dtype inside the
    graph (no float32 copy of the weights is made); float32 weights computed at a lower precision are traced cast
    to it (the graph, and the copy kept on disk, half the size; OpenVINO would round them so itself).
    Once the graph has run, the module's file-backed weight pages are let go of (resident.py): the graph has its
    own copy, and a plain call of the module reads them back."""
    require_openvino()
    import openvino as ov

    if precision is not None and precision not in PRECISION_HINTS:
        raise InvalidInputError(f"OpenVINO computes in {', '.join(map(str, PRECISION_HINTS))}, not {precision}")
    weights = [*module.parameters(), *module.buffers()]
    dtype = next(module.parameters(), torch.empty(0)).dtype
    if dtype != torch.float32:
        module = _CastingCall(module, dtype)
    example = tuple(_as_sent(x) for x in example)
    hints = {} if precision is None else {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
    config = {**hints, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    key = openvino_cache.graph_key(module, example, hints) if openvino_cache.cache_dir() else None
    compiled, mapping = (openvino_cache.load(key, config) if key else None) or (None, None)
    if compiled is None:
        if dtype == torch.float32 and precision in (torch.bfloat16, torch.float16):
            module = _CastingCall(_cast_copy(module, precision), precision)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the UNet's input checks: constant per graph
            model = ov.convert_model(module, example_input=example)  # its constants are the module's tensors
        compiled = ov.Core().compile_model(model, "CPU", config)
        del model
        if key:
            openvino_cache.store(key, compiled)
            compiled, mapping = openvino_cache.load(key, config) or (compiled, None)  # reading the kept file instead
    request = compiled.create_infer_request()

    def run(*inputs: Tensor) -> tuple[Tensor, ...]:
        sent = [_as_sent(x).numpy() for x in inputs]
        mapped, first = run.weights_file, run.weights is not None  # the first run: OpenVINO repacks the weights
        with openvino_cache.pages_let_go(mapped, during=first) if mapped is not None else contextlib.nullcontext():
            results = request.infer(sent)
        if first:
            release_file_pages(run.weights)
            run.weights = None
        return tuple(torch.from_numpy(results[i].copy()) for i in range(len(compiled.outputs)))

    run.weights = weights  # the module's, let go of after the first run
    # The graph may read its constants where it was made from: the kept file's mapping, else the traced module's
    # tensors (a cast copy lives only here); either lives as long as `run`.
    run.weights_file = mapping
    run.traced = module if mapping is None else None
    return run


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` with its floating weights cast to `dtype` (made one tensor at a time, the float32 ones let
    go of as read; no float32 copy)."""
    memo: dict[int, object] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        cast = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
        memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
        release_file_pages([tensor])
    return copy.deepcopy(module, memo)  # tensors found in the memo are taken as they are


class _CastingCall(nn.Module):
    """module(*inputs) with its float inputs cast to `dtype` (its weights') and its outputs to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.module(*(x.to(self.dtype) if x.is_floating_point() else x for x in inputs))
        return out.float() if isinstance(out, Tensor) else tuple(o.float() for o in out)


def _as_sent(x: Tensor) -> Tensor:
    """A tensor as OpenVINO receives it: on the CPU, float32 if floating, contiguous."""
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).contiguous()
