"""Fine-tuning an existing model on a captioned image folder: LoRA (kohya / diffusers files), the full UNet,
DreamBooth (either of those on a subject's images, with prior preservation: `dreambooth.py`), a ControlNet on
image / condition pairs (`controlnet_training.py`), or a textual-inversion embedding (handed to
`textual_inversion.py` once the data folder is scanned).

One `FineTuneConfig` (TOML via `tomlconfig.from_table`, or CLI flags made from the same fields) drives
`finetune`, which:
    1. scans the data folder (`FineTuneDataset`: a missing caption or condition image or an empty folder fails
       here, before any model is loaded) and loads the model (`sdtorch.load`; none given: the built-in shapes model);
    2. builds what trains: a `LoraNetwork` on the frozen UNet (and text encoder), for "full" the UNet
       (and text encoder) itself, or for "controlnet" a ControlNet beside the frozen UNet, whose residuals the
       UNet takes; wrapped with the frozen parts in one `_Denoiser` so that accelerate's DDP sees every trained
       parameter;
    3. runs `loop.train`: each step draws the global batch of (seed, step) and this rank's share of it
       (`FineTuneDataset.batch(step, B, rank, world_size)`), the timesteps and noise of the whole batch
       from `step_generator(seed, step)` (this rank's rows sliced out), so N processes with global batch B
       compute the loss one process with batch B does, and a resumed run continues bit for bit; with
       DreamBooth's prior preservation a class batch of B more joins the same model call (its draws from
       `step_generator(seed, step, _PRIOR_STREAM)`);
    4. exports from rank 0: for LoRA `<out>/<name>.safetensors` (kohya, with `ss_*` metadata) and
       `<out>/pytorch_lora_weights.safetensors` (diffusers / peft); for "full" a diffusers folder or a
       single file `<out>/<name>` (`sdtorch.save`; name: `export_name`); for "controlnet" a diffusers
       ControlNetModel folder or an original-layout file (`save_controlnet`); and `<out>/loss.png`.

Process groups, gradient all-reduce and mixed precision are accelerate's (`Accelerator`): the same command
runs alone, under `accelerate launch --num_processes N` or under `torchrun`. The objective is loss (Ho et al.
2020, eq. 14) on eps or v (the model's own parameterisation), with optional Min-SNR-gamma weights,
noise offset (crosslabs 2023: noise + offset * N(0, 1) per sample and channel, as kohya's --noise_offset) and
loss masks ([dataset] loss_mask_folder or alpha_mask, kohya's masked loss: each latent pixel's squared error
weighted by its mask's mean over the pixels it covers).

Layout of `out`:
    checkpoint/                 the loop's resumable checkpoint, log.jsonl and timings.json
    <name>.safetensors, <name>.pt, learned_embeds.safetensors   textual inversion (see textual_inversion.py)
    <name>.safetensors          LoRA, kohya format; <name>-step<N>.safetensors snapshots (keep_last); name:
                                output_name, by default "lora" for a LoRA and "model" for a full fine-tune
    pytorch_lora_weights.safetensors   LoRA, diffusers format
    <name>/ or <name>.safetensors      full fine-tune (and DreamBooth without lora): a diffusers folder or, with
                                save_format single_file, an original-layout file
    <name>/ or <name>.safetensors      ControlNet (name: output_name, by default "controlnet"): a diffusers
                                ControlNetModel folder (config.json, diffusion_pytorch_model.safetensors) or, with
                                save_format single_file, the A1111 extension's layout (control_model.* keys)
    class_images/               DreamBooth's class images, when class_dir does not name another folder
    latents/                    the latent cache (cache_latents)
    samples/step-<N>.png        the sample grids of sample_prompts (`samples.py`; the trained weights, not the EMA;
                                a ControlNet draws them with sample_condition as the control map)
    loss.png                    the loss curve

Gradient checkpointing covers the ResBlocks and transformers of the UNet and a ControlNet (not the text encoder).
fp16's loss scaler state is not checkpointed, so an fp16 run resumes close to, not exactly on, its uninterrupted path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs import ModelConfig
from ..errors import InvalidInputError
from ..models.checkpointing import set_gradient_checkpointing
from ..models.controlnet import ControlNet
from ..sampling.schedules import DiscreteSchedule
from . import controlnet_training
from .datasets import DatasetConfig, FineTuneDataset
from .dreambooth import DreamBoothConfig, class_dataset, generate_class_images, instance_dataset
from .diffusion import add_noise, min_snr_weights, velocity
from .lora_training import PEFT_FILE, TARGETS, LoraNetwork, save_kohya, save_peft
from .samples import sampler
from .loop import EMA, LOG_JSONL, TrainState, step_generator, train, warmup_cosine
from .textual_inversion import TextualInversionConfig, train_textual_inversion
from .vae import encode_images

logger = logging.getLogger(__name__)

METHODS = ("lora", "full", "dreambooth", "controlnet", "textual-inversion")
PRECISIONS = ("no", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "cosine")
SAVE_FORMATS = ("diffusers", "single_file")
CHECKPOINT_DIR = "checkpoint"
# fields that may change between a run and its resumption (they do not change what a step computes)
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "log_every", "out", "progress", "sample_prompts",
                      "sample_every", "sample_condition", "gradient_checkpointing")
# keys added after checkpoints were first written: left out of run_settings at their default, so those resume
_LATER_KEYS = ("controlnet_model",)
_LATER_DATASET_KEYS = ("conditioning_folder", "loss_mask_folder", "alpha_mask")
# method controlnet's own keys (and [dataset] conditioning_folder): refused for the other methods
_CONTROLNET_ONLY = ("controlnet_model", "sample_condition")
# the LoRA's own keys: setting one for a run that trains no LoRA is an error, not a silent no-op
_LORA_ONLY = ("rank", "alpha", "lora_dropout", "lora_targets", "keep_last")
_SECTIONS = {"textual_inversion": "textual-inversion", "dreambooth": "dreambooth"}  # section -> its method
_PRIOR_STREAM = 1  # `step_generator` stream of the class batch's timesteps and noise
# fields textual inversion does not use: setting one for it is an error, not a silent no-op
_NOT_TEXTUAL_INVERSION = ("output_name", "gradient_accumulation", "train_text_encoder", "rank", "alpha", "lora_dropout",
                          "lora_targets", "min_snr_gamma", "noise_offset", "mixed_precision", "ema_decay", "keep_last",
                          "save_format", "gradient_checkpointing")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FineTuneConfig:
    """A fine-tuning run: the `[dataset]` table, for method textual-inversion the `[textual_inversion]` table,
    and the keys below (each one's help is its CLI flag's).

    Textual inversion shares steps, batch_size, lr, lr_scheduler, warmup_steps, weight_decay, max_grad_norm,
    clip_skip, seed, checkpoint_every, log_every, model and out with the other methods, defaults included;
    A1111 trains embeddings with lr 5e-3, weight decay 0 and no clipping: pass `--lr 5e-3 --weight-decay 0
    --max-grad-norm 0` for that. The other keys (`_NOT_TEXTUAL_INVERSION`) are refused for it.
    """

    dataset: DatasetConfig
    out: str = field(metadata={"help": "output folder (checkpoint, exports, log); run again to resume"})
    method: str = _opt("lora", f"what trains: {' | '.join(METHODS)} (textual-inversion needs --token and "
                       "--init-word; A1111's settings for it: --lr 5e-3 --weight-decay 0 --max-grad-norm 0)")
    textual_inversion: TextualInversionConfig | None = _opt(None, "method textual-inversion's own settings")
    dreambooth: DreamBoothConfig | None = _opt(None, "method dreambooth's own settings")
    model: str = _opt("", "base model: single file, diffusers folder or hub id (empty: the built-in shapes model)")
    output_name: str = _opt("", "name of the exported file (kohya's output_name; empty: \"lora\" for a LoRA, "
                            "\"model\" for a full fine-tune, \"controlnet\" for a ControlNet)")
    controlnet_model: str = _opt("", "method controlnet: continue training this ControlNet (file or diffusers "
                                 "folder; empty: a new one, the UNet's encoder copied, zero convolutions at zero)")
    steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(1, "global batch size (split across processes)")
    gradient_accumulation: int = _opt(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _opt(False, "recompute the UNet blocks' activations in backward: less memory "
                                        "for about one more forward pass a step; same results")
    lr: float = _opt(1e-4, "learning rate (AdamW; textual inversion usually takes 5e-3)")
    lr_scheduler: str = _opt("constant", f"after warm-up: {' | '.join(LR_SCHEDULERS)} (cosine decays to 0)")
    warmup_steps: int = _opt(0, "linear LR warm-up steps")
    weight_decay: float = _opt(1e-2, "AdamW weight decay (A1111's textual inversion: 0)")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    train_text_encoder: bool = _opt(False, "also train the text encoder (LoRA on it, or all of it for full)")
    rank: int = _opt(4, "LoRA rank (kohya's network_dim)")
    alpha: float = _opt(1.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_targets: str = _opt("attention", f"layers given a LoRA: {' | '.join(TARGETS)}")
    min_snr_gamma: float | None = _opt(None, "Min-SNR-gamma loss weighting (e.g. 5)")
    noise_offset: float = _opt(0.0, "noise offset (e.g. 0.05)")
    clip_skip: int = _opt(1, "text-encoder layers skipped from the end")
    mixed_precision: str = _opt("no", f"{' | '.join(PRECISIONS)} (bf16 on CPU only with native bf16)")
    ema_decay: float | None = _opt(None, "keep an EMA of the trained weights and export it (e.g. 0.999)")
    checkpoint_every: int = _opt(500, "steps between checkpoints")
    keep_last: int = _opt(0, "LoRA: also export a snapshot at each checkpoint, keeping the last K (0: none)")
    log_every: int = _opt(10, "steps between log.jsonl lines")
    sample_prompts: tuple[str, ...] = _opt((), "validation prompts drawn to <out>/samples/step-N.png every "
                                           "sample_every steps and at the end (repeat the flag for more)")
    sample_every: int = _opt(0, "steps between sample grids (0: only the final one)")
    sample_condition: str = _opt("", "method controlnet: the control image of the sample grids (empty: the "
                                 "condition image of the dataset's first image)")
    save_format: str = _opt("diffusers", f"full fine-tune and ControlNet export: {' | '.join(SAVE_FORMATS)}")
    seed: int = _opt(0, "seed of the LoRA or new ControlNet init, timesteps and noise")
    progress: bool = _opt(True, "show a progress bar (rank 0)")

    def __post_init__(self) -> None:
        def one_of(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                raise InvalidInputError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

        one_of("method", METHODS), one_of("mixed_precision", PRECISIONS), one_of("lr_scheduler", LR_SCHEDULERS)
        one_of("lora_targets", TARGETS), one_of("save_format", SAVE_FORMATS)
        positive = ("steps", "batch_size", "gradient_accumulation", "rank", "checkpoint_every", "log_every", "clip_skip")
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.out:
            raise InvalidInputError("out must name the output folder")
        if self.output_name and not re.fullmatch(r"[\w.-]+", self.output_name):
            raise InvalidInputError(f"output_name must be a plain file name, got {self.output_name!r}")
        if not (self.lr > 0 and self.alpha > 0 and 0 <= self.lora_dropout < 1 and self.noise_offset >= 0
                and self.warmup_steps >= 0 and self.keep_last >= 0 and self.max_grad_norm >= 0
                and self.sample_every >= 0):
            raise InvalidInputError("need lr > 0, alpha > 0, 0 <= lora_dropout < 1, and noise_offset, warmup_steps, "
                                    "keep_last, max_grad_norm, sample_every >= 0")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise InvalidInputError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise InvalidInputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for section, method in _SECTIONS.items():
            if getattr(self, section) is not None and self.method != method:
                raise InvalidInputError(f"[{section}] is for method {method}, not {self.method}")
        if self.method == "textual-inversion" and self.textual_inversion is None:
            raise InvalidInputError("method textual-inversion needs the [textual_inversion] section "
                                    "(name and init_word; flags --token NAME --init-word WORD)")
        if self.method == "dreambooth" and self.dreambooth is None:
            raise InvalidInputError("method dreambooth needs the [dreambooth] section (instance_prompt, and "
                                    "class_prompt for prior preservation; flags --instance-prompt, --class-prompt)")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.method == "controlnet":
            if not self.dataset.conditioning_folder:
                raise InvalidInputError("method controlnet needs [dataset] conditioning_folder "
                                        "(--conditioning-folder): the condition images, one per training image by "
                                        "file stem")
            if self.train_text_encoder:
                raise InvalidInputError("method controlnet trains only the ControlNet: leave train_text_encoder unset")
        else:
            given = [name for name in _CONTROLNET_ONLY if getattr(self, name) != defaults[name]]
            given += ["[dataset] conditioning_folder"] * bool(self.dataset.conditioning_folder)
            if given:
                raise InvalidInputError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for method "
                                        f"controlnet, not {self.method}")
        unused = (_NOT_TEXTUAL_INVERSION if self.method == "textual-inversion"
                  else () if self.trains_lora else (*_LORA_ONLY, ))
        unused = [name for name in unused if getattr(self, name) != defaults[name]]
        if self.method == "textual-inversion":
            unused += [f"[dataset] {key}" for key in ("loss_mask_folder", "alpha_mask") if getattr(self.dataset, key)]
        if unused and self.method == "textual-inversion":
            raise InvalidInputError(f"method textual-inversion does not use {', '.join(unused)}; leave them unset")
        if unused:
            raise InvalidInputError(f"method {self.method} trains no LoRA: leave {', '.join(unused)} unset")
        if self.trains_lora and self.save_format != defaults["save_format"]:
            raise InvalidInputError("save_format is for full fine-tunes; a LoRA is written in the kohya and diffusers "
                                    "formats")

    @property
    def export_name(self) -> str:
        """The exported file's name: output_name, or by default "lora" / "controlnet" / "model" after what trains."""
        if self.output_name:
            return self.output_name
        if self.method == "controlnet":
            return controlnet_training.DEFAULT_NAME
        return "lora" if self.trains_lora else "model"

    @property
    def trains_lora(self) -> bool:
        """Whether what trains is a LoRA network (method lora, or dreambooth with lora = true)."""
        return self.method == "lora" or (self.dreambooth is not None and self.dreambooth.lora)

    @property
    def final_lr_ratio(self) -> float:
        """The LR at the last step as a fraction of `lr`: 1 for a constant schedule, 0 for cosine."""
        return 1.0 if self.lr_scheduler == "constant" else 0.0

    def run_settings(self) -> dict[str, Any]:
        """The settings (JSON-able) a resumed run must share with the run it continues; a method section
        that is not there is left out, so checkpoints written before it existed resume."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE_CHANGES}
        for section in _SECTIONS:
            if settings[section] is None:
                del settings[section]
        for keys, table, default in ((_LATER_KEYS, settings, self), (_LATER_DATASET_KEYS, settings["dataset"],
                                                                      DatasetConfig)):
            for key in keys:
                if table[key] == _field_default(default, key):
                    del table[key]
        return settings


def _field_default(cls: Any, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: /proc/cpuinfo lists avx512_bf16 or amx_bf16 (torch's
    `get_cpu_capability()` says only "AVX512", which does not imply bf16); else bf16 is emulated, slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise InvalidInputError("mixed_precision fp16 needs a CUDA GPU; on a CPU use bf16 (if it has native bf16) or no")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise InvalidInputError("mixed_precision bf16: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag), "
                                "so it would be emulated and slow; use mixed_precision = \"no\"")


class _Denoiser(nn.Module):
    """Text encoder + UNet (+ the LoRA network or the ControlNet) as one module: noisy latents, timesteps and
    captions' ids (B, 77) of each part of a step's batch (and with a ControlNet its condition images (B, 3, H, W)
    in [0, 1]) -> the UNet's output for each part.

    Wrapping them together lets DDP see every trained parameter, and one call per step however many parts
    (instance and class batches) there are, as DDP requires; parts of one latent size run as one batch.
    The text encoder runs without gradients unless it trains. A ControlNet's residuals go to the UNet as
    diffusers' train_controlnet.py passes them (`down_block_additional_residuals`, `mid_block_additional_residual`).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, network: LoraNetwork | None,
                 train_text_encoder: bool, clip_skip: int, controlnet: nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder, self.network, self.controlnet = unet, text_encoder, network, controlnet
        self.train_text_encoder, self.clip_skip = train_text_encoder, clip_skip

    def forward(self, parts: list[tuple[Tensor, ...]]) -> list[Tensor]:
        """parts: (x_t (b, C, h, w), t (b,), ids (b, 77)[, conditions (b, 3, 8h, 8w)]) each."""
        sizes = [part[0].shape[0] for part in parts]
        if len({part[0].shape for part in parts}) > 1:  # different buckets: one UNet call each
            return [out for part in parts for out in self.forward([part])]
        x_t, t, ids, *conditions = (torch.cat(tensors) for tensors in zip(*parts))
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            context = self.text_encoder(ids, clip_skip=self.clip_skip)  # (B, 77, D)
        residuals = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(x_t, t, context, conditions[0])  # [(B, C_i, h_i, w_i)], (B, C, h', w')
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return list(self.unet(x_t, t, context, **residuals).split(sizes))  # [(b, C, h, w)]


