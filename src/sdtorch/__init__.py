"""sdtorch: Stable Diffusion written from scratch in plain PyTorch."""

from .configs import ModelConfig
from .errors import SdtorchError

__all__ = ["ModelConfig", "SdtorchError"]
