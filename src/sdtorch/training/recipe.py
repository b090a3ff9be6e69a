"""The from-scratch recipe: one config trains a whole text-to-image model with sdtorch's own code.

Stages, in order, each in its own folder under the work directory and skipped once finished
(an interrupted stage resumes from its last checkpoint, bit-identically):
    tokenizer   BPE vocabulary learned from the training captions (CLIP's file format)
    vae         the autoencoder (L1 + KL + edge loss) on rendered images
    decoder     optional ([decoder] in the recipe): the VAE's decoder fine-tuned with its encoder frozen,
                small objects' pixels weighted up (latents stay the same; SD's ft-MSE VAE was made so)
    latents     scaling factor (1 / std of the latents), then every training image encoded once
    clip        text and image towers, contrastive; the text tower becomes the UNet's text encoder
    unet        denoising on the cached latents, captions dropped for classifier-free guidance, EMA
    model       the parts assembled into a diffusers-layout folder (`sdtorch.load` reads it)
    metrics     VAE PSNR on held-out renders, the judge on VAE reconstructions, CLIP text-to-image
                retrieval (metrics.json)
Wall time per stage goes to `timings.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import tomlconfig
from ..checkpoints.io import write_json
from ..configs import DTYPES, ModelConfig
from ..data.shapes import ScenesDataset, ShapesDataset, distinct_items
from ..errors import InvalidInputError
from ..evaluation.judge import ATTRIBUTES, AttributeJudge, load_judge, score
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..pipeline import Pipeline
from ..sampling.schedules import DiscreteSchedule
from .bpe import save_bpe, train_bpe
from .contrastive import CLIPConfig, CLIPModel, ImageEncoderConfig, clip_step, retrieval_top1
from .diffusion import TextConditioner, unet_step
from .loop import EMA, TIMINGS_JSON, TrainState, record_timing, resume, save_checkpoint, train, warmup_cosine
from .vae import cache_latents, estimate_scaling_factor, load_latents, vae_step

logger = logging.getLogger(__name__)

STAGES = ("tokenizer", "vae", "decoder", "latents", "clip", "unet", "model", "metrics")


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one trained stage (AdamW with warm-up + cosine decay)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    checkpoint_every: int = 250


@dataclass(frozen=True)
class AutoencoderStageConfig(StageConfig):
    """The loss terms and pictures the vae and decoder stages share."""

    edge_weight: float = 0.0  # weight of the L1 loss on image gradients (edges)
    mse_weight: float = 0.0  # weight of the squared-error loss, next to L1
    foreground_weight: float = 0.0  # object pixels weigh 1 + this times the background's
    max_objects: int = 1  # > 1: train on scenes of 1 to this many objects instead of the captioned renders


@dataclass(frozen=True)
class VAEStageConfig(AutoencoderStageConfig):
    """[vae]: the autoencoder, L1 + KL (+ edge, MSE) loss."""

    kl_weight: float = 1e-4


@dataclass(frozen=True)
class DecoderStageConfig(AutoencoderStageConfig):
    """[decoder]: the VAE's decoder fine-tuned with its encoder frozen (no KL term: the latents stay the same)."""


@dataclass(frozen=True)
class CLIPStageConfig(StageConfig):
    """[clip]: the text and image towers, contrastive."""

    image_channels: tuple[int, ...] = ImageEncoderConfig.channels  # the image tower's channels per stride-2 stage


@dataclass(frozen=True)
class UNetStageConfig(StageConfig):
    """[unet]: denoising on the cached latents."""

    cfg_dropout: float = 0.1  # probability of dropping a caption (classifier-free guidance)
    ema_decay: float = 0.999
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting; None: plain MSE


@dataclass(frozen=True)
class DataConfig:
    """[data]: the training set, ShapesDataset(items, seed, "train") of image_size px pictures."""

    items: int
    image_size: int = 64


@dataclass(frozen=True)
class TokenizerStageConfig:
    """[tokenizer]: the BPE vocabulary learned from the training captions."""

    vocab_size: int


