"""IP-Adapter units through the A1111 ControlNet extension's API, over real HTTP: a unit whose module is one of the
extension's IP-Adapter modules (ip-adapter-auto, ip-adapter_clip_h...) and whose model is an IP-Adapter file of
--controlnet-dir runs as the Python API's `ip_adapter` unit with the module's CLIP vision tower from
--clip-vision-dir (clip_h, clip_g), pixel for pixel; beside a ControlNet unit; the listings; and the refusals."""

import numpy as np
import pytest
import torch
import transformers
from conftest import random_pipeline
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from serving import decode_image, png_base64, running_server

import sdtorch
from sdtorch.checkpoints.controlnet_files import controlnet_title
from sdtorch.checkpoints.ip_adapter_files import ip_adapter_to_original
from sdtorch.cli import main as cli_main
from sdtorch.configs import TINY_SD1, ControlNetConfig
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions
from sdtorch.request import ControlNetUnit, GenerationRequest, IPAdapterUnit, Limits
from sdtorch.server.catalog import ClipVisionFiles, ControlNetModels
from sdtorch.server.controlnet_units import controlnet_units
from sdtorch.server.ip_adapter_modules import auto_module
from sdtorch.server.service import ServerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

API = "/sdapi/v1"
SIZE = 32  # the tiny VAE: latents 16x16
GENERATION = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "sampler_name": "Euler",
              "cfg_scale": 7.0, "seed": 5, "width": SIZE, "height": SIZE}
CANNY = {"module": "canny", "processor_res": 64, "threshold_a": 50, "threshold_b": 150}
EMBED, WIDTH = 24, 32  # the tiny vision tower's projection and width
IP_MODULES = ["ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith"]
RESOLUTION = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}


def _vision_tower(folder) -> None:
    """A tiny CLIPVisionModelWithProjection (224 px images in 16 patches) as a transformers folder."""
    torch.manual_seed(5)
    config = transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=224, patch_size=56, projection_dim=EMBED)
    transformers.CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)


