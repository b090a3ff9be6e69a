"""The sampler registry (A1111 names, ComfyUI aliases, the legacy "DPM++ 2M Karras" form) and `sample()`.

    x = sample(denoiser, noise, sampler="DPM++ 2M", schedule="Karras", steps=20, context=ctx, ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InvalidInputError
from . import dpmpp, k_samplers, timestep_samplers
from .common import Callback, Noise, SeededNoise
from .denoiser import Conditioning, Denoiser, pad_to_match
from .schedules import DiscreteSchedule, SamplingSchedule, sampling_schedule

SamplerFn = Callable[..., Tensor]


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: its A1111 name, function, other names, and how its sigma list is built."""

    name: str
    function: SamplerFn
    aliases: tuple[str, ...]
    default_schedule: str = "automatic"  # A1111 v1.9+ defaults
    discard_penultimate_sigma: bool = False  # DPM2, DPM2 a, DPM++ 3M SDE (as A1111 does)
    build_schedule: Callable[..., SamplingSchedule] = sampling_schedule  # diffusers' grid for this sampler
    variance_preserving: bool = False  # starts from pure VP noise: x_T = noise * sqrt(1 + sigma_max^2)
    second_order: bool = False  # A1111's "second_order": prompt schedules count two evaluations a step

    def prompt_steps(self, steps: int) -> int:
        """The steps a prompt-editing schedule is written over. A1111 advances the schedule once per
        model evaluation and, for its second-order samplers, doubles the steps (`SamplerData.total_steps`)."""
        return 2 * steps if self.second_order else steps


SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("DPM++ 2M", dpmpp.sample_dpmpp_2m, ("dpmpp_2m", "k_dpmpp_2m"), "karras",
                build_schedule=dpmpp.multistep_schedule, variance_preserving=True),
    SamplerInfo("DPM++ SDE", dpmpp.sample_dpmpp_sde, ("dpmpp_sde", "k_dpmpp_sde"), "karras", second_order=True),
    SamplerInfo("DPM++ 2M SDE", dpmpp.sample_dpmpp_2m_sde, ("dpmpp_2m_sde", "k_dpmpp_2m_sde"), "exponential",
                build_schedule=dpmpp.multistep_schedule, variance_preserving=True),
    SamplerInfo("DPM++ 3M SDE", dpmpp.sample_dpmpp_3m_sde, ("dpmpp_3m_sde", "k_dpmpp_3m_sde"), "exponential",
                discard_penultimate_sigma=True),
    SamplerInfo("DPM++ 2S a", dpmpp.sample_dpmpp_2s_ancestral, ("dpmpp_2s_ancestral", "k_dpmpp_2s_a"), "karras",
                second_order=True),
    SamplerInfo("Euler a", k_samplers.sample_euler_ancestral, ("euler_ancestral", "k_euler_a")),
    SamplerInfo("Euler", k_samplers.sample_euler, ("euler", "k_euler")),
    SamplerInfo("LMS", k_samplers.sample_lms, ("lms", "k_lms")),
    SamplerInfo("Heun", k_samplers.sample_heun, ("heun", "k_heun"), second_order=True),
    SamplerInfo("DPM2", k_samplers.sample_dpm_2, ("dpm_2", "k_dpm_2"), "karras", discard_penultimate_sigma=True,
                second_order=True),
    SamplerInfo("DPM2 a", k_samplers.sample_dpm_2_ancestral, ("dpm_2_ancestral", "k_dpm_2_a"), "karras",
                discard_penultimate_sigma=True, second_order=True),
    SamplerInfo("DDIM", timestep_samplers.sample_ddim, ("ddim",),
                build_schedule=timestep_samplers.ddim_schedule, variance_preserving=True),
    SamplerInfo("PLMS", timestep_samplers.sample_plms, ("plms", "pndm"),
                build_schedule=timestep_samplers.ddim_schedule, variance_preserving=True),
    SamplerInfo("UniPC", timestep_samplers.sample_unipc, ("uni_pc", "unipc"),
                build_schedule=timestep_samplers.unipc_schedule, variance_preserving=True),
    SamplerInfo("DDPM", timestep_samplers.sample_ddpm, ("ddpm",),
                build_schedule=timestep_samplers.ddpm_schedule, variance_preserving=True),
    SamplerInfo("LCM", timestep_samplers.sample_lcm, ("lcm",),
                build_schedule=timestep_samplers.lcm_schedule, variance_preserving=True),
)
SCHEDULE_NAMES = {  # A1111 label / ComfyUI name -> sdtorch schedule kind ("automatic": see SAMPLER_DEFAULT)
    "automatic": "automatic", "auto": "automatic", "normal": "automatic", "discrete": "automatic",
    "karras": "karras", "exponential": "exponential",
    "uniform": "uniform", "sgm uniform": "trailing", "sgm_uniform": "trailing", "simple": "trailing",
    "trailing": "trailing",  # every kind is also a name: a resolved kind resolves to itself
}