@dataclass(frozen=True)
class ExportConfig:
    """[export]: the shipped model folder."""

    dtype: str = "float16"  # a name in configs.DTYPES
    cfg_scale: float | None = None  # the model's default guidance scale, stored with it (None: 7.5, as for SD)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(sorted(DTYPES))}, got {self.dtype!r}")
        if self.cfg_scale is not None and not (math.isfinite(self.cfg_scale) and self.cfg_scale > 0):
            raise InvalidInputError(f"cfg_scale must be a positive number, got {self.cfg_scale!r}")


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the sizes of the evaluation sets."""

    vae_images: int = 512  # held-out renders (and as many fresh held-in ones) for the VAE's PSNR
    clip_captions: int = 200  # distinct held-in renders for CLIP's retrieval top-1


@dataclass(frozen=True)
class RecipeConfig:
    """A parsed recipe file (see configs/shapes.toml): one field per key or [section]."""

    data: DataConfig
    model: ModelConfig
    tokenizer: TokenizerStageConfig
    vae: VAEStageConfig
    clip: CLIPStageConfig
    unet: UNetStageConfig
    decoder: DecoderStageConfig | None = None  # decoder fine-tuning, when the recipe has a [decoder] section
    seed: int = 0
    export: ExportConfig = field(default_factory=ExportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @classmethod
    def from_file(cls, path: str | Path) -> RecipeConfig:
        """Parse a recipe; a typo, a wrong type or a missing key is an InvalidInputError naming the file and key."""
        return tomlconfig.load(cls, path, kind="recipe")


# ---- helpers -------------------------------------------------------------------------------------


def _state(models: dict[str, torch.nn.Module], stage: StageConfig, seed: int, config: dict, ema: float | None = None):
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    # fused: one kernel per step instead of a dozen per tensor (10% of a UNet step on this CPU)
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    scheduler = warmup_cosine(optimizer, stage.warmup_steps, stage.steps)
    averages = {name: EMA(models[name], decay=ema, warmup=True) for name in models} if ema else {}
    return TrainState(models=models, optimizer=optimizer, scheduler=scheduler, ema=averages, seed=seed, config=config)


@contextmanager
def _seeded_init(seed: int, stage: str) -> Iterator[None]:
    """Models built inside draw their initial weights from (seed, stage), whatever ran before in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{stage}".encode()))
        yield


def _run(state: TrainState, stage: StageConfig, step_fn, folder: Path, name: str) -> TrainState:
    return train(
        step_fn, state, stage.steps, batch_size=stage.batch_size, folder=folder,
        checkpoint_every=stage.checkpoint_every, stage=name, max_grad_norm=stage.max_grad_norm,
    )


