"""Shared test helpers: the parity tolerance every model part is held to, fixtures, pipeline references."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw


def assert_parity(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference <= rel * max(1, max |reference|) (the issue's float32 parity bar)."""
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    bound = rel * max(1.0, reference.abs().max().item())
    err = (ours.float() - reference.float()).abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} exceeds {bound:.3e}"


def pytest_configure(config):
    """Under pytest-xdist, each worker takes its share of the cores (no oversubscription)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads cost more than they give (and thrash on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    """A tiny SD1-layout UNet with random weights: the real model the sampler tests run."""
    from sdtorch.configs import TINY_SD1
    from sdtorch.models.unet import UNet

    torch.manual_seed(1234)
    return UNet(TINY_SD1.unet).eval()


@pytest.fixture(scope="module")
def context():
    """A (1, 7, 128) text context for the tiny UNet."""
    return torch.randn(1, 7, 128, generator=torch.Generator().manual_seed(7))


def random_pipeline(config, seed: int):
    """A tiny sdtorch Pipeline of `config` with random weights (norms and biases perturbed too)."""
    from sdtorch.models.sdxl_text import text_encoder_for
    from sdtorch.models.tokenizer import CLIPTokenizer
    from sdtorch.models.unet import UNet
    from sdtorch.models.vae import AutoencoderKL
    from sdtorch.pipeline import Pipeline

    torch.manual_seed(seed)
    parts = [text_encoder_for(config), UNet(config.unet), AutoencoderKL(config.vae)]
    with torch.no_grad():
        for module in parts:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    text, unet, vae = (m.eval() for m in parts)
    pad = "<|endoftext|>" if config.text_encoder.pad_token_id == 49407 else "!"
    return Pipeline(CLIPTokenizer.default(pad_token=pad), text, unet, vae, config)


def resident_pages(tensor: torch.Tensor) -> int:
    """How many of a CPU tensor's whole pages are in this process's memory (/proc/self/pagemap's present bit)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    first, end = -(-start // page), (start + tensor.numel() * tensor.element_size()) // page
    if end <= first:
        return 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((end - first) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


# ---- pipelines against diffusers ---------------------------------------------------------------------

# sdtorch (sampler, schedule) -> diffusers scheduler class and the config that reproduces it
SCHEDULERS = {
    ("DDIM", "Automatic"): ("DDIMScheduler", {}),
    ("Euler", "Automatic"): ("EulerDiscreteScheduler", {}),
    ("DPM++ 2M", "Karras"): ("DPMSolverMultistepScheduler",
                             dict(use_karras_sigmas=True, algorithm_type="dpmsolver++", final_sigmas_type="zero")),
    ("UniPC", "Automatic"): ("UniPCMultistepScheduler", {}),
}


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two 8-bit images."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def diffusers_pipe(folder, kind: str, sampler: str, schedule: str):
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline,
           "instruct-pix2pix": diffusers.StableDiffusionInstructPix2PixPipeline}[kind]
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    name, extra = SCHEDULERS[(sampler, schedule)]
    config = {**pipe.scheduler.config, "timestep_spacing": "leading", "steps_offset": 1, **extra}
    pipe.scheduler = getattr(diffusers, name).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", autouse=True)
def _openvino_cache(tmp_path_factory):
    """OpenVINO's compiled graphs go to a folder of the test session, never the user's ~/.cache."""
    import os

    from sdtorch.openvino_cache import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("openvino-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


# ---- fine-tuning data ---------------------------------------------------------------------------------

DISC_COLOURS = ["red", "green", "blue", "white"]


def disc_pairs(root: Path, count: int = 4) -> tuple[Path, Path]:
    """`count` captioned 64 px discs in root/data and their outlines (the condition) in root/cond; the second
    condition is a JPEG (any image suffix matches by stem)."""
    data, cond = root / "data", root / "cond"
    data.mkdir(parents=True)
    cond.mkdir()
    for i in range(count):
        box = (8 + 4 * i, 8, 52, 52 - 4 * i)
        image = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(image).ellipse(box, fill=DISC_COLOURS[i % 4])
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {DISC_COLOURS[i % 4]} disc")
        edges = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(edges).ellipse(box, outline="white", width=2)
        edges.save(cond / (f"{i}.jpg" if i == 1 else f"{i}.png"))
    return data, cond
