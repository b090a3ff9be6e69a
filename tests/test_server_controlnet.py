"""The A1111 ControlNet extension's HTTP API over real HTTP: units in txt2img / img2img's alwayson_scripts (the same
image as the Python API, the infotext's "ControlNet 0", the detected maps after the images), the /controlnet/*
endpoints' shapes, detect against preprocess(), and the refusals (unknown models, paths, bad values)."""

import numpy as np
import pytest
import torch
from conftest import random_pipeline
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from serving import decode_image, png_base64, running_server

import sdtorch
from sdtorch.checkpoints.controlnet_files import controlnet_title
from sdtorch.cli import main as cli_main
from sdtorch.configs import TINY_SD1, ControlNetConfig
from sdtorch.images import resize_image
from sdtorch.infotext import parse_infotext
from sdtorch.preprocessors import preprocess
from sdtorch.server.ip_adapter_modules import module_list
from sdtorch.request import ControlNetUnit
from sdtorch.server.service import ServerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

API = "/sdapi/v1"
SIZE = 32  # the tiny VAE: latents 16x16
GENERATION = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "sampler_name": "Euler",
              "cfg_scale": 7.0, "seed": 5, "width": SIZE, "height": SIZE}
CANNY = {"module": "canny", "processor_res": 64, "threshold_a": 50, "threshold_b": 150}


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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, the Python pipeline, the ControlNet folder): a tiny SD1 model, a diffusers-folder ControlNet and a
    single-file one, and a file that is no model."""
    root = tmp_path_factory.mktemp("serve-controlnet")
    sdtorch.save(random_pipeline(TINY_SD1, seed=11), root / "model", format="diffusers")
    folder = root / "controlnet"
    _controlnet(20).save_pretrained(folder / "tiny_canny")
    save_file(_controlnet(21).state_dict(), folder / "tiny_seg.safetensors")
    (folder / "notes.txt").write_text("not a model")
    config = ServerConfig(model=str(root / "model"), controlnet_dir=folder, outdir=root / "outputs")
    with running_server(config) as client:
        yield client, sdtorch.load(root / "model"), folder


def picture(seed: int = 1, size: int = 48) -> Image.Image:
    """Shapes on a background (edges for canny) with a little noise."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 8, 30, 32), fill=(230, 40, 40))
    draw.rectangle((26, 20, 44, 42), fill=(40, 200, 80))
    noise = rng.integers(-10, 10, (size, size, 3))
    return Image.fromarray((np.asarray(image, dtype=np.int64) + noise).clip(0, 255).astype(np.uint8))


def unit_payload(**fields) -> dict:
    return {"enabled": True, "model": "tiny_canny", "image": png_base64(picture()), "weight": 0.8,
            "resize_mode": 0, **CANNY, **fields}


def with_units(*units, **payload) -> dict:
    return {**GENERATION, **payload, "alwayson_scripts": {"controlnet": {"args": list(units)}}}


def refused(client, payload, path="txt2img") -> str:
    """The detail of a 422 (with nothing generated)."""
    answer = client.post(f"{API}/{path}", payload)
    assert answer.status == 422, answer.body
    assert answer.body["error"] == "InvalidInputError"
    return answer.body["detail"]


# ---- the listing endpoints ----------------------------------------------------------------------------------


