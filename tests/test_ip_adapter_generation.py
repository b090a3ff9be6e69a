"""IP-Adapter image prompts in generation against diffusers' pipelines with `load_ip_adapter` (tiny random SD1 and
SDXL models, a tiny CLIP vision tower and adapters in IP-Adapter's file layout, identical weights), base and plus,
with a ControlNet beside, and the errors of bad units."""

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import SCHEDULERS, psnr, random_pipeline
from PIL import Image
from safetensors.torch import save_file

import sdtorch
from sdtorch.configs import TINY_SD1, TINY_SDXL
from sdtorch.errors import InvalidInputError
from sdtorch.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions
from sdtorch.checkpoints.ip_adapter_files import ip_adapter_to_original

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # the tiny VAE downsamples by 2: latents 16x16
PROMPT, NEGATIVE = "a red circle in the top left", "blurry"
EMBED, WIDTH = 24, 32  # the vision tower's projection and width
WEIGHT = "ip-adapter_tiny.safetensors"


def _vision_tower(folder) -> None:
    """A tiny CLIPVisionModelWithProjection (224 px images in 16 patches) in h94/IP-Adapter's `image_encoder`."""
    torch.manual_seed(5)
    config = transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=224, patch_size=56, projection_dim=EMBED)
    transformers.CLIPVisionModelWithProjection(config).eval().save_pretrained(folder / "image_encoder")


def _adapter_file(folder, unet, kind: str, seed: int) -> str:
    """An IP-Adapter with random weights for `unet`, saved as IP-Adapter's safetensors files are."""
    torch.manual_seed(seed)
    dims = tuple(attn.to_q.out_features for _, attn in cross_attentions(unet))
    context = unet.config.context_dim
    config = (IPAdapterConfig("base", EMBED, context, 4, dims) if kind == "base" else
              IPAdapterConfig("plus", WIDTH, context, 6, dims, hidden_dim=32, depth=4, heads=1, head_dim=64, ff_dim=128))
    adapter = IPAdapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    parts = ip_adapter_to_original(adapter.state_dict(), config)
    save_file({f"{part}.{k}": v.contiguous() for part, sd in parts.items() for k, v in sd.items()},
              str(folder / f"{kind}-{WEIGHT}"))
    return str(folder / f"{kind}-{WEIGHT}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip-adapter-generation")
    built = {}
    for family, config, seed in (("sd1", TINY_SD1, 11), ("sdxl", TINY_SDXL, 12)):
        sdtorch.save(random_pipeline(config, seed=seed), root / family, format="diffusers")
        pipe = sdtorch.load(root / family)
        adapters = root / f"{family}-adapters"
        adapters.mkdir()
        _vision_tower(adapters)
        built[family] = (pipe, root / family, {kind: _adapter_file(adapters, pipe.unet, kind, 20 + i)
                                                for i, kind in enumerate(("base", "plus"))})
    return built


def image_prompt(seed: int = 1, size: int = 300) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size * 3 // 4, 3), dtype=np.uint8))


def reference(family: str, folder, adapter: str, scale: float):
    kind = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = kind.from_pretrained(folder, **extra)
    pipe.load_ip_adapter(str(adapter.rsplit("/", 1)[0]), subfolder="", weight_name=adapter.rsplit("/", 1)[1],
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(scale)
    name, options = SCHEDULERS[("DPM++ 2M", "Karras")]
    config = {**pipe.scheduler.config, "timestep_spacing": "leading", "steps_offset": 1, **options}
    pipe.scheduler = getattr(diffusers, name).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(pipe, units, **extra):
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=7.5,
                sampler="DPM++ 2M", schedule="Karras", generator=torch.Generator().manual_seed(0), ip_adapter=units,
                **extra)[0]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["base", "plus"])
def test_an_image_prompt_matches_diffusers(models, family, kind):
    pipe, folder, adapters = models[family]
    image = image_prompt()
    ref = reference(family, folder, adapters[kind], 0.7)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=image, height=SIZE, width=SIZE,
                 num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    mine = ours(pipe, [dict(image=image, model=adapters[kind], weight=0.7)])
    assert psnr(mine, theirs) >= 50
    plain = ours(pipe, [])
    assert psnr(mine, plain) < 40  # the image prompt did change the picture
    assert np.array_equal(np.asarray(ours(pipe, [])), np.asarray(plain))  # and was removed after the run


def test_weight_zero_is_the_plain_image_and_errors_are_clear(models, tmp_path):
    pipe, _, adapters = models["sd1"]
    plain = ours(pipe, [])
    off = ours(pipe, [dict(image=image_prompt(), model=adapters["base"], weight=0.0)])
    assert np.array_equal(np.asarray(off), np.asarray(plain))

    def error(**unit) -> str:
        with pytest.raises(InvalidInputError) as e:
            pipe(PROMPT, height=SIZE, width=SIZE, steps=2, ip_adapter=[unit])
        return str(e.value)

    assert "ip_adapter[0].image is missing" in error(model=adapters["base"])
    assert "ip_adapter[0].model is missing" in error(image=image_prompt())
    assert "ip_adapter[0].weight" in error(image=image_prompt(), model=adapters["base"], weight=-1)
    assert "did you mean 'weight'" in error(image=image_prompt(), model=adapters["base"], wieght=1)
    assert "ip_adapter[0]" in error(image=image_prompt(), model=str(tmp_path / "absent.safetensors"))
    assert "ip_adapter[0]" in error(image=image_prompt(), model=adapters["base"], image_encoder=str(tmp_path))
    sdxl_adapter = models["sdxl"][2]["base"]
    assert "ip_adapter[0]" in error(image=image_prompt(), model=sdxl_adapter)  # made for another UNet


def test_the_cli_takes_image_prompts(models, tmp_path, capsys):
    from sdtorch.cli import main

    pipe, folder, adapters = models["sd1"]
    picture = tmp_path / "prompt.png"
    image_prompt().save(picture)
    out = tmp_path / "out.png"
    args = ["generate", PROMPT, "--model", str(folder), "--steps", "2", "--seed", "3", "--width", "32", "--height",
            "32", "--quiet"]
    assert main([*args, "--ip-adapter", adapters["base"], "--ip-image", str(picture), "--ip-weight", "0.7",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    expected = pipe(PROMPT, steps=2, seed=3, width=32, height=32,
                    ip_adapter=[dict(image=picture, model=adapters["base"], weight=0.7)])[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    with pytest.raises(SystemExit):
        main([*args, "--ip-image", str(picture)])
    assert "give it after that flag" in capsys.readouterr().err


def test_the_infotext_names_the_image_prompt_as_the_extension_does(models):
    """An IP-Adapter is a "ControlNet N" unit in the extension's infotext (module ip-adapter_clip_h, the model as
    "name [legacy hash]"), after the ControlNet units; it reads back as an IP-Adapter unit."""
    import hashlib

    from sdtorch.infotext import parse_infotext

    pipe, _, adapters = models["sd1"]
    image = ours(pipe, [dict(image=image_prompt(), model=adapters["base"], weight=0.7)])
    with open(adapters["base"], "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    name = f"base-ip-adapter_tiny [{legacy}]"
    assert (f'ControlNet 0: "Module: ip-adapter_clip_h, Model: {name}, Weight: 0.7, Resize Mode: Crop and Resize, '
            'Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: Balanced"') in image.info["parameters"]
    request = parse_infotext(image.info["parameters"]).request
    assert request.controlnet == [] and [(u.model, u.weight) for u in request.ip_adapter] == [(name, 0.7)]
