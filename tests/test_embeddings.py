"""Textual-inversion embeddings: the three file formats, their vectors at the token-embedding stage, chunking
as A1111, parity with diffusers' load_textual_inversion, unsafe and wrong files refused, exact unloading."""

import os
import pickle

import pytest
import torch
from conftest import assert_parity, random_pipeline
from safetensors.torch import save_file

import sdtorch
from sdtorch.adapters.embeddings import load_embedding, load_embeddings_dir, read_embedding
from sdtorch.configs import TINY_SD1, TINY_SD2
from sdtorch.errors import CheckpointError, InvalidInputError, UnsafeCheckpointError
from sdtorch.models.clip import CLIPTextEncoder
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.prompt_schedule import encode_conditioning
from sdtorch.prompts import CHUNK_LENGTH, encode_prompt_groups, encode_prompts, tokenize_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = TINY_SD1.text_encoder.width  # 128
VOCAB = TINY_SD1.text_encoder.vocab_size  # 49408: the first id an embedding's vectors get


def vectors(n: int, seed: int = 3, width: int = WIDTH) -> torch.Tensor:
    """(n, width) vectors on the scale of CLIP's token embeddings."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(kind: str, folder, name: str, vecs: torch.Tensor):
    """An embedding file as each tool writes it; returns its path."""
    if kind == "a1111_pt":  # A1111's Embedding.save
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs.clone().requires_grad_()},
                    "name": name, "step": 1500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "model"}, path)
    elif kind == "a1111_bin":
        path = folder / f"{name}.bin"
        torch.save({"string_to_param": {"*": vecs.clone()}, "name": name, "step": 10}, path)
    elif kind == "a1111_safetensors":
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": vecs.contiguous()}, path)
    elif kind == "diffusers_safetensors":
        path = folder / "learned_embeds.safetensors"
        save_file({name: (vecs[0] if len(vecs) == 1 else vecs).contiguous()}, path)  # one vector: (D,)
    elif kind == "diffusers_bin":
        path = folder / "learned_embeds.bin"
        torch.save({name: vecs.clone()}, path)
    else:
        raise ValueError(kind)
    return path


KINDS = ["a1111_pt", "a1111_bin", "a1111_safetensors", "diffusers_safetensors", "diffusers_bin"]


@pytest.fixture(scope="module")
def tokenizers():
    return {"sd1": CLIPTokenizer.default(), "sd2": CLIPTokenizer.default(pad_token="!")}


def fresh_encoder(family: str = "sd1") -> CLIPTextEncoder:
    """Random weights; LayerNorms moved off their (1, 0) init so outputs have a non-zero mean, as CLIP's do."""
    config = (TINY_SD1 if family == "sd1" else TINY_SD2).text_encoder
    torch.manual_seed(5)
    model = CLIPTextEncoder(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.5 * torch.randn_like(module.bias))
    return model


def reference(encoder: CLIPTextEncoder, ids: list[int], replaced: dict[int, torch.Tensor]) -> torch.Tensor:
    """The encoder's layers run on token embeddings whose rows at `replaced` positions are the given vectors:
    the encoding of a prompt with an embedding, by hand (1, 77, D)."""
    emb = encoder.embeddings
    x = emb.token_embedding(torch.tensor([ids])).clone()  # (1, 77, D)
    for position, vector in replaced.items():
        x[0, position] = vector
    x = x + emb.position_embedding(torch.arange(len(ids)))
    return encoder.final_layer_norm(encoder.encoder(x, num_layers=encoder.config.num_layers))


def chunk_ids(tokenizer: CLIPTokenizer, words: list[int]) -> list[int]:
    """[BOS] + words + [EOS], padded to 77 as A1111 pads (EOS; SD2: the pad id after the first EOS)."""
    ids = [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CHUNK_LENGTH + 2 - len(ids))


