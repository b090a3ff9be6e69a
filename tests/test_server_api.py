"""The A1111-compatible HTTP API over real HTTP: a uvicorn server on loopback with the built-in model."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from serving import Client, decode_image, png_base64, running_server

import sdtorch
from sdtorch.cli import main as cli_main
from sdtorch.images import tensor_to_images
from sdtorch.infotext import read_infotext
from sdtorch.server.preview import LatentPreview
from sdtorch.server.service import ServerConfig

API = "/sdapi/v1"
FAST = {"steps": 4, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A models folder holding the built-in model as a single file, a LoRA folder and an embeddings folder."""
    root = tmp_path_factory.mktemp("serve")
    (root / "models").mkdir()
    sdtorch.save(sdtorch.load(), root / "models" / "shapes-copy.safetensors", format="single_file")
    (root / "loras").mkdir()
    save_file({"x": torch.zeros(1)}, root / "loras" / "ink.safetensors", metadata={"ss_output_name": "inky"})
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 128) * 0.01}, root / "embeddings" / "glowy.safetensors")
    (root / "embeddings" / "notes.txt").write_text("not an embedding")
    return root


@pytest.fixture(scope="module")
def client(one_thread, folders):
    config = ServerConfig(models_dir=folders / "models", lora_dir=folders / "loras",
                          embeddings_dir=folders / "embeddings", outdir=folders / "outputs")
    with running_server(config) as client:
        yield client


def txt2img(client: Client, **payload) -> dict:
    answer = client.post(f"{API}/txt2img", {**FAST, **payload})
    assert answer.status == 200, answer.body
    return answer.body


def in_background(client: Client, path: str, payload: dict) -> tuple[threading.Thread, dict]:
    """POST in a thread; the returned dict receives the response under "answer"."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("answer", client.post(path, payload)))
    thread.start()
    return thread, out


def wait_for(client: Client, condition, timeout: float = 60) -> dict:
    """Poll /progress until condition(progress) holds; the progress that satisfied it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get(f"{API}/progress").body
        if condition(progress):
            return progress
        time.sleep(0.02)
    raise AssertionError(f"progress never reached the condition; last: {progress['state']}")


def test_listing_endpoints(client, folders):
    samplers = client.get(f"{API}/samplers").body
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get(f"{API}/schedulers").body
    karras = {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}
    assert karras in schedulers
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)

    models = client.get(f"{API}/sd-models").body
    assert [m["model_name"] for m in models] == ["shapes", "shapes-copy"]
    copy = models[1]
    sha = hashlib.sha256((folders / "models" / "shapes-copy.safetensors").read_bytes()).hexdigest()
    assert copy["sha256"] == sha and copy["hash"] == sha[:10]
    assert copy["title"] == f"shapes-copy.safetensors [{sha[:10]}]"
    assert set(copy) == {"title", "model_name", "hash", "sha256", "filename", "config"}

    assert client.get(f"{API}/options").body["sd_model_checkpoint"] == "shapes"
    assert client.get(f"{API}/scripts").body == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    loras = client.get(f"{API}/loras").body
    assert loras == [{"name": "ink", "alias": "inky", "path": str(folders / "loras" / "ink.safetensors"),
                      "metadata": {"ss_output_name": "inky"}}]
    embeddings = client.get(f"{API}/embeddings").body
    assert embeddings["loaded"]["glowy"]["vectors"] == 2 and embeddings["loaded"]["glowy"]["shape"] == 128
    assert "notes" in embeddings["skipped"]
    assert [u["name"] for u in client.get(f"{API}/upscalers").body] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in client.get(f"{API}/latent-upscale-modes").body] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]
    assert all(client.get(f"{API}/{path}").body == [] for path in ("sd-vae", "prompt-styles", "script-info",
                                                                   "realesrgan-models"))
    memory = client.get(f"{API}/memory").body
    assert memory["ram"]["used"] > 0 and "cuda" in memory
    for path in ("refresh-checkpoints", "refresh-loras"):
        assert client.post(f"{API}/{path}").status == 200
    assert len(client.get(f"{API}/sd-models").body) == 2
    idle = client.get(f"{API}/progress").body
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    assert client.get("/docs").status == 200 and "/sdapi/v1/txt2img" in client.get("/openapi.json").body["paths"]


