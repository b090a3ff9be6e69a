"""Training the VAE from scratch, and encoding a dataset's latents once for diffusion training.

The loss is the KL-regularised autoencoder's of Rombach et al. 2022 (section 3 and appendix G) without
the perceptual and adversarial terms: L1 reconstruction of a posterior sample, a small KL term that
keeps the latent space smooth and roughly unit-scaled, and optionally an L1 on image gradients that
keeps flat-coloured shapes' edges sharp (a cheap stand-in for the perceptual loss).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.io import read_safetensors, write_json, write_safetensors
from ..errors import CheckpointError
from ..models.vae import AutoencoderKL, DiagonalGaussian
from .loop import StepFn, TrainState, batch_indices, step_generator


def kl_divergence(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), averaged over batch and latent elements: 0.5 * (mean^2 + var - 1 - logvar)."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal (B, C, H, W-1) and vertical (B, C, H-1, W) forward differences."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def foreground_weights(images: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W), mean 1 in each image: foreground pixels weigh 1 + `weight` times
    as much as background ones before normalising.

    Foreground is where a pixel's colour differs from its image's per-channel median (the background, for
    pictures whose object covers under half the area) by more than `threshold` in some channel ([-1, 1] units).
    A small object is then worth as much of the loss as a large one's share of its image, not 1/16 of it.
    """
    median = images.flatten(2).median(dim=2).values[..., None, None]  # (B, C, 1, 1)
    mask = ((images - median).abs().amax(dim=1, keepdim=True) > threshold).float()  # (B, 1, H, W)
    w = 1.0 + weight * mask
    return w / w.mean(dim=(2, 3), keepdim=True)