# In a request, A1111's "Automatic" means the sampler's own schedule (DPM++ 2M: Karras; `resolve_request`);
# "Discrete" names the automatic kind (diffusers' grid of the model's timesteps) for any sampler
SAMPLER_DEFAULT = ("automatic", "auto")
DISCRETE_LABEL = "Discrete"


def _key(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


_BY_NAME = {_key(n): info for info in SAMPLERS for n in (info.name, *info.aliases)}


def sampler_names() -> list[str]:
    return [info.name for info in SAMPLERS]


def resolve(sampler: str, schedule: str | None = None) -> tuple[SamplerInfo, str]:
    """(sampler, schedule kind) for names; accepts "DPM++ 2M Karras" with the schedule appended. No schedule: the
    sampler's own; a schedule is taken literally ("automatic": the model's timesteps). A request's names go through
    `resolve_request`, where "Automatic" is A1111's."""
    key = _key(sampler)
    info = _BY_NAME.get(key)
    if info is None:  # legacy combined form: cut a known schedule name off the end
        for label in sorted(SCHEDULE_NAMES, key=len, reverse=True):
            if key.endswith(" " + label) and key[: -len(label) - 1] in _BY_NAME:
                info = _BY_NAME[key[: -len(label) - 1]]
                schedule = schedule or label
                break
    if info is None:
        raise InvalidInputError(f"unknown sampler {sampler!r}; valid names: {', '.join(sampler_names())}")
    if schedule is None:
        return info, info.default_schedule
    kind = SCHEDULE_NAMES.get(_key(schedule))
    if kind is None:
        valid = ", ".join(["Automatic", "Karras", "Exponential", "Uniform", "SGM Uniform", DISCRETE_LABEL])
        raise InvalidInputError(f"unknown schedule {schedule!r}; valid names: {valid}")
    return info, kind


def resolve_request(sampler: str, schedule: str | None = None) -> tuple[SamplerInfo, str]:
    """`resolve` for the names a generation request gives: A1111's "Automatic" means the sampler's own schedule
    (A1111's: Karras for DPM++ 2M, exponential for DPM++ 2M SDE, the model's timesteps for Euler), as no schedule
    does; "Discrete" asks for the model's timesteps with any sampler."""
    own = schedule is None or _key(schedule) in SAMPLER_DEFAULT
    return resolve(sampler, None if own else schedule)


@dataclass
class ModelSwitch:
    """A1111's refiner: a second model (its denoiser and its own conditioning) that takes over the running sampler.

    The sampler, its sigmas and its state (a multistep history, the noise generator) carry on; from the first
    model evaluation whose noise level has `completed_ratio(sigma) >= at`, the evaluations use this denoiser and
    conditioning (A1111 `apply_refiner`, checked before each evaluation; its default, by noise level rather
    than by steps). `engaged` records whether the switch happened.
    """

    denoiser: Denoiser
    context: Conditioning
    uncond_context: Conditioning | None
    at: float
    engaged: bool = field(default=False, init=False)

    def due(self, schedule: DiscreteSchedule, sigma: Tensor) -> bool:
        """Whether an evaluation at `sigma` runs on the second model: A1111's completed ratio (T - 1 - t) / T of
        the training timestep t whose sigma is nearest (the largest sigma of a batch), in float32 as A1111's."""
        sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64).max()
        t = torch.argmin((schedule.sigmas - sigma).abs())  # int64 index
        T = schedule.num_train_timesteps
        completed = (T - 1 - t).to(torch.float32) / T
        return bool(completed >= torch.tensor(self.at, dtype=torch.float32))


