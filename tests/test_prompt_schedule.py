"""Prompt editing, alternation and AND against AUTOMATIC1111, and their effect on sampling.

Every expected schedule and split below is what A1111's own `modules/prompt_parser.py` (lark 1.1.2, the
version it pins) returned for the input, under several hash seeds (its Earley parser breaks some ties
between readings by hash order; inputs where that changes the answer are tested apart).
"""

import pytest
import torch
from conftest import assert_parity

import sdtorch.generation
from sdtorch.configs import TINY_SD1
from sdtorch.errors import InvalidInputError
from sdtorch.models.clip import CLIPTextEncoder
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.prompt_schedule import encode_conditioning, prompt_schedule, split_and
from sdtorch.prompts import encode_prompts
from sdtorch.sampling.denoiser import Conditioning, Denoiser, ScheduledContext, pad_to_match
from sdtorch.sampling.samplers import resolve, sample
from sdtorch.sampling.schedules import DiscreteSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

# (prompt, steps, hires_steps, A1111's schedule)
A1111_SCHEDULES = [
    # A1111's docstring examples
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", 10, None, [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 6, None, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)"), (5, "a"), (6, "(b:1.1)")]),
    ("[fe|]male", 4, None, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 6, None, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female"), (6, "male")]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    # A1111's wiki examples
    ("a [fantasy:cyberpunk:16] landscape", 20, None, [(16, "a fantasy landscape"), (20, "a cyberpunk landscape")]),
    ("a [to:10]", 20, None, [(10, "a "), (20, "a to")]),
    ("a [from::10]", 20, None, [(10, "a from"), (20, "a ")]),
    (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]", 100, None,
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    # `when`: a "." makes a fraction, an integer is a step; truncated, capped at the steps; < 1 never shows `from`
    ("[a:b:0.25]", 20, None, [(5, "a"), (20, "b")]),
    ("[a:b:0.29]", 100, None, [(28, "a"), (100, "b")]),  # 0.29 * 100 = 28.999...
    ("[a:b:1]", 10, None, [(1, "a"), (10, "b")]),
    ("[a:b:1.0]", 10, None, [(10, "a")]),
    ("[a:b:1.]", 10, None, [(10, "a")]),
    ("[a:b:30]", 10, None, [(10, "a")]),
    ("[a:b:0]", 10, None, [(10, "b")]),
    ("[a:b:-2]", 10, None, [(10, "b")]),
    ("[a:b:1e1]", 20, None, [(10, "a"), (20, "b")]),
    ("[a:b:2.5e-1]", 20, None, [(5, "a"), (20, "b")]),
    ("[a:b: 3 ]", 10, None, [(3, "a"), (10, "b")]),
    ("[a:b:\n3\n]", 10, None, [(3, "a"), (10, "b")]),
    ("[a\n:b:3]", 10, None, [(3, "a\n"), (10, "b")]),
    ("[:3]", 10, None, [(3, ""), (10, "")]),
    ("[::3]", 10, None, [(3, ""), (10, "")]),
    # not a construct: kept as text
    ("[a:b:3x]", 10, None, [(10, "[a:b:3x]")]),
    ("[a:b:3.5.1]", 10, None, [(10, "[a:b:3.5.1]")]),
    ("[a:b:\u0663]", 10, None, [(10, "[a:b:\u0663]")]),  # only ASCII digits
    ("[a:b:c:3]", 10, None, [(10, "[a:b:c:3]")]),
    ("\\[a:b:3\\]", 10, None, [(10, "\\[a:b:3\\]")]),
    (")(][:", 10, None, [(10, ")(][:")]),
    ("", 10, None, [(10, "")]),
    # escapes stay in the text; emphasis is text here
    ("[a\\]:b:3]", 10, None, [(3, "a\\]"), (10, "b")]),
    ("[a:(b:1.2):0.5]", 10, None, [(5, "a"), (10, "(b:1.2)")]),
    ("(a [b:c:2]) [d]", 10, None, [(2, "(a b) [d]"), (10, "(a c) [d]")]),
    # nesting and alternation
    ("[[a|b]|c]", 4, None, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),
    ("[a|[b:c:2]]", 4, None, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[a:b:2] AND [c|d]", 3, None, [(1, "a AND c"), (2, "a AND d"), (3, "b AND c")]),
    # unreadable by the grammar: the whole text, unscheduled
    ("a | b", 10, None, [(10, "a | b")]),
    ("a [b|c", 10, None, [(10, "a [b|c")]),
    ("trailing \\", 10, None, [(10, "trailing \\")]),
    ("a\\\nb [c:2]", 10, None, [(10, "a\\\nb [c:2]")]),
    # a hires-fix pass of 6 steps after 10: integers count on from 10, fractions from 1.0
    ("[a:b:15]", 10, 6, [(5, "a"), (6, "b")]),
    ("[a:b:1.5]", 10, 6, [(3, "a"), (6, "b")]),
    ("[a:b:5]", 10, 6, [(6, "b")]),
    ("[a:b:0.5]", 10, 6, [(6, "b")]),
]


@pytest.mark.parametrize("prompt, steps, hires_steps, expected", A1111_SCHEDULES)
def test_schedule_matches_a1111(prompt, steps, hires_steps, expected):
    assert prompt_schedule(prompt, steps, hires_steps) == expected


def test_hash_dependent_readings_keep_the_construct():
    """A1111 reads "[a:1]]" either way depending on the process's hash seed; sdtorch keeps the edit."""
    assert prompt_schedule("[a:1]]", 10) == [(1, "]"), (10, "a]")]
    assert prompt_schedule("[a:1]:", 10) == [(1, ":"), (10, "a:")]


def test_schedule_errors():
    with pytest.raises(InvalidInputError, match="out of range"):  # A1111: OverflowError
        prompt_schedule("[a:b:1e999]", 10)
    with pytest.raises(InvalidInputError):
        prompt_schedule(None, 10)


# (prompt, A1111's sub-prompts with weights)
A1111_AND = [
    ("a cat :1.2 AND a dog", [("a cat", 1.2), (" a dog", 1.0)]),
    ("a AND b :0.5", [("a", 1.0), (" b", 0.5)]),
    ("a:0.5", [("a", 0.5)]),
    ("(a:1.2)", [("(a:1.2)", 1.0)]),
    ("a :1.", [("a", 1.0)]),
    ("a : .5 ", [("a", 0.5)]),
    ("a :-1", [("a", -1.0)]),
    ("a :\u0661", [("a", 1.0)]),  # any Unicode digit
    ("a :1.2 b", [("a :1.2 b", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a ANDb", [("a ANDb", 1.0)]),
    ("aAND b", [("aAND b", 1.0)]),
    ("ANDAND AND", [("ANDAND", 1.0), ("", 1.0)]),
    ("a AND\nb :2\n", [("a", 1.0), ("\nb", 2.0)]),
    ("[a:b:3] :0.7 AND c", [("[a:b:3]", 0.7), (" c", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_AND)
def test_split_and_matches_a1111(prompt, expected):
    assert split_and(prompt) == expected


# ---- Conditioning ----------------------------------------------------------------------------------


def test_scheduled_context_follows_a1111_lookup():
    a, b, c = (torch.full((77, 4), float(v)) for v in (1, 2, 3))
    edit = ScheduledContext((4, 7, 10), (a, b, c))
    picked = [edit.at(step)[0, 0].item() for step in range(13)]
    # evaluations 0..4 use the first text (end 4 included), 5..7 the second, 8..10 the third; past the
    # last end A1111 falls back to the first
    assert picked == [1] * 5 + [2] * 3 + [3] * 3 + [1] * 2


def test_batch_padding_repeats_the_last_vector_and_sides_use_the_empty_prompt():
    short, long = torch.randn(77, 4), torch.randn(154, 4)
    padding = torch.randn(77, 4)
    cond = Conditioning(((ScheduledContext((0,), (short,)),), (ScheduledContext((0,), (long,)),)), padding)
    stacked = cond.at(0)  # (2, 154, 4)
    assert torch.equal(stacked[0, :77], short) and torch.equal(stacked[0, 77:], short[-1:].expand(77, 4))
    assert torch.equal(stacked[1], long)
    uncond = torch.randn(2, 77, 4)
    same, padded = pad_to_match(stacked, uncond, padding)
    assert same is stacked and torch.equal(padded, torch.cat([uncond, padding.expand(2, 77, 4)], dim=1))
    with pytest.raises(InvalidInputError, match="tokens"):
        pad_to_match(stacked, uncond, None)


@pytest.fixture(scope="module")
def parts(one_thread):
    """Tokenizer, text encoder and UNet of a tiny SD1 model with random weights, and its denoiser."""
    from sdtorch.models.unet import UNet

    torch.manual_seed(3)
    encoder, unet = CLIPTextEncoder(TINY_SD1.text_encoder).eval(), UNet(TINY_SD1.unet).eval()
    with torch.no_grad():  # LayerNorms off their (1, 0) init: outputs with a non-zero mean, as CLIP's
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.5 * torch.randn_like(module.bias))
    denoiser = Denoiser(unet, DiscreteSchedule(TINY_SD1.schedule), TINY_SD1.prediction_type)
    return CLIPTokenizer.default(), encoder, unet, denoiser


def test_conditioning_encodes_each_schedule_as_a1111(parts):
    tok, encoder, _, _ = parts
    with torch.no_grad():
        cond, uncond = encode_conditioning(tok, encoder, ["a [red:blue:4] cat :0.7 AND dog", "cat " * 80],
                                           ["[ugly:blurry:2]", "x AND y :2"], 10)
        texts = encode_prompts(tok, encoder, ["a red cat", "a blue cat", "dog", "x AND y :2"])
        long, empty = encode_prompts(tok, encoder, ["cat " * 80])[0], encode_prompts(tok, encoder, [""])[0]
    (edit, dog), (cats,) = cond.images
    assert (edit.ends, edit.weight, dog.ends, dog.weight, cats.ends) == ((4, 10), 0.7, (10,), 1.0, (10,))
    for ours, reference in zip([*edit.contexts, *dog.contexts, *cats.contexts], [*texts[:3], long]):
        assert_parity(ours, reference)
    (ugly,), (plain,) = uncond.images
    assert ugly.ends == (2, 10)  # the negative is scheduled too, but read whole: AND is text there
    assert (plain.ends, plain.weight) == ((10,), 1.0)
    assert_parity(plain.contexts[0], texts[3])
    assert_parity(cond.padding, empty)


def test_plain_prompts_sample_bit_identically_to_fixed_contexts(parts):
    tok, encoder, _, denoiser = parts
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(sampler="DPM++ 2M", steps=6, guidance_scale=6.0)
    with torch.no_grad():
        contexts = encode_prompts(tok, encoder, ["red circle", "blue square", "blurry", ""])
        reference = sample(denoiser, noise, context=contexts[:2], uncond_context=contexts[2:], **kw)
        cond, uncond = encode_conditioning(tok, encoder, ["red circle", "blue square"], ["blurry", ""], 6)
        ours = sample(denoiser, noise, context=cond, uncond_context=uncond, **kw)
    assert torch.equal(ours, reference)


def test_and_weights_combine_separate_unet_outputs(parts):
    tok, encoder, unet, denoiser = parts
    with torch.no_grad():
        cond, uncond = encode_conditioning(tok, encoder, ["a red circle :0.7 AND a blue square :0.3"], ["blurry"], 10)
        x, sigma, scale = torch.randn(1, 4, 8, 8), torch.tensor([2.5], dtype=torch.float64), 5.0
        ours = denoiser(x, sigma, cond.at(0), uncond.at(0), guidance_scale=scale, weights=cond.weights)
        x_in, t = x / (1 + 2.5**2) ** 0.5, denoiser.timestep(sigma)
        circle, square, negative = (unet(x_in, t, c) for c in encode_prompts(
            tok, encoder, ["a red circle", " a blue square", "blurry"]).split(1))
    eps = negative + 0.7 * scale * (circle - negative) + 0.3 * scale * (square - negative)
    assert cond.weights == [[0.7, 0.3]]
    assert_parity(ours, x - 2.5 * eps)


def test_and_needs_a_negative(parts):
    _, _, _, denoiser = parts
    with pytest.raises(InvalidInputError, match="negative"):
        denoiser(torch.randn(1, 4, 8, 8), 1.0, torch.randn(2, 77, 128), weights=[[0.5, 0.5]])


# ---- the schedule in sampling -----------------------------------------------------------------------


class Switching(Denoiser):
    """The reference: a denoiser that ignores the context it is given and uses `first` for its first
    `calls` evaluations, then `second`; counted here by hand."""

    def __init__(self, denoiser: Denoiser, first: torch.Tensor, second: torch.Tensor, calls: int):
        super().__init__(denoiser.unet, denoiser.schedule, denoiser.prediction_type)
        self.first, self.second, self.calls, self.made = first, second, calls, 0

    def __call__(self, x, sigma, context, *args, **kwargs):
        context = self.first if self.made < self.calls else self.second
        self.made += 1
        return super().__call__(x, sigma, context, *args, **kwargs)


def spliced(parts, prompt: str, sampler: str, steps: int, calls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample() with `prompt`'s schedule, the reference switching after `calls` evaluations)."""
    tok, encoder, _, denoiser = parts
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(sampler=sampler, steps=steps, guidance_scale=5.0, eta=0.0)
    info, _ = resolve(sampler)
    with torch.no_grad():
        cond, uncond = encode_conditioning(tok, encoder, [prompt], [""], info.prompt_steps(steps))
        ours = sample(denoiser, noise, context=cond, uncond_context=uncond, **kw)
        first, second = (c[None] for c in cond.images[0][0].contexts)
        negative = uncond.at(0)
        reference = sample(Switching(denoiser, first, second, calls), noise, context=first, uncond_context=negative,
                           **kw)
        late = sample(Switching(denoiser, first, second, calls + 1), noise, context=first, uncond_context=negative,
                      **kw)
    assert not torch.allclose(reference, late, atol=1e-4)  # one evaluation later is told apart
    return ours, reference


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_edit_switches_after_its_step(parts, sampler):
    """"[red circle:blue square:4]" at 10 steps: A1111 uses the first text while step <= 4, counting model
    evaluations from 0, so steps 0..4 see "red circle" and steps 5..9 "blue square"."""
    tok, encoder, _, _ = parts
    with torch.no_grad():
        red, blue = encode_prompts(tok, encoder, ["red circle", "blue square"])
        cond, _ = encode_conditioning(tok, encoder, ["[red circle:blue square:4]"], [""], 10)
    assert_parity(cond.images[0][0].contexts[0], red)
    assert_parity(cond.images[0][0].contexts[1], blue)
    ours, reference = spliced(parts, "[red circle:blue square:4]", sampler, 10, calls=5)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("prompt, calls", [("[red circle:blue square:4]", 5), ("[red circle:blue square:0.5]", 11)])
def test_second_order_sampler_counts_evaluations(parts, prompt, calls):
    """Heun evaluates twice a step; A1111 schedules over 2 * steps and advances once per evaluation, so
    "[..:4]" switches after evaluation 4 (inside step 2) and "[..:0.5]" after evaluation 10 of 19."""
    assert resolve("Heun")[0].prompt_steps(10) == 20
    ours, reference = spliced(parts, prompt, "Heun", 10, calls=calls)
    assert torch.equal(ours, reference)


def test_alternation_changes_every_evaluation(parts):
    tok, encoder, _, denoiser = parts
    with torch.no_grad():
        cond, _ = encode_conditioning(tok, encoder, ["a [red|blue] circle"], None, 4)
        red, blue = encode_prompts(tok, encoder, ["a red circle", "a blue circle"])
    # A1111: ends 1..4 alternate red, blue, red, blue; evaluation 0 takes the first (end 1) as well
    assert [torch.equal(cond.at(step)[0], red) for step in range(5)] == [True, True, False, True, False]
    assert_parity(cond.at(2)[0], blue)


# ---- generation ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(parts):
    from sdtorch.models.vae import AutoencoderKL
    from sdtorch.pipeline import Pipeline

    tok, encoder, unet, _ = parts
    torch.manual_seed(4)
    return Pipeline(tok, encoder, unet, AutoencoderKL(TINY_SD1.vae).eval(), TINY_SD1)


def recorded_contexts(monkeypatch, pipe, prompt: str, **kw) -> list:
    """The `context` of every sample() call generation makes for `prompt`."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs["context"])
        return sample(*args, **kwargs)

    monkeypatch.setattr(sdtorch.generation, "sample", recording)
    pipe(prompt, height=32, width=32, seed=1, **kw)
    return calls


def test_generation_schedules_over_the_samplers_evaluations(monkeypatch, pipe):
    (euler,) = recorded_contexts(monkeypatch, pipe, "[red:blue:4]", num_inference_steps=10, sampler="Euler")
    (heun,) = recorded_contexts(monkeypatch, pipe, "[red:blue:4]", num_inference_steps=10, sampler="Heun")
    assert euler.images[0][0].ends == (4, 10) and heun.images[0][0].ends == (4, 20)


def test_generation_schedules_the_hires_pass_after_the_first(monkeypatch, pipe):
    first, hires = recorded_contexts(monkeypatch, pipe, "[red:blue:15]", num_inference_steps=10, sampler="Euler",
                                     enable_hr=True, hr_scale=1.5, hr_second_pass_steps=6)
    assert first.images[0][0].ends == (10,) and hires.images[0][0].ends == (5, 6)


def test_generation_with_and_at_cfg_1(pipe):
    kw = dict(height=32, width=32, seed=1, num_inference_steps=3, sampler="Euler", guidance_scale=1.0)
    plain = pipe("red circle", **kw)[0]
    weighted = pipe("red circle :0.5", **kw)[0]  # uncond + 0.5 * (cond - uncond): the negative is encoded
    assert plain.size == weighted.size and plain.tobytes() != weighted.tobytes()
