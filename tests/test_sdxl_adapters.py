"""SDXL's adapters on tiny random models, against diffusers' StableDiffusionXLPipeline with the same weights.

LoRA: kohya files (the original UNet names kohya trains SDXL on, or diffusers' names; `lora_te1_` for CLIP ViT-L,
`lora_te2_` for OpenCLIP bigG, LoCon convs) and diffusers / peft files (`text_encoder_2.`) against
`load_lora_weights`; the refiner's lone bigG. Textual inversion: A1111 / kohya SDXL embeddings (`clip_l` + `clip_g`)
against two `load_textual_inversion` calls and `encode_prompt`.
"""

import json

import numpy as np
import pytest
import torch
from conftest import assert_parity, random_pipeline
from safetensors.torch import save_file
from torch import nn

from sdtorch.adapters.embeddings import load_embedding, load_embeddings_dir, read_sdxl_embedding
from sdtorch.adapters.lora import kohya_name, kohya_names
from sdtorch.configs import TINY_SDXL, TINY_SDXL_REFINER
from sdtorch.errors import CheckpointError, InvalidInputError
from sdtorch.pipeline import Pipeline
from sdtorch.prompts import CHUNK_LENGTH, encode_prompt_groups, encode_prompts, tokenize_prompt

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),  # diffusers' second adapter
]

RANK, ALPHA = 4, 2.0
PROMPT = "a red circle in the top left"
VOCAB = TINY_SDXL.text_encoder.vocab_size  # 49408: the first id an embedding's vectors get
POOLED = TINY_SDXL.pooled_dim


# ---- the models: sdtorch and its diffusers twin ----------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline(TINY_SDXL, seed=3)


@pytest.fixture(scope="module")
def refiner():
    return random_pipeline(TINY_SDXL_REFINER, seed=4)


@pytest.fixture(scope="module")
def tokenizer_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tokenizer"
    pipe.tokenizer.save(folder)
    return folder


def _clip_twin(encoder) -> nn.Module:
    """transformers' CLIPTextModel (WithProjection for bigG) with one sdtorch encoder's weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**encoder.config.to_diffusers())
    model = (CLIPTextModelWithProjection if encoder.config.with_projection else CLIPTextModel)(config)
    state = encoder.state_dict()
    if hasattr(model, "text_model"):  # transformers 5 keeps `text_model.` only in the model with a projection
        state = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def twin(pipe: Pipeline, tokenizer_dir):
    """diffusers' SDXL pipeline (the refiner's img2img one for a refiner) with the UNet and text-encoder weights of
    `pipe` and two tokenizers (bigG's pads with "!", id 0). The VAE is left out: nothing here decodes."""
    import diffusers
    from transformers import CLIPTokenizer

    unet = diffusers.UNet2DConditionModel(
        **{k: v for k, v in pipe.config.unet.to_diffusers().items() if k != "_class_name"})
    unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    encoders = [_clip_twin(e) for e in pipe.text_encoder.encoders]
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
    common = dict(vae=None, unet=unet.eval(), scheduler=diffusers.EulerDiscreteScheduler(), tokenizer_2=tokenizer_2,
                  text_encoder_2=encoders[-1])
    if len(encoders) == 1:
        return diffusers.StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, **common,
                                                          requires_aesthetics_score=True)
    return diffusers.StableDiffusionXLPipeline(text_encoder=encoders[0], tokenizer=CLIPTokenizer.from_pretrained(
        tokenizer_dir), **common)


def unet_inputs(pipe: Pipeline):
    g = torch.Generator().manual_seed(1)
    cfg = pipe.config.unet
    times = (cfg.addition_in_dim - POOLED) // cfg.addition_time_embed_dim
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64][:times], [48.0, 80, 8, 0, 64, 64][:times]])
    if times == 5:
        ids[:, 4] = torch.tensor([6.0, 2.5])  # the refiner's aesthetic score
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 7, cfg.context_dim, generator=g), torch.randn(2, POOLED, generator=g), ids)


def outputs(pipe: Pipeline) -> list[torch.Tensor]:
    """The UNet's output, each encoder's context and the pooled embedding (sdtorch)."""
    x, t, context, pooled, time_ids = unet_inputs(pipe)
    with torch.no_grad():
        unet = pipe.unet(x, t, context, text_embeds=pooled, time_ids=time_ids)
        text, pool = pipe.text_encoder.encode(pipe.tokenizer([PROMPT, ""]))
    return [unet, *text.split(list(pipe.text_encoder.part_widths), dim=-1), pool]


