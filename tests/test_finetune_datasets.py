"""Fine-tuning datasets: folder layouts, sizing and buckets, caption augmentation, bad data, the latent
cache and DDP sharding. Images are built with Pillow in tmp_path; the VAE is the tiny config's."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sdtorch.configs import TINY_SD1
from sdtorch.errors import InvalidInputError
from sdtorch.models.vae import AutoencoderKL
from sdtorch.tomlconfig import from_table
from sdtorch.training.datasets import (
    DatasetConfig, FineTuneDataset, augment_caption, bucket_sizes, choose_bucket, cover,
)


def image(path: Path, size=(32, 32), colour=(200, 30, 30), mode="RGB", caption: str | None = None) -> Path:
    """Write a solid-colour image (and its caption file when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new(mode, size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def config(folder: Path, **kw) -> DatasetConfig:
    return DatasetConfig(folder=str(folder), resolution=kw.pop("resolution", 16), **kw)


def captions_of(dataset: FineTuneDataset) -> dict[str, str]:
    return {r.path.name: r.caption for r in dataset.images}


# ---- layouts --------------------------------------------------------------------------------------


def test_image_folder_with_caption_files(tmp_path):
    image(tmp_path / "a.png", caption="a red square")
    image(tmp_path / "b.JPG", caption="first line\nsecond line")
    image(tmp_path / "c.WebP", caption="  padded  ")
    image(tmp_path / ".hidden.png", caption="hidden")
    image(tmp_path / "deeper" / "d.png", caption="not read: kohya globs one folder")
    (tmp_path / "notes.md").write_text("not an image")
    data = FineTuneDataset(config(tmp_path))
    assert captions_of(data) == {"a.png": "a red square", "b.JPG": "first line", "c.WebP": "padded"}
    assert len(data) == 3 and data[0]["image"].shape == (3, 16, 16)


def test_caption_extension(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from .caption")
    (tmp_path / "a.txt").write_text("from .txt")
    assert captions_of(FineTuneDataset(config(tmp_path, caption_extension=".caption"))) == {"a.png": "from .caption"}


def test_metadata_jsonl(tmp_path):
    image(tmp_path / "imgs" / "x.png")
    image(tmp_path / "y.bmp")
    image(tmp_path / "unlisted.png")
    lines = [{"file_name": "imgs/x.png", "text": "an x"}, {"file_name": "y.bmp", "text": "a y", "extra": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    data = FineTuneDataset(config(tmp_path, repeats=3))
    assert captions_of(data) == {"x.png": "an x", "y.bmp": "a y"}
    assert len(data) == 6


def test_kohya_repeat_folders(tmp_path):
    image(tmp_path / "10_sks dog" / "a.png")  # no caption file: the folder's prompt
    image(tmp_path / "10_sks dog" / "b.png", caption="sks dog on grass")
    image(tmp_path / "2_a_cat" / "c.png")
    image(tmp_path / "0_disabled" / "d.png")  # N < 1: ignored, as kohya does
    image(tmp_path / "reference" / "e.png")  # not N_prompt: ignored
    data = FineTuneDataset(config(tmp_path))
    assert captions_of(data) == {"a.png": "sks dog", "b.png": "sks dog on grass", "c.png": "a_cat"}
    assert [r.repeats for r in data.images] == [10, 10, 2] and len(data) == 22
    epoch = [i for step in range(data.batches_per_epoch(2)) for i in data.batch_indices(step, 2)]
    assert sorted(epoch) == list(range(22))  # 11 full batches: one epoch visits every entry once


# ---- sizing ---------------------------------------------------------------------------------------


def test_bucket_rules():
    sizes = bucket_sizes(64, 32, 128, 16)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 and 32 <= min(w, h) and max(w, h) <= 128
               for w, h in sizes)
    assert (64, 64) in sizes and (128, 32) in sizes and (32, 128) in sizes
    assert bucket_sizes(512, 256, 1024, 64)[:4] == [(256, 832), (256, 896), (256, 960), (256, 1024)]  # kohya's
    assert choose_bucket((300, 100), sizes) == (96, 32) and choose_bucket((64, 64), sizes) == (64, 64)
    assert cover((100, 50), (32, 32)) == ((64, 32), (0, 16))  # scale to cover, centre crop (top, left)
    assert cover((30, 90), (48, 80)) == ((48, 144), (32, 0))


def test_square_crop_records_original_size_and_crop(tmp_path):
    path = tmp_path / "wide.png"
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[:, 40:60] = 255  # a white middle fifth, black sides
    PIL.Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text("wide")
    data = FineTuneDataset(config(tmp_path, resolution=32))
    item = data[0]
    assert item["original_size"] == (50, 100) and item["crop"] == (0, 16)  # (height, width), (top, left)
    assert item["image"].shape == (3, 32, 32)  # columns 40..60 of 100 -> 25.6..38.4 of 64 -> 9.6..22.4 of the crop
    assert item["image"][:, :, 11:21].min() > 0.9 and item["image"][:, :, :7].max() < -0.9
    batch = data.batch(0, 1)
    assert batch.original_sizes == [(50, 100)] and batch.crops == [(0, 16)] and batch.target_size == (32, 32)


def test_buckets_assign_by_aspect_and_batches_stay_in_one_bucket(tmp_path):
    for name, size in {"sq1": (64, 64), "sq2": (80, 80), "wide1": (200, 50), "wide2": (400, 100),
                       "tall": (40, 100)}.items():
        image(tmp_path / f"{name}.png", size, caption=name)
    data = FineTuneDataset(config(tmp_path, resolution=64, buckets=True, bucket_step=16, min_bucket_side=32,
                                  max_bucket_side=128))
    assert {r.path.stem: r.bucket for r in data.images} == {
        "sq1": (64, 64), "sq2": (64, 64), "wide1": (128, 32), "wide2": (128, 32), "tall": (32, 96)}
    assert {r.path.stem: r.crop for r in data.images}["tall"] == (0, 3)  # 40x100 -> 38x96, columns 3..35
    per_epoch = data.batches_per_epoch(2)
    assert per_epoch == 3
    for step in range(2 * per_epoch):
        batch = data.batch(step, 2)
        buckets = {data.images[data.entries[i]].bucket for i in batch.indices}
        assert len(buckets) == 1 and len(batch.indices) == 2
        (width, height), = buckets
        assert batch.target_size == (height, width) and batch.images.shape == (2, 3, height, width)
    epoch = sorted(i for step in range(per_epoch) for i in data.batch_indices(step, 2))
    tall = [r.path.stem for r in data.images].index("tall")
    assert epoch == sorted([0, 1, 2, 3, 4, tall])  # all five; the tall one's short batch filled from its bucket


def test_rgba_and_sixteen_bit_go_through_load_image(tmp_path):
    PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent: white
    PIL.Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    data = FineTuneDataset(config(tmp_path, require_captions=False))
    assert captions_of(data) == {"clear.png": "", "deep.png": ""}
    assert torch.equal(data[0]["image"], torch.ones(3, 16, 16))
    torch.testing.assert_close(data[1]["image"], torch.full((3, 16, 16), 128 / 255 * 2 - 1), atol=1e-6, rtol=0)


# ---- captions -------------------------------------------------------------------------------------


def test_tag_shuffle_keeps_leading_tags_and_is_seeded():
    cfg = DatasetConfig(folder="x", shuffle_tags=True, keep_tokens=2)
    caption = "sks, dog, grass, sky, ball, , tree"
    draws = [augment_caption(caption, cfg, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(d.startswith("sks, dog, ") for d in draws)
    assert all(sorted(d.split(", ")[2:]) == ["ball", "grass", "sky", "tree"] for d in draws)
    assert len(set(draws)) > 1
    assert draws[3] == augment_caption(caption, cfg, torch.Generator().manual_seed(3))
    plain = DatasetConfig(folder="x")
    assert augment_caption(caption, plain, torch.Generator()) == caption


def test_caption_augmentation_is_deterministic_per_step(tmp_path):
    for i in range(4):
        image(tmp_path / f"{i}.png", caption=f"tag{i}, a, b, c, d")
    cfg = config(tmp_path, caption_dropout=0.3, shuffle_tags=True, keep_tokens=1, seed=7)
    first, again = FineTuneDataset(cfg), FineTuneDataset(cfg)
    runs = [[d.batch(step, 2).captions for step in range(20)] for d in (first, again)]
    assert runs[0] == runs[1]  # a fresh dataset (a resumed run) draws the same
    flat = [c for captions in runs[0] for c in captions]
    assert 0 < flat.count("") < len(flat) and all(c == "" or c.startswith("tag") for c in flat)
    assert len({c for c in flat if c}) > 4
    other = FineTuneDataset(config(tmp_path, caption_dropout=0.3, shuffle_tags=True, keep_tokens=1, seed=8))
    assert [other.batch(step, 2).captions for step in range(20)] != runs[0]
    dropped = FineTuneDataset(config(tmp_path, caption_dropout=1.0))
    assert dropped.batch(5, 4).captions == ["", "", "", ""]


# ---- bad data -------------------------------------------------------------------------------------


def test_bad_data_messages(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match=r"no images in .*empty"):
        FineTuneDataset(config(empty))
    with pytest.raises(InvalidInputError, match="does not exist"):
        FineTuneDataset(config(tmp_path / "missing"))

    plain = tmp_path / "plain"
    image(plain / "a.png", caption="ok")
    image(plain / "nocap.png")
    with pytest.raises(InvalidInputError, match=r"nocap\.png has no caption.*require_captions"):
        FineTuneDataset(config(plain))
    assert captions_of(FineTuneDataset(config(plain, require_captions=False)))["nocap.png"] == ""
    (plain / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (plain / "broken.txt").write_text("caption")
    with pytest.raises(InvalidInputError, match=r"broken\.png"):
        FineTuneDataset(config(plain, require_captions=False))
    truncated = tmp_path / "truncated"
    png = image(truncated / "t.png", (64, 64), caption="t").read_bytes()
    (truncated / "t.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(InvalidInputError, match=r"t\.png"):
        FineTuneDataset(config(truncated))

    mixed = tmp_path / "mixed"
    image(mixed / "loose.png", caption="x")
    image(mixed / "5_thing" / "a.png")
    with pytest.raises(InvalidInputError, match="move the images into a sub-folder"):
        FineTuneDataset(config(mixed))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not JSON"),
    ('{"file_name": "a.png"}', r"line 2: expected an object with string keys file_name and text"),
    ('["a.png", "x"]', r"line 2: expected an object"),
    ('{"file_name": "gone.png", "text": "x"}', r"line 2: file_name 'gone.png': no such file"),
    ('{"file_name": "../a.png", "text": "x"}', r"line 2: file_name '../a.png' is outside"),
])
def test_bad_metadata_lines(tmp_path, line, message):
    folder = tmp_path / "data"
    image(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(InvalidInputError, match=message):
        FineTuneDataset(config(folder))


def test_config_from_toml_table():
    cfg = from_table(DatasetConfig, {"folder": "d", "buckets": True, "caption_dropout": 0.1}, source="r.toml",
                     section="dataset")
    assert cfg.buckets and cfg.caption_dropout == 0.1 and cfg.resolution == 512
    with pytest.raises(InvalidInputError, match=r"r\.toml: \[dataset\] caption_dropot: unknown key; did you mean"):
        from_table(DatasetConfig, {"folder": "d", "caption_dropot": 0.1}, source="r.toml", section="dataset")
    with pytest.raises(InvalidInputError, match=r"r\.toml: .*needs folder"):
        from_table(DatasetConfig, {}, source="r.toml")
    with pytest.raises(InvalidInputError, match="caption_dropout must be in"):
        from_table(DatasetConfig, {"folder": "d", "caption_dropout": 1.5}, source="r.toml")
    with pytest.raises(InvalidInputError, match="multiples of bucket_step"):
        DatasetConfig(folder="d", buckets=True, min_bucket_side=100)
    with pytest.raises(InvalidInputError, match="caption_extension must start with a dot"):
        DatasetConfig(folder="d", caption_extension="txt")


# ---- latent cache -----------------------------------------------------------------------------------


@pytest.fixture
def counted_vae(monkeypatch):
    """The tiny VAE, counting the images its encoder sees."""
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_SD1.vae)
    seen = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: seen.append(x.shape[0]) or encode(x))
    return vae, seen


def test_latent_cache_reuse_and_invalidation(tmp_path, counted_vae, one_thread):
    vae, seen = counted_vae
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    image(data_dir / "a.png", (16, 16), (250, 0, 0), caption="a")
    image(data_dir / "b.png", (32, 16), (0, 250, 0), caption="b")
    image(data_dir / "c.png", (16, 16), (0, 0, 250), caption="c")
    cfg = config(data_dir, cache_latents=True)

    data = FineTuneDataset(cfg)
    assert data.cache_latents(vae, cache, batch_size=2) == 3 and sum(seen) == 3
    batch = data.batch(0, 3)
    assert batch.images is None and batch.latents.shape == (3, 4, 8, 8)
    with torch.no_grad():
        expected = vae.encode(torch.stack([data[i]["image"] for i in batch.indices])).mean * vae.scaling_factor
    torch.testing.assert_close(batch.latents, expected)
    seen.clear()

    again = FineTuneDataset(cfg)
    assert again.cache_latents(vae, cache) == 0 and seen == []  # second run: nothing encoded
    assert torch.equal(again.batch(0, 3).latents, batch.latents)

    image(data_dir / "b.png", (32, 16), (9, 9, 9), caption="b")  # one image changed
    assert FineTuneDataset(cfg).cache_latents(vae, cache) == 1 and seen == [1]
    seen.clear()
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)  # any weight of the VAE changes its fingerprint
    assert FineTuneDataset(cfg).cache_latents(vae, cache) == 3 and sum(seen) == 3
    seen.clear()
    assert FineTuneDataset(cfg).cache_latents(vae.to(torch.float64), cache) == 3  # the dtype too

    means = FineTuneDataset(cfg)
    sampled = FineTuneDataset(config(data_dir, cache_latents=True, sample_latents=True))
    assert means.cache_latents(vae, cache) == 0 and sampled.cache_latents(vae, cache) == 0
    draws = [sampled.batch(0, 3).latents for _ in range(2)]  # a sample for (seed, step, position)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], means.batch(0, 3).latents)


# ---- sharding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_each_global_batch(tmp_path, counted_vae, world_size, one_thread):
    vae, _ = counted_vae
    for i, size in enumerate([(16, 16)] * 5 + [(32, 16)] * 3):
        image(tmp_path / f"{i}.png", size, (30 * i, 0, 0), caption=f"t{i}, x, y, z")
    cfg = config(tmp_path, buckets=True, resolution=32, bucket_step=16, min_bucket_side=16, max_bucket_side=64,
                 caption_dropout=0.2, shuffle_tags=True, sample_latents=True, repeats=2)
    whole = FineTuneDataset(cfg)
    whole.cache_latents(vae, tmp_path / "cache")
    ranks = [FineTuneDataset(cfg) for _ in range(world_size)]
    for rank in ranks:
        rank.cache_latents(vae, tmp_path / "cache")
    for step in range(10):
        one = whole.batch(step, 4)
        parts = [r.batch(step, 4, rank=k, world_size=world_size) for k, r in enumerate(ranks)]
        assert sum((p.indices for p in parts), []) == one.indices
        assert sum((p.captions for p in parts), []) == one.captions
        assert torch.equal(torch.cat([p.latents for p in parts]), one.latents)
    with pytest.raises(InvalidInputError, match="divisible by world_size"):
        whole.batch(0, 4, rank=0, world_size=3)