# ---- reading the formats ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
def test_each_format_reads_its_vectors_and_name(tmp_path, kind, n):
    vecs = vectors(n)
    embedding = read_embedding(write(kind, tmp_path, "mystyle", vecs.half() if kind.endswith("bin") else vecs))
    assert embedding.name == "mystyle"  # the stem (A1111) or the token (diffusers)
    assert embedding.vectors.dtype == torch.float32 and embedding.vectors.shape == (n, WIDTH)
    expected = vecs.half().float() if kind.endswith("bin") else vecs
    assert torch.equal(embedding.vectors, expected)
    assert read_embedding(write(kind, tmp_path, "mystyle", vecs), name="other").name == "other"


# ---- the vectors reach the token-embedding stage ------------------------------------------------------


@pytest.mark.parametrize("kind", ["a1111_pt", "a1111_safetensors", "diffusers_safetensors"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("n", [1, 3])
def test_prompt_with_the_name_encodes_the_vectors_in_its_place(tmp_path, tokenizers, kind, family, n):
    tokenizer, encoder = tokenizers[family], fresh_encoder(family)
    before, after = "a photo of", "on the grass"
    prompt = f"{before} mystyle {after}"
    with torch.no_grad():
        plain_before = encode_prompts(tokenizer, encoder, [prompt])
        other_before = encode_prompts(tokenizer, encoder, ["a dog, on the grass"])
        vecs = vectors(n)
        assert load_embedding(tokenizer, encoder, write(kind, tmp_path, "mystyle", vecs)) == "mystyle"
        ours = encode_prompts(tokenizer, encoder, [prompt])  # (1, 77, D)

        head, tail = tokenizer.encode(before), tokenizer.encode(after)
        start = 1 + len(head)  # after BOS
        expected = chunk_ids(tokenizer, [*head, *range(VOCAB, VOCAB + n), *tail])
        assert tokenize_prompt(tokenizer, prompt, embeddings=encoder.textual_inversion)[0].tokens == expected
        placeholder = chunk_ids(tokenizer, [*head, *[0] * n, *tail])
        ref = reference(encoder, placeholder, {start + i: vecs[i] for i in range(n)})
        assert torch.equal(encoder(torch.tensor([expected])), ref)  # the ids index the vectors exactly
        assert_parity(ours, ref, rel=1e-6)
        assert torch.equal(ours[:, :start], plain_before[:, :start])  # causal: tokens before it are unchanged
        assert not torch.allclose(ours[:, start:], plain_before[:, start:])
        assert torch.equal(encode_prompts(tokenizer, encoder, ["a dog, on the grass"]), other_before)


def test_multi_vector_embedding_takes_n_positions_with_the_runs_weight(tmp_path, tokenizers):
    tokenizer, encoder = tokenizers["sd1"], fresh_encoder()
    load_embedding(tokenizer, encoder, write("a1111_pt", tmp_path, "mystyle", vectors(4)))
    chunk = tokenize_prompt(tokenizer, "a (mystyle:1.5) cat", embeddings=encoder.textual_inversion)[0]
    a, cat = tokenizer.encode("a"), tokenizer.encode("cat")
    expected = [tokenizer.bos_token_id, *a, *range(VOCAB, VOCAB + 4), *cat, tokenizer.eos_token_id]
    assert chunk.tokens[: len(expected)] == expected
    assert chunk.multipliers[1:7] == [1.0, 1.5, 1.5, 1.5, 1.5, 1.0]


def test_an_embedding_is_never_split_across_chunks(tmp_path, tokenizers):
    tokenizer, encoder = tokenizers["sd1"], fresh_encoder()
    load_embedding(tokenizer, encoder, write("a1111_safetensors", tmp_path, "mystyle", vectors(3)))
    word = tokenizer.encode("cat")[0]
    for filler, first_len in [(72, 75), (73, 73), (74, 74)]:  # 72 + 3 fits exactly; 73 + 3 and 74 + 3 do not
        chunks = tokenize_prompt(tokenizer, " ".join(["cat"] * filler) + " mystyle dog",
                                 comma_backtrack=0, embeddings=encoder.textual_inversion)
        assert len(chunks) == 2
        body = chunks[0].tokens[1:-1]
        words = [t for t in body if t != tokenizer.eos_token_id]
        assert len(words) == first_len and words[:filler] == [word] * filler
        ids = list(range(VOCAB, VOCAB + 3))
        if first_len == 75:
            assert words[filler:] == ids and chunks[1].tokens[1] == tokenizer.encode("dog")[0]
        else:
            assert chunks[1].tokens[1:4] == ids


def test_longest_name_wins_and_names_match_in_the_token_stream(tmp_path, tokenizers):
    tokenizer, encoder = tokenizers["sd1"], fresh_encoder()
    load_embedding(tokenizer, encoder, write("a1111_pt", tmp_path, "style", vectors(1, seed=1)))
    (tmp_path / "b").mkdir()
    load_embedding(tokenizer, encoder, write("a1111_pt", tmp_path / "b", "style two", vectors(2, seed=2)))
    database = encoder.textual_inversion
    tokens = tokenize_prompt(tokenizer, "style two, style, styles, STYLE", embeddings=database)[0].tokens
    comma, styles = tokenizer.encode(",")[0], tokenizer.encode("styles")
    # "style" has id VOCAB, "style two" the next two; "styles" is another word; prompts are lower-cased
    expected = [VOCAB + 1, VOCAB + 2, comma, VOCAB, comma, *styles, comma, VOCAB, tokenizer.eos_token_id]
    assert tokens[1 : 1 + len(expected)] == expected


# ---- the pipeline: API, generation path, diffusers parity ---------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti") / "model"
    sdtorch.save(random_pipeline(TINY_SD1, seed=11), folder, format="diffusers")
    return folder


@pytest.fixture
def pipe(model_dir):
    pipe = sdtorch.load(model_dir)
    yield pipe
    pipe.unload_embedding()


@pytest.mark.parametrize("kind", ["diffusers_safetensors", "a1111_pt", "a1111_safetensors"])
@pytest.mark.parametrize("n", [1, 3])
def test_matches_diffusers_load_textual_inversion(tmp_path, model_dir, pipe, kind, n):
    import diffusers

    path = write(kind, tmp_path, "mystyle", vectors(n, seed=8))
    prompt = "a photo of mystyle on the grass"
    name = pipe.load_embedding(path)
    assert pipe.embeddings == {name: n}
    reference_pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False)
    reference_pipe.load_textual_inversion(path, token=name)  # diffusers names A1111 files by their `name` field
    with torch.no_grad():
        theirs = reference_pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
    assert_parity(ours, theirs)


def test_pipeline_api_and_exact_unload(tmp_path, pipe):
    prompt = "a photo of mystyle and otherstyle"
    with torch.no_grad():
        plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
        assert pipe.load_embedding(write("a1111_pt", tmp_path, "mystyle", vectors(2, seed=1))) == "mystyle"
        (tmp_path / "d").mkdir()
        other = write("diffusers_safetensors", tmp_path / "d", "otherstyle", vectors(1, seed=2))
        assert pipe.load_embedding(other) == "otherstyle"
        assert pipe.embeddings == {"mystyle": 2, "otherstyle": 1}
        both = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
        pipe.unload_embedding("mystyle")
        assert pipe.embeddings == {"otherstyle": 1}
        # "otherstyle" now has the first id: what it encodes to does not depend on what else was loaded
        only_other = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
        assert pipe.load_embedding(other, name="again") == "again"
        assert not torch.equal(both, plain) and not torch.equal(only_other, plain)
        pipe.unload_embedding()
        assert pipe.embeddings == {} and pipe.text_encoder.textual_inversion is None
        assert torch.equal(encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt]), plain)
    with pytest.raises(InvalidInputError, match="no embedding named 'nothing'"):
        pipe.unload_embedding("nothing")


