"""sdtorch: Stable Diffusion written from scratch in plain PyTorch.

    pipe = sdtorch.load("model.safetensors")     # single file, diffusers folder or hub id
    sdtorch.save(pipe, "out_folder", format="diffusers")
"""

from . import errors
from .checkpoints.loading import load
from .checkpoints.saving import save
from .configs import ModelConfig
from .errors import SdtorchError
from .pipeline import Pipeline

__all__ = ["load", "save", "Pipeline", "ModelConfig", "SdtorchError", "errors"]
