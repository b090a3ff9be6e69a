"""Fuzzing the txt2img and img2img payloads (Hypothesis): whatever a client sends, the answer is 200 or a 4xx in
A1111's error shape, never a 500, and the server lives on. Payloads start from a valid one and get fields
replaced by values of any JSON type (or dropped, or added), so both the refusals and the generation paths run;
tight limits keep every generation that passes at 64 px and 2 steps."""

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving import png_base64, running_server

from sdtorch.request import Limits
from sdtorch.server.schemas import Img2ImgRequest, Txt2ImgRequest
from sdtorch.server.service import ServerConfig

CASES = {"txt2img": 80, "img2img": 50}
ran = {"txt2img": 0, "img2img": 0}
LIMITS = Limits(max_width=64, max_height=64, max_pixels=2 * 64 * 64, max_steps=2, max_batch=2, max_hr_scale=1.0)
VALID = {"prompt": "a red circle", "steps": 2, "seed": 1, "width": 64, "height": 64, "sampler_name": "Euler"}
PICTURE = png_base64(Image.new("RGB", (32, 32), (200, 30, 30)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
plausible = {  # values near what clients send, so that many payloads get past validation
    "steps": st.integers(-1, 4), "width": st.sampled_from([0, 8, 32, 64, 72, -8]),
    "height": st.sampled_from([8, 32, 64, 65]), "batch_size": st.integers(0, 3), "n_iter": st.integers(0, 3),
    "cfg_scale": st.floats(-1, 20) | st.just(float("nan")), "seed": st.integers(-2, 2**33),
    "sampler_name": st.sampled_from(["Euler a", "DDIM", "dpmpp_2m", "DPM++ 2M Karras", "nope", ""]),
    "scheduler": st.sampled_from(["Karras", "automatic", "Beta", None]),
    "prompt": st.text(max_size=40) | st.sampled_from(["(red:1.3) [star]", "a <lora:x:1>", "AND", "[a|b]", "x BREAK y"]),
    "enable_hr": st.booleans(), "hr_scale": st.floats(0, 2), "denoising_strength": st.floats(-0.5, 1.5),
    "resize_mode": st.integers(-1, 4), "mask_blur": st.integers(-1, 80), "inpaint_full_res": st.booleans(),
    "init_images": st.sampled_from([[PICTURE], [], ["@@"], [base64.b64encode(b"text").decode()], [PICTURE, PICTURE]]),
    "mask": st.sampled_from([None, PICTURE, "data:image/png;base64," + PICTURE, "%%"]),
    "override_settings": st.sampled_from([{}, {"CLIP_stop_at_last_layers": 2}, {"CLIP_stop_at_last_layers": 9},
                                         {"sd_model_checkpoint": "../x"}, {"sd_model_checkpoint": "shapes"}]),
}


def payloads(kind: str) -> st.SearchStrategy[dict]:
    model = Txt2ImgRequest if kind == "txt2img" else Img2ImgRequest
    base = {**VALID, **({"init_images": [PICTURE]} if kind == "img2img" else {})}
    names = sorted(model.model_fields) + ["unknown_field"]
    change = st.sampled_from(names).flatmap(lambda name: st.tuples(
        st.just(name), plausible.get(name, json_values) | json_values | st.just(...)))  # ...: drop the field

    def apply(changes: list) -> dict:
        body = dict(base)
        for name, value in changes:
            if value is ...:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    return st.lists(change, max_size=4).map(apply)


@pytest.fixture(scope="module")
def client(one_thread):
    with running_server(ServerConfig(limits=LIMITS)) as client:
        yield client


@pytest.mark.parametrize("kind", list(CASES))
def test_fuzzed_payloads_never_break_the_server(client, kind):
    statuses: dict[int, int] = {}

    @settings(max_examples=CASES[kind], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=payloads(kind))
    def check(body):
        answer = client.post(f"/sdapi/v1/{kind}", body)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        assert answer.status in (200, 400, 422), (body, answer.body)
        if answer.status != 200:
            assert set(answer.body) == {"error", "detail", "body", "errors"} and answer.body["detail"]
        ran[kind] += 1

    check()
    print(f"\n{kind}: {ran[kind]} fuzzed payloads, answers {dict(sorted(statuses.items()))}")
    assert ran[kind] == CASES[kind] and statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0
    assert client.get("/sdapi/v1/samplers").status == 200