def reference_outputs(pipe: Pipeline, ref, files: list, scales: list[float]) -> list[torch.Tensor]:
    """The same from diffusers with peft, the LoRAs loaded by `load_lora_weights` and scaled by `set_adapters`."""
    import peft  # noqa: F401  (a test extra: diffusers needs it for LoRA; a missing one fails, never skips)

    names = [f"lora{i}" for i in range(len(files))]
    for file, name in zip(files, names):
        ref.load_lora_weights(str(file), adapter_name=name)
    ref.set_adapters(names, adapter_weights=scales)
    x, t, context, pooled, time_ids = unet_inputs(pipe)
    with torch.no_grad():
        unet = ref.unet(x, t, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        out = [unet]
        for encoder, tokenizer in ((ref.text_encoder, ref.tokenizer), (ref.text_encoder_2, ref.tokenizer_2)):
            if encoder is None:
                continue
            ids = tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
            hidden = encoder(ids, output_hidden_states=True)
            out.append(hidden.hidden_states[-2])  # SDXL conditions on the penultimate layer
        out.append(hidden.text_embeds)  # bigG's pooled embedding
    return out


def check_against(ours, theirs, base) -> None:
    assert len(ours) == len(theirs) == len(base)
    for a, b, c in zip(ours, theirs, base):
        assert (b - c).abs().max() > 1e-2 * c.abs().max()  # the LoRA changes every output noticeably
        assert_parity(a, b, rel=1e-4)


# ---- LoRA files ----------------------------------------------------------------------------------------


def targets(pipe: Pipeline) -> dict[tuple[str, str], nn.Module]:
    """Every Linear and Conv2d: attention, proj_in/out, ff, ResBlock and sampler convs (LoCon), the time and
    addition embeddings, conv_in/out; both encoders' attention and MLP projections, bigG's text_projection."""
    return {(part, path): m for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
            for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def random_lora(pipe: Pipeline, seed: int, rank: int = RANK, skip=()) -> dict:
    """{(part, path): (down, up)} in LoCon's layout: conv down (rank, in, kh, kw), up (out, rank, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for target, m in targets(pipe).items():
        if any(s in target[1] for s in skip):
            continue
        if isinstance(m, nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * 0.2
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(rank, m.in_features, generator=g) * 0.2
            up = torch.randn(m.out_features, rank, generator=g) * 0.2
        lora[target] = (down, up)
    return lora


def _encoder_path(path: str) -> tuple[int, str]:
    """`encoders.1.encoder.layers.0...` -> (1, `encoder.layers.0...`)."""
    _, index, rest = path.split(".", 2)
    return int(index), rest


def _hf(rest: str) -> str:
    """An encoder's module path as transformers (4.x, as files name it) spells it."""
    return rest if rest.startswith("text_projection") else "text_model." + rest


def sgm_names(pipe: Pipeline) -> dict[str, str]:
    """{UNet module path: kohya's name of it in SDXL's original (sgm) UNet}, for every UNet target."""
    names = kohya_names({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    sgm = {path: name for name, (part, path) in names.items()
           if part == "unet" and name != "lora_unet_" + path.replace(".", "_")}
    assert sgm.keys() == {path for part, path in targets(pipe) if part == "unet"}
    return sgm


def kohya_te_name(path: str, prefixes: tuple[str, ...]) -> str:
    index, rest = _encoder_path(path)
    return prefixes[index] + _hf(rest).replace(".", "_")


def kohya_file(lora, path, unet_name, te_prefixes=("lora_te1_", "lora_te2_"), alpha: float | None = ALPHA):
    sd = {}
    for (part, module), (down, up) in lora.items():
        name = unet_name(module) if part == "unet" else kohya_te_name(module, te_prefixes)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def peft_file(lora, path, ref, components=("text_encoder", "text_encoder_2"), alpha: float = ALPHA):
    """diffusers' own layout: lora_A / lora_B keys named by the diffusers twin's module paths, and the peft
    LoraConfig in `lora_adapter_metadata`."""
    sd, meta = {}, {}
    for (part, module), (down, up) in lora.items():
        if part == "unet":
            component, hf_path = "unet", module
        else:
            index, rest = _encoder_path(module)
            component = components[index]
            encoder = getattr(ref, component) if ref is not None else None
            hf_path = _hf(rest) if encoder is None or hasattr(encoder, "text_model") else rest
        sd[f"{component}.{hf_path}.lora_A.weight"], sd[f"{component}.{hf_path}.lora_B.weight"] = down, up
        meta.setdefault(f"{component}.target_modules", []).append(hf_path)
        meta.update({f"{component}.r": RANK, f"{component}.lora_alpha": alpha})
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


def test_kohya_sgm_names_are_sdxls_original_ones(pipe):
    names = kohya_names({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    sgm = sgm_names(pipe)
    # the tiny model's level 1 (input_blocks 3, output_blocks 0-1) is SDXL's input_blocks 4-5 / output_blocks 0-2
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q")
    assert sgm["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_1_2_conv"
    assert sgm["add_embedding.linear_1"] == "lora_unet_label_emb_0_0"
    assert sgm["down_blocks.0.resnets.0.time_emb_proj"] == "lora_unet_input_blocks_1_0_emb_layers_1"
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == (
        "text_encoder", "encoders.0.encoder.layers.0.self_attn.q_proj")
    assert names["lora_te2_text_model_encoder_layers_2_mlp_fc2"] == (
        "text_encoder", "encoders.1.encoder.layers.2.mlp.fc2")
    assert names["lora_te2_text_projection"] == ("text_encoder", "encoders.1.text_projection")
    assert not any(name.startswith("lora_te_") for name in names)  # SDXL base: lora_te1_ / lora_te2_ only
    for name, (part, path) in names.items():  # the name a file written for the model gives reads back
        assert names[kohya_name(pipe.text_encoder, part, path)] == (part, path)
    assert kohya_name(pipe.text_encoder, "text_encoder", "encoders.1.text_projection") == "lora_te2_text_projection"


@pytest.mark.parametrize("fmt", ["kohya_sgm", "kohya_diffusers_names", "peft"])
def test_matches_diffusers(pipe, tokenizer_dir, tmp_path, fmt):
    base = outputs(pipe)
    ref = twin(pipe, tokenizer_dir)
    # diffusers' kohya converter mangles `add_embedding` under its diffusers name (its SDXL rule strips a digit)
    lora = random_lora(pipe, seed=1, skip=("add_embedding",) if fmt == "kohya_diffusers_names" else ())
    if fmt == "kohya_sgm":
        sgm = sgm_names(pipe)
        file = kohya_file(lora, tmp_path / f"{fmt}.safetensors", sgm.__getitem__)
    elif fmt == "kohya_diffusers_names":
        file = kohya_file(lora, tmp_path / f"{fmt}.safetensors", lambda p: "lora_unet_" + p.replace(".", "_"))
    else:
        file = peft_file(lora, tmp_path / f"{fmt}.safetensors", ref)
    assert pipe.load_lora(file, scale=0.7) == fmt
    try:
        assert pipe.loras == {fmt: 0.7}
        check_against(outputs(pipe), reference_outputs(pipe, ref, [file], [0.7]), base)
    finally:
        pipe.unload_lora()
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base))  # unloading restores the exact outputs
    assert not any(m._forward_hooks for m in targets(pipe).values())


def test_two_loras_and_exact_unload(pipe, tokenizer_dir, tmp_path):
    """A kohya and a peft LoRA at once equal diffusers' two adapters; unloading one, then all, is exact."""
    base = outputs(pipe)
    ref = twin(pipe, tokenizer_dir)
    a = kohya_file(random_lora(pipe, seed=2), tmp_path / "a.safetensors", sgm_names(pipe).__getitem__)
    b = peft_file(random_lora(pipe, seed=3), tmp_path / "b.safetensors", ref)
    pipe.load_lora(a, scale=0.8)
    only_a = outputs(pipe)
    pipe.load_lora(b, scale=-0.5)
    try:
        check_against(outputs(pipe), reference_outputs(pipe, ref, [a, b], [0.8, -0.5]), base)
        pipe.unload_lora("b")
        assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), only_a))
    finally:
        pipe.unload_lora()
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), base))


