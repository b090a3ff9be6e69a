"""sdtorch: Stable Diffusion written from scratch in plain PyTorch.

    pipe = sdtorch.load("model.safetensors")     # single file, diffusers folder or hub id
    images = pipe("a prompt", steps=20)           # settings: sdtorch.GenerationRequest's fields
    sdtorch.save(pipe, "out_folder", format="diffusers")

The names below are imported on first use, so that `sdtorch` commands that need no model (help, a refused
request, reading an image's parameters) start without loading torch.
"""

from importlib import import_module
from typing import Any

from . import errors
from .errors import SdtorchError

_LAZY = {
    "load": ".checkpoints.loading", "save": ".checkpoints.saving", "Pipeline": ".pipeline",
    "ModelConfig": ".configs", "GenerationRequest": ".request", "Limits": ".request", "ControlNetUnit": ".request",
    "ModelDefaults": ".request", "FEW_STEP_DEFAULTS": ".request",
}

__all__ = ["load", "save", "Pipeline", "ModelConfig", "GenerationRequest", "ControlNetUnit", "Limits", "ModelDefaults",
           "FEW_STEP_DEFAULTS", "SdtorchError", "errors"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sdtorch' has no attribute {name!r}")