class _Conditioned:
    """The denoiser with its conditioning bound: model(x, sigma) -> x0, as samplers expect.

    The conditioning's step is the number of model evaluations made so far in this run (A1111's
    `CFGDenoiser.step`, advanced once per call), so a second-order sampler moves through a schedule
    twice as fast as its steps; `SamplerInfo.prompt_steps` doubles the schedule's steps to match.
    With a `switch`, the denoiser and conditioning change to the switch's once it is due; the count goes on.
    """

    def __init__(self, denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, kwargs: dict,
                 switch: ModelSwitch | None = None):
        self.denoiser, self.cond, self.uncond, self.kwargs = denoiser, cond, uncond, kwargs
        self.prediction_type = denoiser.prediction_type  # PLMS combines raw model outputs, as diffusers does
        self.switch = switch
        self.evaluations = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        switch = self.switch
        if switch is not None and not switch.engaged and switch.due(self.denoiser.schedule, sigma):
            switch.engaged = True
            self.denoiser, self.cond, self.uncond = switch.denoiser, switch.context, switch.uncond_context
        step = self.evaluations
        context, added = self.cond.at(step), self.cond.added_at(step)  # (N, L, D), (N, P+K) | None
        uncond = uncond_added = None
        if self.uncond is not None:
            padding = self.cond.padding if self.cond.padding is not None else self.uncond.padding
            context, uncond = pad_to_match(context, self.uncond.at(step), padding)
            uncond_added = self.uncond.added_at(step)
        self.evaluations += 1
        return self.denoiser(x, sigma, context=context, uncond_context=uncond, weights=self.cond.weights,
                             added=added, uncond_added=uncond_added, **self.kwargs)

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.denoiser.timestep(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1))