def test_sgm_and_diffusers_names_and_old_key_forms_agree(pipe, tmp_path):
    """kohya's two UNet namings, the 2-D (Linear-shaped) LoRA on SDXL's Linear proj_in, transformers 5's
    unprefixed encoder paths and the older `.lora_linear_layer` keys all give bit-identical outputs."""
    lora = random_lora(pipe, seed=4)
    pipe.load_lora(kohya_file(lora, tmp_path / "sgm.safetensors", sgm_names(pipe).__getitem__))
    expected = outputs(pipe)
    pipe.unload_lora()
    files = [kohya_file(lora, tmp_path / "diffusers_names.safetensors", lambda p: "lora_unet_" + p.replace(".", "_")),
             peft_file(lora, tmp_path / "peft.safetensors", None)]
    conv = {k: ((d[:, :, None, None], u[:, :, None, None]) if k[1].endswith(("proj_in", "proj_out")) else (d, u))
            for k, (d, u) in lora.items()}  # (rank, in, 1, 1) on SDXL's Linear proj_in / proj_out
    files.append(kohya_file(conv, tmp_path / "conv_shaped.safetensors", sgm_names(pipe).__getitem__))
    old = {}
    for (part, module), (down, up) in lora.items():
        if part == "unet":
            stem = f"unet.{module}.lora"
        else:
            index, rest = _encoder_path(module)
            stem = f"{('text_encoder', 'text_encoder_2')[index]}.{rest}.lora_linear_layer"  # no text_model.
        old[f"{stem}.down.weight"], old[f"{stem}.up.weight"] = down, up
        old[f"{stem.rsplit('.', 1)[0]}.alpha"] = torch.tensor(ALPHA)
    save_file(old, str(tmp_path / "old.safetensors"))
    files.append(tmp_path / "old.safetensors")
    for file in files:
        pipe.load_lora(file)
        try:
            assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), expected)), file.name
        finally:
            pipe.unload_lora()


