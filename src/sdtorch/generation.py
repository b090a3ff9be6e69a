"""Generation: txt2img, img2img and inpainting on a Pipeline's parts, with diffusers' numerics.

    prompt -> encode_conditioning -> Conditioning: contexts (77k, D) per model evaluation, AND weights
    seed -> CPU noise (B,4,h,w) -> [img2img: VAE.encode(image) * scale + noise] -> sample() -> latents
    latents / scale -> decode_latents -> PIL images with the A1111 "parameters" text

`run(model, request)` validates a GenerationRequest, resolves it against the model (`plan` -> a Job) and
generates. The order in which a single explicit `generator` is drawn from (VAE samples, noise, sampler noise)
follows diffusers' pipelines, so the same generator gives diffusers' image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .compiled import CompiledUNet
from .configs import ModelConfig
from .decoding import decode_latents
from .adapters.lora import lora_files, lora_hash
from .errors import InvalidInputError
from .extra_networks import strip_extra_networks
from .images import (
    crop_for_inpaint, crop_region, expand_to_aspect, image_to_tensor, load_image, load_mask, mask_to_latent,
    masked_image, paste_back, resize_image, tensor_to_images,
)
from .infotext import format_infotext, schedule_label
from .models.tokenizer import CLIPTokenizer
from .models.vae import AutoencoderKL
from .prompt_schedule import encode_conditioning, split_and
from .request import GenerationRequest, Limits, random_seed, suggestion
from .sampling.common import Callback
from .sampling.denoiser import Conditioning, Denoiser
from .sampling.samplers import resolve, sample
from .sampling.schedules import DiscreteSchedule
from .step_cache import StepCache

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
    image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None
    region: tuple[int, int, int, int] | None = None  # "only masked": the part of the image generated
    hires_size: tuple[int, int] | None = None  # (width, height) of the hires fix's second pass
    written_prompts: list[str] = dataclasses.field(default_factory=list)  # as given, <lora:...> tags included
    loras: dict[str, float] = dataclasses.field(default_factory=dict)  # the prompts' <lora:name:weight> tags
    warnings: list[str] = dataclasses.field(default_factory=list)  # what was adjusted or fell back, for the user


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
    vae: AutoencoderKL
    config: ModelConfig
    vae_scale_factor: int
    default_size: int
    default_cfg_scale: float
    model_hash: str | None
    model_name: str | None
    lora_dir: Path | None  # where <lora:name> tags find their files

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str: ...

    def unload_lora(self, name: str | None = None) -> None: ...


def run(
    model: Model, request: GenerationRequest, generator: torch.Generator | None = None,
    callback: Callback | None = None, limits: Limits | None = None,
) -> GenerationResult:
    """Validate `request`, resolve it against `model` and generate: txt2img, img2img, inpainting, hires fix."""
    limits = limits or Limits()
    job = plan(model, request.validate(limits), generator, limits)
    with _prompt_loras(model, job) as hashes:
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
    unet_dtype = next(pipe.unet.parameters()).dtype
    device = next(pipe.unet.parameters()).device

    forward = pipe.compiled_unet or pipe.unet
    if request.source.deep_cache > 1:
        forward = StepCache(forward.split_forward, request.source.deep_cache)

    def unet(x: Tensor, t: Tensor, context: Tensor) -> Tensor:  # sampler math stays float32 where x lives
        out = forward(x.to(device, unet_dtype), t.to(device), context.to(device, unet_dtype))
        return out.to(x.device, torch.float32)

    denoiser = Denoiser(unet, DiscreteSchedule(pipe.config.schedule), pipe.config.prediction_type)
    embeddings = pipe.text_encoder.textual_inversion  # records the embeddings the prompts use
    if embeddings is not None:
        embeddings.used.clear()
    with torch.inference_mode():
        cond, uncond = _conditioning(pipe, request)
        if request.region is not None:
            images = _inpaint_only_masked(pipe, denoiser, request, cond, uncond, callback, warnings)
        else:
            latents = _sample(pipe, denoiser, request, cond, uncond, callback)
            if request.hires_size is not None:
                latents = _hires_pass(pipe, denoiser, request, latents, callback, warnings)
            images = _decode(pipe, latents, request, warnings)
            if request.mask is not None and request.source.inpaint.mask_overlay:
                images = [paste_back(request.image, img, None, request.mask) for img in images]
    hashes = {"Lora hashes": lora_hashes, "TI hashes": embeddings.hashes(embeddings.used) if embeddings else {}}
    return _with_infotext(pipe, request, images, hashes)


def _conditioning(
    pipe: Model, request: Job, hires_steps: int | None = None,
) -> tuple[Conditioning, Conditioning | None]:
    """(cond, uncond) of the first pass, or of a hires pass of `hires_steps` steps after it: A1111 prompt
    editing over the sampler's model evaluations, and AND. The negative side is left out where guidance
    does not use it (CFG scale 1 without AND weights)."""
    info, _ = resolve(request.sampler)
    composed = any(len(parts) > 1 or parts[0][1] != 1.0 for parts in map(split_and, request.prompts))
    negatives = request.negative_prompts if request.guidance_scale != 1.0 or composed else None
    return encode_conditioning(
        pipe.tokenizer, pipe.text_encoder, request.prompts, negatives, info.prompt_steps(request.steps),
        hires_steps=None if hires_steps is None else info.prompt_steps(hires_steps), clip_skip=request.clip_skip)


def _noise(request: Job, shape: tuple[int, ...]) -> Tensor:
    """Initial noise on the CPU: per-image seeds (A1111: image i gets seed + i) or one diffusers-style generator."""
    if request.generator is not None:
        return torch.randn(shape, generator=request.generator, device=request.generator.device).cpu()
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s)) for s in request.seeds])


def _sampler_generator(request: Job) -> torch.Generator:
    return request.generator or torch.Generator("cpu").manual_seed(request.seeds[0])


def _encode_image(pipe: Model, image: Image.Image | Tensor, batch: int, generator: torch.Generator) -> Tensor:
    """VAE latents (batch,4,h,w) of an image (PIL, or (1,3,H,W) in [-1,1]), sampled and scaled, as diffusers does."""
    parameter = next(pipe.vae.parameters())
    pixels = image_to_tensor(image) if isinstance(image, Image.Image) else image  # (1,3,H,W) in [-1,1]
    pixels = pixels.to(parameter.device, parameter.dtype)
    latents = pipe.vae.encode(pixels).sample(generator).float().cpu() * pipe.vae.scaling_factor
    return latents.expand(batch, -1, -1, -1)


def _sample(
    pipe: Model, denoiser: Denoiser, request: Job, cond: Conditioning, uncond: Conditioning | None,
    callback: Callback | None,
) -> Tensor:
    """Latents (B,4,h,w) for txt2img, img2img or inpainting at the request's size."""
    batch, f = len(request.prompts), pipe.vae_scale_factor
    shape = (batch, pipe.config.vae.latent_channels, request.height // f, request.width // f)
    generator = _sampler_generator(request)
    common = dict(sampler=request.sampler, schedule=request.schedule, steps=request.steps, context=cond,
                  uncond_context=uncond, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale, eta=request.eta, generator=generator, callback=callback)
    if request.image is None:
        return sample(denoiser, _noise(request, shape), **common)
    if request.mask is None:  # img2img: the image's latents noised part-way (diffusers: encode, then noise)
        init = _encode_image(pipe, request.image, batch, generator)
        return sample(denoiser, _noise(request, shape), init_latents=init, strength=request.strength, **common)
    return _inpaint(pipe, denoiser, request, shape, common)


def _inpaint(pipe: Model, denoiser: Denoiser, request: Job, shape: tuple, common: dict) -> Tensor:
    """Inpainting, in diffusers' order of draws: image latents (if needed), noise, masked-image latents."""
    batch, generator = shape[0], common["generator"]
    mask = mask_to_latent(request.mask, shape[2], shape[3]).expand(batch, -1, -1, -1)  # (B,1,h,w), 1 = repaint
    nine_channels = pipe.config.is_inpainting
    full_strength = request.strength >= 1.0
    image_latents = None
    if not nine_channels or not full_strength:
        image_latents = _encode_image(pipe, request.image, batch, generator)
    noise = _noise(request, shape)
    start = dict(init_latents=None if full_strength else image_latents, strength=request.strength)
    if nine_channels:
        masked = _encode_image(pipe, masked_image(request.image, request.mask), batch, generator)
        extra = torch.cat([mask, masked], dim=1)  # (B,5,h,w): mask, masked-image latents
        return sample(denoiser, noise, extra_channels=extra, **start, **common)
    return sample(denoiser, noise, keep_latents=image_latents, keep_mask=mask, **start, **common)


def _inpaint_only_masked(
    pipe: Model, denoiser: Denoiser, request: Job, cond: Conditioning, uncond: Conditioning | None,
    callback: Callback | None, warnings: list[str],
) -> list[Image.Image]:
    """A1111's "inpaint only masked": generate the masked region (plus padding) at the full request size,
    then paste it back into the original image through the mask."""
    original, full_mask, region = request.image, request.mask, request.region  # at the image's own size
    crop = dataclasses.replace(request, image=crop_for_inpaint(original, region, request.width, request.height),
                               mask=crop_for_inpaint(full_mask, region, request.width, request.height))
    latents = _sample(pipe, denoiser, crop, cond, uncond, callback)
    return [paste_back(original, img, region, full_mask) for img in _decode(pipe, latents, request, warnings)]


def _hires_pass(
    pipe: Model, denoiser: Denoiser, request: Job, latents: Tensor, callback: Callback | None, warnings: list[str],
) -> Tensor:
    """A1111's hires fix: upscale the first pass (in latent or pixel space) and denoise it again at the target size."""
    (width, height), f, hires = request.hires_size, pipe.vae_scale_factor, request.source.hires
    upscaler = hires.hr_upscaler
    if upscaler == "Lanczos":
        images = _decode(pipe, latents, request, warnings)
        init = torch.cat([_encode_image(pipe, img.resize((width, height), Image.LANCZOS), 1, _sampler_generator(request))
                          for img in images])
    else:
        mode = "nearest" if upscaler == "Latent (nearest)" else "bilinear"
        init = F.interpolate(latents, size=(height // f, width // f), mode=mode)  # (B,4,H/f,W/f)
    second = dataclasses.replace(request, width=width, height=height,
                                 steps=hires.hr_second_pass_steps or request.steps)
    noise = _noise(second, (*latents.shape[:2], height // f, width // f))
    cond, uncond = _conditioning(pipe, request, hires_steps=second.steps)  # A1111 schedules the pass anew
    return sample(denoiser, noise, sampler=request.sampler, schedule=request.schedule, steps=second.steps,
                  context=cond, uncond_context=uncond, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale, eta=request.eta,
                  generator=_sampler_generator(request), callback=callback,
                  init_latents=init, strength=hires.hr_denoising_strength)


def _decode(pipe: Model, latents: Tensor, request: Job, warnings: list[str]) -> list[Image.Image]:
    vae = pipe.vae
    z = (latents / vae.scaling_factor).to(next(vae.parameters()).device)
    pixels, messages = decode_latents(vae, z, tiled=request.source.tiled_decode)
    warnings += [m for m in messages if m not in warnings]
    return tensor_to_images(pixels)


def resolved_request(job: Job, index: int | None = None) -> GenerationRequest:
    """The request with the model's defaults filled in; for one image (its prompt and seed) when `index` is given."""
    request = job.source.replace(
        steps=job.steps, sampler_name=job.sampler,
        scheduler=schedule_label("sgm_uniform" if job.schedule == "trailing" else job.schedule),
        cfg_scale=job.guidance_scale, seed=job.seeds[0], width=job.width, height=job.height,
    )
    if index is not None:
        request = request.replace(prompt=job.written_prompts[index], negative_prompt=job.negative_prompts[index],
                                  seed=job.seeds[index], batch_size=1)
    return request


def _with_infotext(pipe: Model, job: Job, images: list[Image.Image], hashes: dict[str, dict[str, str]]) -> list[Image.Image]:
    """Attach A1111's "parameters" text (with `hashes`: {"Lora hashes" / "TI hashes": {name: hash}}) and the seed
    to each image."""
    extra = {key: ", ".join(f"{n}: {h}" for n, h in named.items()) for key, named in hashes.items() if named} or None
    for i, img in enumerate(images):
        img.info["parameters"] = format_infotext(resolved_request(job, i), model_hash=pipe.model_hash,
                                                 model_name=pipe.model_name, version=f"sdtorch {_version()}", extra=extra)
        img.info["seed"] = job.seeds[i]
    return images


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdtorch")
    except PackageNotFoundError:
        return "dev"


def plan(model: Model, request: GenerationRequest, generator: torch.Generator | None, limits: Limits) -> Job:
    """Resolve a validated request against a model: defaults, seeds, images and masks, sizes (checked on `limits`)."""
    prompts = request.prompts()
    negatives = request.negative_prompt if isinstance(request.negative_prompt, list) else [request.negative_prompt] * len(prompts)
    info, kind = resolve(request.sampler_name, request.scheduler)
    if request.clip_skip > model.config.text_encoder.num_layers:
        raise InvalidInputError(f"clip_skip {request.clip_skip} is more than the text encoder's "
                                f"{model.config.text_encoder.num_layers} layers")
    if model.config.is_inpainting and request.mask is None:
        raise InvalidInputError("this is an inpainting model (9-channel UNet): pass an init image and a mask")
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
    hires_size = None
    if request.hires is not None:
        hires_size = request.hires.target_size(width, height)
        if min(hires_size) < 8:
            raise InvalidInputError(f"the hires fix's target {hires_size[0]}x{hires_size[1]} is too small")
        request.check_size(*hires_size, limits)
    return Job(
        source=request, prompts=prompts, negative_prompts=negatives, seeds=[seed + i for i in range(len(prompts))],
        width=width, height=height, steps=request.steps,
        guidance_scale=model.default_cfg_scale if request.cfg_scale is None else float(request.cfg_scale),
        sampler=info.name, schedule=kind, clip_skip=request.clip_skip, generator=generator, eta=request.eta,
        guidance_rescale=request.guidance_rescale, image=init, strength=request.denoising_strength, mask=mask,
        region=region, hires_size=hires_size, written_prompts=written, loras=loras, warnings=warnings,
    )


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