def test_txt2img_response_and_png_info(client):
    body = txt2img(client, prompt="a small blue star", negative_prompt="red", seed=100, batch_size=2, n_iter=2,
                   some_unknown_field={"ignored": True})
    info = json.loads(body["info"])
    for key in ("prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "all_subseeds", "width",
                "height", "sampler_name", "cfg_scale", "steps", "batch_size", "sd_model_name", "sd_model_hash",
                "denoising_strength", "clip_skip", "infotexts", "job_timestamp", "version"):
        assert key in info, key
    assert info["all_seeds"] == [100, 101, 102, 103] and info["all_prompts"] == ["a small blue star"] * 4
    assert (info["width"], info["height"], info["cfg_scale"], info["sampler_name"]) == (64, 64, 4.0, "Euler")
    assert body["parameters"]["n_iter"] == 2 and body["parameters"]["seed"] == 100
    assert len(body["images"]) == 4 and not body["images"][0].startswith("data:")
    for image_text, infotext in zip(body["images"], info["infotexts"], strict=True):
        assert decode_image(image_text).info["parameters"] == infotext

    read = client.post(f"{API}/png-info", {"image": "data:image/png;base64," + body["images"][3]}).body
    assert read["info"] == info["infotexts"][3]
    assert read["parameters"]["Prompt"] == "a small blue star" and read["parameters"]["Negative prompt"] == "red"
    assert (read["parameters"]["Seed"], read["parameters"]["Size-1"], read["parameters"]["Steps"]) == ("103", "64", "4")


def test_hires_fix(client):
    body = txt2img(client, steps=2, seed=5, enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.6)
    info = json.loads(body["info"])
    assert decode_image(body["images"][0]).size == (128, 128) and info["denoising_strength"] == 0.6
    assert "Hires upscale: 2" in info["infotexts"][0] and "Denoising strength: 0.6" in info["infotexts"][0]
    plain = txt2img(client, steps=2, seed=5, hr_scale=2)  # hires settings with the fix off: ignored, as A1111 does
    assert decode_image(plain["images"][0]).size == (64, 64)


def test_same_image_as_generate_and_python(client, tmp_path):
    settings = dict(prompt="a large green circle in the middle", seed=7, steps=6, sampler_name="DPM++ 2M", cfg_scale=4)
    served = np.asarray(decode_image(txt2img(client, **settings)["images"][0]))
    assert cli_main(["generate", settings["prompt"], "--seed", "7", "--steps", "6", "--sampler", "DPM++ 2M",
                     "--cfg", "4", "--out", str(tmp_path / "cli.png"), "--quiet"]) == 0
    assert np.array_equal(served, np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))
    python = sdtorch.load()(**settings)[0]
    assert np.array_equal(served, np.asarray(python))


def _picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (40, 60, 200))
    ImageDraw.Draw(image).rectangle((8, 8, 28, 28), fill=(230, 30, 30))
    return image


def test_img2img_data_uri_raw_base64_and_inpainting(client):
    raw = png_base64(_picture())
    common = {**FAST, "prompt": "a red square", "seed": 3, "denoising_strength": 0.5}
    plain = client.post(f"{API}/img2img", {**common, "init_images": [raw]})
    uri = client.post(f"{API}/img2img", {**common, "init_images": ["data:image/png;base64," + raw]})
    assert plain.status == uri.status == 200, plain.body
    assert plain.body["images"] == uri.body["images"]
    assert plain.body["parameters"]["init_images"] is None  # not echoed unless include_init_images
    assert "Denoising strength: 0.5" in json.loads(plain.body["info"])["infotexts"][0]

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # repaint the left half
    painted = client.post(f"{API}/img2img", {**common, "init_images": [raw], "mask": png_base64(mask), "mask_blur": 0,
                                             "inpainting_fill": 1, "denoising_strength": 1.0})
    assert painted.status == 200, painted.body
    result = np.asarray(decode_image(painted.body["images"][0]).convert("RGB")).astype(int)
    original = np.asarray(_picture()).astype(int)
    assert np.array_equal(result[:, 40:], original[:, 40:])  # outside the mask: untouched
    assert np.abs(result[:, :24] - original[:, :24]).mean() > 1  # inside: repainted

    for bad in ("not base64!", "data:image/png;base64,@@@@", base64.b64encode(b"not an image").decode()):
        answer = client.post(f"{API}/img2img", {**common, "init_images": [bad]})
        assert answer.status == 422 and "init" in answer.body["detail"], answer.body
    assert client.post(f"{API}/img2img", {**common}).status == 422  # init_images is required


