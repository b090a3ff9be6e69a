"""The denoiser D(x, sigma) -> x0 estimate: a UNet, its schedule and parameterisation, and CFG.

Samplers only ever see this callable (k-diffusion's interface): they know nothing of timesteps,
epsilon vs v, or guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .schedules import DiscreteSchedule, SamplingSchedule

PARAMETERISATIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class ScheduledContext:
    """One prompt's context over a sampler run (A1111 prompt editing), with its AND weight.

    Model evaluations are counted from 0; `contexts[i]` (L, D) holds up to and including evaluation
    `ends[i]` (ascending). All segments have one length L. SDXL: `pooled[i]` (P,) is segment i's pooled
    text embedding.
    """

    ends: tuple[int, ...]
    contexts: tuple[Tensor, ...]
    weight: float = 1.0
    pooled: tuple[Tensor, ...] | None = None

    def segment(self, step: int) -> int:
        """The segment of evaluation `step`: the first with step <= end, or past the last end the first
        (A1111 `reconstruct_cond_batch`)."""
        return next((i for i, end in enumerate(self.ends) if step <= end), 0)

    def at(self, step: int) -> Tensor:
        """The context (L, D) of evaluation `step`."""
        return self.contexts[self.segment(step)]


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of a batch over a sampler run: per image its prompts (one, or several joined
    with A1111's AND), each a `ScheduledContext`.

    `padding` (77, D), the empty prompt's encoding, lengthens the prompt or the negative side so both
    fit one UNet batch (A1111 `pad_cond`); without it both sides must have one length.
    SDXL: `time_ids` (K,), the size/crop numbers (and the refiner's aesthetic score) of this side, follow
    each prompt's pooled embedding into the UNet's addition embedding (`added_at`).
    """

    images: tuple[tuple[ScheduledContext, ...], ...]
    padding: Tensor | None = None
    time_ids: Tensor | None = None

    @classmethod
    def constant(cls, context: Tensor) -> Conditioning:
        """A fixed context (B, L, D): one prompt of weight 1 per image."""
        return cls(tuple((ScheduledContext((0,), (c,)),) for c in context))

    @property
    def weights(self) -> list[list[float]]:
        """The AND weights of each image's prompts."""
        return [[p.weight for p in prompts] for prompts in self.images]

    def at(self, step: int) -> Tensor:
        """Every image's prompt contexts at evaluation `step`, image-major (N, L, D). Shorter ones are
        lengthened by repeating their last token vector (A1111 `stack_conds`; negatives of different
        lengths, which A1111 cannot batch, the same way)."""
        contexts = [p.at(step) for prompts in self.images for p in prompts]
        length = max(c.shape[0] for c in contexts)
        return torch.stack([torch.cat([c, c[-1:].expand(length - len(c), -1)]) if len(c) < length else c
                            for c in contexts])

    def added_at(self, step: int) -> Tensor | None:
        """SDXL's added conditioning of evaluation `step`, image-major as `at`: (N, P + K), each prompt's pooled
        embedding followed by `time_ids`; None without pooled embeddings (SD1/SD2)."""
        prompts = [p for prompts in self.images for p in prompts]
        if prompts[0].pooled is None:
            return None
        pooled = torch.stack([p.pooled[p.segment(step)] for p in prompts])  # (N, P)
        time_ids = self.time_ids.to(pooled).expand(len(prompts), -1)  # (N, K)
        return torch.cat([pooled, time_ids], dim=1)