class _Inpainting(_Conditioned):
    """Also keeps the area outside the mask on the noised original at every step after the first, as
    diffusers' inpainting pipeline does for ordinary (4-channel) models."""

    def __init__(self, denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, kwargs: dict,
                 switch: ModelSwitch | None, sigmas: Tensor, keep: Tensor, mask: Tensor, noise: Tensor):
        super().__init__(denoiser, cond, uncond, kwargs, switch)
        self.sigmas, self.keep, self.mask, self.noise = sigmas, keep, mask, noise

    def step_input(self, i: int, x: Tensor) -> Tensor:
        if i == 0:
            return x
        original = self.keep + self.noise * self.sigmas[i].to(x.dtype)  # (B,4,h,w) at this step's sigma
        return (1 - self.mask) * original + self.mask * x


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    *,
    sampler: str = "DPM++ 2M",
    schedule: str | None = None,
    steps: int = 20,
    spacing: str = "leading",
    context: Tensor | Conditioning,
    uncond_context: Tensor | Conditioning | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    extra_channels: Tensor | None = None,
    image_guidance_scale: float | None = None,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    keep_latents: Tensor | None = None,
    keep_mask: Tensor | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
    generator: Noise | None = None,
    callback: Callback | None = None,
    switch: ModelSwitch | None = None,
) -> Tensor:
    """Run a sampler from noise (txt2img) or from `init_latents` part-way (img2img, `strength` in (0, 1]).

    Each sampler walks the timestep grid its diffusers scheduler uses, from diffusers' starting scale, so
    a seed gives diffusers' latents. Returns the variance-preserving latent diffusers would return
    (x / sqrt(1 + sigma_last^2)). As in diffusers, img2img runs the last int(steps * strength) steps.

    Inpainting with an ordinary model: `keep_latents` (B,4,h,w) are held outside `keep_mask` (B,1,h,w),
    1 = repaint, re-noised with `noise` to each step's sigma. An instruct-pix2pix edit: `extra_channels` are the
    source image's latents and `image_guidance_scale` its guidance (see `Denoiser`).

    `context` / `uncond_context`: fixed (B,L,D) tensors, or `Conditioning`s that change with the model
    evaluation (prompt editing, counted from 0 in this run, img2img included: A1111 does the same) and
    may hold several weighted prompts per image (AND).

    `switch`: a second model that takes over part-way (A1111's refiner; see `ModelSwitch`). It must share the
    first's training schedule and parameterisation.
    """
    info, kind = resolve(sampler, schedule)
    if eta is not None and eta < 0:
        raise InvalidInputError(f"eta must be >= 0, not {eta}")
    if not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be in (0, 1], not {strength}")
    spacing, kind = (kind, "automatic") if kind == "trailing" else (spacing, kind)
    grid = info.build_schedule(denoiser.schedule, steps + info.discard_penultimate_sigma, kind, spacing)
    if info.discard_penultimate_sigma:
        grid = SamplingSchedule(torch.cat([grid.sigmas[:-2], grid.sigmas[-1:]]), grid.timesteps[:-1])
    start = steps - int(steps * strength) if init_latents is not None else 0
    if start >= steps:
        raise InvalidInputError(f"strength {strength} with {steps} steps runs no step; raise either")
    sigmas = grid.sigmas[start:]
    if isinstance(generator, SeededNoise):  # A1111's Brownian trees span the whole sampling's sigmas, img2img too
        positive = grid.sigmas[grid.sigmas > 0]
        generator.span = (float(positive.min()), float(positive.max()))
    denoisers = [denoiser] if switch is None else [denoiser, switch.denoiser]
    if switch is not None:
        _check_switch(denoiser, switch.denoiser)
    for d in denoisers:
        d.use_timesteps_of(grid)
    if init_latents is not None:  # img2img: the clean latents noised to the starting sigma
        x = init_latents + noise * sigmas[0].to(noise.dtype)
    else:  # diffusers' starting scale: VP noise for VP solvers and for the leading-spaced default grid
        vp = info.variance_preserving or (kind == "automatic" and spacing == "leading")
        x = noise * (((1 + sigmas[0] ** 2).sqrt() if vp else sigmas[0]).to(noise.dtype))  # (B,4,h,w)
    cond = context if isinstance(context, Conditioning) else Conditioning.constant(context)
    uncond = uncond_context
    if isinstance(uncond, Tensor):
        uncond = Conditioning.constant(uncond)
    kwargs = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, extra_channels=extra_channels,
                  image_guidance_scale=image_guidance_scale)
    if keep_latents is not None and keep_mask is not None:
        model = _Inpainting(denoiser, cond, uncond, kwargs, switch, sigmas, keep_latents, keep_mask.to(noise.dtype),
                            noise)
    else:
        model = _Conditioned(denoiser, cond, uncond, kwargs, switch)
    try:
        x = info.function(model, x, sigmas, generator=generator, callback=callback, eta=eta, s_noise=s_noise)
    finally:
        for d in denoisers:
            d.use_timesteps_of(None)
    x = x / (1 + sigmas[-1].to(x.dtype) ** 2).sqrt()
    if isinstance(model, _Inpainting):  # the final latent keeps the clean original outside the mask
        x = (1 - model.mask) * keep_latents + model.mask * x
    return x


def _check_switch(first: Denoiser, second: Denoiser) -> None:
    """A model switched to mid-run must read the sampler's sigmas and combine outputs as the first does."""
    if second.prediction_type != first.prediction_type:
        raise InvalidInputError(f"the refiner predicts {second.prediction_type} and the model {first.prediction_type}: "
                                "a refiner must share the model's parameterisation")
    if second.schedule.config != first.schedule.config:
        raise InvalidInputError(f"the refiner was trained on another noise schedule than the model ("
                                f"{second.schedule.config} vs {first.schedule.config}): it cannot continue its sampler")
