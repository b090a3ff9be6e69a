"""A1111 prompt handling: emphasis parsing, 75-token chunking, BREAK, SD2 padding, weighted encoding."""

import pytest
import torch
from conftest import assert_parity

from sdtorch.configs import TINY_SD1
from sdtorch.errors import InvalidInputError
from sdtorch.models.clip import CLIPTextEncoder
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.prompts import PromptChunk, encode_prompt_groups, encode_prompts, parse_prompt_attention, tokenize_prompt

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def tok_sd2():
    return CLIPTokenizer.default(pad_token="!")  # SD2 / OpenCLIP: pad id 0


@pytest.fixture(scope="module")
def encoder(one_thread):
    """Random weights; LayerNorms moved off their (1, 0) init so outputs have a non-zero mean, as CLIP's do."""
    torch.manual_seed(0)
    model = CLIPTextEncoder(TINY_SD1.text_encoder).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.5 * torch.randn_like(module.bias))
    return model


@pytest.fixture(scope="module")
def ids(tok):
    """Single-token words the chunking tests count with (checked, not assumed)."""
    words = {w: tok.encode(w) for w in ("cat", "dog", ",", "a", "red", "circle", "big", "small")}
    assert all(len(v) == 1 for v in words.values()), words
    assert tok.encode("cat " * 3 + ", dog") == [words["cat"][0]] * 3 + [words[","][0], words["dog"][0]]
    return {w: v[0] for w, v in words.items()}


# ---- parse_prompt_attention ---------------------------------------------------------------------

# A1111's own docstring examples, with its exact float results.
A1111_DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
            ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
        ],
    ),
]