@dataclass
class LossPart:
    """One part of a step's batch: this rank's latents (b, C, h, w) and captions' ids (b, 77), the generator of
    the whole global batch's timesteps and noise, the part's weight in the loss, for a ControlNet its condition
    images (b, 3, H, W) in [0, 1], and with loss masks the masks (b, 1, H, W) in [0, 1]."""

    latents: Tensor
    ids: Tensor
    generator: torch.Generator
    weight: float = 1.0
    conditions: Tensor | None = None
    masks: Tensor | None = None


def finetune_loss(model: nn.Module, parts: list[LossPart], schedule: DiscreteSchedule, *, rows: slice,
                  global_batch: int, prediction_type: str, snr_gamma: float | None, noise_offset: float) -> Tensor:
    """Weighted sum over `parts` of the denoising MSE of this rank's latents, rows `rows` of each global batch.

    Timesteps (B,) and noise (B, C, h, w) are drawn for each part's whole global batch from its generator and
    this rank's rows taken, so the split across processes does not change any sample's draws. A part's masks
    weigh each latent pixel's squared error by the mask's mean over the image pixels under it (kohya's masked loss).
    """
    inputs, targets, timesteps = [], [], []
    for part in parts:
        latents, generator = part.latents, part.generator
        shape = (global_batch, *latents.shape[1:])
        t = torch.randint(0, schedule.num_train_timesteps, (global_batch,), generator=generator)[rows]  # (b,)
        noise = torch.randn(shape, generator=generator)  # (B, C, h, w)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(*shape[:2], 1, 1, generator=generator)  # per sample, channel
        t, noise = t.to(latents.device), noise[rows].to(latents.device, latents.dtype)
        extra = () if part.conditions is None else (part.conditions,)
        inputs.append((add_noise(schedule, latents, noise, t), t, part.ids, *extra))  # x_t (b, C, h, w)
        targets.append(noise if prediction_type == "epsilon" else velocity(schedule, latents, noise, t))
        timesteps.append(t)
    loss = torch.zeros((), device=parts[0].latents.device)
    for part, prediction, target, t in zip(parts, model(inputs), targets, timesteps):
        error = (prediction.float() - target.float()).pow(2)  # (b, C, h, w)
        if part.masks is not None:
            error = error * F.interpolate(part.masks.float(), size=error.shape[-2:], mode="area")  # (b, 1, h, w)
        per_sample = error.flatten(1).mean(1)  # (b,)
        if snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(schedule, t, snr_gamma, prediction_type)
        loss = loss + part.weight * per_sample.mean()
    return loss


