"""The attribute judge: accuracy of the shipped weights on renders it never saw, scoring arithmetic, file round trip."""

import json
import random

import numpy as np
import pytest
import torch

from sdtorch.checkpoints.io import write_safetensors
from sdtorch.data import shapes
from sdtorch.errors import CheckpointError, InvalidInputError
from sdtorch.evaluation.judge import (
    ATTRIBUTES,
    HEXAGON,
    LABELS,
    AttributeJudge,
    augment,
    load_judge,
    read_judge,
    render_accuracy,
    save_judge,
    score,
    score_predictions,
    train_judge,
)


def test_shipped_judge_reads_fresh_renders(one_thread):
    """The issue's bar: >= 99% per attribute on renders from a seed training never used, held-out pairs and
    hexagons included (and still >= 97% under the augmentation that mimics imperfect generations)."""
    judge = load_judge()
    results = render_accuracy(judge, count=1200, seed=20250)
    assert results["held_out"]["n"] >= 60 and results["hexagon"]["n"] >= 100
    for subset, result in results.items():
        for name in ATTRIBUTES:
            assert result["accuracy"][name] >= 0.99, (subset, name, result["accuracy"])
    augmented = render_accuracy(judge, count=600, seed=777, augmented=True)["all"]
    assert min(augmented["accuracy"].values()) >= 0.97, augmented["accuracy"]


class _FixedJudge:
    """Stands in for a judge: returns predictions chosen by hand."""

    def __init__(self, predictions):
        self.predictions = predictions

    def predict(self, images):
        assert len(images) == len(self.predictions)
        return self.predictions


def test_score_counts_only_the_attributes_a_prompt_names():
    def p(shape, colour, size, position):
        return dict(shape=shape, colour=colour, size=size, position=position)

    predictions = [
        p("circle", "red", "small", "top left"),  # all four asked, all right
        p("square", "blue", "large", "center"),  # shape wrong
        p("star", "green", "small", "left"),  # only colour asked (right); background ignored
        p("hexagon", "white", "large", "bottom"),  # shape + position asked, position wrong
        p("cross", "black", "small", "right"),  # nothing the judge reads was asked: counts as right
    ]
    intended = [
        dict(shape="circle", colour="red", size="small", position="top left"),
        dict(shape="triangle", colour="blue", size="large", position="center"),
        dict(colour="green", background="gray"),
        dict(shape="hexagon", position="bottom right"),
        dict(background="white"),
    ]
    result = score(_FixedJudge(predictions), [None] * 5, intended)
    assert result["n"] == 5
    assert result["counts"] == {"shape": 3, "colour": 3, "size": 2, "position": 3}
    assert result["accuracy"] == {"shape": 2 / 3, "colour": 1.0, "size": 1.0, "position": 2 / 3}
    assert result["all_correct"] == 3 / 5
    assert score_predictions([], [])["accuracy"]["shape"] is None
    with pytest.raises(InvalidInputError, match="no shape 'blob'"):
        score_predictions(predictions[:1], [dict(shape="blob")])
    with pytest.raises(InvalidInputError, match="2 images but 1"):
        score_predictions(predictions[:2], intended[:1])


def test_save_and_read_round_trip(tmp_path, one_thread):
    judge = AttributeJudge().eval()
    path = tmp_path / "judge.safetensors"
    save_judge(judge, path)
    loaded = read_judge(path)
    assert loaded.state_dict().keys() == judge.state_dict().keys()
    for name, value in judge.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    assert loaded.predict(images) == judge.predict(images)

    write_safetensors(judge.state_dict(), path, metadata={"labels": json.dumps({"shape": ["circle"]})})
    with pytest.raises(CheckpointError, match="re-train"):
        read_judge(path)


def test_predict_takes_tensors_or_pil_images(one_thread):
    judge = load_judge()
    rng = random.Random(5)
    attrs = [shapes.sample_attributes(rng, split="all") for _ in range(6)]
    images = [shapes.render(a) for a in attrs]
    pixels = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in images])  # (B, 64, 64, 3)
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, 64, 64)
    from_pil, from_tensor = judge.predict(images), judge.predict(tensor)
    assert from_pil == from_tensor
    assert from_pil == [{name: getattr(a, name) for name in ATTRIBUTES} for a in attrs]
    upscaled = [im.resize((128, 128)) for im in images]  # other sizes are resized to 64x64
    assert judge.predict(upscaled) == from_pil
    with pytest.raises(InvalidInputError, match=r"\(B, 3, H, W\)"):
        judge.predict(tensor[:, :1])


def test_hexagon_render_and_labels():
    assert LABELS["shape"] == (*shapes.SHAPES, HEXAGON) and HEXAGON not in shapes.SHAPES
    attrs = shapes.Attributes("circle", "red", "large", "center", next(iter(shapes.BACKGROUNDS)))
    circle = np.asarray(shapes.render(attrs), dtype=np.int16)
    hexagon = np.asarray(shapes.render(attrs, shape="hexagon"), dtype=np.int16)
    assert hexagon.shape == circle.shape == (64, 64, 3)
    assert (hexagon[0, 0] == circle[0, 0]).all()  # same background
    assert np.abs(hexagon - circle).max() > 100  # yet a different outline
    assert (np.abs(hexagon - np.array(shapes.COLOURS["red"])).sum(-1) == 0).sum() > 300  # a solid red body
    judged = load_judge().predict([shapes.render(attrs, shape="hexagon")])[0]
    assert judged == dict(shape=HEXAGON, colour="red", size="large", position="center")


def test_training_and_augmentation_are_deterministic(one_thread):
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    a, b = augment(images, torch.Generator().manual_seed(1)), augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.abs().max() <= 1 and not torch.equal(a, images)
    first, second = train_judge(steps=2, seed=3, batch_size=4), train_judge(steps=2, seed=3, batch_size=4)
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