# Worked out by hand; weights written as the products A1111 forms, innermost bracket first.
BY_HAND = [
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("((big)) [small] cat", [("big", 1.1 * 1.1), (" ", 1.0), ("small", 1 / 1.1), (" cat", 1.0)]),
    ("[[tiny]]", [("tiny", (1 / 1.1) * (1 / 1.1))]),
    ("((cat:1.5))", [("cat", 1.5 * 1.1)]),  # weight closes the inner bracket, ")" the outer
    ("(cat: 0.5 )", [("cat", 0.5)]),  # spaces around the weight are allowed
    ("([cat])", [("cat", (1 / 1.1) * 1.1)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.1 * (1 / 1.1)), (" c", 1 / 1.1)]),  # crossed brackets
    # escapes: \( \) \[ \] \\ are literal; any other backslash is dropped
    (r"\(a\) \[b\] c\\d", [(r"(a) [b] c\d", 1.0)]),
    (r"a\b", [("ab", 1.0)]),
    (r"(\(x\))", [("(x)", 1.1)]),
    # unbalanced: open brackets reach to the end; closers and weights with no opener are literal text
    ("a ((b) c", [("a ", 1.0), ("b", 1.1 * 1.1), (" c", 1.1)]),
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1))]),  # round brackets are closed first
    ("a) b] c", [("a) b] c", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("[cat:1.5]", [("cat:1.5", 1 / 1.1)]),  # a weight only closes a round bracket
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    # BREAK: its own item, only as a whole upper-case word, spaces around it swallowed
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAKING break", [("a BREAKING break", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 multiplies its -1 too
]


# Tricky inputs, with the output of A1111's own `parse_prompt_attention` for each (its BREAK weight is the
# int -1, equal to ours). A fuzz of 10,000 random strings of brackets, colons, numbers, escapes, spaces,
# line breaks, BREAK and AND found no difference.
A1111_TRICKY = [
    ("(a\n:1.2)", [("a\n", 1.2)]),  # space and line breaks around a weight
    ("(a :\n 1.2 )", [("a ", 1.2)]),
    ("(a: 1.2\t)", [("a", 1.2)]),
    ("(a:1.2 )x", [("a", 1.2), ("x", 1.0)]),
    ("(a:\u0661.\u0662)", [("a", 1.2)]),  # any Unicode digits, as float() reads them
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:1e3)", [("a:1e3", 1.1)]),  # no exponent in a weight: text, in a plain (x)
    ("(a:)", [("a:", 1.1)]),
    ("(a::1.2)", [("a:", 1.2)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    ("((a:1.2):1.3)", [("a", 1.56)]),
    ("[a:1.2]", [("a:1.2", 0.9090909090909091)]),
    ("[[a]:1.5)", [("a", 0.8264462809917354), (":1.5)", 0.9090909090909091)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("a))", [("a))", 1.0)]),
    ("a:b:c", [("a:b:c", 1.0)]),
    ("(a|b) AND c", [("a|b", 1.1), (" AND c", 1.0)]),
    ("\\", [("", 1.0)]),  # a lone backslash is dropped
    ("a\\", [("a", 1.0)]),
    ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),
    ("(a\\:1.2)", [("a", 1.2)]),  # a backslash before ":" is dropped; the weight still closes
    ("(BREAK:1.5)", [("", 1.5), ("BREAK", -1.5), ("", 1.5)]),
    ("[BREAK]", [("", 0.9090909090909091), ("BREAK", -0.9090909090909091), ("", 0.9090909090909091)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK)b", [("a", 1.1), ("BREAK", -1.1), ("", 1.1), ("b", 1.0)]),
    ("(a:1.2)BREAK[b]", [("a", 1.2), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 0.9090909090909091)]),
    ("BREAKfast BREAK\tBREAK", [("BREAKfast", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a:0) BREAK", [("a", 0.0), ("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING + BY_HAND + A1111_TRICKY)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["(cat:1.2.3)", "(cat:.)", "(cat:-.)"])
def test_parse_rejects_bad_weight(text):
    with pytest.raises(InvalidInputError, match="weight"):  # A1111: float() raises ValueError; ours is one too
        parse_prompt_attention(text)


# ---- tokenize_prompt ----------------------------------------------------------------------------


def words(chunk: PromptChunk, pad: int = EOS) -> tuple[list[int], list[float]]:
    """The chunk's prompt tokens and their weights, after checking BOS/EOS/padding and their 1.0s."""
    assert len(chunk.tokens) == 77 and len(chunk.multipliers) == 77
    assert chunk.tokens[0] == BOS and chunk.multipliers[0] == 1.0
    body = chunk.tokens[1:]
    n = body.index(EOS)
    assert body[n + 1 :] == [pad] * (76 - n - 1) and chunk.multipliers[n + 1 :] == [1.0] * (76 - n)
    return chunk.tokens[1 : n + 1], chunk.multipliers[1 : n + 1]


def test_weights_per_token(tok, ids):
    (chunk,) = tokenize_prompt(tok, "a (red:1.5) circle, ((big)) [small]")
    assert words(chunk) == (
        [ids["a"], ids["red"], ids["circle"], ids[","], ids["big"], ids["small"]],
        [1.0, 1.5, 1.0, 1.0, 1.1 * 1.1, 1 / 1.1],
    )


def test_empty_prompt_is_one_padding_chunk(tok):
    (chunk,) = tokenize_prompt(tok, "")
    assert chunk.tokens == [BOS] + [EOS] * 76 and chunk.multipliers == [1.0] * 77


def test_long_prompt_without_comma(tok, ids):
    cat = ids["cat"]
    assert [words(c)[0] for c in tokenize_prompt(tok, "cat " * 75)] == [[cat] * 75]  # fits exactly
    first, second = tokenize_prompt(tok, "cat " * 80)
    assert first.tokens == [BOS] + [cat] * 75 + [EOS]
    assert words(second)[0] == [cat] * 5


def test_comma_break_carries_words_and_weights(tok, ids):
    cat, dog, comma = ids["cat"], ids["dog"], ids[","]
    # 60 cats, a comma at index 60, 20 weighted dogs: when the 76th token arrives the comma is
    # 75 - 60 = 15 <= 20 tokens back, so dogs 61..74 move on with the rest.
    first, second = tokenize_prompt(tok, "cat " * 60 + ", (" + "dog " * 20 + ":1.3)")
    assert words(first) == ([cat] * 60 + [comma], [1.0] * 61)
    assert words(second) == ([dog] * 20, [1.3] * 20)


@pytest.mark.parametrize(
    "before, first_len",
    [
        (55, 56),  # comma at index 55: 75 - 55 = 20, still within reach: break after it
        (54, 75),  # comma at index 54: 21 back, too far: the chunk is simply cut at 75
    ],
)
def test_comma_backtrack_limit(tok, ids, before, first_len):
    chunks = tokenize_prompt(tok, "cat " * before + ", " + "cat " * (80 - before))  # 81 tokens
    lengths = [len(words(c)[0]) for c in chunks]
    assert lengths == [first_len, 81 - first_len]
    assert words(chunks[0])[0][before] == ids[","]


def test_comma_backtrack_off(tok):
    chunks = tokenize_prompt(tok, "cat " * 60 + ", " + "cat " * 20, comma_backtrack=0)
    assert [len(words(c)[0]) for c in chunks] == [75, 6]


def test_comma_that_overflows_starts_next_chunk(tok, ids):
    first, second = tokenize_prompt(tok, "cat " * 75 + ", dog")
    assert words(first)[0] == [ids["cat"]] * 75
    assert words(second)[0] == [ids[","], ids["dog"]]


def test_break(tok, ids):
    chunks = tokenize_prompt(tok, "a cat BREAK (dog)")
    assert [words(c) for c in chunks] == [([ids["a"], ids["cat"]], [1.0, 1.0]), ([ids["dog"]], [1.1])]
    # A leading BREAK closes an empty chunk; a trailing one adds none; two in a row give an empty one.
    assert [words(c)[0] for c in tokenize_prompt(tok, "BREAK cat")] == [[], [ids["cat"]]]
    assert [words(c)[0] for c in tokenize_prompt(tok, "cat BREAK")] == [[ids["cat"]]]
    assert [words(c)[0] for c in tokenize_prompt(tok, "cat BREAK BREAK dog")] == [[ids["cat"]], [], [ids["dog"]]]
    # BREAK also resets the comma back-track: 70 cats after it fill a fresh chunk.
    chunks = tokenize_prompt(tok, "cat, BREAK " + "cat " * 80)
    assert [len(words(c)[0]) for c in chunks] == [2, 75, 5]


def test_sd2_pads_after_first_eos(tok_sd2, ids):
    pad = tok_sd2.pad_token_id
    assert pad == 0
    (chunk,) = tokenize_prompt(tok_sd2, "a cat")
    assert chunk.tokens == [BOS, ids["a"], ids["cat"], EOS] + [pad] * 73
    assert words(chunk, pad=pad)[0] == [ids["a"], ids["cat"]]
    (empty,) = tokenize_prompt(tok_sd2, "")
    assert empty.tokens == [BOS, EOS] + [pad] * 75
    full, rest = tokenize_prompt(tok_sd2, "cat " * 76)
    assert full.tokens == [BOS] + [ids["cat"]] * 75 + [EOS]  # nothing to pad
    assert rest.tokens == [BOS, ids["cat"], EOS] + [pad] * 74
    # The same as the plain tokenizer's rows.
    assert torch.equal(torch.tensor([chunk.tokens]), tok_sd2(["a cat"]))


# ---- encode_prompts -----------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Wraps a text encoder and records each call's ids shape and clip_skip."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.calls = []

    def forward(self, ids, clip_skip=1):
        self.calls.append((tuple(ids.shape), ids.dtype, clip_skip))
        return self.encoder(ids, clip_skip=clip_skip)


PLAIN = ["a photo of a cat", "", "a dog, highly detailed, 4k"]


@pytest.mark.parametrize("sd2", [False, True])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompts_equal_plain_encoding(tok, tok_sd2, encoder, sd2, clip_skip):
    tokenizer = tok_sd2 if sd2 else tok
    with torch.no_grad():
        ours = encode_prompts(tokenizer, encoder, PLAIN, clip_skip=clip_skip)
        reference = encoder(tokenizer(PLAIN), clip_skip=clip_skip)
    assert ours.shape == (3, 77, 128)
    assert torch.equal(ours, reference)


def test_one_batched_call_and_clip_skip(tok, encoder):
    recorder = Recorder(encoder)
    with torch.no_grad():
        skip2 = encode_prompts(tok, recorder, ["cat " * 80, "dog", "BREAK a BREAK b"], clip_skip=2)
        skip1 = encode_prompts(tok, recorder, ["cat"], clip_skip=1)
    assert skip2.shape == (3, 3 * 77, 128)
    assert recorder.calls == [((9, 77), torch.long, 2), ((1, 77), torch.long, 1)]
    with torch.no_grad():
        reference = encoder(tok(["cat"]), clip_skip=2)
    assert not torch.allclose(skip1, reference)  # clip_skip reached the encoder


def test_mean_restoration(tok, encoder):
    with torch.no_grad():
        weighted = encode_prompts(tok, encoder, ["a (red:1.5) circle"])[0]  # (77, D)
        plain = encoder(tok(["a red circle"]))[0]  # the same ids, all weights 1
    weights = torch.ones(77, 1)
    weights[2] = 1.5  # BOS, a, red, ...
    scaled = plain * weights
    expected = scaled * (plain.mean() / scaled.mean())
    assert_parity(weighted, expected)
    assert abs(weighted.mean().item() - plain.mean().item()) <= 1e-6 * plain.abs().mean().item()
    # "red" is 1.5 times as strong as its neighbours relative to the plain encoding.
    ratio = weighted / plain
    assert torch.allclose(ratio[2], 1.5 * ratio[1], rtol=1e-5)
    assert not torch.allclose(ratio[1], torch.ones(()), rtol=1e-4)  # the mean fix changed the rest
    # Means are per prompt and chunk: another prompt in the batch changes nothing.
    with torch.no_grad():
        pair = encode_prompts(tok, encoder, ["a (red:1.5) circle", "dog"])
    assert_parity(pair[0], weighted)
    assert_parity(pair[1], encoder(tok(["dog"]))[0].detach())


class ZeroMean(torch.nn.Module):
    """An encoder whose every output has a mean of exactly 0, as a final LayerNorm without bias gives but for
    rounding: (x, -x) in steps of 1/16, so every partial sum is exact."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids, clip_skip=1):
        out = torch.round(self.encoder(ids, clip_skip=clip_skip) * 16) / 16
        return torch.cat([out, -out], dim=-1)


def test_an_output_with_a_mean_of_zero_stays_finite(tok, encoder):
    zero_mean = ZeroMean(encoder)
    with torch.no_grad():
        plain = zero_mean(tok(["a red circle"]))[0]
        assert plain.mean().item() == 0 and plain.abs().max() > 0
        unweighted, weighted = encode_prompts(tok, zero_mean, ["a red circle", "a (red:1.5) circle"])
    assert torch.equal(unweighted, plain)  # was 0 / 0: NaN
    weights = torch.ones(77, 1)
    weights[2] = 1.5
    assert torch.equal(weighted, plain * weights)  # no mean to restore: the weighting alone


def test_batch_padded_with_empty_chunk(tok, tok_sd2, encoder):
    for tokenizer in (tok, tok_sd2):
        with torch.no_grad():
            out = encode_prompts(tokenizer, encoder, ["a cat", "cat " * 80])
            empty = encoder(tokenizer([""]))[0]
            short = encoder(tokenizer(["a cat"]))[0]
            long_chunks = [torch.tensor([c.tokens]) for c in tokenize_prompt(tokenizer, "cat " * 80)]
            long = torch.cat([encoder(ids)[0] for ids in long_chunks])
        assert out.shape == (2, 154, 128)
        assert_parity(out[0, :77], short)
        assert_parity(out[0, 77:], empty)
        assert_parity(out[1], long)


def test_dtype_and_device_follow_the_encoder(tok, encoder):
    double = CLIPTextEncoder(TINY_SD1.text_encoder)
    double.load_state_dict(encoder.state_dict())
    double = double.double()
    with torch.no_grad():
        out = encode_prompts(tok, double, ["a (red:1.5) circle"])
        reference = encode_prompts(tok, encoder, ["a (red:1.5) circle"])
    assert out.dtype == torch.float64 and out.device == reference.device
    assert_parity(out, reference.double())


def test_bad_prompts(tok, encoder):
    with pytest.raises(InvalidInputError):
        encode_prompts(tok, encoder, [])
    with pytest.raises(InvalidInputError):
        tokenize_prompt(tok, None)


def test_groups_of_one_equal_encode_prompts(tok, encoder):
    prompts = ["a (red:1.5) circle", "cat " * 80, "BREAK dog"]
    with torch.no_grad():
        groups, pooled = encode_prompt_groups(tok, encoder, [[p] for p in prompts], clip_skip=2)
        alone = [encode_prompts(tok, encoder, [p], clip_skip=2) for p in prompts]
    assert [g.shape for g in groups] == [(1, 77, 128), (1, 154, 128), (1, 154, 128)] and pooled == [None] * 3
    for group, reference in zip(groups, alone):
        assert_parity(group, reference)


def test_group_means_are_restored_over_the_whole_schedule(tok, encoder):
    """A1111 encodes a prompt's editing texts in one batch and restores each chunk position's mean over
    the batch: one factor for all the group's texts, empty padding chunks included."""
    recorder = Recorder(encoder)
    texts = ["a (red:1.5) circle", "a [blue] circle, " + "cat " * 80]
    with torch.no_grad():
        (group, other), _ = encode_prompt_groups(tok, recorder, [texts, ["dog"]])
        chunks = [tokenize_prompt(tok, texts[0]) + tokenize_prompt(tok, ""), tokenize_prompt(tok, texts[1])]
        raw = [[encoder(torch.tensor([c.tokens]))[0] for c in cs] for cs in chunks]  # (77, D) each
    assert recorder.calls == [((5, 77), torch.long, 1)]  # 2 x 2 chunks and "dog", one call
    assert group.shape == (2, 154, 128) and other.shape == (1, 77, 128)
    for i in range(2):  # chunk position
        weights = [torch.tensor(cs[i].multipliers)[:, None] for cs in chunks]
        before = torch.stack([raw[t][i] for t in range(2)]).mean()
        after = torch.stack([raw[t][i] * weights[t] for t in range(2)]).mean()
        for t in range(2):
            assert_parity(group[t, 77 * i : 77 * (i + 1)], raw[t][i] * weights[t] * (before / after))
    assert_parity(other[0], encoder(tok(["dog"]))[0])


def test_bad_groups(tok, encoder):
    for groups in ([], [[]], ["a cat"]):
        with pytest.raises(InvalidInputError):
            encode_prompt_groups(tok, encoder, groups)
