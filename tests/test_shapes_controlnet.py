"""The shipped ControlNet of the built-in model (assets/shapes-controlnet, trained by scripts/shapes_controlnet.py on
canny edge maps of the shapes world's renders): given a render's edge map and a prompt naming only the colour, the
judge finds the shape at the edge map's position and size, where the plain model puts it anywhere."""

import random

import pytest

import sdtorch
from sdtorch.checkpoints.loading import SHAPES_CONTROLNET
from sdtorch.data import shapes
from sdtorch.evaluation.judge import load_judge
from sdtorch.preprocessors import preprocess
from sdtorch.request import ControlNetUnit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shipped_controlnet_draws_at_the_edge_maps_position_and_size():
    pipe, judge = sdtorch.load(), load_judge()
    rng = random.Random("test-shapes-controlnet")
    pairs = [shapes.sample_attributes(rng, "all") for _ in range(8)]
    guided, plain = [], []
    for seed, attrs in enumerate(pairs):
        edges = preprocess("canny", shapes.render(attrs), resolution=64)
        prompt = f"a {attrs.colour} shape"
        guided += pipe(prompt, seed=seed, steps=20, controlnet=[ControlNetUnit(image=edges, model=SHAPES_CONTROLNET)])
        plain += pipe(prompt, seed=seed, steps=20)
    hits = {name: [sum(p[attr] == getattr(a, attr) for p, a in zip(judge.predict(images), pairs))
                   for attr in ("position", "size")] for name, images in (("guided", guided), ("plain", plain))}
    assert hits["guided"][0] >= 7 and hits["guided"][1] >= 7, hits
    assert hits["guided"][0] > hits["plain"][0] + 3, hits