def test_refiner_lone_encoder_answers_to_lora_te_and_text_encoder_2(refiner, tokenizer_dir, tmp_path):
    """kohya writes `lora_te_` for a model with one text encoder; diffusers' refiner pipeline calls bigG
    text_encoder_2 (and `lora_te2_`): all name the refiner's bigG. `lora_te1_` (ViT-L) is refused."""
    base = outputs(refiner)
    ref = twin(refiner, tokenizer_dir)
    lora = random_lora(refiner, seed=5)
    sgm = sgm_names(refiner)
    te2 = kohya_file(lora, tmp_path / "te2.safetensors", sgm.__getitem__, te_prefixes=("lora_te2_",))
    refiner.load_lora(te2, scale=0.6)
    try:
        expected = outputs(refiner)
        check_against(expected, reference_outputs(refiner, ref, [te2], [0.6]), base)
    finally:
        refiner.unload_lora()
    for file in (kohya_file(lora, tmp_path / "te.safetensors", sgm.__getitem__, te_prefixes=("lora_te_",)),
                 peft_file(lora, tmp_path / "peft2.safetensors", ref, components=("text_encoder_2",)),
                 peft_file(lora, tmp_path / "peft1.safetensors", ref, components=("text_encoder",))):
        refiner.load_lora(file, scale=0.6)
        try:
            assert all(torch.equal(x, y) for x, y in zip(outputs(refiner), expected)), file.name
        finally:
            refiner.unload_lora()
    assert all(torch.equal(x, y) for x, y in zip(outputs(refiner), base))
    bad = kohya_file(lora, tmp_path / "te1.safetensors", sgm.__getitem__, te_prefixes=("lora_te1_",))
    with pytest.raises(CheckpointError, match=r"lora_te1_text_model_encoder_layers_0_mlp_fc1\.alpha.*"
                                              r"text encoders are named lora_te_ / lora_te2_"):
        refiner.load_lora(bad)
    assert refiner.loras == {}