def test_listings(served):
    client, _, folder = served
    titles = [controlnet_title(folder / "tiny_canny"), controlnet_title(folder / "tiny_seg.safetensors")]
    assert titles[0].startswith("tiny_canny [") and titles[1].startswith("tiny_seg [")  # "name [8 hex]"
    assert client.get("/controlnet/model_list").body == {"model_list": titles}
    assert client.get("/controlnet/version").body == {"version": 3}
    assert client.get("/controlnet/settings").body == {"control_net_unit_count": 3}
    assert client.get("/controlnet/module_list").body == module_list(False)
    labels = client.get("/controlnet/module_list?alias_names=true").body
    assert labels == module_list(True) and "invert (from white bg & black line)" in labels["module_list"]
    canny = labels["module_detail"]["canny"]
    assert canny == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    types = client.get("/controlnet/control_types").body["control_types"]
    assert list(types)[0] == "All" and types["All"]["model_list"] == ["None", *titles]
    assert types["Canny"] == {"module_list": ["none", "canny", "invert (from white bg & black line)"],
                              "model_list": ["None", titles[0]], "default_option": "canny",
                              "default_model": titles[0]}
    assert types["Segmentation"]["model_list"] == ["None", titles[1]]
    # a new file is listed after a rescan (update=true, the default), not before
    save_file({"x": torch.zeros(1)}, folder / "later.pth")
    try:
        assert client.get("/controlnet/model_list?update=false").body == {"model_list": titles}
        assert client.get("/controlnet/model_list").body["model_list"][0].startswith("later [")
    finally:
        (folder / "later.pth").unlink()
        client.get("/controlnet/model_list")


# ---- detect -------------------------------------------------------------------------------------------------


def test_detect_is_preprocess(served):
    client, _, _ = served
    images = [picture(1), picture(2, size=40)]
    answer = client.post("/controlnet/detect", {
        "controlnet_module": "canny", "controlnet_input_images": [png_base64(i) for i in images],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 50, "controlnet_threshold_b": 150})
    assert answer.status == 200 and list(answer.body) == ["info", "images"] and answer.body["info"] == "Success"
    for text, image in zip(answer.body["images"], images):
        assert np.array_equal(np.asarray(decode_image(text)), np.asarray(preprocess("canny", image, 64, 50, 150)))
    # a slider outside its range is the default, as the extension's unit makes it
    answer = client.post("/controlnet/detect", {"controlnet_module": "canny", "controlnet_threshold_a": 999,
                                                "controlnet_input_images": [png_base64(images[0])]})
    assert np.array_equal(np.asarray(decode_image(answer.body["images"][0])),
                          np.asarray(preprocess("canny", images[0])))
    # the inpaint modules take a mask; the map shows it half-transparent (the extension's visualize_inpaint_mask)
    mask = Image.new("L", images[0].size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 20, 20), fill=255)
    answer = client.post("/controlnet/detect", {"controlnet_module": "inpaint_only", "controlnet_input_images": [
        png_base64(images[0])], "controlnet_masks": [png_base64(mask)]})
    shown = np.asarray(decode_image(answer.body["images"][0]))
    assert shown.shape == (48, 48, 4) and shown[0, 0, 3] == 128 and shown[40, 40, 3] == 255
    for body, detail in [({"controlnet_module": "nope", "controlnet_input_images": ["x"]}, "Module not available"),
                         ({"controlnet_module": "depth_midas", "controlnet_input_images": ["x"]},
                          "Module not supported"),
                         ({"controlnet_module": "canny"}, "No image selected"),
                         ({"controlnet_module": "inpaint_only", "controlnet_input_images": [png_base64(images[0])]},
                          "requires `controlnet_masks` param")]:
        answer = client.post("/controlnet/detect", body)
        assert answer.status == 422 and detail in answer.body["detail"], answer.body


# ---- generation ---------------------------------------------------------------------------------------------