def test_reloading_a_name_replaces_it(tmp_path, pipe):
    pipe.load_embedding(write("a1111_pt", tmp_path, "mystyle", vectors(2, seed=1)))
    (tmp_path / "new").mkdir()
    pipe.load_embedding(write("a1111_pt", tmp_path / "new", "mystyle", vectors(3, seed=2)))
    assert pipe.embeddings == {"mystyle": 3}
    assert torch.equal(pipe.text_encoder.textual_inversion.vectors, vectors(3, seed=2))


def test_generation_uses_the_embedding(tmp_path, pipe):
    prompt = "a [mystyle:cat:0.5] picture"  # through prompt editing, A1111's get_learned_conditioning
    pipe.load_embedding(write("a1111_safetensors", tmp_path, "mystyle", vectors(2)))
    with torch.no_grad():
        cond, _ = encode_conditioning(pipe.tokenizer, pipe.text_encoder, [prompt], None, steps=4)
        group = encode_prompt_groups(pipe.tokenizer, pipe.text_encoder, [["a mystyle picture", "a cat picture"]])[0][0]
    contexts = cond.images[0][0].contexts
    assert torch.equal(contexts[0], group[0].float()) and torch.equal(contexts[1], group[1].float())
    images = pipe("mystyle", steps=1, width=32, height=32, seed=1)
    assert images[0].size == (32, 32)