def test_sampler_index_legacy_and_unknown_sampler(client):
    legacy = json.loads(client.post(f"{API}/txt2img", {"steps": 3, "sampler_index": "DDIM"}).body["info"])
    assert legacy["sampler_name"] == "DDIM"
    both = json.loads(client.post(f"{API}/txt2img", {"steps": 3, "sampler_name": "Euler a",
                                                     "sampler_index": "DDIM"}).body["info"])
    assert both["sampler_name"] == "Euler a"
    for field in ("sampler_name", "sampler_index"):
        answer = client.post(f"{API}/txt2img", {"steps": 3, field: "Eulerish"})
        assert answer.status == 400 and answer.body["detail"].startswith("Sampler not found: 'Eulerish'")
        assert set(answer.body) == {"error", "detail", "body", "errors"}


@pytest.mark.parametrize("payload, words", [
    ({"steps": 1000}, "max_steps"),
    ({"width": 4096}, "max_width"),
    ({"batch_size": 100}, "max_batch"),
    ({"batch_size": 8, "n_iter": 10}, "max_batch"),
    ({"width": -64}, "width"),
    ({"height": 60}, "multiple of 8"),
    ({"cfg_scale": "NaN"}, "finite"),
    ({"seed": 2**40}, "seed"),
    ({"steps": "many"}, "steps"),
    ({"prompt": 5}, "prompt"),
    ({"n_iter": 0}, "n_iter"),
    ({"resize_mode": 3}, "resize_mode"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "clip_skip"),
    ({"script_name": "x/y/z plot", "script_args": [1, "Seed", "1,2"]}, "Script not found: 'x/y/z plot'"),
])
def test_bad_values_are_422_naming_the_problem(client, payload, words):
    path = "img2img" if "resize_mode" in payload else "txt2img"
    extra = {"init_images": [png_base64(_picture())]} if path == "img2img" else {}
    answer = client.post(f"{API}/{path}", {**FAST, **extra, **payload})
    assert answer.status == 422, answer.body
    assert words in answer.body["detail"] and set(answer.body) == {"error", "detail", "body", "errors"}


def test_malformed_bodies(client):
    broken = client.post(f"{API}/txt2img", raw=b'{"prompt": "x",')
    assert broken.status == 422 and "JSON" in broken.body["detail"]
    assert client.post(f"{API}/txt2img", raw=b"[1, 2]").status == 422
    assert client.post(f"{API}/png-info", {"image": "!!"}).status == 422
    assert client.post(f"{API}/png-info", {"image": base64.b64encode(b"text").decode()}).status == 422
    assert client.get(f"{API}/nothing-here").status == 404
    assert client.get(f"{API}/samplers").status == 200  # and the server lives on


def test_names_never_reach_the_file_system(client, folders):
    model_file = str(folders / "models" / "shapes-copy.safetensors")
    for name in ("../../../etc/passwd", "/etc/passwd", model_file, "org/some-hub-model"):
        answer = client.post(f"{API}/txt2img", {**FAST, "override_settings": {"sd_model_checkpoint": name}})
        assert answer.status == 400 and "Model not found" in answer.body["detail"], answer.body
        assert client.post(f"{API}/options", {"sd_model_checkpoint": name}).status == 400
        answer = client.post(f"{API}/txt2img", {**FAST, "refiner_checkpoint": name})
        assert answer.status == 400 and "Model not found" in answer.body["detail"], answer.body
    answer = client.post(f"{API}/txt2img", {**FAST, "prompt": "a star <lora:../../etc/passwd:1>"})
    assert answer.status == 422 and "is not in" in answer.body["detail"]
    assert client.get(f"{API}/options").body["sd_model_checkpoint"] == "shapes"