def _mean(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Mean of t, weighted per pixel by w (broadcast over channels) when given."""
    return t.mean() if w is None else (t * w).mean()


def vae_loss(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    kl_weight: float = 1e-4,
    edge_weight: float = 0.0,
    mse_weight: float = 0.0,
    foreground_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Loss of one batch of images (B, 3, H, W) in [-1, 1]: {"loss", "l1", "kl"[, "edge"][, "mse"]}.

    loss = mean |decode(z) - x| + kl_weight * KL + edge_weight * mean |grad decode(z) - grad x|
           + mse_weight * mean (decode(z) - x)^2 (squared errors weigh the few large errors, on small shapes, more),
    z sampled from the posterior with `generator`. Every term is a per-element mean, so the weights
    do not depend on the image size. With `foreground_weight`, the pixel terms are means weighted by
    `foreground_weights` (edges: the weight of the pixel each difference starts at).
    With the encoder frozen (requires_grad False), only the decoder learns and the KL term is a constant.
    """
    posterior = vae.encode(images)
    recon = vae.decode(posterior.sample(generator)).float()  # (B, 3, H, W)
    target = images.float()
    w = foreground_weights(target, foreground_weight) if foreground_weight else None  # (B, 1, H, W)
    l1 = _mean((recon - target).abs(), w)
    kl = kl_divergence(posterior)
    out = {"l1": l1, "kl": kl}
    loss = l1 + kl_weight * kl
    if edge_weight:
        (rx, ry), (tx, ty) = _gradients(recon), _gradients(target)
        wx, wy = (None, None) if w is None else (w[..., :, :-1], w[..., :-1, :])  # (B, 1, H, W-1), (B, 1, H-1, W)
        out["edge"] = 0.5 * (_mean((rx - tx).abs(), wx) + _mean((ry - ty).abs(), wy))
        loss = loss + edge_weight * out["edge"]
    if mse_weight:
        out["mse"] = _mean((recon - target).square(), w)
        loss = loss + mse_weight * out["mse"]
    return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


def _images(dataset: Sequence[dict[str, Any]], indices: list[int], like: torch.Tensor) -> torch.Tensor:
    """Stack the "image" entries of dataset items, on the device and in the dtype of `like`."""
    return torch.stack([dataset[i]["image"] for i in indices]).to(like.device, like.dtype)  # (B, 3, H, W)


def vae_step(
    vae: AutoencoderKL,
    dataset: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    kl_weight: float = 1e-4,
    edge_weight: float = 0.0,
    mse_weight: float = 0.0,
    foreground_weight: float = 0.0,
) -> StepFn:
    """A step function for `train`: the batch of (seed, step) from `dataset` (items with an "image")."""
    param = next(vae.parameters())

    def step(state: TrainState) -> dict[str, torch.Tensor]:
        indices = batch_indices(state.seed, state.step, batch_size, len(dataset))
        images = _images(dataset, indices, param)
        generator = step_generator(state.seed, state.step)
        return vae_loss(vae, images, kl_weight=kl_weight, edge_weight=edge_weight, mse_weight=mse_weight,
                        foreground_weight=foreground_weight, generator=generator)

    return step


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> DiagonalGaussian:
    """The posterior of images (B, 3, H, W) in [-1, 1], moved to the VAE's device and dtype and encoded
    in eval mode without gradients (the VAE's train/eval mode is restored afterwards)."""
    param = next(vae.parameters())
    was_training = vae.training
    vae.eval()
    try:
        return vae.encode(images.to(param.device, param.dtype))  # (B, C, h, w) moments
    finally:
        vae.train(was_training)


def _encode(
    vae: AutoencoderKL, dataset: Sequence[dict[str, Any]], count: int, batch_size: int, sample: bool, seed: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Unscaled latents (count, C, h, w), float32 on the CPU, of the first `count` items in order, and
    those items without their images."""
    chunks, rest = [], []
    for n, start in enumerate(range(0, count, batch_size)):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        posterior = encode_images(vae, torch.stack([item["image"] for item in items]))  # of (b, 3, H, W)
        z = posterior.sample(step_generator(seed, n)) if sample else posterior.mean  # (b, C, h, w)
        chunks.append(z.float().cpu())
        rest += [{k: v for k, v in item.items() if k != "image"} for item in items]
    return torch.cat(chunks), rest


def estimate_scaling_factor(
    vae: AutoencoderKL,
    dataset: Sequence[dict[str, Any]],
    *,
    num_images: int = 512,
    batch_size: int = 64,
    sample: bool = True,
    seed: int = 0,
) -> float:
    """1 / std of the latents of the first `num_images` items (SD's recipe: scaled latents have unit variance).

    SD measured posterior samples (`sample=True`); with a small posterior variance the mean gives nearly
    the same factor. Store the result as `VAEConfig.scaling_factor` before caching latents.
    """
    latents, _ = _encode(vae, dataset, min(num_images, len(dataset)), batch_size, sample, seed)
    return 1.0 / latents.double().std().item()


def sidecar_path(path: str | Path) -> Path:
    """The JSON file beside a latent cache: "latents.safetensors" -> "latents.json"."""
    return Path(path).with_suffix(".json")


def cache_latents(
    vae: AutoencoderKL,
    dataset: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    batch_size: int = 64,
    sample: bool = False,
    seed: int = 0,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """Encode every item of `dataset` once; write "latents" (N, C, h, w) to `path` (safetensors) and the
    captions, attributes and scaling factor to the JSON sidecar (`sidecar_path(path)`). Returns the latents.

    Latents are posterior means (or, with `sample`, samples drawn from (seed, batch number)) times
    `scaling_factor` (default: the VAE config's), so the diffusion model trains on unit-variance latents.
    """
    factor = vae.scaling_factor if scaling_factor is None else scaling_factor
    latents, items = _encode(vae, dataset, len(dataset), batch_size, sample, seed)
    latents = latents * factor  # (N, C, h, w)
    info = {
        "count": len(items),
        "scaling_factor": factor,
        "sample": sample,
        "seed": seed,
        "captions": [item.get("caption", "") for item in items],
    }
    attributes = [item.get("attributes") for item in items]
    if all(dataclasses.is_dataclass(a) for a in attributes):
        info["attributes"] = [dataclasses.asdict(a) for a in attributes]
    elif all(isinstance(a, dict) for a in attributes):
        info["attributes"] = attributes
    write_safetensors({"latents": latents}, path)
    write_json(info, sidecar_path(path))
    return latents


def load_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a cache written by `cache_latents`: (latents (N, C, h, w), sidecar dict with "captions", ...)."""
    tensors, _ = read_safetensors(path)
    try:
        info = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{sidecar_path(path)}: unreadable latent-cache sidecar ({e})") from None
    latents = tensors.get("latents")
    if latents is None or latents.shape[0] != info.get("count") or len(info.get("captions", ())) != info["count"]:
        raise CheckpointError(f"{path}: latents and sidecar {sidecar_path(path).name} disagree; re-run cache_latents")
    return latents, info
