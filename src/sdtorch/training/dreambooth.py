"""DreamBooth (Ruiz et al. 2022): teach a model a subject from a few images named by a rare token, while
prior preservation keeps what it draws for the subject's class.

`sdtorch finetune --method dreambooth --instance-prompt "a photo of sks dog" --class-prompt "a photo of a dog"`
runs it: a `FineTuneConfig` whose `[dreambooth]` section (`DreamBoothConfig`) holds what is this method's own.
What trains is the UNet (and, with train_text_encoder, the text encoder) as method "full" trains it, or
with `lora = true` a LoRA as method "lora" trains it (diffusers' train_dreambooth.py and
train_dreambooth_lora.py); the exports are those methods' exports.

Prior preservation (on when class_prompt is given): the class folder (class_dir, default <out>/class_images)
holds the class images; its images are used as they are (a user's own pictures too), and when it holds
fewer than num_class_images, rank 0 draws the missing ones with the base model before training (the
model's default sampler, steps and CFG, at the dataset's resolution, seeds seed + i), written as A1111
names and stamps them ("NNNNN-seed.png" with their parameters). A later run with the folder in place
generates nothing. Each step then adds, for a class batch as large as the instance batch and captioned
with class_prompt (or an image's own caption file, as kohya's regularisation images are), prior_loss_weight
times its denoising loss (the paper's eq. 2; diffusers'
--with_prior_preservation --prior_loss_weight).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from .datasets import DatasetConfig, FineTuneDataset, image_files

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

CLASS_IMAGES_DIR = "class_images"  # under the output folder, when class_dir is not given
_CLASS_SEED_STREAM = 1  # the class dataset's batch order seed: the instance dataset's seed + this


@dataclass(frozen=True)
class DreamBoothConfig:
    """What is DreamBooth's own in a fine-tune: FineTuneConfig's `[dreambooth]` section.

    instance_prompt: the caption of every instance image, holding the rare token ("a photo of sks dog");
        empty: each image's own caption (the dataset's folder layout; kohya's DreamBooth style).
    class_prompt: the prompt of the class images ("a photo of a dog"); empty: no prior preservation.
    class_dir: the class images' folder (empty: <out>/class_images).
    num_class_images: the class images wanted; the missing ones are generated (diffusers' default, 100).
    prior_loss_weight: the weight of the class images' loss.
    lora: train a LoRA (the rank, alpha, lora_targets ... keys) instead of the whole UNet.
    """

    instance_prompt: str = ""
    class_prompt: str = ""
    class_dir: str = ""
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    lora: bool = False

    def __post_init__(self) -> None:
        if self.num_class_images < 1:
            raise InvalidInputError(f"num_class_images must be >= 1, got {self.num_class_images}")
        if not self.prior_loss_weight >= 0:
            raise InvalidInputError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.class_dir and not self.class_prompt:
            raise InvalidInputError("class_dir is for prior preservation: give class_prompt too")

    @property
    def prior_preservation(self) -> bool:
        return bool(self.class_prompt)

    def class_folder(self, out: str | Path) -> Path:
        return Path(self.class_dir) if self.class_dir else Path(out) / CLASS_IMAGES_DIR


def instance_dataset(config: DreamBoothConfig, dataset: DatasetConfig) -> FineTuneDataset:
    """The instance images, every one captioned with instance_prompt when it is given."""
    return FineTuneDataset(dataset, caption=config.instance_prompt or None)


def generate_class_images(pipe: Pipeline, config: DreamBoothConfig, folder: Path, resolution: int,
                          seed: int, batch_size: int = 4) -> int:
    """Draw the class images `folder` lacks (up to num_class_images) with `pipe`; returns how many were drawn."""
    from ..outputs import plan_outputs, write_images

    folder.mkdir(parents=True, exist_ok=True)
    have = len(image_files(folder))
    missing = max(config.num_class_images - have, 0)
    if missing:
        logger.info("drawing %d class image(s) of %r into %s", missing, config.class_prompt, folder)
    for start in range(have, have + missing, batch_size):
        count = min(batch_size, have + missing - start)
        images = pipe(config.class_prompt, width=resolution, height=resolution, seed=seed + start, batch_size=count)
        write_images(plan_outputs(folder, count), images)
    return missing


def class_dataset(config: DreamBoothConfig, dataset: DatasetConfig, folder: Path) -> FineTuneDataset:
    """The class images of `folder`, sized and cached as the instance images are (without loss masks), each
    captioned by its own caption file when it has one (kohya's regularisation folders) and else by class_prompt."""
    settings = dataclasses.replace(dataset, folder=str(folder), repeats=1, caption_dropout=0.0, shuffle_tags=False,
                                   require_captions=False, loss_mask_folder="", alpha_mask=False,
                                   seed=dataset.seed + _CLASS_SEED_STREAM)
    images = FineTuneDataset(settings)
    images.images = [dataclasses.replace(record, caption=record.caption or config.class_prompt)
                     for record in images.images]
    return images
