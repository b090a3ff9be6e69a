"""Training the UNet on cached latents: the denoising objective of DDPM (Ho et al. 2020, eq. 14).

A step draws t uniformly from {0, ..., T-1} and noise eps ~ N(0, I), forms the variance-preserving
    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
with SD's training schedule, and regresses the UNet's output on eps ("epsilon") or on
v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0 ("v_prediction", Salimans & Ho 2022). For
classifier-free guidance (Ho & Salimans 2022) a caption is replaced by "" with probability
`cfg_dropout`, so the same UNet also learns the unconditional prediction.

With `snr_gamma` the per-sample losses are weighted by Min-SNR-gamma (Hang et al. 2023): with
SNR_t = abar_t / (1 - abar_t), the weight is min(SNR_t, gamma) / SNR_t for epsilon and
min(SNR_t, gamma) / (SNR_t + 1) for v, which stops the easy low-noise steps from dominating.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import PREDICTION_TYPES
from ..errors import InvalidInputError
from ..models.unet import UNet
from ..sampling.schedules import DiscreteSchedule
from .contrastive import Tokenizer
from .loop import StepFn, TrainState, batch_indices, step_generator


class TextConditioner:
    """A frozen text encoder and its tokenizer: captions -> UNet context (B, L, D), without gradients.

    The empty prompt's context (the unconditional one) is computed once and reused; `precompute`
    encodes a training set's captions once, so that steps read their contexts from memory.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer: Tokenizer, clip_skip: int = 1):
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self._empty: torch.Tensor | None = None
        self._rows: dict[str, int] = {}  # caption -> row of self._table
        self._table: torch.Tensor | None = None  # (U, L, D) contexts of the precomputed captions

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(captions).to(device), clip_skip=self.clip_skip)  # (B, L, D)

    def precompute(self, captions: Sequence[str], batch_size: int = 256) -> None:
        """Encode the distinct `captions` once and keep their contexts (on the encoder's device)."""
        unique = list(dict.fromkeys(captions))
        self._table = torch.cat([self._encode(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)])
        self._rows = {caption: row for row, caption in enumerate(unique)}

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Contexts (B, L, D) of `captions`, from the precomputed table when it holds them all."""
        if self._table is not None and all(c in self._rows for c in captions):
            return self._table[[self._rows[c] for c in captions]]
        return self._encode(captions)

    def empty(self) -> torch.Tensor:
        """The context of "" (1, L, D), cached."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def __call__(self, captions: list[str], drop: torch.Tensor | None = None) -> torch.Tensor:
        """Contexts (B, L, D) of `captions`; rows where `drop` (B,) is True get the empty prompt's."""
        if drop is None or not drop.any():
            return self.encode(captions)
        context = self.empty().expand(len(captions), -1, -1).clone()  # (B, L, D)
        keep = (~drop).nonzero().flatten().tolist()
        if keep:
            context[keep] = self.encode([captions[i] for i in keep])
        return context


def add_noise(schedule: DiscreteSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for integer timesteps t (B,)."""
    abar = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))  # (B, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def velocity(schedule: DiscreteSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, the v-prediction target."""
    abar = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))  # (B, 1, 1, 1)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def min_snr_weights(schedule: DiscreteSchedule, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) for integer timesteps t (B,)."""
    abar = schedule.alphas_cumprod[t.cpu()]  # (B,) float64
    snr = abar / (1 - abar)
    denominator = snr if prediction_type == "epsilon" else snr + 1
    return (snr.clamp(max=gamma) / denominator).float().to(t.device)


def diffusion_loss(
    unet: UNet,
    latents: torch.Tensor,
    context: torch.Tensor,
    schedule: DiscreteSchedule,
    *,
    generator: torch.Generator,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
) -> dict[str, torch.Tensor]:
    """MSE of the UNet's prediction for scaled latents (B, C, h, w) at uniform random timesteps: {"loss"}.

    Timesteps and noise come from `generator` (a CPU generator: the same draws on any device).
    `snr_gamma` weights each sample's MSE by Min-SNR-gamma (None: unweighted).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise InvalidInputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if snr_gamma is not None and not snr_gamma > 0:
        raise InvalidInputError(f"snr_gamma must be positive, got {snr_gamma}")
    b = latents.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator).to(latents.device)  # (B,)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    x_t = add_noise(schedule, latents, noise, t)  # (B, C, h, w)
    target = noise if prediction_type == "epsilon" else velocity(schedule, latents, noise, t)
    prediction = unet(x_t, t, context)
    if snr_gamma is None:
        return {"loss": F.mse_loss(prediction.float(), target.float())}
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return {"loss": (min_snr_weights(schedule, t, snr_gamma, prediction_type) * per_sample).mean()}


def unet_step(
    unet: UNet,
    latents: torch.Tensor,
    captions: Sequence[str],
    conditioner: TextConditioner,
    schedule: DiscreteSchedule,
    *,
    batch_size: int,
    cfg_dropout: float = 0.1,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
) -> StepFn:
    """A step function for `train` over cached latents (N, C, h, w) and their N captions.

    The batch, the captions dropped to "" (each with probability `cfg_dropout`), the timesteps and
    the noise all derive from (seed, step). `snr_gamma`: Min-SNR-gamma weighting (see `diffusion_loss`).
    """
    if latents.shape[0] != len(captions):
        raise InvalidInputError(
            f"need one caption per latent, got {len(captions)} captions and {latents.shape[0]} latents"
        )
    if not 0.0 <= cfg_dropout <= 1.0:
        raise InvalidInputError(f"cfg_dropout must be a probability, got {cfg_dropout}")
    param = next(unet.parameters())

    def step(state: TrainState) -> dict[str, torch.Tensor]:
        indices = batch_indices(state.seed, state.step, batch_size, len(captions))
        generator = step_generator(state.seed, state.step)
        drop = torch.rand(len(indices), generator=generator) < cfg_dropout  # (B,)
        context = conditioner([captions[i] for i in indices], drop).to(param.device, param.dtype)  # (B, L, D)
        x0 = latents[indices].to(param.device, param.dtype)  # (B, C, h, w)
        return diffusion_loss(unet, x0, context, schedule, generator=generator, prediction_type=prediction_type,
                              snr_gamma=snr_gamma)

    return step
