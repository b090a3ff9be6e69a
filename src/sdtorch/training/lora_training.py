"""Trainable LoRA layers on a frozen UNet / text encoder, and their export in kohya's and diffusers' formats.

Each targeted nn.Linear / nn.Conv2d keeps its frozen weight W and gains a trainable pair, applied by a
forward hook as adapters/lora.py applies a loaded file (so training and inference compute the same thing):
    y = layer(x) + (alpha / rank) * up(down(dropout(x)))                     (Hu et al. 2021, eq. 3)
Linear: down (rank, in), up (out, rank). Conv2d (LoCon): down a conv (rank, in, kh, kw) with the layer's
stride / padding / dilation, up a 1x1 conv (out, rank, 1, 1). Initialised as kohya's networks/lora.py does:
down Kaiming-uniform (a = sqrt(5), torch's Linear default), up zeros, so the untrained network is the
identity.

Layer sets (`TARGETS`), named by where the layers are:
    attention    the UNet's attention projections to_q / to_k / to_v / to_out.0 (diffusers'
                 train_text_to_image_lora); the text encoder's q / k / v / out_proj
    transformer  every Linear and 1x1 conv of the UNet's transformer blocks, proj_in / proj_out and the
                 feed-forward included (kohya's default "Transformer2DModel" set); the text encoder's
                 attention and MLP (kohya's CLIPAttention + CLIPMLP)
    locon        transformer + every layer of the ResBlocks and down / up samplers (kohya's conv_dim
                 set, at the same rank and alpha)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checkpoints.io import write_safetensors
from ..errors import InvalidInputError

TARGETS = ("attention", "transformer", "locon")
_UNET_PATTERNS = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "transformer": r"\.attentions\.\d+\.",
    "locon": r"\.attentions\.\d+\.|\.(resnets|downsamplers|upsamplers)\.\d+\.",
}
_TEXT_PATTERNS = {
    "attention": r"\.self_attn\.(q|k|v|out)_proj$",
    "transformer": r"\.(self_attn|mlp)\.",
    "locon": r"\.(self_attn|mlp)\.",
}
PEFT_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes


class LoraPair(nn.Module):
    """The trainable low-rank pair of one layer; `hook` adds its update to the layer's output."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float):
        super().__init__()
        w = layer.weight
        if isinstance(layer, nn.Conv2d):
            down = torch.empty(rank, layer.in_channels // layer.groups, *layer.kernel_size, dtype=w.dtype, device=w.device)
            up = torch.zeros(layer.out_channels, rank, 1, 1, dtype=w.dtype, device=w.device)
        else:
            down = torch.empty(rank, layer.in_features, dtype=w.dtype, device=w.device)
            up = torch.zeros(layer.out_features, rank, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.down, self.up = nn.Parameter(down), nn.Parameter(up)
        self.factor = alpha / rank
        self.dropout = dropout

    def hook(self, layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = F.dropout(args[0], self.dropout, self.training)  # Linear: (..., in); Conv2d: (B, in, H, W)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, self.down, None, layer.stride, layer.padding, layer.dilation)  # (B, rank, H', W')
            h = F.conv2d(h, self.up)  # (B, out, H', W')
        else:
            h = F.linear(F.linear(x, self.down), self.up)  # (..., rank) -> (..., out)
        return output + h * self.factor


class LoraNetwork(nn.Module):
    """Trainable LoRA pairs on the chosen layers of {"unet": ..., "text_encoder": ...}.

    `pairs` is keyed by kohya's layer name (`lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_...`),
    so the network's state_dict names are stable; `targets` maps the same names to (part, module path).
    The base models are frozen here (requires_grad False); `remove()` takes the hooks off again.
    """

    def __init__(self, models: Mapping[str, nn.Module], *, rank: int, alpha: float, dropout: float = 0.0,
                 targets: str = "attention", parts: tuple[str, ...] = ("unet",)):
        super().__init__()
        if targets not in TARGETS:
            raise InvalidInputError(f"LoRA targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        self.rank, self.alpha, self.dropout, self.target_set = rank, alpha, dropout, targets
        self.pairs = nn.ModuleDict()
        self.targets: dict[str, tuple[str, str]] = {}
        self._handles: list[RemovableHandle] = []
        for part in parts:
            models[part].requires_grad_(False)
            pattern = re.compile((_UNET_PATTERNS if part == "unet" else _TEXT_PATTERNS)[targets])
            for path, layer in models[part].named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)) and pattern.search("." + path):
                    name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")
                    pair = LoraPair(layer, rank, alpha, dropout)
                    self.pairs[name], self.targets[name] = pair, (part, path)
                    self._handles.append(layer.register_forward_hook(pair.hook))
        if not self.pairs:
            raise InvalidInputError(f"no layer of {', '.join(parts)} matches the LoRA targets {targets!r}")

    def remove(self) -> None:
        """Take the hooks off the base layers (their outputs are what they were before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def kohya_tensors(self) -> dict[str, Tensor]:
        """kohya / A1111 layout: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (a 0-d tensor)."""
        out: dict[str, Tensor] = {}
        for name, pair in self.pairs.items():
            out[f"{name}.lora_down.weight"] = pair.down.detach()
            out[f"{name}.lora_up.weight"] = pair.up.detach()
            out[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=pair.down.dtype)
        return out

    def peft_tensors(self) -> dict[str, Tensor]:
        """diffusers / peft layout: `unet.<path>.lora_A.weight` (down) and `.lora_B.weight` (up)."""
        out: dict[str, Tensor] = {}
        for name, pair in self.pairs.items():
            part, path = self.targets[name]
            out[f"{part}.{path}.lora_A.weight"] = pair.down.detach()
            out[f"{part}.{path}.lora_B.weight"] = pair.up.detach()
        return out

    def peft_metadata(self) -> dict[str, str]:
        """diffusers' `lora_adapter_metadata`: the peft LoraConfig fields of each part, as "<part>.<field>"."""
        fields: dict[str, object] = {}
        for part in dict.fromkeys(part for part, _ in self.targets.values()):
            fields.update({
                f"{part}.r": self.rank, f"{part}.lora_alpha": self.alpha, f"{part}.lora_dropout": self.dropout,
                f"{part}.target_modules": sorted(path for p, path in self.targets.values() if p == part),
                f"{part}.init_lora_weights": True, f"{part}.use_rslora": False, f"{part}.use_dora": False,
                f"{part}.bias": "none",
            })
        return {"lora_adapter_metadata": json.dumps(fields)}

    def kohya_metadata(self) -> dict[str, str]:
        """The network's own `ss_*` fields (the run's go in by the caller)."""
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha), "ss_network_dropout": str(self.dropout)}
        if self.target_set == "locon":
            meta["ss_network_args"] = json.dumps({"conv_dim": str(self.rank), "conv_alpha": str(self.alpha)})
        return meta


def tensor_data_hash(tensors: dict[str, Tensor]) -> str:
    """sha256 (hex) of the data section of these tensors as a safetensors file: sd-scripts'
    `addnet_hash_safetensors`, which kohya records as `sshs_model_hash` (and A1111 reads back)."""
    blob = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def save_kohya(network: LoraNetwork, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write the kohya file (atomically) with `metadata` + the network's fields + `sshs_model_hash`."""
    tensors = network.kohya_tensors()
    meta = {**metadata, **network.kohya_metadata(), "sshs_model_hash": tensor_data_hash(tensors)}
    write_safetensors(tensors, path, metadata=meta)


def save_peft(network: LoraNetwork, path: str | Path) -> None:
    """Write diffusers' `pytorch_lora_weights.safetensors` layout (atomically) to `path`."""
    write_safetensors(network.peft_tensors(), path, metadata=network.peft_metadata())
