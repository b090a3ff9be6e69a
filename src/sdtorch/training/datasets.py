"""Fine-tuning datasets: captioned image folders in the layouts people already have, sized into
square crops or aspect-ratio buckets, with seeded caption augmentation and an on-disk latent cache.

Three folder layouts are read (the first that applies):

    metadata.jsonl         diffusers' ImageFolder: one JSON object a line, {"file_name": "a/b.png",
                           "text": "a caption"}; file names are relative to the folder
    10_sks dog/a.png ...   kohya's DreamBooth sub-folders "N_prompt": every image repeated N times;
                           "sks dog" is the caption of an image without a caption file (a
                           sub-folder not named "N_..." is ignored, and so is N < 1, as kohya does)
    a.png + a.txt          images with captions in same-name files (`caption_extension`, ".txt" or
                           kohya's ".caption"); a caption is the file's first line, stripped

As kohya globs, an image folder is read without recursing into its sub-folders, hidden files are
skipped, and images are found by extension (png, jpg, jpeg, webp, bmp; any case). Every image is
decoded once when the folder is scanned (`images.load_image`), so a corrupt file stops the run
before training, with its name, rather than mid-way.

Sizing, as kohya's BucketManager does it: each image is scaled to cover its target size (keeping its
aspect ratio, sides rounded to whole pixels) and centre-cropped. The target is the square
`resolution` or, with `buckets`, the bucket of the closest aspect ratio among sizes that are
multiples of `bucket_step` with area <= resolution^2 and sides in [min_bucket_side, max_bucket_side].
Each item records its original size and the crop's (top, left) in the scaled image, the values
SDXL's size conditioning takes.

Batches (`FineTuneDataset.batch`) are a function of (seed, step), so runs are deterministic and
resume exactly (the rule of `loop.py`). Epoch e (of `batches_per_epoch` steps) shuffles each
bucket, cuts it into batches of one bucket each, and shuffles the order of the batches. A bucket's
last, short batch is filled up from the start of the same bucket's shuffled order (as accelerate's
`even_batches` does), so every batch is full and splits evenly across DDP ranks. Rank r of N gets
the r-th contiguous part of each global batch: the ranks' parts, in rank order, are the batch one
process with the whole batch size draws, with the same captions and latent samples.

Condition images (ControlNet training, `conditioning_folder`, kohya's conditioning_data_dir): each
training image's condition is the image of the same file stem in that folder ("a.png" -> "cond/a.jpg",
any image extension), read when the folder is scanned (a missing or ambiguous one, or one of another
aspect ratio, fails there, by name). It is scaled to its training image's scaled size and cut by the
same crop, so the two stay pixel-aligned in every bucket (there are no flips to mirror), and batches
carry it as `conditions` (B, 3, H, W) in [0, 1], not normalised (diffusers' train_controlnet.py): pixels
even when the training images' latents are cached.

Loss masks (`loss_mask_folder`, kohya's masked loss): each training image's mask is the image of the same file
stem in that folder, found, checked, scaled and cropped as a condition image is, read as greyscale in [0, 1]
(white 1, black 0); batches carry them as `masks` (B, 1, H, W), and the denoising loss of each latent pixel is
weighted by the mask's mean over the pixels it covers (finetune.py). A grey background (say 0.2) with a white
subject weighs the subject 5x; a black one leaves the background out of the loss. With `alpha_mask` (kohya's
alpha_mask) the mask is each training image's own transparency instead (opaque 1; an image without any: all 1).

Captions (kohya's order): dropped to "" with probability `caption_dropout`; otherwise, with
`shuffle_tags`, the comma-separated tags after the first `keep_tokens` are shuffled. Each draw comes
from `step_generator(seed, step, stream)` with a stream for the item's position in the global batch.

Latent cache (`cache_latents`): the VAE's posterior mean and std of each (image, crop) are written to
one safetensors file each, named by a hash of the image file's bytes, its size, scaling and crop, the
VAE's config and weights, and the dtype it encodes in; a later run with the same images and VAE
encodes nothing, and a changed image or VAE re-encodes only what changed. kohya caches one
posterior sample (`latent_dist.sample()`); diffusers' train_text_to_image draws a fresh sample each
step. Storing mean and std allows both: batches carry the mean (`sample_latents` off, vae.py's
default) or a sample drawn for (seed, step, position), times the VAE's scaling factor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..checkpoints.io import file_sha256, read_safetensors, write_safetensors
from ..errors import InvalidInputError
from ..images import LANCZOS, image_to_tensor, load_alpha, load_image
from ..models.vae import AutoencoderKL
from .loop import step_generator
from .vae import encode_images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
METADATA_KEYS = ("file_name", "text")  # diffusers' ImageFolder file column; train_text_to_image's caption column
CACHE_FORMAT = 1  # part of every latent-cache key: bump when what a cache file holds changes

# Streams of `step_generator`, one per purpose, so no two kinds of draw share numbers.
_ORDER_STREAM = -1  # (seed, epoch): the order of an epoch's batches (the stream `batch_indices` uses)
_BUCKET_STREAM = 1 << 20  # + bucket number, (seed, epoch): a bucket's shuffled order
_CAPTION_STREAM = 2 << 20  # + position in the global batch, (seed, step): dropout and tag order
_LATENT_STREAM = 3 << 20  # + position in the global batch, (seed, step): a posterior sample

# per-image companion folders of a DatasetConfig -> what each file is
_COMPANIONS = {"conditioning_folder": "condition image", "loss_mask_folder": "loss mask"}

Size = tuple[int, int]  # (width, height) in pixels, as PIL has it


@dataclass(frozen=True)
class DatasetConfig:
    """A fine-tuning dataset, as the `[dataset]` table of a TOML file (`tomlconfig.from_table`).

    folder: the data folder (one of the layouts in the module docstring).
    resolution: the square side; with buckets, the side of the largest bucket area (resolution^2).
    buckets, bucket_step, min_bucket_side, max_bucket_side: aspect-ratio bucketing (kohya's
        enable_bucket, bucket_reso_steps, min_bucket_reso, max_bucket_reso).
    caption_extension: the caption file beside each image ("a.png" -> "a.txt").
    caption_dropout: probability that an item's caption is "" at a step (kohya's caption_dropout_rate).
    shuffle_tags, keep_tokens: shuffle comma-separated tags, the first `keep_tokens` kept in place.
    repeats: times each image appears in an epoch (a "N_prompt" sub-folder sets its own N).
    require_captions: an image whose caption is missing or empty is an error (else its caption is "").
    cache_latents: train on latents cached with `FineTuneDataset.cache_latents` rather than pixels.
    conditioning_folder: a ControlNet's condition images, one per training image by file stem ("" : none).
    loss_mask_folder: greyscale loss masks, one per training image by file stem ("": none; see above).
    alpha_mask: each training image's alpha channel is its loss mask (instead of a loss_mask_folder).
    sample_latents: with cached latents, a posterior sample for each (step, position) instead of the mean.
    seed: drives batch order, caption augmentation and latent samples.
    """

    folder: str
    resolution: int = 512
    buckets: bool = False
    bucket_step: int = 64
    min_bucket_side: int = 256
    max_bucket_side: int = 1024
    caption_extension: str = ".txt"
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    repeats: int = 1
    require_captions: bool = True
    cache_latents: bool = False
    sample_latents: bool = False
    conditioning_folder: str = ""
    loss_mask_folder: str = ""
    alpha_mask: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInputError(message)

        check(bool(self.folder), "folder must name the data folder")
        check(self.resolution > 0 and self.resolution % 8 == 0,
              f"resolution must be a positive multiple of 8 (the VAE's stride), got {self.resolution}")
        if self.buckets:
            step = self.bucket_step
            check(step > 0 and step % 8 == 0, f"bucket_step must be a positive multiple of 8, got {step}")
            check(self.min_bucket_side % step == 0 and self.max_bucket_side % step == 0,
                  f"min_bucket_side {self.min_bucket_side} and max_bucket_side {self.max_bucket_side} must be "
                  f"multiples of bucket_step {step}")
            check(0 < self.min_bucket_side <= self.resolution <= self.max_bucket_side,
                  f"need 0 < min_bucket_side <= resolution <= max_bucket_side, got {self.min_bucket_side}, "
                  f"{self.resolution}, {self.max_bucket_side}")
        check(len(self.caption_extension) > 1 and self.caption_extension.startswith("."),
              f"caption_extension must start with a dot (\".txt\"), got {self.caption_extension!r}")
        check(0.0 <= self.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        check(self.keep_tokens >= 0, f"keep_tokens must be >= 0, got {self.keep_tokens}")
        check(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        check(not (self.alpha_mask and self.loss_mask_folder),
              "alpha_mask and loss_mask_folder both name the loss masks: set one of them")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset, as scanned: where it is, its caption, and how it is sized.

    Sizes are (width, height). The image is scaled to `scaled` (covering `bucket`) and the crop of
    the bucket's size taken at `crop` = (top, left) of the scaled image; so are its `condition`
    image (ControlNet training) and its loss `mask` (the file's greyscale, or its alpha channel where
    `mask_alpha`), if it has them.
    """

    path: Path
    caption: str
    repeats: int
    size: Size
    scaled: Size
    bucket: Size
    crop: tuple[int, int]
    condition: Path | None = None
    mask: Path | None = None
    mask_alpha: bool = False