def kohya_metadata(config: FineTuneConfig, model: ModelConfig, *, step: int, images: int, started: float,
                   batches_per_epoch: int, reg_images: int = 0) -> dict[str, str]:
    """The run's `ss_*` fields as sd-scripts' train_network.py writes them (all strings)."""
    d = config.dataset
    return {
        "ss_base_model_version": "sd_v1" if model.family == "sd1" else "sd_v2",
        "ss_v2": str(model.family == "sd2"), "ss_v_parameterization": str(model.prediction_type == "v_prediction"),
        "ss_sd_model_name": config.model or "sdtorch-shapes", "ss_output_name": config.export_name,
        "ss_resolution": f"({d.resolution}, {d.resolution})", "ss_enable_bucket": str(d.buckets),
        "ss_steps": str(step), "ss_max_train_steps": str(config.steps), "ss_learning_rate": str(config.lr),
        "ss_unet_lr": str(config.lr), "ss_text_encoder_lr": str(config.lr if config.train_text_encoder else 0.0),
        "ss_lr_scheduler": config.lr_scheduler, "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_training_started_at": str(started), "ss_training_finished_at": str(time.time()),
        "ss_num_train_images": str(images), "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_total_batch_size": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_mixed_precision": config.mixed_precision, "ss_seed": str(config.seed), "ss_clip_skip": str(config.clip_skip),
        "ss_noise_offset": str(config.noise_offset), "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_max_grad_norm": str(config.max_grad_norm), "ss_cache_latents": str(d.cache_latents),
        "ss_caption_dropout_rate": str(d.caption_dropout), "ss_shuffle_caption": str(d.shuffle_tags),
        "ss_keep_tokens": str(d.keep_tokens), "ss_optimizer": "torch.optim.AdamW",
        "ss_network_train_unet_only": str(not config.train_text_encoder), "ss_num_reg_images": str(reg_images),
        "ss_prior_loss_weight": str(config.dreambooth.prior_loss_weight if config.dreambooth else 1.0),
    }