def _controlnet(seed: int):
    """A diffusers ControlNetModel for the tiny SD1 UNet with random weights (zero convs moved off zero)."""
    import diffusers

    torch.manual_seed(seed)
    config = ControlNetConfig(unet=TINY_SD1.unet, hint_channels=(8, 16)).to_diffusers()
    model = diffusers.ControlNetModel(**{k: v for k, v in config.items() if k != "_class_name"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or not p.any():
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _adapter_parts(unet, kind: str, seed: int) -> dict:
    """An IP-Adapter for `unet` with random weights, as IP-Adapter's files hold it: {"image_proj": {...},
    "ip_adapter": {...}}."""
    torch.manual_seed(seed)
    dims = tuple(attn.to_q.out_features for _, attn in cross_attentions(unet))
    context = unet.config.context_dim
    config = (IPAdapterConfig("base", EMBED, context, 4, dims) if kind == "base" else
              IPAdapterConfig("plus", WIDTH, context, 6, dims, hidden_dim=32, depth=4, heads=1, head_dim=64,
                              ff_dim=128))
    adapter = IPAdapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return {part: {k: v.contiguous() for k, v in sd.items()}
            for part, sd in ip_adapter_to_original(adapter.state_dict(), config).items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, the Python pipeline, the ControlNet folder, the CLIP vision folder): a tiny SD1 model; in the
    ControlNet folder a base IP-Adapter as ip-adapter_sd15.safetensors (a preset name: ip-adapter-auto picks
    clip_h), a plus one as IP-Adapter's .bin pickle, the base one again under a name no preset knows, and a
    ControlNet; in the CLIP vision folder the tiny tower as the transformers folder clip_h/ (no clip_g)."""
    root = tmp_path_factory.mktemp("serve-ip-adapter")
    sdtorch.save(random_pipeline(TINY_SD1, seed=11), root / "model", format="diffusers")
    pipe = sdtorch.load(root / "model")
    folder, clip_vision = root / "controlnet", root / "clip_vision"
    folder.mkdir()
    base = _adapter_parts(pipe.unet, "base", 20)
    flat = {f"{part}.{k}": v for part, sd in base.items() for k, v in sd.items()}
    save_file(flat, folder / "ip-adapter_sd15.safetensors")
    save_file(flat, folder / "my_adapter.safetensors")
    torch.save(_adapter_parts(pipe.unet, "plus", 21), folder / "ip-adapter-plus_sd15.bin")
    _controlnet(20).save_pretrained(folder / "tiny_canny")
    _vision_tower(clip_vision / "clip_h")
    config = ServerConfig(model=str(root / "model"), controlnet_dir=folder, clip_vision_dir=clip_vision,
                          outdir=root / "outputs")
    with running_server(config) as client:
        yield client, pipe, folder, clip_vision


def picture(seed: int = 1, size: int = 48) -> Image.Image:
    """Shapes on a background (edges for canny) with a little noise."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size * 3 // 4), (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 8, 30, 32), fill=(230, 40, 40))
    draw.rectangle((26, 10, 44, 30), fill=(40, 200, 80))
    noise = rng.integers(-10, 10, (image.height, image.width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.int64) + noise).clip(0, 255).astype(np.uint8))


def ip_unit(**fields) -> dict:
    return {"enabled": True, "module": "ip-adapter_clip_h", "model": "ip-adapter_sd15", "image": png_base64(picture()),
            "weight": 0.7, **fields}


def with_units(*units, **payload) -> dict:
    return {**GENERATION, **payload, "alwayson_scripts": {"controlnet": {"args": list(units)}}}


def python_api(pipe, **units):
    settings = {k: v for k, v in GENERATION.items() if k not in ("prompt", "negative_prompt")}
    return pipe(GENERATION["prompt"], GENERATION["negative_prompt"], **settings, **units)[0]


def refused(client, payload, path="txt2img") -> str:
    """The detail of a 422 (with nothing generated)."""
    answer = client.post(f"{API}/{path}", payload)
    assert answer.status == 422, answer.body
    return answer.body["detail"]


def test_listings(served):
    client, _, folder, _ = served
    body = client.get("/controlnet/module_list").body
    assert body["module_list"][:2] == ["none", "ip-adapter-auto"]  # its priority 1000 puts it first
    for name in IP_MODULES:  # a Resolution slider shows (the extension's legacy modules), the value unused
        assert body["module_detail"][name] == {"model_free": False, "sliders": [RESOLUTION]}
    labels = client.get("/controlnet/module_list?alias_names=true").body["module_list"]
    assert {"ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith"} <= set(labels)
    assert "canny" in labels and "ip-adapter_clip_sd15" not in labels
    ip_titles = [controlnet_title(folder / "ip-adapter-plus_sd15.bin"),
                 controlnet_title(folder / "ip-adapter_sd15.safetensors")]  # sorted by file name, as listed
    assert client.get("/controlnet/control_types").body["control_types"]["IP-Adapter"] == {
        "module_list": ["none", "ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_sdxl_plus_vith",
                        "ip-adapter_clip_g"],
        "model_list": ["None", *ip_titles], "default_option": "ip-adapter-auto", "default_model": ip_titles[0]}
    # detect: no image to give for these (the extension answers CLIP's output as pickled tensors)
    for module, detail in [("ip-adapter_clip_h", "encodes the image with CLIP"), ("ip-adapter-auto", "CLIP"),
                           ("ip-adapter_face_id", "InsightFace")]:
        answer = client.post("/controlnet/detect", {"controlnet_module": module,
                                                    "controlnet_input_images": [png_base64(picture())]})
        assert answer.status == 422 and "Module not supported" in answer.body["detail"], answer.body
        assert detail in answer.body["detail"]


def test_txt2img_ip_adapter_unit_is_the_python_apis(served):
    client, pipe, folder, clip_vision = served
    answer = client.post(f"{API}/txt2img", with_units(ip_unit()))
    assert answer.status == 200, answer.body
    served_image, shown = (decode_image(text) for text in answer.body["images"])  # the image, its "detected map"
    unit = IPAdapterUnit(image=picture(), model=folder / "ip-adapter_sd15.safetensors",
                         image_encoder=clip_vision / "clip_h", weight=0.7)
    python = python_api(pipe, ip_adapter=[unit])
    assert np.array_equal(np.asarray(served_image.convert("RGB")), np.asarray(python))
    assert served_image.info["parameters"] == python.info["parameters"]
    read = parse_infotext(served_image.info["parameters"]).request
    assert [(u.model, u.weight) for u in read.ip_adapter] == [(controlnet_title(unit.model), 0.7)]
    # the extension's display image of a module that returns none: the input image (RGBA, its empty CLIP mask)
    assert shown.mode == "RGBA" and np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(picture()))
    plain = python_api(pipe)
    assert not np.array_equal(np.asarray(plain), np.asarray(python))  # the image prompt did something
    # the module's other names, ip-adapter-auto (the preset of "ip-adapter_sd15": clip_h), an empty mask, the
    # sliders and modes (which do nothing): the same image
    blank = png_base64(Image.new("L", picture().size, 0))
    for fields in [{"module": "ip-adapter_clip_sd15"}, {"module": "ip-adapter-auto"},
                   {"module": "ip-adapter_clip_sdxl_plus_vith", "model": controlnet_title(unit.model)},
                   {"image": [png_base64(picture()), blank], "resize_mode": 2, "control_mode": 1,
                    "processor_res": 9999, "pixel_perfect": True, "save_detected_map": False}]:
        images = client.post(f"{API}/txt2img", with_units(ip_unit(**fields))).body["images"]
        assert images[0] == answer.body["images"][0], fields
    assert len(images) == 1  # save_detected_map false
    # a .bin IP-Adapter (IP-Adapter's pickle, a plus one)
    answer = client.post(f"{API}/txt2img", with_units(ip_unit(model="ip-adapter-plus_sd15"), save_detected_map=False))
    unit = IPAdapterUnit(image=picture(), model=folder / "ip-adapter-plus_sd15.bin",
                         image_encoder=clip_vision / "clip_h", weight=0.7)
    assert np.array_equal(np.asarray(decode_image(answer.body["images"][0]).convert("RGB")),
                          np.asarray(python_api(pipe, ip_adapter=[unit])))


