"""Method "controlnet" of `finetune`: train a ControlNet (Zhang et al. 2023) on image / condition pairs, as diffusers'
examples/controlnet/train_controlnet.py and kohya's sd-scripts train_controlnet.py do.

    condition (B,3,H,W) in [0,1] ─┐
    x_t (B,4,h,w), t (B,), context (B,77,D) ──ControlNet──▶ down residuals [(B,C_i,h_i,w_i)], mid (B,C,h',w')
    x_t, t, context + residuals ──frozen UNet──▶ eps | v  ──▶ the usual denoising loss (finetune_loss)

Only the ControlNet trains (all of it, AdamW); UNet, text encoder and VAE are frozen. A new ControlNet is
`ControlNet.from_unet` (the UNet's encoder copied, the zero convolutions at zero: the first step's UNet output is
the plain UNet's), seeded by the run's seed; `controlnet_model` continues an existing one instead. The loop
(batches, timesteps and noise, caption dropout, accumulation, EMA, resume, accelerate) is finetune.py's own; this
module holds what is particular: making the ControlNet, checking its inputs before any model loads, the pipeline
the sample grids are drawn with, and the export (`checkpoints.controlnet_files.save_controlnet`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoints.controlnet_files import load_controlnet, save_controlnet
from ..errors import InvalidInputError
from ..images import load_image
from ..models.controlnet import ControlNet
from .datasets import FineTuneDataset

if TYPE_CHECKING:
    from ..pipeline import Pipeline

DEFAULT_NAME = "controlnet"  # the export's name without output_name

__all__ = ["DEFAULT_NAME", "check_inputs", "controlnet_to_train", "export", "SamplingPipeline"]


def check_inputs(controlnet_model: str, sample_condition: str, dataset: FineTuneDataset) -> Path:
    """Fail before any model loads: `controlnet_model` (if given) must exist and the sample grids' condition image
    decode. Returns that image: `sample_condition`, or by default the condition of the dataset's first image."""
    if controlnet_model and not Path(controlnet_model).expanduser().exists():
        raise InvalidInputError(f"controlnet_model {controlnet_model}: no such ControlNet file or folder")
    condition = Path(sample_condition) if sample_condition else dataset.images[0].condition
    if condition is None:
        raise InvalidInputError("method controlnet needs [dataset] conditioning_folder (--conditioning-folder)")
    try:
        load_image(condition)
    except (OSError, InvalidInputError) as e:
        raise InvalidInputError(f"sample_condition {condition}: cannot read it as an image ({e})") from None
    return condition


def controlnet_to_train(pipe: Pipeline, source: str, seed: int) -> ControlNet:
    """The ControlNet to train beside `pipe.unet`, with gradients, in train mode, on the UNet's device and dtype:
    loaded from `source` (a file or diffusers folder, checked to fit the UNet) or, without one, `from_unet` with the
    hint encoder's fresh weights drawn from `seed` (the global RNG is left as it was)."""
    weight = pipe.unet.conv_in.weight
    if source:
        controlnet = load_controlnet(source, weight.dtype, weight.device, base=pipe.unet.config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            controlnet = ControlNet.from_unet(pipe.unet)
    return controlnet.requires_grad_(True).train()


def export(controlnet: ControlNet, path: Path, save_format: str) -> Path:
    """Write the trained ControlNet to `path` (a diffusers folder, or with "single_file" the original layout),
    replacing an earlier export of the run but nothing that is not a ControlNet."""
    return save_controlnet(controlnet, path, save_format, overwrite=True)


class SamplingPipeline:
    """`pipe` as the sample grids (`samples.write_sample_grid`) see it: every call guided by the ControlNet being
    trained, with `condition` as its control map (resized to the output as generation does, "crop and resize").

    The unit names `title` (an existing folder: the run's output folder) as its model, and for the call the
    pipeline's `load_controlnet` answers with the in-memory ControlNet, so nothing is written or loaded; every other
    attribute is the pipeline's own.
    """

    def __init__(self, pipe: Pipeline, controlnet: ControlNet, condition: Path, title: Path):
        self._pipe, self._controlnet, self._condition, self._title = pipe, controlnet, condition, title

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, prompt: str, **settings: Any):
        from ..request import ControlNetUnit

        unit = ControlNetUnit(image=str(self._condition), model=str(self._title))
        pipe = self._pipe
        self._title.mkdir(parents=True, exist_ok=True)  # the unit's model: an existing folder names it in the infotext
        pipe.load_controlnet = lambda source: self._controlnet  # shadows the method for this call only
        try:
            return pipe(prompt, controlnet=[unit], **settings)
        finally:
            del pipe.load_controlnet