def test_wrong_files_are_refused_naming_the_key(pipe, tmp_path):
    lora = random_lora(pipe, seed=6)
    good = kohya_file(dict(list(lora.items())[:3]), tmp_path / "good.safetensors", sgm_names(pipe).__getitem__)
    from safetensors.torch import load_file

    good_sd = load_file(good)
    q = pipe.text_encoder.get_submodule("encoders.0.encoder.layers.0.self_attn.q_proj")
    cases = {  # an SD1 LoRA's text encoder, an unknown layer, a bigG shape under the ViT-L name, a third encoder
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": "lora_te1_ / text_encoder",
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": "no such Linear or Conv2d",  # level 0: no attention
        "text_encoder_3.encoder.layers.0.self_attn.q_proj.lora_A.weight": "not a LoRA tensor name",
    }
    for i, (key, message) in enumerate(cases.items()):
        save_file({**good_sd, key: torch.zeros(RANK, q.in_features)}, str(tmp_path / f"bad{i}.safetensors"))
        with pytest.raises(CheckpointError, match=message) as caught:
            pipe.load_lora(tmp_path / f"bad{i}.safetensors")
        assert key in str(caught.value)
    g_q = lora["text_encoder", "encoders.1.encoder.layers.0.self_attn.q_proj"]
    save_file({**good_sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": g_q[0],
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": g_q[1]},
              str(tmp_path / "swapped.safetensors"))
    with pytest.raises(CheckpointError, match=r"lora_te1_.*has shape .* another model \(SD1, SD2 or SDXL\?\)"):
        pipe.load_lora(tmp_path / "swapped.safetensors")
    assert pipe.loras == {} and not any(m._forward_hooks for m in targets(pipe).values())


def test_generation_with_an_sdxl_lora(pipe, tmp_path):
    settings = dict(num_inference_steps=2, height=32, width=32, seed=1)
    before = np.asarray(pipe(PROMPT, **settings)[0])
    pipe.load_lora(kohya_file(random_lora(pipe, seed=7), tmp_path / "style.safetensors", sgm_names(pipe).__getitem__))
    try:
        assert not np.array_equal(np.asarray(pipe(PROMPT, **settings)[0]), before)
    finally:
        pipe.unload_lora()
    assert np.array_equal(np.asarray(pipe(PROMPT, **settings)[0]), before)


# ---- textual inversion -----------------------------------------------------------------------------------


def sdxl_vectors(n: int, seed: int) -> dict[str, torch.Tensor]:
    """An SDXL embedding's vectors for the tiny encoders: clip_l (n, 32), clip_g (n, 64)."""
    g = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, TINY_SDXL.text_encoders[0].width, generator=g) * 0.5,
            "clip_g": torch.randn(n, TINY_SDXL.text_encoders[1].width, generator=g) * 0.5}


def write_sdxl(folder, name: str, n: int, seed: int = 3, kind: str = "safetensors"):
    """An SDXL embedding as kohya's sdxl_train_textual_inversion (.safetensors) or A1111 (.pt) writes it."""
    vectors = sdxl_vectors(n, seed)
    path = folder / f"{name}.{kind}"
    if kind == "safetensors":
        save_file(vectors, str(path))
    else:
        torch.save(vectors, path)
    return path


def chunk_ids(tokenizer, words: list[int]) -> list[int]:
    ids = [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CHUNK_LENGTH + 2 - len(ids))


def by_hand(encoder, ids: list[int], replaced: dict[int, torch.Tensor]) -> torch.Tensor:
    """One sdtorch CLIP encoder's SDXL conditioning (penultimate layer, not normed) with the token-embedding rows at
    `replaced` positions set to the given vectors: what a prompt with an embedding should encode to (1, 77, W)."""
    emb = encoder.embeddings
    x = emb.token_embedding(torch.tensor([ids])).clone()  # (1, 77, W)
    for position, vector in replaced.items():
        x[0, position] = vector
    x = x + emb.position_embedding(torch.arange(len(ids)))
    return encoder.encoder(x, num_layers=encoder.config.num_layers - 1)


