"""Generation: txt2img, img2img and inpainting on a Pipeline's parts, with diffusers' numerics.

    prompt -> encode_conditioning -> Conditioning: contexts (77k, D) per model evaluation, AND weights
    seed -> CPU noise (B,4,h,w) -> [img2img: VAE.encode(image) * scale + noise] -> sample() -> latents
    latents / scale -> decode_latents -> PIL images with the A1111 "parameters" text

`run(model, request)` validates a GenerationRequest, resolves it against the model (`plan` -> a Job) and
generates. The order in which a single explicit `generator` is drawn from (VAE samples, noise, sampler noise)
follows diffusers' pipelines, so the same generator gives diffusers' image. Seeds follow A1111: each image draws its
initial noise and then its sampler's noise from its own stream (`SeededNoise`), so image i of a batch is the image
seed + i gives alone.

ControlNet units (`request.controlnet`) add their residuals to the model's UNet calls (control.py); the refiner
runs without them.

A refiner (A1111's, e.g. SDXL's refiner after its base) is a second model that takes over the running sampler
at `refiner_switch_at`, with its own conditioning, and decodes the result (`sampling.samplers.ModelSwitch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from .compiled import CompiledDecoder, CompiledUNet
from .configs import ModelConfig
from .checkpoints.controlnet_files import controlnet_title
from .control import Control, control_map, infotext_unit, residuals, step_of
from .image_prompts import ImagePrompt, image_prompt, installed, with_prompt_tokens
from .decoding import decode_latents
from .adapters.lora import lora_files, lora_hash
from .errors import CheckpointError, InvalidInputError
from .extra_networks import strip_extra_networks
from .images import (
    crop_for_inpaint, crop_region, expand_to_aspect, image_to_tensor, load_image, load_mask, mask_to_latent,
    masked_image, paste_back, resize_image, tensor_to_images,
)
from .infotext import format_infotext, schedule_label
from .models.tokenizer import CLIPTokenizer
from .models.vae import AutoencoderKL, DiagonalGaussian
from .prompt_schedule import encode_conditioning, split_and
from .request import INSTRUCT_PIX2PIX_IMAGE_CFG, GenerationRequest, Limits, ModelDefaults, random_seed, suggestion
from .resident import release_file_pages
from .sampling.common import Callback, Noise, SeededNoise
from .sampling.denoiser import Conditioning, Denoiser
from .sampling.samplers import DISCRETE_LABEL, ModelSwitch, resolve, resolve_request, sample
from .sampling.schedules import DiscreteSchedule
from .step_cache import StepCache
from .tiling import wrapped_edges
from .upscaling import LATENT_MODES, resize_with, upscale_latents

if TYPE_CHECKING:
    from .checkpoints.vae_files import LoadedVae

@dataclass
class Job:
    """A validated request resolved against a model: one entry per output image where it varies."""

    source: GenerationRequest
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    schedule: str
    clip_skip: int
    generator: torch.Generator | None
    eta: float | None = None
    guidance_rescale: float = 0.0
    image_guidance_scale: float | None = None  # instruct-pix2pix models only: the init image's guidance
    subseeds: list[int] = dataclasses.field(default_factory=list)  # per image, with a variation seed strength
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (width, height) A1111's seed resize draws the noise for
    image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None
    region: tuple[int, int, int, int] | None = None  # "only masked": the part of the image generated
    hires_size: tuple[int, int] | None = None  # (width, height) of the hires fix's second pass
    hires_sampler: str | None = None  # the second pass's sampler and schedule kind (None: the first pass's)
    hires_schedule: str | None = None
    hires_prompts: list[str] = dataclasses.field(default_factory=list)  # its prompts, if its own (tags stripped)
    hires_negative_prompts: list[str] = dataclasses.field(default_factory=list)
    written_prompts: list[str] = dataclasses.field(default_factory=list)  # as given, <lora:...> tags included
    refiner: Model | None = None  # takes over the sampling at source.refiner_switch_at (A1111's refiner)
    loras: dict[str, float] = dataclasses.field(default_factory=dict)  # the prompts' <lora:name:weight> tags
    warnings: list[str] = dataclasses.field(default_factory=list)  # what was adjusted or fell back, for the user
    controls: list[Control] = dataclasses.field(default_factory=list)  # the request's ControlNet units, loaded
    image_prompts: list[ImagePrompt] = dataclasses.field(default_factory=list)  # its IP-Adapter units, encoded


class GenerationResult(list):
    """The images of one generation (a list of PIL images), with the resolved request and any warnings.

    Each image carries its A1111 text in `img.info["parameters"]` and its seed in `img.info["seed"]`.
    """

    def __init__(self, images: list[Image.Image], request: GenerationRequest, warnings: list[str]):
        super().__init__(images)
        self.request = request  # with the model's defaults filled in (size, CFG, schedule, seed)
        self.warnings = warnings


class Model(Protocol):
    """What generation needs of a model (a Pipeline is one)."""

    tokenizer: CLIPTokenizer
    text_encoder: nn.Module
    unet: nn.Module
    compiled_unet: CompiledUNet | None  # runs the UNet when set (Pipeline.compile)
    compiled_decoder: CompiledDecoder | None  # decodes untiled latents when set (Pipeline.compile)
    vae: AutoencoderKL
    config: ModelConfig
    vae_scale_factor: int
    default_size: int
    defaults: ModelDefaults  # what a request's unset steps, sampler, schedule and CFG become
    model_hash: str | None
    model_name: str | None
    lora_dir: Path | None  # where <lora:name> tags find their files
    loaded_vae: LoadedVae | None  # a VAE file used instead of the checkpoint's own (its infotext keys)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str: ...

    def load_refiner(self, source: str) -> Model: ...  # the model a request's refiner_checkpoint names

    def load_controlnet(self, source: str | Path) -> nn.Module: ...  # a ControlNet unit's model (cached)

    def load_ip_adapter(self, source: str | Path) -> nn.Module: ...  # an IP-Adapter unit's adapter (cached)

    def load_image_encoder(self, source: str | Path) -> nn.Module: ...  # its CLIP vision tower (cached)

    def unload_lora(self, name: str | None = None) -> None: ...


def run(
    model: Model, request: GenerationRequest, generator: torch.Generator | None = None,
    callback: Callback | None = None, limits: Limits | None = None, refiner: Model | None = None,
) -> GenerationResult:
    """Validate `request`, resolve it against `model` and generate: txt2img, img2img, inpainting, hires fix;
    with a `refiner` (or the request's refiner_checkpoint), A1111's refiner."""
    limits = limits or Limits()
    job = plan(model, request.validate(limits), generator, limits, refiner)
    with _prompt_loras(model, job) as hashes, installed(model.unet, job.image_prompts):
        images = _generate(model, job, callback, job.warnings, hashes)
    return GenerationResult(images, resolved_request(job), job.warnings)


@contextmanager
def _prompt_loras(model: Model, job: Job) -> Iterator[dict[str, str]]:
    """Apply the prompts' `<lora:name:weight>` tags for this run (files found by name in `model.lora_dir`) and
    remove them after it; yields {name: A1111 hash} for the infotext's "Lora hashes"."""
    if not job.loras:
        yield {}
        return
    if model.lora_dir is None:
        raise InvalidInputError(f"the prompt names <lora:{next(iter(job.loras))}:...> but no LoRA folder is set "
                                "(--lora-dir, or pipe.lora_dir)")
    files = lora_files(model.lora_dir)
    applied, hashes = [], {}
    try:
        for name, weight in job.loras.items():
            if name not in files:
                raise InvalidInputError(f"<lora:{name}> is not in {model.lora_dir}{suggestion(name, files)}")
            applied.append(model.load_lora(files[name], scale=weight, name=f"<lora:{name}>"))
            hashes[name] = lora_hash(files[name])
        yield hashes
    finally:
        for name in applied:
            model.unload_lora(name)


def _generate(
    pipe: Model, request: Job, callback: Callback | None, warnings: list[str], lora_hashes: dict[str, str],
) -> list[Image.Image]:
    """Run one job end to end and return PIL images carrying their infotext; decoding warnings go to `warnings`."""
    denoiser = _denoiser(pipe, request, request.controls, request.image_prompts)
    embeddings = pipe.text_encoder.textual_inversion  # records the embeddings the prompts use
    if embeddings is not None:
        embeddings.used.clear()
    models = (pipe, request.refiner) if request.refiner is not None else (pipe,)
    tiled = request.source.tiling
    edges = wrapped_edges(*(part for m in models for part in (m.unet, m.vae))) if tiled else nullcontext()
    with torch.inference_mode(), edges:
        cond, uncond = _conditioning(pipe, request)
        # the refiner runs in the hires fix's second pass only (A1111's default, "Hires fix refiner pass")
        switch = _refiner_switch(request) if request.hires_size is None else None
        if request.region is not None:
            images = _inpaint_only_masked(pipe, denoiser, request, cond, uncond, callback, warnings, switch)
        else:
            latents = _sample(pipe, denoiser, request, cond, uncond, callback, switch)
            if request.hires_size is not None:
                switch = _refiner_switch(request, hires=True)
                latents = _hires_pass(pipe, denoiser, request, latents, callback, warnings, switch)
            images = _decode(_decoder(pipe, request, switch), latents, request, warnings)
            if request.mask is not None and request.source.inpaint.mask_overlay:
                images = [paste_back(request.image, img, None, request.mask) for img in images]
    refined = switch is not None and switch.engaged
    if switch is not None and not refined:
        warnings.append(f"the refiner did not run: no step of this sampling is past refiner_switch_at "
                        f"{request.source.refiner_switch_at}")
    hashes = {"Lora hashes": lora_hashes, "TI hashes": embeddings.hashes(embeddings.used) if embeddings else {}}
    return _with_infotext(pipe, request, images, hashes, refined)


def _denoiser(
    pipe: Model, request: Job, controls: list[Control] | None = None, image_prompts: list[ImagePrompt] | None = None,
) -> Denoiser:
    """The model's UNet as D(x, sigma): run on the model's device and dtype, with step caching if asked, the
    `controls`' ControlNet residuals added (step caching and the compiled UNet pass them through) and the
    `image_prompts`' tokens appended to the context (their adapters installed: the plain UNet runs)."""
    unet_dtype = next(pipe.unet.parameters()).dtype
    device = next(pipe.unet.parameters()).device

    plain = image_prompts or request.source.tiling  # adapters installed, or convolutions wrapping: not as compiled
    forward = pipe.unet if plain else (pipe.compiled_unet or pipe.unet)
    if request.source.deep_cache > 1:
        forward = StepCache(forward.split_forward, request.source.deep_cache)

    pooled_dim = pipe.config.pooled_dim

    def unet(x: Tensor, t: Tensor, context: Tensor, added: Tensor | None = None) -> Tensor:
        """The UNet on the model's device and dtype; sampler math stays float32 where x lives. added (B, P+K):
        SDXL's pooled text embedding and time ids."""
        extra = {}
        if added is not None:
            added = added.to(device, unet_dtype)
            extra = dict(text_embeds=added[:, :pooled_dim], time_ids=added[:, pooled_dim:])
        x_in, t_in, context_in = x.to(device, unet_dtype), t.to(device), context.to(device, unet_dtype)
        if controls:
            grid = denoiser.grid  # the sampler's steps: the guidance windows are fractions of them
            step, steps = (step_of(grid.timesteps, t), grid.steps) if grid is not None else (0, 1)
            extra = {**extra, **residuals(controls, x_in, t_in, context_in, step, steps, denoiser.uncond_rows, **extra)}
        if image_prompts:  # after the ControlNets, which read the text alone
            context_in = with_prompt_tokens(context_in, image_prompts, denoiser.uncond_rows)
        out = forward(x_in, t_in, context_in, **extra)
        return out.to(x.device, torch.float32)

    denoiser = Denoiser(unet, DiscreteSchedule(pipe.config.schedule), pipe.config.prediction_type)
    return denoiser


def _refiner_switch(request: Job, hires: bool = False) -> ModelSwitch | None:
    """The refiner's denoiser and conditioning for the first pass, or the hires pass (None without a refiner).
    The refiner encodes the prompts with its own text encoder, its time ids with its own shape (the SDXL
    refiner's aesthetic scores), over the same model evaluations (A1111 `setup_conds` after the switch)."""
    refiner = request.refiner
    if refiner is None:
        return None
    hires_steps = (request.source.hires.hr_second_pass_steps or request.steps) if hires else None
    cond, uncond = _conditioning(refiner, request, hires_steps=hires_steps)
    return ModelSwitch(_denoiser(refiner, request), cond, uncond, request.source.refiner_switch_at)


def _decoder(pipe: Model, request: Job, switch: ModelSwitch | None) -> Model:
    """The model whose VAE decodes: the refiner once it has run (A1111 decodes with the model loaded last)."""
    return request.refiner if switch is not None and switch.engaged else pipe


def _conditioning(
    pipe: Model, request: Job, hires_steps: int | None = None,
) -> tuple[Conditioning, Conditioning | None]:
    """(cond, uncond) of the first pass, or of a hires pass of `hires_steps` steps after it: A1111 prompt
    editing over the sampler's model evaluations, and AND. The negative side is left out where guidance
    does not use it (CFG scale 1 without AND weights)."""
    info, _ = resolve(request.sampler)
    prompts, negatives = request.prompts, request.negative_prompts
    if hires_steps is not None:  # the hires pass: its own sampler's model evaluations, its own prompts if given
        hires_steps = resolve(request.hires_sampler or request.sampler)[0].prompt_steps(hires_steps)
        prompts, negatives = request.hires_prompts or prompts, request.hires_negative_prompts or negatives
    composed = any(len(parts) > 1 or parts[0][1] != 1.0 for parts in map(split_and, prompts))
    negatives = negatives if request.guidance_scale != 1.0 or composed else None
    cond, uncond = encode_conditioning(
        pipe.tokenizer, pipe.text_encoder, prompts, negatives, info.prompt_steps(request.steps),
        hires_steps=hires_steps, clip_skip=request.clip_skip, zero_empty_negatives=pipe.config.is_sdxl)
    # done until the next prompt: its weights that are views of the checkpoint file leave memory (resident.py)
    release_file_pages([*pipe.text_encoder.parameters(), *pipe.text_encoder.buffers()])
    if not pipe.config.is_sdxl:
        return cond, uncond
    width, height = (request.width, request.height) if hires_steps is None else request.hires_size
    cond = dataclasses.replace(cond, time_ids=sdxl_time_ids(pipe.config, width, height, negative=False))
    if uncond is not None:
        uncond = dataclasses.replace(uncond, time_ids=sdxl_time_ids(pipe.config, width, height, negative=True))
    return cond, uncond


REFINER_AESTHETIC_SCORES = (6.0, 2.5)  # (prompt, negative): A1111's sdxl_refiner_high/low_aesthetic_score


def sdxl_time_ids(config: ModelConfig, width: int, height: int, negative: bool) -> Tensor:
    """SDXL's size/crop conditioning (K,) for a width x height image, as A1111 and diffusers set it by default:
    original size = target size, crop (0, 0). The base takes (original h, w, crop top, left, target h, w), the
    refiner (original h, w, crop top, left, aesthetic score), the score lower on the negative side."""
    if config.num_time_ids == 5:
        return torch.tensor([height, width, 0, 0, REFINER_AESTHETIC_SCORES[negative]], dtype=torch.float32)
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def _noise(request: Job, shape: tuple[int, ...]) -> tuple[Tensor, Noise]:
    """(initial noise (B,C,h,w) on the CPU, what the sampler's own noise continues from): the request's one
    generator, in diffusers' order of draws, else A1111's per-image streams of the seeds (image i of a batch is the
    image seed + i gives alone, stochastic samplers included)."""
    if request.generator is not None:
        return torch.randn(shape, generator=request.generator, device=request.generator.device).cpu(), request.generator
    streams, drawn_as = SeededNoise(request.seeds, request.source.eta_noise_seed_delta), None
    if request.seed_resize_from is not None:  # A1111's seed resize, in latent pixels
        f = request.width // shape[-1]
        drawn_as = (request.seed_resize_from[1] // f, request.seed_resize_from[0] // f)
        drawn_as = None if drawn_as == tuple(shape[-2:]) else drawn_as
    return streams.initial(shape, request.subseeds or None, request.subseed_strength, drawn_as), streams


def _vae_generator(request: Job) -> torch.Generator | None:
    """What samples the VAE's posterior when an image is encoded: the request's generator (diffusers' order of
    draws); None for seeded images, which take the posterior's mean (A1111 samples it from its global RNG, apart
    from the images' seeds; the mean keeps image i of a batch the image of seed + i)."""
    return request.generator


def _posterior(pipe: Model, image: Image.Image | Tensor) -> DiagonalGaussian:
    """The VAE's posterior q(z|x) of an image (PIL, or (1,3,H,W) in [-1,1]), on the VAE's device and dtype."""
    parameter = next(pipe.vae.parameters())
    pixels = image_to_tensor(image) if isinstance(image, Image.Image) else image  # (1,3,H,W) in [-1,1]
    return pipe.vae.encode(pixels.to(parameter.device, parameter.dtype))


def _encode_image(pipe: Model, image: Image.Image | Tensor, batch: int, generator: torch.Generator | None) -> Tensor:
    """VAE latents (batch,4,h,w) of an image, scaled; sampled from `generator` as diffusers does, or the posterior's
    mean without one."""
    return _scaled_latents(pipe, _posterior(pipe, image), batch, generator)


def _scaled_latents(pipe: Model, posterior: DiagonalGaussian, batch: int, generator: torch.Generator | None) -> Tensor:
    """(batch,4,h,w) latents of a posterior, scaled: sampled from `generator`, or its mean without one."""
    latents = posterior.mode() if generator is None else posterior.sample(generator)
    return (latents.float().cpu() * pipe.vae.scaling_factor).expand(batch, -1, -1, -1)


def _sample(
    pipe: Model, denoiser: Denoiser, request: Job, cond: Conditioning, uncond: Conditioning | None,
    callback: Callback | None, switch: ModelSwitch | None = None,
) -> Tensor:
    """Latents (B,4,h,w) for txt2img, img2img or inpainting at the request's size; `switch`: the refiner."""
    batch, f = len(request.prompts), pipe.vae_scale_factor
    shape = (batch, pipe.config.vae.latent_channels, request.height // f, request.width // f)
    common = dict(sampler=request.sampler, schedule=request.schedule, steps=request.steps, context=cond,
                  uncond_context=uncond, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale, eta=request.eta, callback=callback, switch=switch)
    if request.image is None:
        noise, generator = _noise(request, shape)
        return sample(denoiser, noise, generator=generator, **common)
    if request.image_guidance_scale is not None:
        return _edit(pipe, denoiser, request, shape, common)
    if request.mask is None:  # img2img: the image's latents noised part-way (diffusers: encode, then noise)
        init = _encode_image(pipe, request.image, batch, _vae_generator(request))
        noise, generator = _noise(request, shape)
        return sample(denoiser, noise, generator=generator, init_latents=init, strength=request.strength, **common)
    return _inpaint(pipe, denoiser, request, shape, common)


def _edit(pipe: Model, denoiser: Denoiser, request: Job, shape: tuple, common: dict) -> Tensor:
    """An instruct-pix2pix edit: the UNet reads the init image's latents (the posterior's mean, unscaled, as the
    model was trained) beside its own; from pure noise at strength 1 (diffusers), else from the init image noised
    part-way (A1111's img2img)."""
    batch, posterior = shape[0], _posterior(pipe, request.image)  # one encode serves both uses
    source = posterior.mode().float().cpu().expand(batch, -1, -1, -1)  # (B,4,h,w)
    init = None if request.strength >= 1.0 else _scaled_latents(pipe, posterior, batch, _vae_generator(request))
    noise, generator = _noise(request, shape)
    return sample(denoiser, noise, generator=generator, init_latents=init, strength=request.strength,
                  extra_channels=source, image_guidance_scale=request.image_guidance_scale, **common)


def _inpaint(pipe: Model, denoiser: Denoiser, request: Job, shape: tuple, common: dict) -> Tensor:
    """Inpainting, in diffusers' order of draws: image latents (if needed), noise, masked-image latents."""
    batch, vae_generator = shape[0], _vae_generator(request)
    mask = mask_to_latent(request.mask, shape[2], shape[3]).expand(batch, -1, -1, -1)  # (B,1,h,w), 1 = repaint
    nine_channels = pipe.config.is_inpainting
    full_strength = request.strength >= 1.0
    image_latents = None
    if not nine_channels or not full_strength:
        image_latents = _encode_image(pipe, request.image, batch, vae_generator)
    noise, generator = _noise(request, shape)
    start = dict(init_latents=None if full_strength else image_latents, strength=request.strength,
                 generator=generator)
    if nine_channels:
        masked = _encode_image(pipe, masked_image(request.image, request.mask), batch, vae_generator)
        extra = torch.cat([mask, masked], dim=1)  # (B,5,h,w): mask, masked-image latents
        return sample(denoiser, noise, extra_channels=extra, **start, **common)
    # diffusers encodes the masked image for ordinary models too (and does not use it): its VAE sample's draw
    # (one image's latents) comes before the sampler's, so ancestral samplers get diffusers' noise
    if vae_generator is not None:
        vae_dtype = next(pipe.vae.parameters()).dtype
        torch.randn((1, *shape[1:]), generator=vae_generator, device=vae_generator.device, dtype=vae_dtype)
    return sample(denoiser, noise, keep_latents=image_latents, keep_mask=mask, **start, **common)


def _inpaint_only_masked(
    pipe: Model, denoiser: Denoiser, request: Job, cond: Conditioning, uncond: Conditioning | None,
    callback: Callback | None, warnings: list[str], switch: ModelSwitch | None,
) -> list[Image.Image]:
    """A1111's "inpaint only masked": generate the masked region (plus padding) at the full request size,
    then paste it back into the original image through the mask."""
    original, full_mask, region = request.image, request.mask, request.region  # at the image's own size
    crop = dataclasses.replace(request, image=crop_for_inpaint(original, region, request.width, request.height),
                               mask=crop_for_inpaint(full_mask, region, request.width, request.height))
    latents = _sample(pipe, denoiser, crop, cond, uncond, callback, switch)
    images = _decode(_decoder(pipe, request, switch), latents, request, warnings)
    return [paste_back(original, img, region, full_mask) for img in images]


def _hires_pass(
    pipe: Model, denoiser: Denoiser, request: Job, latents: Tensor, callback: Callback | None, warnings: list[str],
    switch: ModelSwitch | None = None,
) -> Tensor:
    """A1111's hires fix: upscale the first pass (in latent or pixel space) and denoise it again at the target size."""
    (width, height), f, hires = request.hires_size, pipe.vae_scale_factor, request.source.hires
    upscaler = hires.hr_upscaler
    if upscaler in LATENT_MODES:
        init = upscale_latents(latents, height // f, width // f, upscaler)  # (B,4,H/f,W/f)
    else:  # a pixel upscaler: decode, enlarge, encode
        images, vae_generator = _decode(pipe, latents, request, warnings), _vae_generator(request)
        init = torch.cat([_encode_image(pipe, resize_with(img, width, height, upscaler), 1, vae_generator)
                          for img in images])
    second = dataclasses.replace(request, width=width, height=height,
                                 steps=hires.hr_second_pass_steps or request.steps)
    noise, generator = _noise(second, (*latents.shape[:2], height // f, width // f))  # A1111: streams anew
    cond, uncond = _conditioning(pipe, request, hires_steps=second.steps)  # A1111 schedules the pass anew
    sampler, schedule = request.hires_sampler or request.sampler, request.hires_schedule or request.schedule
    return sample(denoiser, noise, sampler=sampler, schedule=schedule, steps=second.steps,
                  context=cond, uncond_context=uncond, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale, eta=request.eta,
                  generator=generator, callback=callback,
                  init_latents=init, strength=hires.hr_denoising_strength, switch=switch)


def _decode(pipe: Model, latents: Tensor, request: Job, warnings: list[str]) -> list[Image.Image]:
    vae = pipe.vae
    z = (latents / vae.scaling_factor).to(next(vae.parameters()).device)
    if request.source.tiling:  # the whole latent at once, by the VAE whose convolutions wrap
        pixels, messages = decode_latents(vae, z, tiled=False)
    else:
        pixels, messages = decode_latents(vae, z, tiled=request.source.tiled_decode, decoder=pipe.compiled_decoder)
    warnings += [m for m in messages if m not in warnings]
    return tensor_to_images(pixels)


def _schedule_written(sampler: str, kind: str) -> str:
    """The label a resolved schedule kind is written with: A1111's, but "Discrete" for the automatic kind where the
    sampler's own schedule is another ("Automatic" would read back as that one)."""
    if kind == "automatic" and resolve(sampler)[1] != "automatic":
        return DISCRETE_LABEL
    return schedule_label("sgm_uniform" if kind == "trailing" else kind)


def resolved_request(job: Job, index: int | None = None) -> GenerationRequest:
    """The request with the model's defaults filled in; for one image (its prompt and seed) when `index` is given.
    A refiner given as a model is named by the file it was loaded from (None when it has none)."""
    refiner_source = job.source.refiner_checkpoint
    if job.refiner is not None and not refiner_source:
        refiner_source = job.refiner.report.source if getattr(job.refiner, "report", None) else None
    request = job.source.replace(
        steps=job.steps, sampler_name=job.sampler,
        scheduler=_schedule_written(job.sampler, job.schedule),
        cfg_scale=job.guidance_scale, image_cfg_scale=job.image_guidance_scale, seed=job.seeds[0], width=job.width,
        height=job.height, refiner_checkpoint=refiner_source if job.refiner is not None else None,
        subseed=job.subseeds[0] if job.subseeds else -1,
    )
    if index is not None:
        request = request.replace(prompt=job.written_prompts[index], negative_prompt=job.negative_prompts[index],
                                  seed=job.seeds[index], batch_size=1,
                                  subseed=job.subseeds[index] if job.subseeds else -1)
    return request


def _with_infotext(
    pipe: Model, job: Job, images: list[Image.Image], hashes: dict[str, dict[str, str]], refined: bool = False,
) -> list[Image.Image]:
    """Attach A1111's "parameters" text (with `hashes`: {"Lora hashes" / "TI hashes": {name: hash}}, and "VAE hash"
    and "VAE" when a VAE file decoded) and the seed to each image. The refiner is named, as A1111 names it
    ("name [hash]"), when it ran."""
    extra = {key: ", ".join(f"{n}: {h}" for n, h in named.items()) for key, named in hashes.items() if named}
    vae = (job.refiner if refined else pipe).loaded_vae  # that of the model whose VAE decoded
    extra = {**extra, **(vae.infotext if vae is not None else {})} or None
    refiner = _title(job.refiner, job.source.refiner_checkpoint) if refined else None
    for i, img in enumerate(images):
        units = [infotext_unit(c) for c in job.controls] + [p.infotext_unit() for p in job.image_prompts]
        request = resolved_request(job, i).replace(refiner_checkpoint=refiner, controlnet=units, ip_adapter=[])
        img.info["parameters"] = format_infotext(request, model_hash=pipe.model_hash, model_name=pipe.model_name,
                                                 version=f"sdtorch {_version()}", extra=extra)
        img.info["seed"] = job.seeds[i]
    return images


def _title(model: Model, given: str | None) -> str:
    """A1111's short title of a checkpoint: "name [hash]" (single files), the name alone (folders)."""
    name = model.model_name or given or "refiner"
    return f"{name} [{model.model_hash}]" if model.model_hash else name


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdtorch")
    except PackageNotFoundError:
        return "dev"


def plan(
    model: Model, request: GenerationRequest, generator: torch.Generator | None, limits: Limits,
    refiner: Model | None = None,
) -> Job:
    """Resolve a validated request against a model: defaults, seeds, images and masks, sizes (checked on `limits`),
    the refiner (`refiner`, else the one the request names)."""
    prompts = request.prompts()
    negatives = request.negative_prompt if isinstance(request.negative_prompt, list) else [request.negative_prompt] * len(prompts)
    defaults = model.defaults
    steps = defaults.steps if request.steps is None else request.steps
    if request.steps is None:
        request.check_steps(steps)
    info, kind = resolve_request(request.sampler_name or defaults.sampler_name,
                                 request.scheduler or defaults.scheduler)
    _check_clip_skip(model, request.clip_skip, "this model")
    if model.config.is_inpainting and request.mask is None:
        raise InvalidInputError("this is an inpainting model (9-channel UNet): pass an init image and a mask")
    image_guidance = None
    if model.config.is_instruct_pix2pix:
        if request.init_image is None:
            raise InvalidInputError("this is an instruct-pix2pix model (8-channel UNet): it edits an image; pass an "
                                    "init image (img2img) and say the edit in the prompt")
        if request.mask is not None:
            raise InvalidInputError("an instruct-pix2pix model edits the whole image: it takes no inpainting mask")
        image_guidance = INSTRUCT_PIX2PIX_IMAGE_CFG if request.image_cfg_scale is None else request.image_cfg_scale
    batch = request.batch_size
    written = [p for p in prompts for _ in range(batch)]
    prompts, loras, warnings = _extra_networks(written)
    negatives = [n for n in negatives for _ in range(batch)]
    if generator is not None:
        seed = generator.initial_seed()  # reported only: a given generator drives all the noise (diffusers)
    else:
        seed = random_seed(len(prompts)) if request.seed == -1 else request.seed

    init = mask = region = None
    width, height = request.width, request.height
    if request.init_image is not None:
        init = load_image(request.init_image)
        width, height = width or init.width // 8 * 8, height or init.height // 8 * 8
        if width < 8 or height < 8:
            raise InvalidInputError(f"the init image is {init.width}x{init.height}: give a width and height")
        if (request.width or init.width, request.height or init.height) != (width, height):
            warnings.append(f"the init image is {init.width}x{init.height}; generating at {width}x{height} "
                            "(multiples of 8)")
    native = model.default_size
    width, height = width or native, height or native
    request.check_size(width, height, limits)
    settings = request.inpaint
    if request.mask is not None:
        mask_size = load_image(request.mask).size
        if mask_size != init.size:
            raise InvalidInputError(f"mask is {mask_size[0]}x{mask_size[1]} but the image is {init.width}x{init.height}")
        mask_options = dict(blur=settings.mask_blur, invert=settings.inpainting_mask_invert)
        full_mask = load_mask(request.mask, *init.size, **mask_options)
        found = crop_region(full_mask, settings.inpaint_full_res_padding) if settings.inpaint_full_res else None
        if found is not None:  # only the masked region is generated; an empty mask falls back to the whole picture
            region = expand_to_aspect(found, width, height, *init.size)
            mask = full_mask
        else:
            mask = load_mask(request.mask, width, height, resize_mode=request.resize_mode, **mask_options)
    if init is not None and region is None:
        init = resize_image(init, width, height, request.resize_mode)
    hires_size, hires_sampling = None, {}
    if request.hires is not None:
        hires_sampling = _hires_sampling(request, info.name, defaults, len(prompts), loras, warnings)
        hires_size = request.hires.target_size(width, height)
        if min(hires_size) < 8:
            raise InvalidInputError(f"the hires fix's target {hires_size[0]}x{hires_size[1]} is too small")
        request.check_size(*hires_size, limits)
    controls = _controls(model, request, width, height, seed)
    image_prompts = _image_prompts(model, request)
    subseeds, resize_from = _variation(request, generator, len(prompts))
    refiner = _refiner(model, request, refiner)  # last: loading one is the slow part
    if refiner is not None:
        _check_clip_skip(refiner, request.clip_skip, "the refiner")
    return Job(
        source=request, prompts=prompts, negative_prompts=negatives, seeds=[seed + i for i in range(len(prompts))],
        width=width, height=height, steps=steps,
        guidance_scale=defaults.cfg_scale if request.cfg_scale is None else float(request.cfg_scale),
        sampler=info.name, schedule=kind, clip_skip=request.clip_skip, generator=generator, eta=request.eta,
        guidance_rescale=request.guidance_rescale, image_guidance_scale=image_guidance, subseeds=subseeds,
        subseed_strength=request.subseed_strength, seed_resize_from=resize_from, image=init,
        strength=request.denoising_strength, mask=mask,
        region=region, hires_size=hires_size, **hires_sampling, written_prompts=written, loras=loras,
        warnings=warnings,
        refiner=refiner, controls=controls, image_prompts=image_prompts,
    )


def _hires_sampling(request: GenerationRequest, sampler: str, defaults: ModelDefaults, images: int,
                    loras: dict[str, float], warnings: list[str]) -> dict[str, object]:
    """The hires pass's own sampler, schedule and prompts as Job fields (none where it takes the first pass's): A1111's
    hr_sampler_name / hr_scheduler (the first pass's schedule setting for another sampler) and hr_prompt /
    hr_negative_prompt (for every image). LoRA tags there are stripped: the pass keeps the first pass's LoRAs."""
    hires, found = request.hires, {}
    if hires.hr_sampler_name or hires.hr_scheduler:
        schedule = hires.hr_scheduler or request.scheduler or defaults.scheduler
        info, kind = resolve_request(hires.hr_sampler_name or sampler, schedule)
        found.update(hires_sampler=info.name, hires_schedule=kind)
    if hires.hr_prompt:
        stripped, tags, _ = _extra_networks([hires.hr_prompt] * images)
        if tags and tags != loras:
            warnings.append("LoRA tags in the hires pass's prompt are not applied: it keeps the first pass's LoRAs")
        found["hires_prompts"] = stripped
    if hires.hr_negative_prompt:  # negatives are read whole, as A1111 reads them
        found["hires_negative_prompts"] = [hires.hr_negative_prompt] * images
    return found


def _variation(request: GenerationRequest, generator: torch.Generator | None,
               images: int) -> tuple[list[int], tuple[int, int] | None]:
    """(each image's variation seed, the seed resize's (width, height)) of a request: A1111's variation seed (image i
    uses subseed + i; -1: a random one) where subseed_strength > 0, its seed resize where both sides are > 0. Both
    shape the seeds' noise: refused with an explicit generator."""
    subseeds = []
    if request.subseed_strength > 0:
        subseed = random_seed(images) if request.subseed == -1 else request.subseed
        subseeds = [subseed + i for i in range(images)]
    resize_from = None
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        resize_from = (request.seed_resize_from_w, request.seed_resize_from_h)
    if generator is not None and (subseeds or resize_from):
        raise InvalidInputError("a variation seed (subseed_strength) and seed resize work on seeds; drop the explicit "
                                "generator or them")
    return subseeds, resize_from


def _image_prompts(model: Model, request: GenerationRequest) -> list[ImagePrompt]:
    """The request's IP-Adapter units with their adapters and image encoders (loaded, and cached, by the model), each
    image encoded."""
    prompts = []
    for i, unit in enumerate(request.ip_adapter):
        try:
            adapter = model.load_ip_adapter(unit.model)
            encoder_source = unit.image_encoder or Path(unit.model).expanduser().parent / "image_encoder"
            encoder = model.load_image_encoder(encoder_source)
            prompts.append(image_prompt(adapter, encoder, load_image(unit.image), unit.weight,
                                        controlnet_title(unit.model)))
        except CheckpointError as e:
            raise InvalidInputError(f"ip_adapter[{i}]: {e}") from e
    return prompts


def _controls(model: Model, request: GenerationRequest, width: int, height: int, seed: int) -> list[Control]:
    """The request's ControlNet units with their models (loaded, and cached, by the model) and control maps (each
    image through its preprocessor)."""
    controls = []
    for i, unit in enumerate(request.controlnet):
        mask = unit.mask if unit.mask is not None else request.mask
        try:
            image = control_map(unit, load_image(unit.image), None if mask is None else load_image(mask), width,
                                height, seed)
        except InvalidInputError as e:
            raise InvalidInputError(f"controlnet[{i}]: {e}") from e
        try:
            controlnet = model.load_controlnet(unit.model)
        except CheckpointError as e:
            raise InvalidInputError(f"controlnet[{i}].model: {e}") from e
        controls.append(Control(controlnet, image, unit, controlnet_title(unit.model), model.vae_scale_factor))
    return controls


def _check_clip_skip(model: Model, clip_skip: int, which: str) -> None:
    usable_layers = min(e.num_layers - e.hidden_state_output for e in model.config.text_encoders)
    if clip_skip > usable_layers:
        raise InvalidInputError(f"clip_skip {clip_skip} is more than the {usable_layers} text-encoder "
                                f"layers {which} can condition on")


NO_REFINER = ("", "None", "none")  # refiner_checkpoint values A1111 reads as "no refiner"


def _refiner(model: Model, request: GenerationRequest, refiner: Model | None) -> Model | None:
    """The refiner of a request (a given model, else the checkpoint it names), checked to fit the model: it
    continues the model's latents (same latent channels and VAE factor, same UNet input) on its sigmas (same
    training schedule and parameterisation). None without one, or when it is the model itself (A1111 then
    does not switch)."""
    name = request.refiner_checkpoint
    if refiner is None and name is not None and name not in NO_REFINER:
        refiner = model.load_refiner(name)
    if refiner is None or refiner is model:
        return None
    ours, theirs = model.config, refiner.config
    checks = (
        ("latent channels", ours.vae.latent_channels, theirs.vae.latent_channels),
        ("VAE downscale factor", model.vae_scale_factor, refiner.vae_scale_factor),
        ("UNet input channels", ours.unet.in_channels, theirs.unet.in_channels),
        ("prediction type", ours.prediction_type, theirs.prediction_type),
        ("training noise schedule", ours.schedule, theirs.schedule),
    )
    for what, a, b in checks:
        if a != b:
            raise InvalidInputError(f"the refiner does not fit this model: its {what} is {b}, the model's {a} "
                                    "(a refiner continues the model's latents on its noise levels)")
    return refiner


def _extra_networks(prompts: list[str]) -> tuple[list[str], dict[str, float], list[str]]:
    """(prompts without their <kind:...> tags, {LoRA name: weight} over the batch, warnings), as A1111 reads them."""
    stripped, loras, warnings = [], {}, []
    for prompt in prompts:
        text, tags = strip_extra_networks(prompt)
        stripped.append(text)
        for tag in tags:
            if tag.kind != "lora":
                warnings.append(f"<{tag.kind}:{tag.name}> ignored: sdtorch applies only <lora:...> tags")
            elif len(tag.args) > 1:
                raise InvalidInputError(f"<lora:{tag.name}:{':'.join(tag.args)}>: separate text-encoder and UNet "
                                        "weights are not supported; give one weight")
            elif loras.setdefault(tag.name, tag.weight) != tag.weight:
                raise InvalidInputError(f"<lora:{tag.name}> has two weights in one batch ({loras[tag.name]} and "
                                        f"{tag.weight})")
    return stripped, loras, list(dict.fromkeys(warnings))