def test_txt2img_unit_is_the_python_apis(served):
    client, pipe, folder = served
    answer = client.post(f"{API}/txt2img", with_units(unit_payload()))
    assert answer.status == 200, answer.body
    served_image, served_map = (decode_image(text) for text in answer.body["images"])  # the image, its detected map
    unit = ControlNetUnit(image=picture(), model=folder / "tiny_canny", weight=0.8, resize_mode="Just Resize", **CANNY)
    settings = {k: v for k, v in GENERATION.items() if k not in ("prompt", "negative_prompt")}
    python = pipe(GENERATION["prompt"], GENERATION["negative_prompt"], controlnet=[unit], **settings)[0]
    assert np.array_equal(np.asarray(served_image.convert("RGB")), np.asarray(python))
    assert served_image.info["parameters"] == python.info["parameters"]
    read = parse_infotext(served_image.info["parameters"]).request.controlnet
    assert "ControlNet 0: " in served_image.info["parameters"] and len(read) == 1
    assert read[0].module == "canny" and read[0].model == controlnet_title(folder / "tiny_canny")
    control = resize_image(preprocess("canny", picture(), 64, 50, 150), SIZE, SIZE, "just resize")
    assert np.array_equal(np.asarray(served_map), np.asarray(control))
    plain = client.post(f"{API}/txt2img", GENERATION).body["images"]
    assert len(plain) == 1 and not np.array_equal(np.asarray(decode_image(plain[0])), np.asarray(served_image))


def test_unit_shapes_and_options(served):
    """The extension's other spellings give the same image; disabled units and save_detected_map; no_detectmap."""
    client, _, folder = served
    first = client.post(f"{API}/txt2img", with_units(unit_payload())).body["images"]
    title = controlnet_title(folder / "tiny_canny")
    legacy = unit_payload(model="TINY_Canny", resize_mode="Just Resize", guidance=1.0)  # a name in any case
    legacy["input_image"] = legacy.pop("image")
    off = {"enabled": False, "model": "nothing listed", "image": None}  # skipped, its model never looked up
    again = client.post(f"{API}/txt2img", with_units(off, legacy, {"extra_key": 1, **off})).body
    assert again["images"] == first
    assert "ControlNet 0" in again["info"] and "ControlNet 1" not in again["info"]
    one = client.post(f"{API}/txt2img", with_units(unit_payload(model=title, save_detected_map=False))).body["images"]
    assert one == first[:1]
    hidden = client.post(f"{API}/txt2img", {**with_units(unit_payload()),
                                            "override_settings": {"control_net_no_detectmap": True}})
    assert hidden.body["images"] == first[:1]
    # {"image", "mask"} and [image, mask] with an empty mask: the image alone
    blank = png_base64(Image.new("L", picture().size, 0))
    for image in ({"image": png_base64(picture()), "mask": blank}, [png_base64(picture()), blank]):
        assert client.post(f"{API}/txt2img", with_units(unit_payload(image=image))).body["images"] == first
    # a name part finds the shortest name holding it (the extension's closest match)
    assert client.post(f"{API}/txt2img", with_units(unit_payload(model="canny"))).body["images"] == first
    # an inpaint module: the mask in the map's alpha, shown half-transparent; without a mask, an empty one
    mask = Image.new("L", picture().size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 20, 20), fill=255)
    inpaint = unit_payload(module="inpaint_only", image={"image": png_base64(picture()), "mask": png_base64(mask)})
    shown = np.asarray(decode_image(client.post(f"{API}/txt2img", with_units(inpaint)).body["images"][1]))
    assert shown.shape == (SIZE, SIZE, 4) and shown[0, 0, 3] == 128 and shown[-1, -1, 3] == 255
    inpaint["image"] = png_base64(picture())
    shown = np.asarray(decode_image(client.post(f"{API}/txt2img", with_units(inpaint)).body["images"][1]))
    assert (shown[:, :, 3] == 255).all()
    # a mask on a module that takes none: the mask is the control image (the extension's canvas scribble)
    scribble = unit_payload(module="none", mask=png_base64(mask))
    shown = np.asarray(decode_image(client.post(f"{API}/txt2img", with_units(scribble)).body["images"][1]))
    expected = resize_image(mask.convert("RGB"), SIZE, SIZE, "just resize")
    assert np.array_equal(shown, np.asarray(expected))
    # the hires fix: the map at the hires size first, then at the first pass's (the extension's order)
    hires = with_units(unit_payload(control_mode=2), enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)
    sizes = [decode_image(t).size for t in client.post(f"{API}/txt2img", hires).body["images"]]
    assert sizes == [(48, 48), (48, 48), (SIZE, SIZE)]
    assert "hr_option 'Low res only'" in refused(client, {**hires, "alwayson_scripts": {"controlnet": {
        "args": [unit_payload(hr_option="Low res only")]}}})
    # a slider out of its range is its default, with a warning
    answer = client.post(f"{API}/txt2img", with_units(unit_payload(threshold_a=0))).body
    assert "threshold_a 0" in answer["info"]