@dataclass
class Batch:
    """One rank's part of a step's batch; every item of it has the same bucket.

    Sizes follow SDXL's conditioning order, (height, width); crops are (top, left).
    `images` (B, 3, H, W) in [-1, 1] or, for a dataset with cached latents, `latents` (B, C, H/f, W/f)
    times the VAE's scaling factor; the other is None. With a `conditioning_folder`, `conditions`
    (B, 3, H, W) in [0, 1]: each item's condition image, sized and cropped as its image. With a
    `loss_mask_folder` or `alpha_mask`, `masks` (B, 1, H, W) in [0, 1], sized and cropped likewise.
    """

    indices: list[int]
    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crops: list[tuple[int, int]]
    target_size: tuple[int, int]
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    conditions: torch.Tensor | None = None
    masks: torch.Tensor | None = None


# ---- scanning --------------------------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The images directly in `folder` (not its sub-folders), by extension in any case, sorted."""
    return sorted(p for p in folder.iterdir() if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_caption(image: Path, extension: str) -> str | None:
    """The first line, stripped, of the caption file beside `image`; None when there is none."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InvalidInputError(f"caption file {path} is not UTF-8 text") from None
    except OSError as e:
        raise InvalidInputError(f"cannot read caption file {path}: {e.strerror or e}") from None
    return lines[0].strip() if lines else ""


def _repeat_folders(folder: Path) -> list[tuple[Path, int, str]]:
    """kohya's "N_prompt" sub-folders of `folder` with N >= 1: (path, N, prompt), sorted by name."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if _visible(p) and p.is_dir()):
        match = re.fullmatch(r"(\d+)_(.*)", sub.name, flags=re.DOTALL)
        if match and int(match[1]) >= 1:
            found.append((sub, int(match[1]), match[2]))
    return found


def _metadata_entries(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) of each line of `folder/metadata.jsonl`; blank lines are skipped."""
    path = folder / METADATA_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read {path}: {e}") from None
    entries, root = [], folder.resolve()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in METADATA_KEYS):
            raise InvalidInputError(f"{where}: expected an object with string keys {' and '.join(METADATA_KEYS)}")
        image = folder / record["file_name"]
        if not image.resolve().is_relative_to(root):
            raise InvalidInputError(f"{where}: file_name {record['file_name']!r} is outside {folder}")
        if not image.is_file():
            raise InvalidInputError(f"{where}: file_name {record['file_name']!r}: no such file in {folder}")
        entries.append((image, record["text"].strip()))
    return entries


def _captioned_images(config: DatasetConfig, caption: str | None) -> list[tuple[Path, str | None, int]]:
    """(image, caption or None when it has none, repeats) for every image of the folder's layout; with
    `caption`, that is every image's caption and caption files are not read."""
    folder = Path(config.folder)
    if not folder.is_dir():
        raise InvalidInputError(f"dataset folder {folder} does not exist or is not a folder")
    if caption is not None:
        return [(image, caption, repeats) for image, _, repeats in _captioned_images(config, None)]
    if (folder / METADATA_FILE).is_file():
        return [(image, caption, config.repeats) for image, caption in _metadata_entries(folder)]
    subsets = _repeat_folders(folder)
    if not subsets:
        return [(image, _read_caption(image, config.caption_extension), config.repeats)
                for image in image_files(folder)]
    if image_files(folder):
        names = ", ".join(sub.name for sub, _, _ in subsets)
        raise InvalidInputError(f"{folder} holds images and N_prompt sub-folders ({names}); move the images into "
                                "a sub-folder (kohya reads only the sub-folders)")
    images = []
    for sub, repeats, prompt in subsets:
        for image in image_files(sub):
            caption = _read_caption(image, config.caption_extension)
            images.append((image, prompt if caption is None else caption, repeats))
    return images


# ---- sizing --------------------------------------------------------------------------------------


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """kohya's bucket sizes (width, height), sorted: the largest square of sides a multiple of `step`
    with area <= resolution^2, and for each width from `min_side` to `max_side` in `step`s, the
    tallest height (a multiple of `step`, at most `max_side`) keeping the area <= resolution^2, both
    ways round, where that height is >= `min_side`."""
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    sizes = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def choose_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket of `size` itself if there is one, else the first of the closest aspect ratio (kohya)."""
    if size in buckets:
        return size
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def cover(size: Size, target: Size) -> tuple[Size, tuple[int, int]]:
    """The scaled size that covers `target` keeping the aspect ratio of `size`, and the centre crop's
    (top, left) in it: kohya's select_bucket and trimming."""
    (width, height), (target_w, target_h) = size, target
    scale = target_h / height if width / height > target_w / target_h else target_w / width
    scaled = (int(width * scale + 0.5), int(height * scale + 0.5))
    return scaled, ((scaled[1] - target_h) // 2, (scaled[0] - target_w) // 2)


def _sized(image: PIL.Image.Image, record: ImageRecord) -> PIL.Image.Image:
    """The record's crop of its scaled image, bucket-sized."""
    (top, left), (width, height) = record.crop, record.bucket
    return image.resize(record.scaled, resample=LANCZOS).crop((left, top, left + width, top + height))


# ---- condition images and loss masks -----------------------------------------------------------


def companion_files(folder: Path, setting: str) -> dict[str, Path]:
    """The images of a folder of per-image companions (`setting`: a key of _COMPANIONS) by file stem; two files of
    one stem are an error."""
    if not folder.is_dir():
        raise InvalidInputError(f"{setting} {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in image_files(folder):
        if path.stem in found:
            raise InvalidInputError(f"{setting} {folder} holds two {_COMPANIONS[setting]}s for the stem {path.stem!r}: "
                                    f"{found[path.stem].name} and {path.name}; keep one")
        found[path.stem] = path
    return found


def _companion_of(image: Path, size: Size, files: dict[str, Path], folder: Path, setting: str) -> Path:
    """The companion (condition image, loss mask) of training image `image` (of `size`) in `setting`'s folder,
    decoded once to check it, or a clear error."""
    what = _COMPANIONS[setting]
    path = files.get(image.stem)
    if path is None:
        others = ", ".join(IMAGE_EXTENSIONS[1:])
        raise InvalidInputError(f"training image {image} has no {what}: no {image.stem}{IMAGE_EXTENSIONS[0]} "
                                f"(or {others}, any case) in {setting} {folder}")
    (width, height), (other_w, other_h) = size, load_image(path).size  # a corrupt file fails here, by name
    if abs(other_w * height - other_h * width) > 0.01 * width * height:  # aspect ratios 1% apart or more
        raise InvalidInputError(f"{what} {path} is {other_w}x{other_h}, its training image {image} "
                                f"{width}x{height}: they need the same aspect ratio (the {what} is scaled to "
                                "the image's size and cropped with it)")
    return path


def condition_pixels(record: ImageRecord) -> torch.Tensor:
    """The record's condition image scaled and cropped as its image: (3, H, W) float32 in [0, 1]."""
    sized = _sized(load_image(record.condition), record)  # scaled to record.scaled whatever its own size
    return torch.from_numpy(np.asarray(sized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def mask_pixels(record: ImageRecord) -> torch.Tensor:
    """The record's loss mask scaled and cropped as its image, greyscale: (1, H, W) float32 in [0, 1]."""
    mask = load_alpha(record.mask) if record.mask_alpha else load_image(record.mask).convert("L")
    sized = _sized(mask, record)
    return torch.from_numpy(np.asarray(sized, dtype=np.float32) / 255.0)[None]  # (H, W) -> (1, H, W)


# ---- captions -------------------------------------------------------------------------------------


def augment_caption(caption: str, config: DatasetConfig, generator: torch.Generator) -> str:
    """The caption of one draw: "" with probability `caption_dropout`, else with `shuffle_tags` its
    comma-separated tags (stripped, empty ones dropped) after the first `keep_tokens` shuffled and
    joined by ", " (kohya). The dropout draw comes first, so switching shuffling on keeps the dropouts."""
    if config.caption_dropout and torch.rand((), generator=generator).item() < config.caption_dropout:
        return ""
    if not config.shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, rest = tags[: config.keep_tokens], tags[config.keep_tokens :]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(fixed + [rest[i] for i in order])


# ---- latent cache ---------------------------------------------------------------------------------


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """sha256 of the VAE's config and every weight (name, dtype, shape, bytes): what its latents depend on."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(vae.config), sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cache_key(record: ImageRecord, vae_key: str) -> str:
    """The name of a record's cache file: a hash of everything its latents depend on."""
    parts = {
        "format": CACHE_FORMAT, "image": file_sha256(record.path), "size": record.size,
        "scaled": record.scaled, "bucket": record.bucket, "crop": record.crop, "vae": vae_key,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---- the dataset ----------------------------------------------------------------------------------


class FineTuneDataset:
    """The images of a `DatasetConfig`'s folder, scanned and checked, with seeded, resumable batches.

    Entries are images repeated `repeats` times (index i of `entries` is an image index); `len` is the
    number of entries. `caption`, when given, is every image's caption (DreamBooth's instance and class
    prompts) and no caption file is read. `dataset[i]` is entry i unaugmented as a dict ("image" (3, H, W) in [-1, 1],
    "caption", "original_size", "crop", "path"), the item form vae.py's helpers take.
    """

    def __init__(self, config: DatasetConfig, caption: str | None = None):
        self.config = config
        found = _captioned_images(config, caption)
        if not found:
            raise InvalidInputError(
                f"no images in {config.folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files, any case)"
            )
        sizes = (bucket_sizes(config.resolution, config.min_bucket_side, config.max_bucket_side, config.bucket_step)
                 if config.buckets else [(config.resolution, config.resolution)])
        companions = {setting: (Path(folder), companion_files(Path(folder), setting))
                      for setting in _COMPANIONS
                      if (folder := getattr(config, setting))}
        self.images: list[ImageRecord] = []
        for path, caption, repeats in found:
            if config.require_captions and not caption:
                raise InvalidInputError(
                    f"image {path} has no caption (no {path.with_suffix(config.caption_extension).name} or an empty "
                    "one); add it or set require_captions = false"
                )
            size = load_image(path).size  # decodes the whole file: a corrupt image fails here, by name
            bucket = choose_bucket(size, sizes)
            scaled, crop = cover(size, bucket)
            found = {setting: _companion_of(path, size, files, folder, setting)
                     for setting, (folder, files) in companions.items()}
            mask = path if config.alpha_mask else found.get("loss_mask_folder")
            self.images.append(ImageRecord(path, caption or "", repeats, size, scaled, bucket, crop,
                                           found.get("conditioning_folder"), mask, config.alpha_mask))
        self.entries: list[int] = [i for i, record in enumerate(self.images) for _ in range(record.repeats)]
        by_bucket: dict[Size, list[int]] = {}
        for entry, image in enumerate(self.entries):
            by_bucket.setdefault(self.images[image].bucket, []).append(entry)
        self.buckets: dict[Size, list[int]] = dict(sorted(by_bucket.items()))  # bucket -> entry indices
        self._latent_files: list[Path] | None = None
        self._scaling_factor = 1.0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[self.entries[index]]
        item = {
            "image": self.pixels(self.entries[index]), "caption": record.caption, "path": str(record.path),
            "original_size": record.size[::-1], "crop": record.crop,
        }
        if record.condition is not None:
            item["condition"] = condition_pixels(record)  # (3, H, W) in [0, 1]
        return item

    def pixels(self, image: int) -> torch.Tensor:
        """Image `image` (an index of `images`) loaded, scaled and cropped: (3, H, W) float32 in [-1, 1]."""
        record = self.images[image]
        return image_to_tensor(_sized(load_image(record.path), record))[0]

    # ---- batches

    def batches_per_epoch(self, batch_size: int) -> int:
        """Steps in an epoch: each bucket's entries in batches of `batch_size`, the last one filled up."""
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        return sum(-(-len(entries) // batch_size) for entries in self.buckets.values())

    def batch_indices(self, step: int, batch_size: int) -> list[int]:
        """Entry indices of the global batch of `step`, all from one bucket: a function of (seed, step)."""
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, position = divmod(step, per_epoch)
        seed = self.config.seed
        batches = []
        for number, entries in enumerate(self.buckets.values()):
            order = torch.randperm(len(entries), generator=step_generator(seed, epoch, _BUCKET_STREAM + number))
            count = -(-len(entries) // batch_size)
            cyclic = [entries[i] for i in order.tolist()] * -(-count * batch_size // len(entries))
            batches += [cyclic[k * batch_size : (k + 1) * batch_size] for k in range(count)]
        pick = torch.randperm(per_epoch, generator=step_generator(seed, epoch, _ORDER_STREAM))[position]
        return batches[int(pick)]

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Batch:
        """Rank `rank`'s part of the global batch of `step`: positions [rank * b, (rank + 1) * b) with
        b = batch_size / world_size, augmented by (seed, step, position in the global batch)."""
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise InvalidInputError(
                f"need 0 <= rank < world_size and batch_size divisible by world_size; got rank {rank}, "
                f"world_size {world_size}, batch_size {batch_size}"
            )
        share = batch_size // world_size
        positions = range(rank * share, (rank + 1) * share)
        indices = self.batch_indices(step, batch_size)[positions.start : positions.stop]
        records = [self.images[self.entries[i]] for i in indices]
        seed = self.config.seed
        captions = [augment_caption(r.caption, self.config, step_generator(seed, step, _CAPTION_STREAM + p))
                    for r, p in zip(records, positions)]
        batch = Batch(
            indices=indices, captions=captions, original_sizes=[r.size[::-1] for r in records],
            crops=[r.crop for r in records], target_size=records[0].bucket[::-1],
        )
        if self._latent_files is None:
            batch.images = torch.stack([self.pixels(self.entries[i]) for i in indices])  # (b, 3, H, W)
        else:
            batch.latents = torch.stack([self._latents(self.entries[i], step, p) for i, p in zip(indices, positions)])
        if records[0].condition is not None:  # pixels, cached latents or not
            batch.conditions = torch.stack([condition_pixels(r) for r in records])  # (b, 3, H, W) in [0, 1]
        if records[0].mask is not None:
            batch.masks = torch.stack([mask_pixels(r) for r in records])  # (b, 1, H, W) in [0, 1]
        return batch

    # ---- latents

    def cache_latents(self, vae: AutoencoderKL, folder: str | Path, *, batch_size: int = 8) -> int:
        """Make batches carry latents: encode each image's crop with `vae` unless `folder` already holds
        it (see the module docstring for the key), `batch_size` images of one bucket at a time.

        Returns how many images were encoded (0 when every one was cached). Latents are stored
        unscaled; batches multiply them by the VAE's current scaling factor.
        """
        folder = Path(folder)
        vae_key = vae_fingerprint(vae)
        files = [folder / f"{_cache_key(record, vae_key)}.safetensors" for record in self.images]
        missing: dict[Size, list[int]] = {}
        for image, file in enumerate(files):
            if not file.is_file():
                missing.setdefault(self.images[image].bucket, []).append(image)
        for images in missing.values():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                posterior = encode_images(vae, torch.stack([self.pixels(i) for i in chunk]))  # of (b, 3, H, W)
                for image, mean, std in zip(chunk, posterior.mean.float(), posterior.std.float()):
                    write_safetensors({"mean": mean, "std": std}, files[image])  # (C, h, w) each
        self._latent_files, self._scaling_factor = files, vae.scaling_factor
        return sum(len(images) for images in missing.values())

    def _latents(self, image: int, step: int, position: int) -> torch.Tensor:
        """Scaled latents (C, h, w) of a cached image: the mean, or with `sample_latents` a sample for
        (seed, step, position)."""
        tensors, _ = read_safetensors(self._latent_files[image])
        latents = tensors["mean"]
        if self.config.sample_latents:
            generator = step_generator(self.config.seed, step, _LATENT_STREAM + position)
            latents = latents + tensors["std"] * torch.randn(latents.shape, generator=generator)
        return latents * self._scaling_factor
