"""Textual inversion (Gal et al. 2022): learn n new token vectors for a concept; the model stays frozen.

`sdtorch finetune --method textual-inversion --token NAME --init-word WORD` runs it: a `FineTuneConfig`
whose `[textual_inversion]` section (`TextualInversionConfig`) holds what is this method's own, while the
shared settings (steps, batch_size, lr, lr_scheduler, warmup_steps, weight_decay, max_grad_norm, seed,
checkpoint_every, log_every, clip_skip, model, out) are FineTuneConfig's. Its defaults are LoRA's;
A1111 trains embeddings with lr 5e-3, weight decay 0 and no gradient clipping: pass
`--lr 5e-3 --weight-decay 0 --max-grad-norm 0` for that.

The new embedding is a name and n vectors (n, D) in the text encoder's token-embedding space,
started from the token vectors of an init word as A1111's `create_embedding` does
(`adapters.embeddings.init_vectors`) and added to the text encoder's embedding table as a
parameter (`add_trainable_embedding`). Every other weight of the pipeline (UNet, VAE, text
encoder, its token table) gets requires_grad False and is left bit-identical; the optimizer holds
the n vectors alone.

A step (the loop of `loop.py`, so runs resume bit-identically):
    batch of step s      cached latents (B, C, h, w) and captions from `FineTuneDataset.batch(s, B)`
    caption              a template drawn for (seed, s, position); "[filewords]" becomes the image's
                         caption, then "[name]" the embedding's name (A1111's template syntax; a
                         caption may itself hold "[name]")
    context              `encode_prompts` (A1111 tokenization: the name's tokens become the n
                         vector ids, emphasis applies) -> (B, 77k, D), with gradients for the vectors
    loss                 `diffusion_loss`: the frozen UNet's eps / v error at a uniform timestep

The default templates are subject prompts in the style of diffusers' textual_inversion example
("a photo of a [name]", ...), which ignore the captions; a template with "[filewords]" (A1111's
"style_filewords" / "subject_filewords") uses them, and ("[filewords]",) trains on captions that
name the concept themselves ("a [name] on grass").

Output folder (`out`):
    latents/                     the dataset's latent cache (reused by a later run)
    checkpoint/                  the training checkpoint (`loop.save_checkpoint`)
    <name>.safetensors           A1111: {"emb_params": (n, D)}
    <name>.pt                    A1111's pickled dict: string_to_token, string_to_param {"*": (n, D)},
                                 name, step, sd_checkpoint (model hash), sd_checkpoint_name
    learned_embeds.safetensors   diffusers: {name: (n, D)}
    samples/step-<N>.png         sample grids of sample_prompts (`samples.py`), which may name the embedding
each written atomically and exclusively: an existing file is never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters.embeddings import add_trainable_embedding, init_vectors, unload_embedding
from ..checkpoints.io import atomic_write, write_safetensors
from ..errors import InvalidInputError
from ..prompts import CHUNK_LENGTH, encode_prompts
from ..sampling.schedules import DiscreteSchedule
from .datasets import FineTuneDataset
from .diffusion import diffusion_loss
from .loop import StepFn, TrainState, step_generator, train, warmup_cosine
from .samples import sampler

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .finetune import FineTuneConfig

NAME_PLACEHOLDER, CAPTION_PLACEHOLDER = "[name]", "[filewords]"  # A1111's template words
DEFAULT_TEMPLATES = (
    "a photo of a [name]",
    "a rendering of a [name]",
    "a picture of a [name]",
    "a close-up photo of a [name]",
    "a good photo of a [name]",
    "a photo of the [name]",
    "a bright photo of a [name]",
    "a cropped photo of the [name]",
)
FORMATS = {  # format -> file name ({} is the embedding's name)
    "a1111_safetensors": "{}.safetensors",
    "a1111_pt": "{}.pt",
    "diffusers": "learned_embeds.safetensors",
}
_NAME_CHARACTERS = "._- "  # besides letters and digits: the characters A1111 keeps in an embedding's file name
_TEMPLATE_STREAM = 1  # `step_generator` stream of the template draws (stream 0: timesteps and noise)


@dataclass(frozen=True)
class TextualInversionConfig:
    """What is textual inversion's own in a fine-tune: FineTuneConfig's `[textual_inversion]` section
    (the shared settings, from steps to lr, are FineTuneConfig's).

    name: the embedding's name, which prompts write and the files are named after (letters, digits, "._- ").
    init_word: text whose token vectors start the new vectors (A1111's "initialization text").
    num_vectors: n, the token positions the name takes in a prompt (A1111's "number of vectors per token").
    templates: caption templates, one drawn per image and step (see the module docstring).
    formats: the files written at the end, from "a1111_safetensors", "a1111_pt", "diffusers".
    """

    name: str
    init_word: str
    num_vectors: int = 1
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    formats: tuple[str, ...] = tuple(FORMATS)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInputError(message)

        check(bool(self.name.strip()) and all(c.isalnum() or c in _NAME_CHARACTERS for c in self.name)
              and not self.name.startswith("."),
              f"name {self.name!r} must be letters, digits and {_NAME_CHARACTERS!r}, not starting with a dot "
              "(it names the output files)")
        check(1 <= self.num_vectors <= CHUNK_LENGTH,
              f"num_vectors must be in [1, {CHUNK_LENGTH}], got {self.num_vectors}")
        check(bool(self.templates), "templates must hold at least one caption template")
        for template in self.templates:
            check(NAME_PLACEHOLDER in template or CAPTION_PLACEHOLDER in template,
                  f"template {template!r} holds neither {NAME_PLACEHOLDER} nor {CAPTION_PLACEHOLDER}: its captions "
                  "would never name the embedding")
        check(bool(self.formats) and set(self.formats) <= set(FORMATS),
              f"formats must be some of {', '.join(FORMATS)}, got {list(self.formats)}")

    def caption(self, template: str, caption: str) -> str:
        """The training caption of an image: `template` with "[filewords]" -> its caption, then "[name]" -> name."""
        return template.replace(CAPTION_PLACEHOLDER, caption).replace(NAME_PLACEHOLDER, self.name)


class EmbeddingVectors(nn.Module):
    """The trained state: the embedding's vectors (n, D), the very parameter the text encoder reads."""

    def __init__(self, vectors: nn.Parameter):
        super().__init__()
        self.vectors = vectors


def train_textual_inversion(pipe: Pipeline, dataset: FineTuneDataset, config: FineTuneConfig) -> Path:
    """Train the embedding of `config.textual_inversion` on `dataset` (`FineTuneDataset(config.dataset)`) with
    `pipe` frozen, into `config.out`; returns the first file of its `formats`.

    Latents are cached under out/latents; a run interrupted after a checkpoint resumes from
    out/checkpoint to bit-identical vectors. Every pipeline parameter is left with requires_grad
    False and unchanged; the trained embedding is unloaded at the end (load a written file to use it).
    Raises InvalidInputError when an output file exists already, the name is loaded in `pipe`, or the
    init word has no tokens.
    """
    from .finetune import CHECKPOINT_DIR

    ti = config.textual_inversion
    out_dir = Path(config.out)
    outputs = {kind: out_dir / FORMATS[kind].format(ti.name) for kind in ti.formats}
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing:
        raise InvalidInputError(f"{', '.join(existing)} exist already; train into a new folder (nothing is replaced)")
    if ti.name in pipe.embeddings:
        raise InvalidInputError(f"an embedding named {ti.name!r} is loaded in the pipeline; unload it first")
    start = init_vectors(pipe.tokenizer, pipe.text_encoder, ti.init_word, ti.num_vectors)  # (n, D)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    dataset.cache_latents(pipe.vae, out_dir / "latents")

    vectors = add_trainable_embedding(pipe.tokenizer, pipe.text_encoder, ti.name, start)  # (n, D)
    try:
        optimizer = torch.optim.AdamW([vectors], lr=config.lr, weight_decay=config.weight_decay)
        state = TrainState(
            models={"embedding": EmbeddingVectors(vectors)},
            optimizer=optimizer,
            scheduler=warmup_cosine(optimizer, config.warmup_steps, config.steps, config.final_lr_ratio),
            seed=config.seed,
            config=config.run_settings(),
        )
        sample = sampler(pipe, config.sample_prompts, out_dir, every=config.sample_every, last=config.steps,
                         resolution=config.dataset.resolution, seed=config.seed)
        train(_step_fn(pipe, dataset, config), state, config.steps, batch_size=config.batch_size,
              folder=out_dir / CHECKPOINT_DIR, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
              stage="textual_inversion", max_grad_norm=config.max_grad_norm or None,
              on_step=lambda state, _: sample(state.step))
        _save(pipe, ti, vectors.detach(), state.step, outputs)
    finally:
        unload_embedding(pipe.text_encoder, ti.name)
    return outputs[ti.formats[0]]


def _step_fn(pipe: Pipeline, dataset: FineTuneDataset, config: FineTuneConfig) -> StepFn:
    """The loss of step `state.step`: a function of (dataset seed, config seed, step) and the vectors."""
    schedule = DiscreteSchedule(pipe.config.schedule)
    param = next(pipe.unet.parameters())
    ti = config.textual_inversion

    def step(state: TrainState) -> dict[str, torch.Tensor]:
        batch = dataset.batch(state.step, config.batch_size)
        picks = torch.randint(len(ti.templates), (config.batch_size,),
                              generator=step_generator(config.seed, state.step, _TEMPLATE_STREAM))  # (B,)
        captions = [ti.caption(ti.templates[k], words) for k, words in zip(picks.tolist(), batch.captions)]
        context = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions, config.clip_skip)  # (B, 77k, D)
        latents = batch.latents.to(param.device, param.dtype)  # (B, C, h, w)
        return diffusion_loss(pipe.unet, latents, context.to(param.dtype), schedule,
                              generator=step_generator(config.seed, state.step),
                              prediction_type=pipe.config.prediction_type)

    return step


def _save(pipe: Pipeline, config: TextualInversionConfig, vectors: torch.Tensor, step: int,
          outputs: dict[str, Path]) -> None:
    """Write the trained vectors (n, D) in each requested format, atomically and never over an existing file."""
    vectors = vectors.to("cpu", torch.float32).clone()  # (n, D)
    for kind, path in outputs.items():
        if kind == "a1111_pt":
            data = {
                "string_to_token": {"*": 265},  # A1111 writes this fixed entry; readers ignore it
                "string_to_param": {"*": vectors},
                "name": config.name,
                "step": step,
                "sd_checkpoint": pipe.model_hash,
                "sd_checkpoint_name": pipe.model_name,
            }
            atomic_write(path, lambda tmp: torch.save(data, tmp), exclusive=True)
        else:
            tensors = {"emb_params" if kind == "a1111_safetensors" else config.name: vectors}
            atomic_write(path, lambda tmp: write_safetensors(tensors, tmp), exclusive=True)


__all__ = ["DEFAULT_TEMPLATES", "FORMATS", "TextualInversionConfig", "train_textual_inversion"]