@pytest.fixture
def ti_pipe(pipe):
    yield pipe
    pipe.unload_embedding()


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
@pytest.mark.parametrize("n", [1, 3])
def test_embedding_changes_only_the_encoding_where_its_name_stands(ti_pipe, tmp_path, kind, n):
    pipe = ti_pipe
    before, after = "a photo of", "on the grass"
    prompt = f"{before} mystyle {after}"
    with torch.no_grad():
        plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
        other = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a dog, on the grass"])
        path = write_sdxl(tmp_path, "mystyle", n, kind=kind)
        assert pipe.load_embedding(path) == "mystyle"
        assert pipe.embeddings == {"mystyle": n}
        ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])  # (1, 77, 32 + 64)
        assert torch.equal(encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a dog, on the grass"]), other)

        head, tail = pipe.tokenizer.encode(before), pipe.tokenizer.encode(after)
        start = 1 + len(head)  # after BOS
        expected = chunk_ids(pipe.tokenizer, [*head, *range(VOCAB, VOCAB + n), *tail])
        database = pipe.text_encoder.textual_inversion
        assert tokenize_prompt(pipe.tokenizer, prompt, embeddings=database)[0].tokens == expected
        placeholder = chunk_ids(pipe.tokenizer, [*head, *[0] * n, *tail])
        vectors = sdxl_vectors(n, seed=3)
        parts = []
        for key, encoder in zip(("clip_l", "clip_g"), pipe.text_encoder.encoders):
            ids = placeholder if encoder.config.pad_token_id == pipe.tokenizer.pad_token_id else [
                i if j <= placeholder.index(pipe.tokenizer.eos_token_id) else encoder.config.pad_token_id
                for j, i in enumerate(placeholder)]
            parts.append(by_hand(encoder, ids, {start + i: vectors[key][i] for i in range(n)}))
        assert_parity(ours, torch.cat(parts, dim=-1), rel=1e-6)
        assert torch.equal(pipe.text_encoder(torch.tensor([expected])), torch.cat(parts, dim=-1))  # ids index exactly
        # causal attention: the tokens before the name encode as before, the name and what follows it do not
        # (encode_prompts' emphasis mean-restoration rescales the whole chunk by a ratio within rounding of 1)
        assert_parity(ours[:, :start], plain[:, :start], rel=1e-6)
        assert torch.equal(pipe.text_encoder(torch.tensor([expected]))[:, :start],
                           pipe.text_encoder(pipe.tokenizer([prompt]))[:, :start])
        assert not torch.allclose(ours[:, start:], plain[:, start:])
        widths = list(pipe.text_encoder.part_widths)
        for mine, without in zip(ours.split(widths, -1), plain.split(widths, -1)):  # each encoder got its vectors
            assert not torch.allclose(mine[:, start], without[:, start])


@pytest.mark.parametrize("n", [1, 3])
def test_matches_diffusers_encode_prompt(ti_pipe, tokenizer_dir, tmp_path, n):
    """diffusers loads an SDXL embedding as two load_textual_inversion calls (clip_l into text_encoder, clip_g
    into text_encoder_2); its encode_prompt gives our context and pooled embedding."""
    from safetensors.torch import load_file

    pipe = ti_pipe
    path = write_sdxl(tmp_path, "mystyle", n, seed=8)
    prompt = "a photo of mystyle on the grass"
    name = pipe.load_embedding(path)
    ref = twin(pipe, tokenizer_dir)
    state = load_file(path)
    ref.load_textual_inversion(state["clip_l"], token=name, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token=name, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    with torch.no_grad():
        theirs, _, their_pooled, _ = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        contexts, pooled = encode_prompt_groups(pipe.tokenizer, pipe.text_encoder, [[prompt]])
    assert_parity(contexts[0], theirs)
    assert_parity(pooled[0], their_pooled)


def test_pipeline_api_unload_is_exact_and_generation_records_the_hash(ti_pipe, tmp_path):
    import hashlib

    from sdtorch.infotext import parse_infotext

    pipe = ti_pipe
    prompt = "a photo of mystyle and otherstyle"
    with torch.no_grad():
        plain = encode_prompt_groups(pipe.tokenizer, pipe.text_encoder, [[prompt]])
        mine = write_sdxl(tmp_path, "mystyle", 2, seed=1)
        pipe.load_embedding(mine)
        pipe.load_embedding(write_sdxl(tmp_path, "otherstyle", 1, seed=2, kind="pt"))
        assert pipe.embeddings == {"mystyle": 2, "otherstyle": 1}
        for encoder in pipe.text_encoder.encoders:  # each encoder its own vectors, the same names and ids
            assert encoder.textual_inversion.counts == {"mystyle": 2, "otherstyle": 1}
        assert torch.equal(pipe.text_encoder.encoders[1].textual_inversion.vectors,
                           torch.cat([sdxl_vectors(2, 1)["clip_g"], sdxl_vectors(1, 2)["clip_g"]]))
        both = encode_prompt_groups(pipe.tokenizer, pipe.text_encoder, [[prompt]])
        assert not torch.equal(both[0][0], plain[0][0]) and not torch.equal(both[1][0], plain[1][0])
        info = parse_infotext(pipe(prompt.replace("otherstyle", "cat"), steps=1, seed=1, width=32, height=32)[0]
                              .info["parameters"])
        assert info.extra["TI hashes"] == f"mystyle: {hashlib.sha256(mine.read_bytes()).hexdigest()[:12]}"
        pipe.unload_embedding("mystyle")
        assert pipe.embeddings == {"otherstyle": 1}
        assert all(e.textual_inversion.counts == {"otherstyle": 1} for e in pipe.text_encoder.encoders)
        pipe.unload_embedding()
        assert pipe.embeddings == {} and pipe.text_encoder.textual_inversion is None
        assert all(e.textual_inversion is None for e in pipe.text_encoder.encoders)
        again = encode_prompt_groups(pipe.tokenizer, pipe.text_encoder, [[prompt]])
        assert torch.equal(again[0][0], plain[0][0]) and torch.equal(again[1][0], plain[1][0])
    with pytest.raises(InvalidInputError, match="no embedding named 'nothing'"):
        pipe.unload_embedding("nothing")


def test_wrong_embeddings_are_refused_and_load_nothing(ti_pipe, tmp_path):
    pipe = ti_pipe
    sd1 = tmp_path / "sd1style.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(sd1))
    with pytest.raises(CheckpointError, match=r"sd1style.*an SD1 / SD2 embedding .*width 32.*clip_l and clip_g"):
        pipe.load_embedding(sd1)
    wide = tmp_path / "wide.safetensors"  # clip_l fits ViT-L; clip_g has the wrong width for bigG
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 80)}, str(wide))
    with pytest.raises(CheckpointError, match="width 80.*width is 64"):
        pipe.load_embedding(wide)
    uneven = tmp_path / "uneven.safetensors"
    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(1, 64)}, str(uneven))
    with pytest.raises(CheckpointError, match="vector counts differ"):
        read_sdxl_embedding(uneven)
    half = tmp_path / "half.safetensors"
    save_file({"clip_l": torch.zeros(1, 32)}, str(half))
    with pytest.raises(CheckpointError, match="has no clip_g"):
        pipe.load_embedding(half)
    assert pipe.embeddings == {} and all(e.textual_inversion is None for e in pipe.text_encoder.encoders)
    # an embedding put into one encoder alone (around the pipeline) is found out, not read with the wrong ids
    load_embedding(pipe.tokenizer, pipe.text_encoder.encoders[0], sd1)
    with pytest.raises(InvalidInputError, match="hold different textual-inversion embeddings"):
        encode_prompts(pipe.tokenizer, pipe.text_encoder, ["sd1style"])


