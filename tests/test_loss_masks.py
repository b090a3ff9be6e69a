"""Loss masks in fine-tuning ([dataset] loss_mask_folder, kohya's masked loss): masks sized and cropped as their
images, each latent pixel's error weighted by its mask's mean over the pixels under it, and whole runs whose logged
losses follow the masks."""

import json
from pathlib import Path

import pytest
import torch
from conftest import disc_pairs
from PIL import Image, ImageDraw

from sdtorch.errors import InvalidInputError
from sdtorch.sampling.schedules import DiscreteSchedule
from sdtorch.configs import TINY_SD1
from sdtorch.training.datasets import DatasetConfig, FineTuneDataset
from sdtorch.training.finetune import FineTuneConfig, LossPart, finetune, finetune_loss

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def images_with_masks(root: Path, mask_fill: int | None = None) -> tuple[Path, Path]:
    """conftest's captioned discs in root/data; root/masks holds each one's mask: `mask_fill` everywhere, or (None)
    white on the disc and black elsewhere."""
    data, _ = disc_pairs(root)
    masks = root / "masks"
    masks.mkdir()
    for image in data.glob("*.png"):
        disc = Image.open(image).convert("L").point(lambda v: 255 if v else 0)  # the discs lie on black
        (disc if mask_fill is None else Image.new("L", disc.size, mask_fill)).save(masks / image.name)
    return data, masks