def test_img2img_unit_without_image_uses_the_init_image(served):
    client, pipe, folder = served
    init = picture(3, size=SIZE)
    payload = with_units({"enabled": True, "model": "tiny_seg", "module": "none"}, init_images=[png_base64(init)],
                         denoising_strength=0.6, resize_mode=1)
    answer = client.post(f"{API}/img2img", payload)
    assert answer.status == 200, answer.body
    unit = ControlNetUnit(image=init, model=folder / "tiny_seg.safetensors", resize_mode="Crop and Resize")
    settings = {k: v for k, v in GENERATION.items() if k not in ("prompt", "negative_prompt")}
    python = pipe(GENERATION["prompt"], GENERATION["negative_prompt"], image=init, strength=0.6,
                  resize_mode="crop and resize", controlnet=[unit], **settings)[0]
    assert np.array_equal(np.asarray(decode_image(answer.body["images"][0]).convert("RGB")), np.asarray(python))
    assert np.array_equal(np.asarray(decode_image(answer.body["images"][1])), np.asarray(init))


def test_refusals(served):
    client, _, folder = served
    for model, detail in [("tiny_cany [00000000]", "not found; did you mean"), ("None", "no ControlNet model selected"),
                          (str(folder / "tiny_seg.safetensors"), "is a path"), ("../controlnet/tiny_seg", "is a path"),
                          ("", "no ControlNet model selected")]:
        assert detail in refused(client, with_units(unit_payload(model=model))), model
    where = "alwayson_scripts.controlnet.args[0]"
    for fields, detail in [({"weight": 3}, f"{where}.weight: Input should be less than or equal to 2"),
                           ({"weight": "heavy"}, f"{where}.weight: Input should be a valid number"),
                           ({"resize_mode": 7}, f"{where}.resize_mode 7 is not one of 0 'Just Resize'"),
                           ({"control_mode": "Loud"}, f"{where}.control_mode 'Loud' is not one of"),
                           ({"module": "nope"}, f"{where}.module: unknown ControlNet preprocessor 'nope'"),
                           ({"module": "depth_midas"}, "runs a network sdtorch does not run yet"),
                           ({"guidance_start": 0.9, "guidance_end": 0.2}, "guidance_start 0.9 must be below"),
                           ({"image": None}, "controlnet is enabled but no input image is given"),
                           ({"image": "not base64!"}, f"{where}.image is not valid base64"),
                           ({"image": [png_base64(picture())] * 3}, "one image a unit"),
                           ({"advanced_weighting": [1.0] * 13}, "advanced_weighting is not supported"),
                           ({"guidance": 0.5, "guidance_end": 0.5}, "both 'guidance' and 'guidance_end'")]:
        assert detail in refused(client, with_units(unit_payload(**fields))), fields
    assert "must be a ControlNet unit" in refused(client, with_units("canny"))
    assert "unknown ControlNet preprocessor" in refused(client, with_units({"enabled": False, "module": "nope"}))
    assert "takes 3 units" in refused(client, with_units(*[unit_payload()] * 4))
    assert "must be a list" in refused(client, {**GENERATION, "alwayson_scripts": {"ControlNet": {"args": {}}}})
    other = {**GENERATION, "alwayson_scripts": {"other script": {"args": [1]}}}  # other scripts: ignored
    assert client.post(f"{API}/txt2img", other).status == 200


def test_serve_flag(tmp_path, capsys):
    assert cli_main(["serve", "--controlnet-dir", str(tmp_path / "missing")]) == 2
    assert "--controlnet-dir" in capsys.readouterr().err