def test_embeddings_folder_on_sdxl_skips_sd1_files(ti_pipe, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_sdxl(folder, "xlstyle", 2)
    save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "sd1style.safetensors"))
    report = load_embeddings_dir(ti_pipe, folder)
    assert report.loaded == ["xlstyle"] and ti_pipe.embeddings == {"xlstyle": 2}
    assert len(report.skipped) == 1 and "sd1style" in report.skipped[0] and "SD1 / SD2" in report.skipped[0]


def test_refiner_takes_the_clip_g_vectors(refiner, tmp_path):
    tokenizer = refiner.tokenizer
    with torch.no_grad():
        refiner.load_embedding(write_sdxl(tmp_path, "mystyle", 2, seed=5))
        try:
            assert refiner.embeddings == {"mystyle": 2}
            ours = encode_prompts(tokenizer, refiner.text_encoder, ["mystyle cat"])
            encoder = refiner.text_encoder.encoders[0]
            ids = [tokenizer.bos_token_id, 0, 0, *tokenizer.encode("cat"), tokenizer.eos_token_id]
            ids += [encoder.config.pad_token_id] * (CHUNK_LENGTH + 2 - len(ids))
            g = sdxl_vectors(2, seed=5)["clip_g"]
            assert_parity(ours, by_hand(encoder, ids, {1: g[0], 2: g[1]}), rel=1e-6)
        finally:
            refiner.unload_embedding()


def test_textual_inversion_training_on_sdxl_is_refused_clearly(pipe):
    from sdtorch.adapters.embeddings import add_trainable_embedding, init_vectors

    with pytest.raises(InvalidInputError, match="training for SDXL models is not supported yet"):
        init_vectors(pipe.tokenizer, pipe.text_encoder, "cat", 2)
    with pytest.raises(InvalidInputError, match="training for SDXL models is not supported yet"):
        add_trainable_embedding(pipe.tokenizer, pipe.text_encoder, "new", torch.zeros(1, 32))
