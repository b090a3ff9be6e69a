"""Generation: txt2img, img2img and inpainting on a Pipeline's parts, with diffusers' numerics.

    prompt -> encode_prompts -> context (B, 77k, D)
    seed -> CPU noise (B,4,h,w) -> [img2img: VAE.encode(image) * scale + noise] -> sample() -> latents
    latents / scale -> decode_latents -> PIL images with the A1111 "parameters" text

The order in which a single explicit `generator` is drawn from (VAE samples, noise, sampler noise)
follows diffusers' pipelines, so the same generator gives diffusers' image.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .decoding import decode_latents
from .errors import InvalidInputError
from .images import (
    check_size, crop_for_inpaint, crop_region, expand_to_aspect, image_to_tensor, load_image, load_mask,
    mask_to_latent, masked_image, paste_back, resize_image, tensor_to_images,
)
from .infotext import GenerationParams, format_infotext, schedule_label
from .prompts import encode_prompts
from .sampling.common import Callback
from .sampling.denoiser import Denoiser
from .sampling.samplers import resolve, sample
from .sampling.schedules import DiscreteSchedule

if TYPE_CHECKING:
    from .pipeline import Pipeline

MAX_SEED = 2**32 - 1
HIRES_UPSCALERS = ("Latent", "Latent (nearest)", "Lanczos")


@dataclass
class Request:
    """Everything one call generates from, validated; one entry per output image where it varies."""

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
    strength: float = 0.8
    mask: Image.Image | None = None


def generate(pipe: Pipeline, request: Request, callback: Callback | None, options: dict) -> list[Image.Image]:
    """Run one request end to end and return PIL images carrying their infotext."""
    unet_dtype = next(pipe.unet.parameters()).dtype
    device = next(pipe.unet.parameters()).device

    def unet(x: Tensor, t: Tensor, context: Tensor) -> Tensor:  # sampler math stays float32 where x lives
        out = pipe.unet(x.to(device, unet_dtype), t.to(device), context.to(device, unet_dtype))
        return out.to(x.device, torch.float32)

    denoiser = Denoiser(unet, DiscreteSchedule(pipe.config.schedule), pipe.config.prediction_type)
    with torch.inference_mode():
        cond, uncond = _conditioning(pipe, request)
        region = options.get("inpaint_region")
        if region is not None:
            images = _inpaint_only_masked(pipe, denoiser, request, region, cond, uncond, callback, options)
        else:
            latents = _sample(pipe, denoiser, request, cond, uncond, callback, options)
            if options.get("enable_hr"):
                latents = _hires_pass(pipe, denoiser, request, latents, cond, uncond, callback, options)
            images = _decode(pipe, latents, options)
            if request.mask is not None and options.get("mask_overlay", True):
                images = [paste_back(request.image, img, None, request.mask) for img in images]
    return _with_infotext(pipe, request, images, options)


def _conditioning(pipe: Pipeline, request: Request) -> tuple[Tensor, Tensor | None]:
    """(cond, uncond) contexts (B, 77k, D), encoded in one batch so both have the same length."""
    guided = request.guidance_scale != 1.0
    texts = request.prompts + (request.negative_prompts if guided else [])
    context = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, clip_skip=request.clip_skip).float()
    n = len(request.prompts)
    return context[:n], (context[n:] if guided else None)


def _noise(request: Request, shape: tuple[int, ...]) -> Tensor:
    """Initial noise on the CPU: per-image seeds (A1111: image i gets seed + i) or one diffusers-style generator."""
    if request.generator is not None:
        return torch.randn(shape, generator=request.generator, device=request.generator.device).cpu()
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s)) for s in request.seeds])


def _sampler_generator(request: Request) -> torch.Generator:
    return request.generator or torch.Generator("cpu").manual_seed(request.seeds[0])


def _encode_image(pipe: Pipeline, image: Image.Image | Tensor, batch: int, generator: torch.Generator) -> Tensor:
    """VAE latents (batch,4,h,w) of an image (PIL, or (1,3,H,W) in [-1,1]), sampled and scaled, as diffusers does."""
    parameter = next(pipe.vae.parameters())
    pixels = image_to_tensor(image) if isinstance(image, Image.Image) else image  # (1,3,H,W) in [-1,1]
    pixels = pixels.to(parameter.device, parameter.dtype)
    latents = pipe.vae.encode(pixels).sample(generator).float().cpu() * pipe.vae.scaling_factor
    return latents.expand(batch, -1, -1, -1)


def _sample(
    pipe: Pipeline, denoiser: Denoiser, request: Request, cond: Tensor, uncond: Tensor | None,
    callback: Callback | None, options: dict,
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


def _inpaint(pipe: Pipeline, denoiser: Denoiser, request: Request, shape: tuple, common: dict) -> Tensor:
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
    pipe: Pipeline, denoiser: Denoiser, request: Request, region: tuple[int, int, int, int], cond: Tensor,
    uncond: Tensor | None, callback: Callback | None, options: dict,
) -> list[Image.Image]:
    """A1111's "inpaint only masked": generate the masked region (plus padding) at the full request size,
    then paste it back into the original image through the mask."""
    original, full_mask = request.image, request.mask  # at the image's own size
    crop = Request(**{**request.__dict__, "image": crop_for_inpaint(original, region, request.width, request.height),
                      "mask": crop_for_inpaint(full_mask, region, request.width, request.height)})
    latents = _sample(pipe, denoiser, crop, cond, uncond, callback, options)
    return [paste_back(original, img, region, full_mask) for img in _decode(pipe, latents, options)]


def _hires_pass(
    pipe: Pipeline, denoiser: Denoiser, request: Request, latents: Tensor, cond: Tensor, uncond: Tensor | None,
    callback: Callback | None, options: dict,
) -> Tensor:
    """A1111's hires fix: upscale the first pass (in latent or pixel space) and denoise it again at the target size."""
    width, height, f = options["hr_width"], options["hr_height"], pipe.vae_scale_factor
    upscaler = options.get("hr_upscaler", "Latent")
    if upscaler == "Lanczos":
        images = _decode(pipe, latents, options)
        init = torch.cat([_encode_image(pipe, img.resize((width, height), Image.LANCZOS), 1, _sampler_generator(request))
                          for img in images])
    else:
        mode = "nearest" if upscaler == "Latent (nearest)" else "bilinear"
        init = F.interpolate(latents, size=(height // f, width // f), mode=mode)  # (B,4,H/f,W/f)
    second = Request(**{**request.__dict__, "width": width, "height": height,
                        "steps": options.get("hr_second_pass_steps") or request.steps})
    noise = _noise(second, (*latents.shape[:2], height // f, width // f))
    return sample(denoiser, noise, sampler=request.sampler, schedule=request.schedule, steps=second.steps,
                  context=cond, uncond_context=uncond, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale, eta=request.eta,
                  generator=_sampler_generator(request), callback=callback,
                  init_latents=init, strength=options.get("hr_denoising_strength", 0.7))


def _decode(pipe: Pipeline, latents: Tensor, options: dict) -> list[Image.Image]:
    vae = pipe.vae
    z = (latents / vae.scaling_factor).to(next(vae.parameters()).device)
    pixels, messages = decode_latents(vae, z, tiled=options.get("tiled_decode"))
    for message in messages:
        warnings.warn(message, stacklevel=3)
        options.setdefault("warnings", []).append(message)
    return tensor_to_images(pixels)


def _with_infotext(pipe: Pipeline, request: Request, images: list[Image.Image], options: dict) -> list[Image.Image]:
    """Attach A1111's "parameters" text and the seed to each image."""
    hires = bool(options.get("enable_hr"))
    if request.image is not None:
        strength = request.strength
    else:
        strength = options.get("hr_denoising_strength", 0.7) if hires else None
    for i, img in enumerate(images):
        params = GenerationParams(
            prompt=request.prompts[i], negative_prompt=request.negative_prompts[i], steps=request.steps,
            sampler=request.sampler,
            schedule=schedule_label("sgm_uniform" if request.schedule == "trailing" else request.schedule),
            cfg_scale=request.guidance_scale, seed=request.seeds[i], width=request.width, height=request.height,
            model_hash=pipe.model_hash, model_name=pipe.model_name, denoising_strength=strength,
            clip_skip=request.clip_skip, eta=request.eta,
            hires_upscale=options.get("hr_scale") if hires else None,
            hires_steps=options.get("hr_second_pass_steps") if hires else None,
            hires_upscaler=options.get("hr_upscaler", "Latent") if hires else None,
            mask_blur=options.get("mask_blur") if request.mask is not None else None,
            version=f"sdtorch {_version()}",
        )
        img.info["parameters"] = format_infotext(params)
        img.info["seed"] = request.seeds[i]
    return images


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdtorch")
    except PackageNotFoundError:
        return "dev"


def build_request(pipe: Pipeline, prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, schedule,
                  seed, generator, height, width, num_images_per_prompt, image, strength, mask_image, clip_skip,
                  options: dict) -> Request:
    """Validate the user's arguments into a Request (clear errors for every bad value)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InvalidInputError("prompt must be a string or a non-empty list of strings")
    negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt or ""] * len(prompts)
    if len(negatives) != len(prompts):
        raise InvalidInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise InvalidInputError(f"num_images_per_prompt must be a positive integer, not {num_images_per_prompt!r}")
    if guidance_scale < 0:
        raise InvalidInputError(f"guidance scale must be >= 0, not {guidance_scale}")
    if not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be in (0, 1], not {strength}")
    info, kind = resolve(sampler, schedule)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
    if generator is not None:
        seed = generator.initial_seed()  # reported only: a given generator drives all the noise (diffusers)
    else:
        if seed is None or seed == -1:
            seed = random.randrange(MAX_SEED - len(prompts))
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - len(prompts):
            raise InvalidInputError(f"seed must be an integer in [0, {MAX_SEED}] or -1 (random), not {seed!r}")

    init = mask = None
    if image is not None:
        init = load_image(image)
        width, height = width or init.width // 8 * 8, height or init.height // 8 * 8
    if pipe.config.is_inpainting and mask_image is None:
        raise InvalidInputError("this is an inpainting model (9-channel UNet): pass image and mask_image")
    if mask_image is not None:
        if init is None:
            raise InvalidInputError("mask_image needs an image to inpaint")
        mask_size = load_image(mask_image).size
        if mask_size != init.size:
            raise InvalidInputError(f"mask is {mask_size[0]}x{mask_size[1]} but the image is {init.width}x{init.height}")
    native = pipe.default_size
    width, height = width or native, height or native
    check_size(width, height)
    resize_mode = options.get("resize_mode", "just resize")
    if mask_image is not None:
        mask_options = dict(blur=options.get("mask_blur", 4), invert=options.get("inpainting_mask_invert", False))
        full_mask = load_mask(mask_image, *init.size, **mask_options)
        padding = options.get("inpaint_full_res_padding", 0)
        region = crop_region(full_mask, padding) if options.get("inpaint_full_res") else None
        if region is not None:  # only the masked region is generated; an empty mask falls back to the whole picture
            options["inpaint_region"] = expand_to_aspect(region, width, height, *init.size)
            mask = full_mask
        else:
            mask = load_mask(mask_image, width, height, resize_mode=resize_mode, **mask_options)
    if init is not None and "inpaint_region" not in options:
        init = resize_image(init, width, height, resize_mode)
    if options.get("enable_hr"):
        scale = options.get("hr_scale", 2.0)
        options["hr_width"] = options.get("hr_resize_x") or int(width * scale) // 8 * 8
        options["hr_height"] = options.get("hr_resize_y") or int(height * scale) // 8 * 8
        check_size(options["hr_width"], options["hr_height"])
        if options.get("hr_upscaler", "Latent") not in HIRES_UPSCALERS:
            raise InvalidInputError(f"unknown hires upscaler {options['hr_upscaler']!r}; use one of {HIRES_UPSCALERS}")
    return Request(
        prompts=prompts, negative_prompts=negatives, seeds=[seed + i for i in range(len(prompts))],
        width=width, height=height, steps=num_inference_steps, guidance_scale=guidance_scale, sampler=info.name,
        schedule=kind, clip_skip=clip_skip, generator=generator, eta=options.get("eta"),
        guidance_rescale=options.get("guidance_rescale", 0.0), image=init, strength=strength, mask=mask,
    )
