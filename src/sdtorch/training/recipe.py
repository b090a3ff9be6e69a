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
import random
import time
import tomllib
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
from .loop import EMA, TIMINGS_JSON, TrainState, record_timing, resume, train, warmup_cosine
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
    extra: dict[str, Any] = field(default_factory=dict)  # the stage's own settings (kl_weight, cfg_dropout, ...)


@dataclass(frozen=True)
class RecipeConfig:
    """A parsed recipe file (see configs/shapes.toml)."""

    seed: int
    items: int
    image_size: int
    model: ModelConfig
    vocab_size: int
    vae: StageConfig
    clip: StageConfig
    unet: StageConfig
    decoder: StageConfig | None = None  # decoder fine-tuning, when the recipe has a [decoder] section
    export_dtype: str = "float16"
    vae_eval_images: int = 512  # held-out renders (and as many fresh held-in ones) for the VAE's PSNR
    clip_eval_captions: int = 200  # distinct held-in renders for CLIP's retrieval top-1
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipeConfig:
        def stage(name: str) -> StageConfig:
            values = dict(d.get(name, {}))
            names = {f.name for f in dataclasses.fields(StageConfig)} - {"extra"}
            missing = {"steps", "batch_size", "lr"} - set(values)
            if missing:
                raise InvalidInputError(f"recipe: [{name}] needs {', '.join(sorted(missing))}")
            known = {k: values.pop(k) for k in list(values) if k in names}
            return StageConfig(**known, extra=values)

        try:
            config = cls(
                seed=int(d.get("seed", 0)),
                items=int(d["data"]["items"]),
                image_size=int(d["data"].get("image_size", 64)),
                model=ModelConfig.from_dict(d["model"]),
                vocab_size=int(d["tokenizer"]["vocab_size"]),
                vae=stage("vae"),
                clip=stage("clip"),
                unet=stage("unet"),
                decoder=stage("decoder") if "decoder" in d else None,
                export_dtype=d.get("export", {}).get("dtype", "float16"),
                vae_eval_images=int(d.get("metrics", {}).get("vae_images", 512)),
                clip_eval_captions=int(d.get("metrics", {}).get("clip_captions", 200)),
                raw=d,
            )
        except KeyError as e:
            raise InvalidInputError(f"recipe: missing setting {e}") from None
        if config.export_dtype not in DTYPES:
            raise InvalidInputError(f"recipe: export dtype must be one of {sorted(DTYPES)}")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> RecipeConfig:
        try:
            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        except OSError as e:
            raise InvalidInputError(f"cannot read recipe {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidInputError(f"recipe {path} is not valid TOML: {e}") from None


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
        self.dataset = ShapesDataset(config.items, seed=config.seed, split="train", size=config.image_size)

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
        return _state({"vae": vae}, self.config.vae, self.config.seed, {"vae": self.config.raw.get("vae"),
                                                                       "model": self.config.raw["model"].get("vae")})

    def _decoder_state(self) -> TrainState:
        """A VAE with everything but its decoder frozen (`stage_decoder` starts it from the vae stage's weights)."""
        with _seeded_init(self.config.seed, "decoder"):
            vae = AutoencoderKL(self.config.model.vae).requires_grad_(False)
        for part in (vae.post_quant_conv, vae.decoder):
            part.requires_grad_(True)
        return _state({"vae": vae}, self.config.decoder, self.config.seed,
                      {"decoder": self.config.raw.get("decoder"), "model": self.config.raw["model"].get("vae")})

    def _clip_state(self) -> TrainState:
        extra = self.config.clip.extra
        image = ImageEncoderConfig(image_size=self.config.image_size,
                                   channels=tuple(extra.get("image_channels", ImageEncoderConfig.channels)))
        with _seeded_init(self.config.seed, "clip"):
            clip = CLIPModel(CLIPConfig(text=self.model_config.text_encoder, image=image))
        return _state({"clip": clip}, self.config.clip, self.config.seed,
                      {"clip": self.config.raw.get("clip"), "text": self.config.raw["model"].get("text_encoder")})

    def _unet_state(self) -> TrainState:
        with _seeded_init(self.config.seed, "unet"):
            unet = UNet(self.config.model.unet)
        return _state({"unet": unet}, self.config.unet, self.config.seed,
                      {"unet": self.config.raw.get("unet"), "model": self.config.raw["model"].get("unet")},
                      ema=self.config.unet.extra.get("ema_decay", 0.999))

    def trained(self, name: str) -> TrainState:
        """The state of a trained stage ("vae", "decoder", "clip" or "unet"), restored from its checkpoint."""
        builders = {"vae": self._vae_state, "decoder": self._decoder_state, "clip": self._clip_state,
                    "unet": self._unet_state}
        state = builders[name]()
        if not resume(state, self.workdir / name):
            raise InvalidInputError(f"{self.workdir / name}: stage {name!r} has not been trained yet")
        return state

    def vae(self) -> AutoencoderKL:
        """The finished VAE: the decoder stage's when the recipe has one, else the vae stage's."""
        return self.trained("decoder" if self.config.decoder else "vae").models["vae"].requires_grad_(False)

    # stages

    def run(self, until: str | None = None) -> None:
        """Run every stage not yet done, in order (stopping after `until` when given)."""
        if until is not None and until not in STAGES:
            raise InvalidInputError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_json(self.config.raw, self.workdir / "recipe.json")
        for name in STAGES:
            if not _done(self.workdir, name):
                logger.info("stage %s", name)
                getattr(self, f"stage_{name}")()
            if name == until:
                break

    def stage_tokenizer(self) -> None:
        def build() -> None:
            captions = [self.dataset.describe(i)[1] for i in range(len(self.dataset))]
            vocab, merges = train_bpe(captions, self.config.vocab_size)
            save_bpe(vocab, merges, self.workdir / "tokenizer")

        _timed(self.workdir, "tokenizer", build)

    def stage_vae(self) -> None:
        state = self._vae_state()
        step = self._autoencoder_step(state, self.config.vae, kl_weight=self.config.vae.extra.get("kl_weight", 1e-4))
        _run(state, self.config.vae, step, self.workdir / "vae", "vae")
        _merge_timings(self.workdir, self.workdir / "vae", "vae")

    def _autoencoder_step(self, state: TrainState, stage: StageConfig, kl_weight: float):
        """The vae or decoder stage's step: its loss weights and pictures (the captioned renders, or with
        `max_objects` scenes of up to that many objects each) from the stage's settings."""
        extra, cfg = stage.extra, self.config
        max_objects = extra.get("max_objects", 1)
        images: Sequence[dict[str, Any]] = self.dataset if max_objects == 1 else ScenesDataset(
            cfg.items, seed=cfg.seed, split="train", size=cfg.image_size, max_objects=max_objects)
        return vae_step(state.models["vae"], images, batch_size=stage.batch_size, kl_weight=kl_weight,
                        edge_weight=extra.get("edge_weight", 0.0), mse_weight=extra.get("mse_weight", 0.0),
                        foreground_weight=extra.get("foreground_weight", 0.0))

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
        extra = self.config.unet.extra
        step = unet_step(state.models["unet"], latents, info["captions"], conditioner, schedule,
                         batch_size=self.config.unet.batch_size, cfg_dropout=extra.get("cfg_dropout", 0.1),
                         prediction_type=self.config.model.prediction_type, snr_gamma=extra.get("snr_gamma"))
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
            pipe = self.pipeline().to(dtype=DTYPES[self.config.export_dtype])
            save(pipe, self.workdir / "model")

        _timed(self.workdir, "model", build)

    def stage_metrics(self) -> None:
        def build() -> dict[str, Any]:
            cfg = self.config
            vae = self.vae()

            def renders(split: str) -> ShapesDataset:
                return ShapesDataset(cfg.vae_eval_images, seed=f"{cfg.seed}:vae-eval", split=split, size=cfg.image_size)

            metrics = {
                "vae_psnr_held_out_pairs": vae_psnr(vae, renders("held_out")),
                "vae_psnr_fresh_held_in": vae_psnr(vae, renders("train")),
                "vae_judged_fresh_held_in": vae_judged(vae, renders("train"), load_judge()),
                "clip_top1": clip_retrieval(self.trained("clip").models["clip"], self.tokenizer(), seed=cfg.seed,
                                            count=cfg.clip_eval_captions, image_size=cfg.image_size),
                "clip_captions": cfg.clip_eval_captions,
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


__all__ = ["Recipe", "RecipeConfig", "StageConfig", "STAGES", "run_recipe", "vae_psnr", "vae_judged", "clip_retrieval"]
