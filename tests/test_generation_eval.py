"""`sdtorch eval`'s prompts, scoring and report, with stand-in "models" whose answers are known."""

import pytest

from sdtorch.data.shapes import HELD_OUT_PAIRS, Attributes, allowed_backgrounds, render
from sdtorch.errors import InvalidInputError
from sdtorch.evaluation.generation import eval_prompts, evaluate, format_report, generate_and_score
from sdtorch.evaluation.judge import load_judge

pytestmark = pytest.mark.usefixtures("one_thread")


class Painter:
    """A stand-in pipeline that renders what each prompt names (with `recolour` it paints the wrong colour)."""

    def __init__(self, prompts, recolour=None):
        self.intended = {p.text: p.intended for p in prompts}
        self.recolour = recolour
        self.calls = []

    def __call__(self, texts, **kwargs):
        self.calls.append(kwargs)
        images = []
        for text in texts:
            wanted = dict(self.intended[text])
            if self.recolour:
                wanted["colour"] = self.recolour(wanted["colour"])
            attrs = Attributes(shape=wanted["shape"], colour=wanted["colour"], size=wanted["size"],
                               position=wanted["position"], background=allowed_backgrounds(wanted["colour"])[0])
            images.append(render(attrs))
        return images


def test_eval_prompts_are_seeded_and_split():
    prompts = eval_prompts(20, 6, seed=3)
    assert prompts == eval_prompts(20, 6, seed=3) and prompts != eval_prompts(20, 6, seed=4)
    assert [p.held_out for p in prompts] == [False] * 20 + [True] * 6
    for p in prompts:
        assert set(p.intended) >= {"shape", "colour", "size", "position"}
        assert ((p.intended["shape"], p.intended["colour"]) in HELD_OUT_PAIRS) == p.held_out
    with pytest.raises(InvalidInputError):
        eval_prompts(0, 0)


def test_a_perfect_painter_scores_everything_and_a_wrong_colour_scores_none():
    prompts = eval_prompts(12, 4, seed=0)
    judge = load_judge()
    perfect = generate_and_score(Painter(prompts), prompts, judge, batch_size=5)
    assert perfect["all"]["all_correct"] == 1.0 and perfect["held_out"]["n"] == 4 and perfect["held_in"]["n"] == 12
    assert set(perfect["all"]["accuracy"].values()) == {1.0}

    swap = {"black": "white", "white": "black"}
    painter = Painter(prompts, recolour=lambda c: swap.get(c, "black"))
    wrong = generate_and_score(painter, prompts, judge, seed=7, batch_size=5, guidance_scale=3.0)
    assert wrong["all"]["accuracy"]["colour"] == 0.0 and wrong["all"]["all_correct"] == 0.0
    assert wrong["all"]["accuracy"]["shape"] >= 0.9  # the other attributes are still drawn as asked
    assert [c["seed"] for c in painter.calls] == [7, 12, 17, 22] and painter.calls[0]["cfg_scale"] == 3.0


def test_evaluate_compares_guidance_and_formats_a_table():
    prompts = eval_prompts(6, 2, seed=0)
    painter = Painter(prompts)
    report = evaluate(painter, 6, 2, guidance_scale=5.0)
    assert [c["cfg_scale"] for c in painter.calls] == [5.0, 1.0]
    assert report["guided"]["all"]["all_correct"] == report["unguided"]["all"]["all_correct"] == 1.0
    table = format_report(report)
    assert "CFG 5" in table and "CFG 1 (off)" in table and "held-out all correct" in table
    assert table.count("100.0%") == 14  # 7 rows x 2 runs
    single = evaluate(painter, 6, 0, compare_guidance=False)
    assert single["unguided"] is None and "CFG 1" not in format_report(single)
    assert format_report(single).splitlines()[-1].split() == ["held-out", "all", "correct", "-"]  # no such prompts