def test_infotext_records_the_embeddings_a_prompt_used(tmp_path, pipe):
    """A1111's "TI hashes": name and the first 12 hex digits of the file's sha256, for the names the prompts use."""
    import hashlib

    from sdtorch.infotext import parse_infotext

    path = write("a1111_safetensors", tmp_path, "mystyle", vectors(1))
    other = write("a1111_safetensors", tmp_path, "unused", vectors(1, seed=4))
    pipe.load_embedding(path)
    pipe.load_embedding(other)
    try:
        used = parse_infotext(pipe("a cat", negative_prompt="mystyle", steps=1, seed=1)[0].info["parameters"])
        plain = parse_infotext(pipe("a cat", steps=1, seed=1)[0].info["parameters"])
    finally:
        pipe.unload_embedding()
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert used.extra["TI hashes"] == f"mystyle: {expected}" and "TI hashes" not in plain.extra


def test_embedding_follows_the_encoders_dtype(tmp_path, tokenizers):
    tokenizer, encoder = tokenizers["sd1"], fresh_encoder().double()
    load_embedding(tokenizer, encoder, write("a1111_pt", tmp_path, "mystyle", vectors(2)))
    with torch.no_grad():
        out = encode_prompts(tokenizer, encoder, ["mystyle"])
    assert out.dtype == torch.float64 and encoder.textual_inversion.vectors.dtype == torch.float32


# ---- refusals -------------------------------------------------------------------------------------------