def pad_to_match(context: Tensor, uncond: Tensor, padding: Tensor | None) -> tuple[Tensor, Tensor]:
    """(context (N, L, D), uncond (B, L', D)) brought to one length by appending `padding` (77, D) to
    the shorter, as many times as the difference holds it: A1111's `pad_cond_uncond`, its "pad prompt/
    negative prompt" setting (without it A1111 runs the two sides in separate UNet batches)."""
    difference = context.shape[1] - uncond.shape[1]
    if difference == 0:
        return context, uncond
    if padding is None or difference % padding.shape[0]:
        raise InvalidInputError(
            f"prompt and negative contexts have {context.shape[1]} and {uncond.shape[1]} tokens: "
            "pass contexts of one length, or a Conditioning with padding"
        )

    def lengthen(x: Tensor, repeats: int) -> Tensor:
        return torch.cat([x, padding.to(x).repeat(x.shape[0], repeats, 1)], dim=1)

    if difference > 0:
        return context, lengthen(uncond, difference // padding.shape[0])
    return lengthen(context, -difference // padding.shape[0]), uncond


class Denoiser:
    """Wraps `unet(x_in, t, context) -> output` into `D(x, sigma) -> x0` for x = x0 + sigma * eps; with SDXL's
    added conditioning, `unet(x_in, t, context, added)`.

    Input scaling: the UNet was trained on variance-preserving x_t = x / sqrt(1 + sigma^2).
    Parameterisations (Karras et al. 2022, table 1 with sigma_data = 1 for v):
        epsilon:      x0 = x - sigma * out
        v_prediction: x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * out
        sample:       x0 = out
    Classifier-free guidance runs cond and uncond in one batch, on the UNet output:
        out = uncond + scale * (cond - uncond), optionally rescaled (Lin et al. 2023, eq. 15-16).
    Composable prompts (A1111's AND; Liu et al. 2022, eq. 10) sum one such term per prompt i of an image:
        out = uncond + sum_i w_i * scale * (cond_i - uncond).
    A1111 combines the x0 estimates; x0 is affine in the output with coefficients fixed by x and sigma,
    and the weights multiply differences, so combining the outputs gives the same x0.
    """

    def __init__(
        self,
        unet: Callable[..., Tensor],
        schedule: DiscreteSchedule,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in PARAMETERISATIONS:
            raise InvalidInputError(f"prediction_type must be one of {PARAMETERISATIONS}, not {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self._grid: SamplingSchedule | None = None
        self._uncond_rows = 0

    @property
    def grid(self) -> SamplingSchedule | None:
        """The sampling schedule being walked (set by the sampler for its run), or None."""
        return self._grid

    @property
    def uncond_rows(self) -> int:
        """How many leading rows of the UNet batch being evaluated are unconditional (CFG's [uncond, cond]
        layout; 0 without guidance): for what applies to the conditional rows only (ControlNet's guess mode)."""
        return self._uncond_rows

    def use_timesteps_of(self, sampling: SamplingSchedule | None) -> None:
        """At the sigmas of `sampling`, call the UNet at its exact timesteps (as diffusers does)."""
        self._grid = sampling

    def timestep(self, sigma: Tensor) -> Tensor:
        """The UNet timestep for each sigma: the schedule grid's own where it matches, else log-sigma interpolation."""
        t = self.schedule.sigma_to_t(sigma)
        if self._grid is not None:
            grid_sigmas = self._grid.sigmas[:-1].to(sigma.device, torch.float64)
            match = (sigma.to(torch.float64)[:, None] - grid_sigmas[None]).abs() <= 1e-9 * grid_sigmas[None]
            found = match.any(dim=1)
            if found.any():
                exact = self._grid.timesteps.to(sigma.device, torch.float64)[match.float().argmax(dim=1)]
                t = torch.where(found, exact.to(t.dtype), t)
        return t

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | float,
        context: Tensor,
        uncond_context: Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        extra_channels: Tensor | None = None,
        weights: Sequence[Sequence[float]] | None = None,
        added: Tensor | None = None,
        uncond_added: Tensor | None = None,
        image_guidance_scale: float | None = None,
    ) -> Tensor:
        """x0 estimate for x (B,C,H,W) at noise level sigma (scalar or (B,)).

        context (B,L,D) is the prompt's; with `uncond_context` (B,L,D) and a scale != 1, guidance is applied.
        With `weights` (image b's AND weights, per image), context (N,L,D) holds every image's prompts
        in order, N = the number of weights, and the guidance sums them (always needs `uncond_context`).
        extra_channels (B,5|4,H,W), for inpainting and instruct-pix2pix UNets, are appended to the scaled input
        unchanged.
        added / uncond_added (B|N, P+K): SDXL's pooled embedding and time ids of each context row.
        image_guidance_scale (instruct-pix2pix, with `extra_channels` (B,4,H,W) the source image's latents and a
        negative context): the image's own guidance term, see `_edited`; at 1 it is plain guidance.
        """
        if guidance_scale < 0:
            raise InvalidInputError(f"guidance scale must be >= 0, not {guidance_scale}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        composed = weights is not None and any(list(w) != [1.0] for w in weights)
        if image_guidance_scale not in (None, 1.0) and uncond_context is not None:
            if composed:
                raise InvalidInputError("composable prompts (AND, or a prompt weight) do not combine with an "
                                        "instruct-pix2pix model's image guidance; set image_cfg_scale 1")
            return self._edited(x, sigma, context, uncond_context, guidance_scale, image_guidance_scale,
                                guidance_rescale, extra_channels, added, uncond_added)
        if composed:
            return self._composed(x, sigma, context, uncond_context, guidance_scale, guidance_rescale,
                                  extra_channels, weights, added, uncond_added)
        guided = uncond_context is not None and guidance_scale != 1.0
        if guided:
            x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
            context = torch.cat([uncond_context, context])
            extra_channels = None if extra_channels is None else torch.cat([extra_channels, extra_channels])
            added = None if added is None else torch.cat([uncond_added, added])
        else:
            x_in, sigma_in = x, sigma
        self._uncond_rows = x.shape[0] if guided else 0
        out = self._predict(x_in, sigma_in, context, extra_channels, added)  # (2B|B, C, H, W)
        if guided:  # guidance on the raw output, as diffusers applies it (x0 is affine in it)
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
            if guidance_rescale > 0:
                out = _rescale(out, out_cond, guidance_rescale)
        s = sigma.to(x.dtype)[:, None, None, None]  # (B,1,1,1)
        return self._to_x0(x, s, out)

    def _composed(
        self, x: Tensor, sigma: Tensor, context: Tensor, uncond_context: Tensor | None, guidance_scale: float,
        guidance_rescale: float, extra_channels: Tensor | None, weights: Sequence[Sequence[float]],
        added: Tensor | None, uncond_added: Tensor | None,
    ) -> Tensor:
        """Guidance over several prompts per image: uncond + sum_i w_i * scale * (cond_i - uncond)."""
        if uncond_context is None:
            raise InvalidInputError("composable prompts (AND, or a prompt weight) need a negative context")
        counts = [len(w) for w in weights]
        if len(counts) != x.shape[0] or sum(counts) != context.shape[0]:
            raise InvalidInputError(f"{context.shape[0]} prompt contexts for {x.shape[0]} images with AND weights "
                                    f"{[list(w) for w in weights]}")
        image = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], device=x.device)  # (N,) image of each
        x_in, sigma_in = torch.cat([x, x[image]]), torch.cat([sigma, sigma[image]])  # (B+N, ...)
        if extra_channels is not None:
            extra_channels = torch.cat([extra_channels, extra_channels[image]])
        added = None if added is None else torch.cat([uncond_added, added])
        self._uncond_rows = x.shape[0]
        out = self._predict(x_in, sigma_in, torch.cat([uncond_context, context]), extra_channels, added)
        out_uncond, out_cond = out[: x.shape[0]], out[x.shape[0] :]  # (B, C, H, W), (N, C, H, W)
        scale = torch.tensor([w * guidance_scale for ws in weights for w in ws], dtype=out.dtype, device=out.device)
        out = out_uncond.index_add(0, image, (out_cond - out_uncond[image]) * scale[:, None, None, None])
        if guidance_rescale > 0:  # against each image's first prompt, the one A1111 previews
            first = [sum(counts[:b]) for b in range(len(counts))]
            out = _rescale(out, out_cond[first], guidance_rescale)
        return self._to_x0(x, sigma.to(x.dtype)[:, None, None, None], out)

    def _edited(
        self, x: Tensor, sigma: Tensor, context: Tensor, uncond_context: Tensor, guidance_scale: float,
        image_guidance_scale: float, guidance_rescale: float, extra_channels: Tensor | None, added: Tensor | None,
        uncond_added: Tensor | None,
    ) -> Tensor:
        """instruct-pix2pix's guidance (Brooks et al. 2023, eq. 3) over rows [no text, no image], [no text, image],
        [text, image]: out = uncond + s_I * (image - uncond) + s_T * (cond - image)."""
        if extra_channels is None:
            raise InvalidInputError("image guidance needs the source image's latents (extra_channels)")
        x_in, sigma_in = torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma])  # (3B, ...)
        contexts = torch.cat([uncond_context, uncond_context, context])
        images = torch.cat([torch.zeros_like(extra_channels), extra_channels, extra_channels])
        added = None if added is None else torch.cat([uncond_added, uncond_added, added])
        self._uncond_rows = 2 * x.shape[0]
        out_uncond, out_image, out_cond = self._predict(x_in, sigma_in, contexts, images, added).chunk(3)
        out = out_uncond + image_guidance_scale * (out_image - out_uncond) + guidance_scale * (out_cond - out_image)
        if guidance_rescale > 0:
            out = _rescale(out, out_cond, guidance_rescale)
        return self._to_x0(x, sigma.to(x.dtype)[:, None, None, None], out)

    def _predict(
        self, x: Tensor, sigma: Tensor, context: Tensor, extra_channels: Tensor | None, added: Tensor | None = None,
    ) -> Tensor:
        """The UNet's raw output (eps | v | x0, as trained) for x (B,C,H,W) at sigma (B,)."""
        s = sigma.to(x.dtype)[:, None, None, None]  # (B,1,1,1)
        unet_in = x / (1 + s**2).sqrt()
        if extra_channels is not None:
            unet_in = torch.cat([unet_in, extra_channels.to(unet_in.dtype)], dim=1)  # (B, 4+5|4, H, W)
        if added is not None:
            return self.unet(unet_in, self.timestep(sigma), context, added)
        return self.unet(unet_in, self.timestep(sigma), context)

    def _to_x0(self, x: Tensor, s: Tensor, out: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
        return out


def _rescale(guided: Tensor, cond: Tensor, factor: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the guided output's std to the cond output's."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided
