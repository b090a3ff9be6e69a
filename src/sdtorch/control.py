"""ControlNets in generation: each unit's residuals, scaled by its weight, added to the UNet's calls inside its
guidance window, as diffusers' StableDiffusionControlNetPipeline (and MultiControlNetModel) adds them.

    image -> the unit's preprocessor (unit.module, preprocessors.py: "none" keeps it) -> the control map
    control map -> resize to the output (unit.resize_mode) -> (1,3,H,W) in [0,1] -> expand to the UNet batch
    at each UNet call of step i of n, per unit with guidance_start <= ... (diffusers' rule, `active`):
        down, mid = controlnet(x, t, context, image, scale=weight)    (SDXL: with text_embeds, time_ids)
    residuals of several units are summed; the UNet adds them to its skips and mid block.

The control image is the same for both halves of a CFG batch ([uncond, cond]), as diffusers repeats it.
Control modes, as the A1111 extension applies them (its hook.py):
    Balanced                        every residual x weight, on the whole batch
    My prompt is more important     residual i (of SD's 13: 12 skips + mid) x weight * 0.825 ** (12 - i)
    ControlNet is more important    the same scales, on the conditional rows only (zeros on the unconditional)
diffusers' guess mode scales them by logspace(-1, 0) (ControlNet.residual_scales) on the conditional rows only,
and a pooled ("shuffle") ControlNet always guides the conditional rows only (both do so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from .images import resize_image
from .models.controlnet import ControlNet
from .models.t2i_adapter import T2IAdapter
from .preprocessors import control_pixels, get_preprocessor, numpy_seed, pixel_perfect_resolution, preprocess
from .request import ControlNetUnit

SOFT_INJECTION = 0.825  # the extension's "soft" weights: residual i of 13 x 0.825 ** (12 - i)
ADAPTER_SOFT_WEIGHTS = (0.25, 0.62, 0.825, 1.0)  # the same for a T2I-Adapter's four features


@dataclass
class Control:
    """A ControlNet unit resolved for a job: the loaded model, its control map (`control_map`), the unit."""

    model: ControlNet | T2IAdapter
    image: Image.Image
    unit: ControlNetUnit
    title: str  # the model as the A1111 extension names it: "name [hash]"
    scale_factor: int  # image pixels a latent pixel (the VAE's)
    _pixels: dict[tuple, Tensor] = field(default_factory=dict, repr=False)
    _features: dict[tuple, list[Tensor]] = field(default_factory=dict, repr=False)

    def pixels(self, width: int, height: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The control image at width x height by the unit's resize mode: (1, 3, H, W) in [0, 1] (diffusers' control
        image processor: no normalisation to [-1, 1]), made once per size, device and dtype, not at every step."""
        key = (width, height, device, dtype)
        if key not in self._pixels:
            resized = resize_image(self.image, width, height, self.unit.resize_mode.lower())
            array = control_pixels(resized)  # (H, W, 3), the inpaint maps' masked pixels -1
            self._pixels[key] = torch.from_numpy(array).permute(2, 0, 1)[None].to(device, dtype)  # (1, 3, H, W)
        return self._pixels[key]

    def features(self, width: int, height: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """A T2I-Adapter's features of the control image at width x height: (1, C_i, h_i, w_i) each, unscaled; made
        once per size (they do not depend on the step). A one-channel adapter (sketch, canny) reads the first
        channel, as the extension feeds it."""
        key = (width, height, device, dtype)
        if key not in self._features:
            pixels = self.pixels(width, height, device, dtype)  # (1, 3, H, W)
            self._features[key] = self.model(pixels[:, : self.model.config.in_channels])
        return self._features[key]


def infotext_unit(control: Control) -> ControlNetUnit:
    """The unit as the extension's infotext shows it: the model by its title, the preprocessor's sliders at the
    values used (one the module lacks at the extension's hidden default: 512 px, 0.5)."""
    unit, p = control.unit, get_preprocessor(control.unit.module)
    resolution, a, b = (slider.resolve(value, p.label, name) if slider is not None else default for slider, value, name,
                        default in ((p.resolution, unit.processor_res, "resolution", 512),
                                    (p.slider_1, unit.threshold_a, "threshold_a", 0.5),
                                    (p.slider_2, unit.threshold_b, "threshold_b", 0.5)))
    return dataclasses.replace(unit, model=control.title, processor_res=int(resolution), threshold_a=a, threshold_b=b)


def control_map(unit: ControlNetUnit, image: Image.Image, mask: Image.Image | None, width: int, height: int,
                seed: int) -> Image.Image:
    """The unit's image through its preprocessor, as the A1111 extension runs it for a width x height generation
    of `seed`: at processor_res (pixel perfect: from the output size), the extension's numpy seed; `mask` for
    the inpaint preprocessors (RGBA map, the mask in alpha)."""
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(image.width, image.height, width, height, unit.resize_mode)
    return preprocess(unit.module, image, resolution, unit.threshold_a, unit.threshold_b, seed=numpy_seed(seed),
                      mask=mask)


def active(unit: ControlNetUnit, step: int, steps: int) -> bool:
    """Whether a unit guides step `step` (from 0) of `steps`: diffusers' controlnet_keep,
    keep = 1 - (step / steps < guidance_start or (step + 1) / steps > guidance_end)."""
    return not (step / steps < unit.guidance_start or (step + 1) / steps > unit.guidance_end)


def residuals(
    controls: list[Control], x: Tensor, t: Tensor, context: Tensor, step: int, steps: int, uncond_rows: int = 0,
    **added: Tensor,
) -> dict[str, object]:
    """The UNet's extra arguments for one call: the summed residuals (ControlNets) and features (T2I-Adapters) of the
    units active at `step`, or {} when none is. x: (B, C, h, w) UNet input (its first latent channels go to the
    ControlNet, as diffusers' inpainting ControlNet pipeline passes the latents without mask channels), t: (B,),
    context: (B, L, D); added: SDXL's; the first `uncond_rows` rows are CFG's unconditional ones."""
    down = mid = features = None
    for control in controls:
        unit = control.unit
        if unit.weight == 0 or not active(unit, step, steps):
            continue
        width, height = x.shape[3] * control.scale_factor, x.shape[2] * control.scale_factor
        skip = uncond_rows if conditional_only(control) else 0  # rows left at zero
        if isinstance(control.model, T2IAdapter):
            fs = [f * w for f, w in zip(control.features(width, height, x.device, x.dtype), _scales(control))]
            fs = [_zero_rows(f.expand(x.shape[0] - skip, -1, -1, -1), skip) for f in fs]  # (B, C_i, h_i, w_i)
            features = fs if features is None else [a + b for a, b in zip(features, fs)]
            continue
        image = control.pixels(width, height, x.device, x.dtype)
        rows = slice(skip, None)
        latents = x[rows, : control.model.config.unet.in_channels]
        image = image.expand(latents.shape[0], -1, -1, -1)  # (B, 3, H, W), the same for both halves of CFG
        d, m = control.model(latents, t[rows], context[rows], image, _scales(control), guess_mode=unit.guess_mode,
                             **{k: v[rows] for k, v in added.items()})
        d, m = [_zero_rows(r, skip) for r in d], _zero_rows(m, skip)  # diffusers' guess mode, the extension's cond_mark
        down = d if down is None else [a + b for a, b in zip(down, d)]  # MultiControlNetModel: summed
        mid = m if mid is None else mid + m
    extra: dict[str, object] = {}
    if down is not None:
        extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    if features is not None:
        extra.update(down_intrablock_additional_residuals=features)
    return extra


def conditional_only(control: Control) -> bool:
    """Whether a unit guides CFG's conditional rows only."""
    unit, model = control.unit, control.model
    pooled = isinstance(model, ControlNet) and model.config.global_pool_conditions
    return unit.control_mode == "ControlNet is more important" or unit.guess_mode or pooled


def _scales(control: Control) -> list[float]:
    """The weight of each residual (skips then mid) or adapter feature, by the unit's control mode."""
    unit, model = control.unit, control.model
    count = len(model.config.levels) if isinstance(model, T2IAdapter) else model.num_residuals()
    if unit.control_mode == "Balanced":
        return [unit.weight] * count
    if isinstance(model, T2IAdapter):
        return [unit.weight * w for w in ADAPTER_SOFT_WEIGHTS[:count]]
    # SD: 13; SDXL: 10, the extension's first 10 of 13
    return [unit.weight * SOFT_INJECTION ** float(12 - i) for i in range(count)]


def _zero_rows(residual: Tensor, rows: int) -> Tensor:
    """(B, C, H, W) -> (rows + B, C, H, W): `rows` rows of zeros before it."""
    return torch.cat([residual.new_zeros(rows, *residual.shape[1:]), residual]) if rows else residual


def step_of(timesteps: Tensor, t: Tensor) -> int:
    """The sampling step (from 0) a UNet call at timestep t belongs to: the last grid timestep (descending) >= t,
    so a sampler's in-between evaluations count to the step they are part of."""
    return max(int((timesteps.to(t.device, torch.float64) >= t.reshape(-1)[0].double()).sum()) - 1, 0)