def test_options_switch_models_and_override_settings(client):
    copy = client.get(f"{API}/sd-models").body[1]
    try:
        assert client.post(f"{API}/options", {"sd_model_checkpoint": copy["model_name"]}).status == 200
        assert client.get(f"{API}/options").body["sd_model_checkpoint"] == copy["title"]
        info = json.loads(txt2img(client, seed=1)["info"])
        assert info["sd_model_hash"] == copy["hash"] and f"Model hash: {copy['hash']}" in info["infotexts"][0]
    finally:
        assert client.post(f"{API}/options", {"sd_model_checkpoint": "shapes"}).status == 200
    once = json.loads(txt2img(client, seed=1, override_settings={"sd_model_checkpoint": copy["title"],
                                                                 "CLIP_stop_at_last_layers": 2})["info"])
    assert once["sd_model_hash"] == copy["hash"] and once["clip_skip"] == 2 and "Clip skip: 2" in once["infotexts"][0]
    options = client.get(f"{API}/options").body
    assert (options["sd_model_checkpoint"], options["CLIP_stop_at_last_layers"]) == ("shapes", 1)  # restored
    assert json.loads(txt2img(client, seed=1)["info"])["sd_model_hash"] is None


def test_save_images_without_sending_them(client, folders):
    body = txt2img(client, seed=4242, save_images=True, send_images=False)
    assert body["images"] == []
    saved = sorted((folders / "outputs" / "txt2img-images").glob("*-4242.png"))
    assert len(saved) == 1 and read_infotext(saved[0]) == json.loads(body["info"])["infotexts"][0]


def test_progress_preview_and_interrupt(client):
    thread, out = in_background(client, f"{API}/txt2img", {"prompt": "a circle", "steps": 30, "n_iter": 3,
                                                            "seed": 50, "force_task_id": "long-one"})
    def ours(p: dict) -> bool:  # this job, not one an earlier test left running
        return p["queue"]["current"] == "long-one"

    first = wait_for(client, lambda p: ours(p) and p["state"]["sampling_step"] >= 2)
    later = wait_for(client, lambda p: ours(p) and p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 2)
    assert later["progress"] > first["progress"] > 0 and later["eta_relative"] > 0
    assert later["queue"]["current"] == "long-one" and later["state"]["job_count"] == 3
    assert decode_image(later["current_image"]).size == (64, 64)
    assert client.post(f"{API}/interrupt").body == {}
    thread.join(60)
    answer = out["answer"]
    assert answer.status == 200, answer.body
    info = json.loads(answer.body["info"])
    assert info["all_seeds"] == [50] and len(answer.body["images"]) == 1  # the iteration finished before it
    assert info["interrupted"] is True
    assert txt2img(client, seed=1)["images"]  # the next job runs as usual


def test_latent_preview(one_thread):
    pipe = sdtorch.load()
    preview = LatentPreview(pipe.vae, pipe.vae_scale_factor)
    latents = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # small latents: the VAE's own picture
        decoded = tensor_to_images(pipe.vae.decode(latents[None] / pipe.vae.scaling_factor))[0]
    assert np.array_equal(np.asarray(preview.image(latents)), np.asarray(decoded))
    large = preview.image(torch.randn(4, 32, 24))  # large: the fitted linear map, at the image's size
    assert large.size == (192, 256) and large.mode == "RGB"


def test_skip_moves_to_the_next_iteration(client):
    thread, out = in_background(client, f"{API}/txt2img", {"prompt": "a cross", "steps": 20, "n_iter": 3, "seed": 70})
    wait_for(client, lambda p: p["state"]["job_count"] == 3 and p["state"]["sampling_step"] >= 1)
    client.post(f"{API}/skip")
    thread.join(60)
    info = json.loads(out["answer"].body["info"])
    assert info["all_seeds"] == [71, 72] and info["interrupted"] is False


def test_client_that_disconnects_harms_nothing(client):
    host, port = client.base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "gone", "steps": 20, "seed": 9}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(client, lambda p: p["state"]["sampling_step"] >= 1)
    assert txt2img(client, seed=2)["images"]  # queued behind the orphaned job, answered all the same