def test_masks_are_sized_and_cropped_as_their_images(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    Image.new("RGB", (96, 64), "gray").save(data / "wide.png")
    (data / "wide.txt").write_text("a wide picture")
    mask = Image.new("RGB", (48, 32), "black")  # half size, colour: read as greyscale
    ImageDraw.Draw(mask).rectangle((0, 0, 23, 31), fill="white")  # the left half of the original
    mask.save(masks / "wide.bmp")
    dataset = FineTuneDataset(DatasetConfig(folder=str(data), resolution=64, loss_mask_folder=str(masks)))
    batch = dataset.batch(0, 1)
    # scaled to 96x64 and centre-cropped to 64x64 from x = 16: white up to x = 48 - 16 = 32
    assert batch.masks.shape == (1, 1, 64, 64) and batch.images.shape == (1, 3, 64, 64)
    assert batch.masks.min() >= 0 and batch.masks.max() <= 1
    assert (batch.masks[0, 0, :, :27] > 0.97).all() and (batch.masks[0, 0, :, 37:] < 0.03).all()

    (masks / "wide.bmp").unlink()
    with pytest.raises(InvalidInputError, match=r"training image .*wide\.png has no loss mask: no wide\.png .* in "
                                                r"loss_mask_folder"):
        FineTuneDataset(DatasetConfig(folder=str(data), resolution=64, loss_mask_folder=str(masks)))
    Image.new("L", (64, 64)).save(masks / "wide.png")
    with pytest.raises(InvalidInputError, match="loss mask .*wide.png is 64x64, its training image .* 96x64"):
        FineTuneDataset(DatasetConfig(folder=str(data), resolution=64, loss_mask_folder=str(masks)))
    with pytest.raises(InvalidInputError, match="loss_mask_folder .*nowhere does not exist"):
        FineTuneDataset(DatasetConfig(folder=str(data), loss_mask_folder=str(tmp_path / "nowhere")))
    with pytest.raises(InvalidInputError, match="textual-inversion does not use \\[dataset\\] loss_mask_folder"):
        FineTuneConfig(dataset=DatasetConfig(folder=str(data), loss_mask_folder=str(masks)), out="o",
                       method="textual-inversion", textual_inversion={"name": "<x>", "init_word": "disc"})


def test_alpha_masks_are_the_images_transparency(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    picture = Image.new("RGBA", (64, 64), (200, 0, 0, 0))  # transparent ...
    ImageDraw.Draw(picture).rectangle((0, 0, 31, 63), fill=(200, 0, 0, 255))  # ... but the opaque left half
    picture.save(data / "half.png")
    Image.new("RGB", (64, 64), "blue").save(data / "opaque.png")  # no alpha: all of it counts
    for name in ("half", "opaque"):
        (data / f"{name}.txt").write_text("a picture")
    dataset = FineTuneDataset(DatasetConfig(folder=str(data), resolution=64, alpha_mask=True))
    masks = {Path(dataset.images[dataset.entries[i]].path).stem: dataset.batch(0, 2).masks[k]
             for k, i in enumerate(dataset.batch_indices(0, 2))}
    assert (masks["opaque"] == 1).all()
    assert (masks["half"][0, :, :30] > 0.97).all() and (masks["half"][0, :, 34:] < 0.03).all()
    with pytest.raises(InvalidInputError, match="alpha_mask and loss_mask_folder both name the loss masks"):
        DatasetConfig(folder=str(data), alpha_mask=True, loss_mask_folder=str(data))
    with pytest.raises(InvalidInputError, match="textual-inversion does not use \\[dataset\\] alpha_mask"):
        FineTuneConfig(dataset=DatasetConfig(folder=str(data), alpha_mask=True), out="o",
                       method="textual-inversion", textual_inversion={"name": "<x>", "init_word": "disc"})


class _Zeros(torch.nn.Module):
    """A model predicting 0 for every part: the loss is then the mean of the (masked) squared target."""

    def forward(self, parts):
        return [torch.zeros_like(part[0]) for part in parts]


def _loss(masks: torch.Tensor | None) -> float:
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # 32 px images
    part = LossPart(latents, torch.zeros(2, 77, dtype=torch.long), torch.Generator().manual_seed(5), masks=masks)
    return finetune_loss(_Zeros(), [part], DiscreteSchedule(TINY_SD1.schedule), rows=slice(0, 2), global_batch=2,
                         prediction_type="epsilon", snr_gamma=None, noise_offset=0.0).item()


def test_each_latent_pixel_is_weighed_by_its_masks_mean_over_its_pixels():
    full = _loss(None)
    assert _loss(torch.ones(2, 1, 32, 32)) == full
    assert _loss(torch.zeros(2, 1, 32, 32)) == 0.0
    assert _loss(torch.full((2, 1, 32, 32), 0.25)) == pytest.approx(full / 4, rel=1e-6)
    quarters = []
    for top, left in [(0, 0), (0, 16), (16, 0), (16, 16)]:
        mask = torch.zeros(2, 1, 32, 32)
        mask[..., top:top + 16, left:left + 16] = 1
        quarters.append(_loss(mask))
    assert sum(quarters) == pytest.approx(full, rel=1e-6) and len(set(quarters)) == 4
    block, half_block = torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    block[..., :8, :8] = 1  # exactly latent pixel (0, 0) of the 4x4 latents
    half_block[..., :8, :4] = 1  # half of its pixels
    assert _loss(half_block) == pytest.approx(_loss(block) / 2, rel=1e-6) and _loss(block) > 0


def _logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "checkpoint" / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "controlnet"])
def test_runs_follow_their_masks(tmp_path, method):
    """White masks change nothing, black ones zero the loss; a disc-only mask gives another loss."""

    def run(name: str, masks: Path | None) -> list[float]:
        data = tmp_path / "white" / "data"
        extra = dict(conditioning_folder=str(tmp_path / "white" / "cond")) if method == "controlnet" else {}
        dataset = DatasetConfig(folder=str(data), resolution=64, loss_mask_folder=str(masks or ""), **extra)
        finetune(FineTuneConfig(dataset=dataset, out=str(tmp_path / name), method=method, steps=2, batch_size=2,
                                lr=1e-3, log_every=1, checkpoint_every=2, progress=False))
        return _logged_losses(tmp_path / name)

    white = images_with_masks(tmp_path / "white", 255)[1]  # its data folder is the one every run trains on
    black = images_with_masks(tmp_path / "black", 0)[1]
    disc = images_with_masks(tmp_path / "disc", None)[1]
    plain = run("plain", None)
    assert len(plain) == 2 and all(loss > 0 for loss in plain)
    assert run("white-masks", white) == plain
    assert run("black-masks", black) == [0.0, 0.0]
    assert run("disc-masks", disc)[0] not in (plain[0], 0.0)
