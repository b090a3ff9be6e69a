"""ControlNets in generation: each unit's residuals, scaled by its weight, added to the UNet's calls inside its
guidance window, as diffusers' StableDiffusionControlNetPipeline (and MultiControlNetModel) adds them.

    control image -> resize to the output (unit.resize_mode) -> (1,3,H,W) in [0,1] -> expand to the UNet batch
    at each UNet call of step i of n, per unit with guidance_start <= ... (diffusers' rule, `active`):
        down, mid = controlnet(x, t, context, image, scale=weight)    (SDXL: with text_embeds, time_ids)
    residuals of several units are summed; the UNet adds them to its skips and mid block.

The control image is the same for both halves of a CFG batch ([uncond, cond]), as diffusers repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .images import resize_image
from .models.controlnet import ControlNet
from .request import ControlNetUnit


@dataclass
class Control:
    """A ControlNet unit resolved for a job: the loaded model, the control image as given (RGB), the unit."""

    model: ControlNet
    image: Image.Image
    unit: ControlNetUnit
    _pixels: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    def pixels(self, width: int, height: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The control image at width x height by the unit's resize mode: (1, 3, H, W) in [0, 1] (diffusers' control
        image processor: no normalisation to [-1, 1]), made once per size, device and dtype, not at every step."""
        key = (width, height, device, dtype)
        if key not in self._pixels:
            resized = resize_image(self.image, width, height, self.unit.resize_mode.lower())
            array = np.asarray(resized.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
            self._pixels[key] = torch.from_numpy(array).permute(2, 0, 1)[None].to(device, dtype)  # (1, 3, H, W)
        return self._pixels[key]


def active(unit: ControlNetUnit, step: int, steps: int) -> bool:
    """Whether a unit guides step `step` (from 0) of `steps`: diffusers' controlnet_keep,
    keep = 1 - (step / steps < guidance_start or (step + 1) / steps > guidance_end)."""
    return not (step / steps < unit.guidance_start or (step + 1) / steps > unit.guidance_end)


def residuals(
    controls: list[Control], x: Tensor, t: Tensor, context: Tensor, step: int, steps: int, **added: Tensor,
) -> dict[str, object]:
    """The UNet's extra arguments for one call: the summed residuals of the units active at `step`, or {} when none is.
    x: (B, C, h, w) UNet input (its first latent channels go to the ControlNet, as diffusers' inpainting ControlNet
    pipeline passes the latents without mask channels), t: (B,), context: (B, L, D); added: SDXL's."""
    down, mid = None, None
    for control in controls:
        if control.unit.weight == 0 or not active(control.unit, step, steps):
            continue
        model = control.model
        f = model.config.hint_downscale
        image = control.pixels(x.shape[3] * f, x.shape[2] * f, x.device, x.dtype)
        image = image.expand(x.shape[0], -1, -1, -1)  # (B, 3, H, W), the same for both halves of CFG
        latents = x[:, : model.config.unet.in_channels]
        d, m = model(latents, t, context, image, control.unit.weight, **added)
        down = d if down is None else [a + b for a, b in zip(down, d)]  # MultiControlNetModel: summed
        mid = m if mid is None else mid + m
    if down is None:
        return {}
    return dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)


def step_of(timesteps: Tensor, t: Tensor) -> int:
    """The sampling step (from 0) a UNet call at timestep t belongs to: the last grid timestep (descending) >= t,
    so a sampler's in-between evaluations count to the step they are part of."""
    return max(int((timesteps.to(t.device, torch.float64) >= t.reshape(-1)[0].double()).sum()) - 1, 0)