def draw_loss_curve(log: Path, out: Path, size: tuple[int, int] = (640, 360)) -> bool:
    """A PNG of the logged loss against the step (Pillow lines, no plotting library); False when nothing was logged."""
    import json

    from PIL import Image, ImageDraw

    from ..checkpoints.io import atomic_write

    points = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if math.isfinite(entry.get("loss", math.nan)):
                points.append((entry["step"], entry["loss"]))
    if len(points) < 2:
        return False
    w, h, m = *size, 40
    s0, s1 = points[0][0], points[-1][0]
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    xy = [(m + (w - 2 * m) * (s - s0) / max(s1 - s0, 1), h - m - (h - 2 * m) * (v - lo) / max(hi - lo, 1e-12))
          for s, v in points]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((m, m, w - m, h - m), outline="gray")
    draw.line(xy, fill=(200, 40, 40), width=2)
    draw.text((m, 8), f"loss {hi:.4g} .. {lo:.4g}, steps {s0} .. {s1}", fill="black")
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))
    return True


def finetune(config: FineTuneConfig) -> Path:
    """Run (or resume) the fine-tune of `config`; returns the main export's path (see the module docstring)."""
    import sdtorch
    from accelerate import Accelerator

    dreambooth = config.dreambooth
    # bad data fails here, before any model is loaded
    dataset = instance_dataset(dreambooth, config.dataset) if dreambooth else FineTuneDataset(config.dataset)
    sample_condition = (controlnet_training.check_inputs(config.controlnet_model, config.sample_condition, dataset)
                        if config.method == "controlnet" else None)
    if config.method == "textual-inversion":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by accelerate launch and torchrun
            raise InvalidInputError("textual inversion trains in one process; run it without accelerate launch / "
                                    "torchrun (its few vectors train fast on one device)")
        result = train_textual_inversion(sdtorch.load(config.model or None), dataset, config)
        draw_loss_curve(Path(config.out) / CHECKPOINT_DIR / LOG_JSONL, Path(config.out) / "loss.png")
        return result
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    _check_precision(config.mixed_precision, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.batch_size % world:
        raise InvalidInputError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    out = Path(config.out)
    folder = out / CHECKPOINT_DIR
    main = accelerator.is_main_process
    started = time.time()

    pipe = sdtorch.load(config.model or None, device=accelerator.device)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    vae.requires_grad_(False).eval()
    set_gradient_checkpointing(unet, config.gradient_checkpointing)
    network: LoraNetwork | None = None
    controlnet: ControlNet | None = None
    if config.method == "controlnet":  # only the ControlNet trains
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        controlnet = controlnet_training.controlnet_to_train(pipe, config.controlnet_model, config.seed)
        set_gradient_checkpointing(controlnet, config.gradient_checkpointing)
        trained: dict[str, nn.Module] = {"controlnet": controlnet}
    elif config.trains_lora:
        parts = ("unet", "text_encoder") if config.train_text_encoder else ("unet",)
        text_encoder.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            network = LoraNetwork({"unet": unet, "text_encoder": text_encoder}, rank=config.rank,
                                  alpha=config.alpha, dropout=config.lora_dropout, targets=config.lora_targets,
                                  parts=parts)
        trained = {"lora": network}
    else:
        text_encoder.requires_grad_(config.train_text_encoder)
        unet.requires_grad_(True)
        trained = {"unet": unet, **({"text_encoder": text_encoder} if config.train_text_encoder else {})}
    prior: FineTuneDataset | None = None
    if dreambooth is not None and dreambooth.prior_preservation:
        folder_of_class = dreambooth.class_folder(out)
        with accelerator.main_process_first():  # rank 0 draws the missing class images, the others wait
            if main:
                generate_class_images(pipe, dreambooth, folder_of_class, config.dataset.resolution, config.seed)
        prior = class_dataset(dreambooth, config.dataset, folder_of_class)
    if config.dataset.cache_latents:
        with accelerator.main_process_first():
            for data in (dataset, prior) if prior is not None else (dataset,):
                data.cache_latents(vae, out / "latents")

    denoiser = _Denoiser(unet, text_encoder, network, config.train_text_encoder, config.clip_skip, controlnet)
    denoiser.train()
    text_encoder.train(config.train_text_encoder and config.method == "full")
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.steps, final_ratio=config.final_lr_ratio)
    model, prepared_optimizer = accelerator.prepare(denoiser, optimizer)
    # the global RNG (dropout draws from it) starts from the seed and this rank; a resumed run restores its state
    random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)
    state = TrainState(
        models=trained, optimizer=prepared_optimizer, scheduler=scheduler, seed=config.seed,
        config=config.run_settings(),
        ema={name: EMA(m, decay=config.ema_decay, warmup=True) for name, m in trained.items()}
        if config.ema_decay is not None else {},
    )
    schedule = DiscreteSchedule(pipe.config.schedule)
    accumulation, share = config.gradient_accumulation, config.batch_size // world
    rows = slice(rank * share, (rank + 1) * share)
    scaling = vae.scaling_factor

    def loss_part(data: FineTuneDataset, micro_step: int, stream: int, weight: float) -> LossPart:
        batch = data.batch(micro_step, config.batch_size, rank=rank, world_size=world)
        if batch.latents is not None:
            latents = batch.latents.to(accelerator.device)  # (b, C, h, w), scaled
        else:
            latents = encode_images(vae, batch.images).mean * scaling  # (b, C, h, w)
        ids = pipe.tokenizer(batch.captions).to(accelerator.device)  # (b, 77)
        conditions = None if controlnet is None else batch.conditions.to(accelerator.device)  # (b, 3, H, W) in [0, 1]
        masks = None if batch.masks is None else batch.masks.to(accelerator.device)  # (b, 1, H, W) in [0, 1]
        return LossPart(latents, ids, step_generator(config.seed, micro_step, stream), weight, conditions, masks)

    def micro_loss(micro_step: int) -> Tensor:
        parts = [loss_part(dataset, micro_step, 0, 1.0)]
        if prior is not None:
            parts.append(loss_part(prior, micro_step, _PRIOR_STREAM, dreambooth.prior_loss_weight))
        return finetune_loss(model, parts, schedule, rows=rows, global_batch=config.batch_size,
                             prediction_type=pipe.config.prediction_type, snr_gamma=config.min_snr_gamma,
                             noise_offset=config.noise_offset)

    def step(state: TrainState) -> dict[str, Tensor]:
        earlier = torch.zeros((), device=accelerator.device)
        for micro in range(accumulation - 1):  # their gradients accumulate locally, unsynced
            with accelerator.no_sync(model):
                loss = micro_loss(state.step * accumulation + micro)
                accelerator.backward(loss / accumulation)
            earlier += loss.detach()
        last = micro_loss(state.step * accumulation + accumulation - 1) / accumulation
        mean = accelerator.reduce((earlier / accumulation + last.detach()), reduction="mean")
        # the value is the mean loss over micro-batches and processes; the gradient is that of `last`
        return {"loss": last + (mean - last).detach()}

    def backward(loss: Tensor) -> None:
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)

    bar = None
    if main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"finetune {config.method}", unit="step", dynamic_ncols=True)

    drawing = (pipe if controlnet is None
               else controlnet_training.SamplingPipeline(pipe, controlnet, sample_condition, out))
    sample = sampler(drawing, config.sample_prompts if main else (), out, every=config.sample_every, last=config.steps,
                     resolution=config.dataset.resolution, seed=config.seed,
                     modules=[m for m in (network, controlnet) if m is not None])

    def on_step(state: TrainState, metrics: dict[str, Tensor]) -> None:
        sample(state.step)
        if bar is not None:
            if bar.n == 0 and state.step > 1:  # resumed: start the bar where the run is
                bar.n = bar.last_print_n = state.step - 1
                bar.start_t = time.time()
            bar.update(1)
            rate = bar.format_dict["rate"] or 0.0
            bar.set_postfix(loss=f"{metrics['loss'].item():.4f}", img_s=f"{rate * config.batch_size:.1f}")

    def exported(fn) -> None:
        """Run `fn` with the EMA weights in place (when there is an EMA)."""
        if not state.ema:
            fn()
            return
        name, ema = next(iter(state.ema.items()))
        with ema.averaged(trained[name]):
            fn()

    def metadata() -> dict[str, str]:
        return kohya_metadata(config, pipe.config, step=state.step, images=len(dataset), started=started,
                              batches_per_epoch=dataset.batches_per_epoch(config.batch_size),
                              reg_images=len(prior) if prior is not None else 0)

    def snapshot(state: TrainState) -> None:
        if network is None or not config.keep_last or state.step >= config.steps:
            return
        exported(lambda: save_kohya(network, out / f"{config.export_name}-step{state.step:08d}.safetensors", metadata()))
        snapshots = sorted(out.glob(f"{config.export_name}-step[0-9]*.safetensors"))
        for old in snapshots[: -config.keep_last]:
            old.unlink(missing_ok=True)

    try:
        train(step, state, config.steps, batch_size=config.batch_size, folder=folder,
              checkpoint_every=config.checkpoint_every, log_every=config.log_every, stage=f"finetune-{config.method}",
              backward=backward, write=main, on_step=on_step, on_checkpoint=snapshot,
              log=(lambda entry: None) if bar is not None or not main else None)
    finally:
        if bar is not None:
            bar.close()
    accelerator.wait_for_everyone()
    if not main:
        return out
    if network is not None:
        result = out / f"{config.export_name}.safetensors"
        exported(lambda: (save_kohya(network, result, metadata()), save_peft(network, out / PEFT_FILE)))
    else:
        result = out / (config.export_name + (".safetensors" if config.save_format == "single_file" else ""))
        if controlnet is not None:
            exported(lambda: controlnet_training.export(controlnet, result, config.save_format))
        else:
            exported(lambda: sdtorch.save(pipe, result, format=config.save_format, overwrite=True))
    draw_loss_curve(folder / LOG_JSONL, out / "loss.png")
    return result