def _timed(workdir: Path, name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    record_timing(workdir / TIMINGS_JSON, name, seconds=round(time.perf_counter() - start, 3), done=True)
    return result


def _merge_timings(workdir: Path, folder: Path, name: str) -> None:
    """Copy a trained stage's entry of its own timings.json into the recipe's."""
    path = folder / TIMINGS_JSON
    if path.is_file():
        entry = json.loads(path.read_text(encoding="utf-8")).get(name, {})
        record_timing(workdir / TIMINGS_JSON, name, **entry)


def _done(workdir: Path, name: str) -> bool:
    path = workdir / TIMINGS_JSON
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get(name, {}).get("done", False)


# ---- the recipe ----------------------------------------------------------------------------------


class Recipe:
    """The stages of one recipe run in `workdir`; `run()` does what is left of them."""

    def __init__(self, config: RecipeConfig, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        self.dataset = ShapesDataset(config.data.items, seed=config.seed, split="train", size=config.data.image_size)

    # the parts, built from the config and (once trained) their stage's checkpoint

    @property
    def model_config(self) -> ModelConfig:
        """The model config with the tokenizer's vocabulary and, once measured, the VAE scaling factor."""
        cfg = self.config.model
        tokenizer = self.tokenizer()
        vocab = tokenizer.vocab_size
        text = dataclasses.replace(
            cfg.text_encoder, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        vae = cfg.vae
        scale = self.workdir / "latents" / "scaling_factor.json"
        if scale.is_file():
            vae = dataclasses.replace(vae, scaling_factor=json.loads(scale.read_text(encoding="utf-8"))["scaling_factor"])
        return cfg.replace(text_encoder=text, vae=vae)

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_folder(self.workdir / "tokenizer")

    def _vae_state(self) -> TrainState:
        with _seeded_init(self.config.seed, "vae"):
            vae = AutoencoderKL(self.config.model.vae)
        return _state({"vae": vae}, self.config.vae, self.config.seed,
                      {"vae": asdict(self.config.vae), "model": asdict(self.config.model.vae)})

    def _decoder_state(self) -> TrainState:
        """A VAE with everything but its decoder frozen (`stage_decoder` starts it from the vae stage's weights)."""
        with _seeded_init(self.config.seed, "decoder"):
            vae = AutoencoderKL(self.config.model.vae).requires_grad_(False)
        for part in (vae.post_quant_conv, vae.decoder):
            part.requires_grad_(True)
        return _state({"vae": vae}, self.config.decoder, self.config.seed,
                      {"decoder": asdict(self.config.decoder), "model": asdict(self.config.model.vae)})

    def _clip_state(self) -> TrainState:
        image = ImageEncoderConfig(image_size=self.config.data.image_size, channels=self.config.clip.image_channels)
        with _seeded_init(self.config.seed, "clip"):
            clip = CLIPModel(CLIPConfig(text=self.model_config.text_encoder, image=image))
        return _state({"clip": clip}, self.config.clip, self.config.seed,
                      {"clip": asdict(self.config.clip), "text": asdict(self.config.model.text_encoder)})

    def _unet_state(self) -> TrainState:
        with _seeded_init(self.config.seed, "unet"):
            unet = UNet(self.config.model.unet)
        return _state({"unet": unet}, self.config.unet, self.config.seed,
                      {"unet": asdict(self.config.unet), "model": asdict(self.config.model.unet)},
                      ema=self.config.unet.ema_decay)

    def trained(self, name: str) -> TrainState:
        """The state of a trained stage ("vae", "decoder", "clip" or "unet"), restored from its checkpoint."""
        builders = {"vae": self._vae_state, "decoder": self._decoder_state, "clip": self._clip_state,
                    "unet": self._unet_state}
        state = builders[name]()
        if not resume(state, self.workdir / name):
            raise InvalidInputError(f"{self.workdir / name}: stage {name!r} has not been trained yet")
        return state

    def adopt_vae(self, vae: torch.nn.Module, source: str) -> None:
        """Record `vae`'s weights (from `source`, written in the timings) as the finished vae stage, so that the
        later stages build on a VAE trained elsewhere (scripts/shapes_decoder.py: the shipped model's). A workdir
        whose vae stage exists already is left as it is."""
        if (self.workdir / "vae").is_dir():
            return
        state = self._vae_state()
        state.models["vae"].load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
        state.step = self.config.vae.steps
        save_checkpoint(state, self.workdir / "vae")
        record_timing(self.workdir / TIMINGS_JSON, "vae", done=True, adopted_from=source)

    def vae(self) -> AutoencoderKL:
        """The finished VAE: the decoder stage's when the recipe has one, else the vae stage's."""
        return self.trained("decoder" if self.config.decoder else "vae").models["vae"].requires_grad_(False)

    # stages

    def run(self, until: str | None = None) -> None:
        """Run every stage not yet done, in order (stopping after `until` when given)."""
        if until is not None and until not in STAGES:
            raise InvalidInputError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_json(asdict(self.config), self.workdir / "recipe.json")
        for name in STAGES:
            if not _done(self.workdir, name):
                logger.info("stage %s", name)
                getattr(self, f"stage_{name}")()
            if name == until:
                break

    def stage_tokenizer(self) -> None:
        def build() -> None:
            captions = [self.dataset.describe(i)[1] for i in range(len(self.dataset))]
            vocab, merges = train_bpe(captions, self.config.tokenizer.vocab_size)
            save_bpe(vocab, merges, self.workdir / "tokenizer")

        _timed(self.workdir, "tokenizer", build)

    def stage_vae(self) -> None:
        state = self._vae_state()
        step = self._autoencoder_step(state, self.config.vae, kl_weight=self.config.vae.kl_weight)
        _run(state, self.config.vae, step, self.workdir / "vae", "vae")
        _merge_timings(self.workdir, self.workdir / "vae", "vae")

    def _autoencoder_step(self, state: TrainState, stage: AutoencoderStageConfig, kl_weight: float):
        """The vae or decoder stage's step: its loss weights and pictures (the captioned renders, or with
        `max_objects` scenes of up to that many objects each) from the stage's settings."""
        data, seed = self.config.data, self.config.seed
        images: Sequence[dict[str, Any]] = self.dataset if stage.max_objects == 1 else ScenesDataset(
            data.items, seed=seed, split="train", size=data.image_size, max_objects=stage.max_objects)
        return vae_step(state.models["vae"], images, batch_size=stage.batch_size, kl_weight=kl_weight,
                        edge_weight=stage.edge_weight, mse_weight=stage.mse_weight,
                        foreground_weight=stage.foreground_weight)

    def stage_decoder(self) -> None:
        if self.config.decoder is None:
            record_timing(self.workdir / TIMINGS_JSON, "decoder", seconds=0.0, done=True, skipped=True)
            return
        state = self._decoder_state()
        state.models["vae"].load_state_dict(self.trained("vae").models["vae"].state_dict())  # train() resumes over it
        step = self._autoencoder_step(state, self.config.decoder, kl_weight=0.0)
        _run(state, self.config.decoder, step, self.workdir / "decoder", "decoder")
        _merge_timings(self.workdir, self.workdir / "decoder", "decoder")

    def stage_latents(self) -> None:
        vae = self.vae().eval()
        folder = self.workdir / "latents"

        def build() -> None:
            factor = estimate_scaling_factor(vae, self.dataset, seed=self.config.seed)
            write_json({"scaling_factor": factor}, folder / "scaling_factor.json")
            cache_latents(vae, self.dataset, folder / "latents.safetensors", scaling_factor=factor)

        _timed(self.workdir, "latents", build)

    def stage_clip(self) -> None:
        state = self._clip_state()
        step = clip_step(state.models["clip"], self.dataset, self.tokenizer(), batch_size=self.config.clip.batch_size)
        _run(state, self.config.clip, step, self.workdir / "clip", "clip")
        _merge_timings(self.workdir, self.workdir / "clip", "clip")

    def stage_unet(self) -> None:
        state = self._unet_state()
        latents, info = load_latents(self.workdir / "latents" / "latents.safetensors")
        text_encoder = self.trained("clip").models["clip"].text_model
        conditioner = TextConditioner(text_encoder, self.tokenizer())
        conditioner.precompute(info["captions"])
        schedule = DiscreteSchedule(self.config.model.schedule)
        stage = self.config.unet
        step = unet_step(state.models["unet"], latents, info["captions"], conditioner, schedule,
                         batch_size=stage.batch_size, cfg_dropout=stage.cfg_dropout,
                         prediction_type=self.config.model.prediction_type, snr_gamma=stage.snr_gamma)
        _run(state, self.config.unet, step, self.workdir / "unet", "unet")
        _merge_timings(self.workdir, self.workdir / "unet", "unet")

    def pipeline(self) -> Pipeline:
        """The trained parts as a Pipeline (the UNet's EMA weights), float32 on the CPU."""
        config = self.model_config
        vae = self.vae()
        vae.config = config.vae  # carries the measured scaling factor
        clip = self.trained("clip").models["clip"]
        unet_state = self.trained("unet")
        unet = unet_state.models["unet"]
        unet_state.ema["unet"].copy_to(unet)
        pipe = Pipeline(self.tokenizer(), clip.text_model, unet, vae, config)
        for module in pipe.modules.values():
            module.eval().requires_grad_(False)
        return pipe

    def stage_model(self) -> None:
        from ..checkpoints.saving import save

        def build() -> None:
            pipe = self.pipeline().to(dtype=DTYPES[self.config.export.dtype])
            if self.config.export.cfg_scale is not None:
                pipe.defaults = dataclasses.replace(pipe.defaults, cfg_scale=self.config.export.cfg_scale)
            save(pipe, self.workdir / "model", overwrite=True)  # the recipe owns this folder (a rerun after a stop)

        _timed(self.workdir, "model", build)

    def vae_metrics(self, vae: AutoencoderKL) -> dict[str, Any]:
        """metrics.json's VAE figures for `vae`: PSNR on renders of held-out pairs and fresh held-in ones, and the
        judge on the held-in reconstructions."""
        cfg = self.config

        def renders(split: str) -> ShapesDataset:
            return ShapesDataset(cfg.metrics.vae_images, seed=f"{cfg.seed}:vae-eval", split=split,
                                 size=cfg.data.image_size)

        return {
            "vae_psnr_held_out_pairs": vae_psnr(vae, renders("held_out")),
            "vae_psnr_fresh_held_in": vae_psnr(vae, renders("train")),
            "vae_judged_fresh_held_in": vae_judged(vae, renders("train"), load_judge()),
        }

    def stage_metrics(self) -> None:
        def build() -> dict[str, Any]:
            cfg, size = self.config, self.config.data.image_size
            metrics = {
                **self.vae_metrics(self.vae()),
                "clip_top1": clip_retrieval(self.trained("clip").models["clip"], self.tokenizer(), seed=cfg.seed,
                                            count=cfg.metrics.clip_captions, image_size=size),
                "clip_captions": cfg.metrics.clip_captions,
            }
            write_json(metrics, self.workdir / "metrics.json")
            logger.info("metrics: %s", metrics)
            return metrics

        _timed(self.workdir, "metrics", build)


@torch.no_grad()
def _reconstructions(vae: AutoencoderKL, dataset: ShapesDataset, batch_size: int = 64):
    """Batches (images, reconstructions from the posterior mean), each (B, 3, H, W) in [-1, 1]."""
    vae.eval()
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        yield images, vae.decode(vae.encode(images).mean).clamp(-1, 1)


def vae_psnr(vae: AutoencoderKL, dataset: ShapesDataset, batch_size: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of VAE reconstructions (posterior mean) of the dataset's images."""
    psnrs = []
    for images, recon in _reconstructions(vae, dataset, batch_size):
        mse = ((recon - images) / 2).square().flatten(1).mean(1)  # (B,) in [0, 1] units
        psnrs += (-10 * torch.log10(mse.clamp(min=1e-10))).tolist()
    return sum(psnrs) / len(psnrs)


def vae_judged(vae: AutoencoderKL, dataset: ShapesDataset, judge: AttributeJudge) -> dict[str, dict[str, float]]:
    """The judge's per-attribute accuracy on VAE reconstructions, for small and large shapes apart.

    What the VAE's decoder cannot draw, the UNet cannot either: these bound the generation figures.
    """
    recon = torch.cat([r for _, r in _reconstructions(vae, dataset)])  # (N, 3, H, W)
    truth = [dataclasses.asdict(dataset.describe(i)[0]) for i in range(len(dataset))]
    result = {}
    for size in ("small", "large"):
        rows = [i for i, attrs in enumerate(truth) if attrs["size"] == size]
        intended = [{k: truth[i][k] for k in ATTRIBUTES} for i in rows]
        result[size] = score(judge, recon[rows], intended)["accuracy"]
    return result


@torch.no_grad()
def clip_retrieval(clip: CLIPModel, tokenizer: CLIPTokenizer, seed: int, count: int = 200, image_size: int = 64) -> float:
    """Text-to-image top-1 among `count` renders of distinct held-in attribute sets, each with a fresh caption."""
    items = distinct_items(count, random.Random(f"{seed}:clip-eval"), split="train", size=image_size)
    images = torch.stack([item["image"] for item in items])  # (N, 3, S, S)
    return retrieval_top1(clip, images, [item["caption"] for item in items], tokenizer)


def run_recipe(config_path: str | Path, workdir: str | Path, until: str | None = None) -> Path:
    """Run (or finish) the recipe in `config_path` in `workdir`; returns the model folder."""
    recipe = Recipe(RecipeConfig.from_file(config_path), workdir)
    recipe.run(until)
    return recipe.workdir / "model"


__all__ = [
    "Recipe", "RecipeConfig", "StageConfig", "AutoencoderStageConfig", "VAEStageConfig", "DecoderStageConfig",
    "CLIPStageConfig", "UNetStageConfig", "DataConfig", "TokenizerStageConfig", "ExportConfig", "MetricsConfig",
    "STAGES", "run_recipe", "vae_psnr", "vae_judged", "clip_retrieval",
]