def test_serve_command(tmp_path):
    """`sdtorch serve` itself, in its own process: flags reach the server (auth, limits, the output folder)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "sdtorch", "serve", "--port", str(port), "--api-auth", "ann:pw",
               "--limit", "max_steps=5", "--out", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        client = Client(f"http://127.0.0.1:{port}", auth=("ann", "pw"))
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if client.get(f"{API}/samplers").status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "sdtorch serve did not start"
                time.sleep(0.2)
        over = client.post(f"{API}/txt2img", {**FAST, "steps": 6})
        assert over.status == 422 and "max_steps=5" in over.body["detail"]
        saved = client.post(f"{API}/txt2img", {**FAST, "seed": 3, "save_images": True})
        assert saved.status == 200 and (tmp_path / "txt2img-images" / "00000-3.png").is_file()
        assert Client(client.base).get(f"{API}/samplers").status == 401
    finally:
        server.terminate()
        server.wait(30)


def test_basic_auth(one_thread):
    with running_server(ServerConfig(api_auth=(("ann", "s3cret"),))) as anonymous:
        for path in (f"{API}/samplers", f"{API}/options", "/", "/docs"):
            answer = anonymous.get(path)
            assert answer.status == 401 and answer.headers["www-authenticate"].startswith("Basic")
        wrong = Client(anonymous.base, auth=("ann", "guess"))
        assert wrong.get(f"{API}/samplers").status == 401
        assert wrong.post(f"{API}/txt2img", FAST).status == 401
        right = Client(anonymous.base, auth=("ann", "s3cret"))
        assert right.get(f"{API}/samplers").status == 200
        assert right.post(f"{API}/txt2img", FAST).status == 200


def test_extras_upscale_single_and_batch(client):
    source = txt2img(client, prompt="a red circle", seed=7)["images"][0]
    parameters, source_pixels = decode_image(source).info["parameters"], np.asarray(decode_image(source))
    answer = client.post(f"{API}/extra-single-image", {
        "image": source, "upscaler_1": "Nearest", "upscaling_resize": 2, "gfpgan_visibility": 0,
        "codeformer_weight": 0.5, "upscale_first": True, "some_unknown_field": 1})
    assert answer.status == 200, answer.body
    out = decode_image(answer.body["image"])
    assert np.array_equal(np.asarray(out), source_pixels.repeat(2, 0).repeat(2, 1))  # Nearest 2x: 2x2 blocks
    said = "Postprocess upscale by: 2, Postprocess upscaler: Nearest"
    assert out.info["parameters"] == parameters and out.info["postprocessing"] == said
    assert answer.body["html_info"] == f"<p>{said}</p>"
    read = client.post(f"{API}/png-info", {"image": answer.body["image"]}).body
    assert read["info"] == parameters and read["items"]["postprocessing"] == said

    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 128))
    batch = client.post(f"{API}/extra-batch-images", {
        "imageList": [{"data": png_base64(rgba), "name": "half-red.png"},
                      {"data": "data:image/png;base64," + source, "name": "circle.png"}],
        "resize_mode": 1, "upscaling_resize_w": 32, "upscaling_resize_h": 32, "upscaling_crop": False,
        "upscaler_1": "Lanczos"})
    assert batch.status == 200, batch.body
    first, second = (decode_image(text) for text in batch.body["images"])
    assert first.size == (64, 32) and first.mode == "RGBA" and first.getpixel((5, 5)) == (255, 0, 0, 128)
    assert second.size == (32, 32) and second.info["parameters"] == parameters and "parameters" not in first.info
    assert batch.body["html_info"] == "<p>Postprocess upscale to: 32x32, Postprocess upscaler: Lanczos</p>"


@pytest.mark.parametrize("payload, words", [
    ({"upscaler_1": "R-ESRGAN 4x+"}, ["upscaler_1", "'Nearest'"]),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 1}, ["gfpgan_visibility", "face restoration"]),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 200}, ["upscaling_resize"]),
    ({"upscaler_1": "Lanczos", "imageList": [{"data": "bm90IGFuIGltYWdl", "name": "notes.txt"}]},
     ["imageList[1] ('notes.txt')"]),
])
def test_extras_refusals_name_the_problem(client, payload, words):
    image = {"data": png_base64(Image.new("RGB", (8, 8))), "name": "black.png"}
    answer = client.post(f"{API}/extra-batch-images", {"imageList": [image], **payload} if "imageList" not in payload
                         else {**payload, "imageList": [image, *payload["imageList"]]})
    assert answer.status == 422 and all(word in answer.body["detail"] for word in words), answer.body


def test_unknown_endpoints_and_what_sdtorch_lacks(client, folders):
    assert client.post(f"{API}/no-such-endpoint", {}).status == 404
    assert client.get(f"{API}/txt2img").status == 405  # a known endpoint, the wrong method
    answer = client.post(f"{API}/interrogate", {"image": png_base64(Image.new("RGB", (8, 8))), "model": "clip"})
    assert answer.status == 404 and "interrogate" in answer.body["detail"]
    flags = client.get(f"{API}/cmd-flags").body
    assert flags["lora_dir"] == str(folders / "loras") and flags["api"] is True
    assert not any("auth" in key for key in flags)


def test_unload_reload_and_refresh(client, folders):
    assert client.post(f"{API}/unload-checkpoint").status == 200
    assert client.get(f"{API}/embeddings").body == {"loaded": {}, "skipped": {}}  # no model in memory
    txt2img(client, prompt="a blue square", steps=2)  # the next job loads it again
    assert "glowy" in client.get(f"{API}/embeddings").body["loaded"]
    assert client.post(f"{API}/unload-checkpoint").status == 200
    assert client.post(f"{API}/reload-checkpoint").status == 200
    assert "glowy" in client.get(f"{API}/embeddings").body["loaded"]
    save_file({"emb_params": torch.randn(3, 128) * 0.01}, folders / "embeddings" / "shiny.safetensors")
    try:
        assert client.post(f"{API}/refresh-embeddings").status == 200
        loaded = client.get(f"{API}/embeddings").body["loaded"]
        assert loaded["shiny"]["vectors"] == 3 and loaded["glowy"]["vectors"] == 2
    finally:
        (folders / "embeddings" / "shiny.safetensors").unlink()
        client.post(f"{API}/refresh-embeddings")
    assert "shiny" not in client.get(f"{API}/embeddings").body["loaded"]
    assert client.post(f"{API}/refresh-vae").status == 200 and client.get(f"{API}/sd-modules").body == []


def test_variation_seed_over_the_api(client):
    body = txt2img(client, prompt="a red circle", seed=3, subseed=7, subseed_strength=0.4, batch_size=2,
                   seed_resize_from_w=-1, seed_resize_from_h=-1)
    info = json.loads(body["info"])
    assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (7, [7, 8], 0.4)
    assert "Variation seed: 8, Variation seed strength: 0.4" in info["infotexts"][1]
    again = txt2img(client, prompt="a red circle", seed=4, subseed=8, subseed_strength=0.4)
    assert again["images"][0] == body["images"][1]  # image i is its seed and variation seed alone


def test_ensd_as_an_option(client):
    kw = dict(prompt="a green star", seed=9, sampler_name="Euler a")
    plain = txt2img(client, **kw)["images"][0]
    with_delta = txt2img(client, override_settings={"eta_noise_seed_delta": 31337}, **kw)
    assert with_delta["images"][0] != plain and "ENSD: 31337" in json.loads(with_delta["info"])["infotexts"][0]
    assert client.post(f"{API}/options", {"eta_noise_seed_delta": -5}).status == 422
    assert client.post(f"{API}/options", {"eta_noise_seed_delta": 31337}).status == 200
    try:
        assert txt2img(client, **kw)["images"][0] == with_delta["images"][0]
    finally:
        client.post(f"{API}/options", {"eta_noise_seed_delta": 0})
    assert client.get(f"{API}/options").body["eta_noise_seed_delta"] == 0


def test_features_sdtorch_lacks_run_without_them_and_say_so(client):
    body = txt2img(client, prompt="a red star", restore_faces=True, tiling=False, enable_hr=True, hr_scale=1.5,
                   hr_second_pass_steps=2, hr_sampler_name="Use same sampler", hr_scheduler="Use same scheduler",
                   hr_checkpoint_name="other.safetensors")
    warnings = json.loads(body["info"])["warnings"]
    assert any(w.startswith("restore_faces") for w in warnings)
    assert any(w.startswith("hr_checkpoint_name") for w in warnings)
    assert "Hires sampler" not in json.loads(body["info"])["infotexts"][0]  # "Use same sampler": none of its own
    quiet = txt2img(client, prompt="a red star", restore_faces=False, hr_checkpoint_name="x")  # the fix is off
    assert json.loads(quiet["info"])["warnings"] == []