def test_a_controlnet_unit_and_an_ip_adapter_unit(served):
    client, pipe, folder, clip_vision = served
    canny = {"enabled": True, "model": "tiny_canny", "image": png_base64(picture(2)), "weight": 0.8,
             "resize_mode": 0, **CANNY}
    answer = client.post(f"{API}/txt2img", with_units(ip_unit(), canny))
    assert answer.status == 200, answer.body
    image, ip_shown, canny_map = (decode_image(text) for text in answer.body["images"])  # maps in the units' order
    python = python_api(pipe, controlnet=[ControlNetUnit(image=picture(2), model=folder / "tiny_canny", weight=0.8,
                                                         resize_mode="Just Resize", **CANNY)],
                        ip_adapter=[IPAdapterUnit(image=picture(), model=folder / "ip-adapter_sd15.safetensors",
                                                  image_encoder=clip_vision / "clip_h", weight=0.7)])
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(python))
    assert image.info["parameters"] == python.info["parameters"]
    assert ip_shown.size == picture().size and canny_map.size == (SIZE, SIZE)
    # img2img: a unit without image takes the init image, shown as it is (RGB)
    init = picture(3, size=SIZE)
    payload = with_units({k: v for k, v in ip_unit().items() if k != "image"}, init_images=[png_base64(init)],
                         denoising_strength=0.6)
    answer = client.post(f"{API}/img2img", payload)
    assert answer.status == 200, answer.body
    unit = IPAdapterUnit(image=init, model=folder / "ip-adapter_sd15.safetensors",
                         image_encoder=clip_vision / "clip_h", weight=0.7)
    python = python_api(pipe, image=init, strength=0.6, ip_adapter=[unit])
    image, shown = (decode_image(text) for text in answer.body["images"])
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(python))
    assert shown.mode == "RGB" and np.array_equal(np.asarray(shown), np.asarray(init))