class RunsCode:
    """Pickles as a call to os.system: what a malicious .pt file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tokenizers):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": RunsCode(marker)}, "name": "evil"}, evil)
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"string_to_param": {"*": RunsCode(marker)}}, f, protocol=2)
    encoder = fresh_encoder()
    for path in (evil, legacy):
        with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
            load_embedding(tokenizers["sd1"], encoder, path)
    assert not marker.exists()
    assert encoder.textual_inversion is None


def test_wrong_width_is_refused_naming_file_and_sizes(tmp_path, tokenizers):
    path = write("a1111_pt", tmp_path, "sd2style", vectors(2, width=96))
    encoder = fresh_encoder()
    with pytest.raises(CheckpointError, match=rf"sd2style\.pt.*width 96.*width is {WIDTH}"):
        load_embedding(tokenizers["sd1"], encoder, path)
    assert encoder.textual_inversion is None


@pytest.mark.parametrize("data, message", [
    ({"a": torch.zeros(2, WIDTH), "b": torch.zeros(2, WIDTH)}, "not a textual-inversion embedding"),
    ({"string_to_param": {"*": torch.zeros(1, WIDTH), "+": torch.zeros(1, WIDTH)}}, "holds 2 terms"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
    ({"emb_params": torch.zeros(76, WIDTH)}, "1 <= n <= 75"),
    ({"emb_params": torch.zeros(0, WIDTH)}, "1 <= n <= 75"),
    ({"emb_params": torch.zeros(2, WIDTH, dtype=torch.int64)}, "not floating-point"),
    ({"emb_params": torch.full((1, WIDTH), float("nan"))}, "NaN"),
    ([torch.zeros(1, WIDTH)], "holds a list"),
])
def test_files_that_are_no_usable_embedding_are_refused(tmp_path, data, message):
    path = tmp_path / "thing.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=message):
        read_embedding(path)


def test_bad_names_are_refused(tmp_path, tokenizers):
    tokenizer, encoder = tokenizers["sd1"], fresh_encoder()
    path = write("a1111_pt", tmp_path, "mystyle", vectors(1))
    with pytest.raises(InvalidInputError, match="has no tokens"):
        load_embedding(tokenizer, encoder, path, name="  ")
    load_embedding(tokenizer, encoder, path)
    with pytest.raises(InvalidInputError, match="tokenizes as the loaded 'mystyle'"):
        load_embedding(tokenizer, encoder, path, name="MyStyle")
    assert list(encoder.textual_inversion.counts) == ["mystyle"]


def test_text_encoder_checks_ids_against_the_loaded_vectors(tmp_path, tokenizers):
    encoder = fresh_encoder()
    ids = torch.tensor([[49406, VOCAB, 49407]])
    with pytest.raises(InvalidInputError, match=r"\[0, 49408\) \(the CLIP vocabulary\)"):
        encoder(ids)
    load_embedding(tokenizers["sd1"], encoder, write("a1111_pt", tmp_path, "mystyle", vectors(1)))
    assert encoder(ids).shape == (1, 3, WIDTH)
    with pytest.raises(InvalidInputError, match="and 1 textual-inversion vectors"):
        encoder(ids + 1)


# ---- a folder of embeddings (A1111 --embeddings-dir) --------------------------------------------------


def test_load_embeddings_dir_loads_every_embedding_and_lists_what_it_skipped(tmp_path, pipe):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    write("a1111_pt", folder, "alpha", vectors(2, seed=1))
    write("a1111_safetensors", folder, "beta", vectors(1, seed=2))
    torch.save({"<concept>": vectors(1, seed=3)[0]}, folder / "sub" / "gamma.bin")  # a diffusers concept
    write("a1111_pt", folder, "wide", vectors(1, width=64))
    torch.save({"string_to_param": {"*": RunsCode(tmp_path / "ran")}}, folder / "evil.pt")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 40)
    (folder / "alpha.preview.png").write_bytes(b"\x89PNG\r\n")
    (folder / "notes.txt").write_text("hello")
    report = load_embeddings_dir(pipe, folder)
    assert report.loaded == ["alpha", "beta", "gamma"]  # named by file stem, as A1111 names them
    assert pipe.embeddings == {"alpha": 2, "beta": 1, "gamma": 1}
    skipped = {line.split(": ")[0].rsplit("/", 1)[-1]: line for line in report.skipped}
    assert sorted(skipped) == ["alpha.preview.png", "broken.safetensors", "evil.pt", "notes.txt", "wide.pt"]
    assert "refused to unpickle" in skipped["evil.pt"] and "width 64" in skipped["wide.pt"]
    assert "not an embedding file" in skipped["notes.txt"]
    assert not (tmp_path / "ran").exists()
    with pytest.raises(InvalidInputError, match="not a folder"):
        load_embeddings_dir(pipe, folder / "missing")