def test_refusals(served):
    client, _, folder, _ = served
    where = "alwayson_scripts.controlnet.args[0]"
    canny = {"enabled": True, "model": "tiny_canny", "image": png_base64(picture()), **CANNY}
    mask = Image.new("L", picture().size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 10, 10), fill=255)
    for unit, details in [
        (ip_unit(module="ip-adapter_clip_g"), [f"{where}.module 'ip-adapter_clip_g'", "clip_g.pth",
                                               "--clip-vision-dir", "annotator/downloads/clip_vision/"]),
        (ip_unit(model="tiny_canny"), [f"{where}.model 'tiny_canny [", "is not an IP-Adapter"]),
        ({**canny, "model": "ip-adapter_sd15"}, [f"{where}.model 'ip-adapter_sd15 [", "is an IP-Adapter",
                                                 "ip-adapter-auto"]),
        (ip_unit(model=str(folder / "ip-adapter_sd15.safetensors")), ["is a path"]),
        (ip_unit(model="../controlnet/ip-adapter_sd15"), ["is a path"]),
        (ip_unit(model="None"), ["no ControlNet model selected"]),
        (ip_unit(module="ip-adapter-auto", model="my_adapter"), ["not one of the extension's IP-Adapter presets"]),
        (ip_unit(module="ip-adapter_face_id"), [f"{where}.module", "InsightFace"]),
        (ip_unit(module="ip-adapter_pulid"), ["PuLID"]),
        (ip_unit(image={"image": png_base64(picture()), "mask": png_base64(mask)}), [f"{where}.mask", "CLIP mask"]),
        (ip_unit(image=[png_base64(picture())] * 3), ["one image a unit"]),
        (ip_unit(guidance_end=0.5), ["guidance_end 0.5", "every step"]),
        (ip_unit(ipadapter_input="abc"), ["ipadapter_input is not supported"]),
        (ip_unit(weight=2.5), [f"{where}.weight"]),
        (ip_unit(image=None), ["no input image is given"]),
    ]:
        detail = refused(client, with_units(unit))
        for text in details:
            assert text in detail, (unit.get("module"), unit.get("model"), detail)
    # ip-adapter-auto of a FaceID or PuLID preset says why not; of the others, which module it runs
    for name, detail in [("ip-adapter-faceid_sd15 [0123abcd]", "InsightFace"), ("ip-adapter_pulid_sdxl_fp16", "PuLID")]:
        with pytest.raises(InvalidInputError, match=detail):
            auto_module(name)
    assert auto_module("ip-adapter_sdxl [0123abcd]").clip_vision == "clip_g"
    assert auto_module("ip-adapter-plus_sdxl_vit-h").clip_vision == "clip_h"
    hires = with_units(ip_unit(hr_option="High res only"), enable_hr=True, hr_scale=1.5)
    assert "hr_option 'High res only'" in refused(client, hires)
    # a disabled unit is checked for its module only; more than 3 enabled units are refused, IP-Adapters too
    for module in ("ip-adapter_clip_h", "ip-adapter_face_id"):  # one sdtorch does not run: refused when enabled
        assert client.post(f"{API}/txt2img", with_units(ip_unit(enabled=False, module=module,
                                                                model="nothing"))).status == 200
    assert "unknown ControlNet preprocessor" in refused(client, with_units(ip_unit(enabled=False, module="nope")))
    assert "takes 3 units" in refused(client, with_units(*[ip_unit()] * 4))


def test_without_a_clip_vision_folder(served):
    _, _, folder, _ = served
    request = GenerationRequest(prompt="x", width=SIZE, height=SIZE)
    scripts = {"controlnet": {"args": [ip_unit()]}}
    with pytest.raises(InvalidInputError) as e:
        controlnet_units(scripts, ControlNetModels(folder), request, Limits(), ClipVisionFiles(None))
    assert "needs the CLIP vision tower clip_h.pth" in str(e.value)
    assert "start it with --clip-vision-dir DIR holding clip_h.pth" in str(e.value)


def test_clip_vision_files(tmp_path):
    (tmp_path / "clip_h").mkdir()
    (tmp_path / "clip_h.pth").write_bytes(b"x")
    (tmp_path / "clip_g.safetensors").write_bytes(b"x")
    files = ClipVisionFiles(tmp_path)
    assert files.find("clip_h", "unit") == tmp_path / "clip_h.pth"  # a file before a folder of the same name
    assert files.find("clip_g", "unit") == tmp_path / "clip_g.safetensors"
    (tmp_path / "clip_h.pth").unlink()
    assert files.find("clip_h", "unit") == tmp_path / "clip_h"


def test_serve_flag(tmp_path, capsys):
    assert cli_main(["serve", "--clip-vision-dir", str(tmp_path / "missing")]) == 2
    assert "--clip-vision-dir" in capsys.readouterr().err
