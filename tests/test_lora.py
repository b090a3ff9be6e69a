"""LoRA files (kohya and diffusers / peft) applied to tiny models, against diffusers' `load_lora_weights`."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity, random_pipeline
from safetensors.torch import save_file
from torch import nn

import sdtorch
from sdtorch.adapters.lora import kohya_names, lora_hash
from sdtorch.configs import TINY_SD1, TINY_SD2
from sdtorch.errors import CheckpointError, InvalidInputError
from sdtorch.pipeline import Pipeline

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),  # diffusers' second adapter
]

RANK, ALPHA = 4, 2.0
PROMPT = "a red circle in the top left"


def targets(pipe: Pipeline) -> dict[tuple[str, str], nn.Module]:
    """Every layer a LoRA may change: attention q/k/v/out, proj_in/out, ff, ResBlock and sampler convs (LoCon),
    time projections; the text encoder's q/k/v/out_proj and mlp fc1/fc2."""
    out = {}
    for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                out[part, path] = m
    return out


def random_lora(pipe: Pipeline, seed: int, rank: int = RANK) -> dict[tuple[str, str], tuple[torch.Tensor, ...]]:
    """{(part, path): (down, up)} in LoCon's layout: conv down (rank, in, kh, kw), up (out, rank, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for target, m in targets(pipe).items():
        if isinstance(m, nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * 0.2
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(rank, m.in_features, generator=g) * 0.2
            up = torch.randn(m.out_features, rank, generator=g) * 0.2
        lora[target] = (down, up)
    return lora


def kohya_name(part: str, path: str) -> str:
    return ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")


def kohya_file(lora, path, alpha: float | None = ALPHA, names=kohya_name):
    sd = {}
    for (part, module), (down, up) in lora.items():
        name = names(part, module)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def peft_name(part: str, path: str, text_model: bool = False) -> str:
    """diffusers' key stem; transformers 5 dropped CLIPTextModel's `text_model.`, older files have it."""
    return f"unet.{path}" if part == "unet" else f"text_encoder.{'text_model.' if text_model else ''}{path}"


def peft_file(lora, path, alpha: float = ALPHA, config: dict[str, dict] | None = None):
    """diffusers' own layout: lora_A / lora_B keys and the peft LoraConfig (plus `config[part]`) in
    `lora_adapter_metadata`."""
    sd, meta = {}, {f"{part}.{k}": v for part, fields in (config or {}).items() for k, v in fields.items()}
    for (part, module), (down, up) in lora.items():
        sd[f"{peft_name(part, module)}.lora_A.weight"] = down
        sd[f"{peft_name(part, module)}.lora_B.weight"] = up
        meta.setdefault(f"{part}.target_modules", []).append(module)
    for part in ("unet", "text_encoder"):
        meta.update({f"{part}.r": RANK, f"{part}.lora_alpha": alpha})
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(sdtorch pipeline, diffusers folder) with the same tiny random SD1 weights."""
    folder = tmp_path_factory.mktemp("sd1") / "model"
    sdtorch.save(random_pipeline(TINY_SD1, seed=3), folder, format="diffusers")
    return sdtorch.load(folder), folder


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0])
    return x, t, torch.randn(2, 7, 128, generator=g)


def outputs(pipe: Pipeline, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text-encoder output) of the sdtorch pipeline."""
    x, t, context = inputs
    with torch.no_grad():
        return pipe.unet(x, t, context), pipe.text_encoder(pipe.tokenizer([PROMPT, ""]))


def reference_outputs(folder, files: list, scales: list[float], inputs, pipe: Pipeline):
    """The same from diffusers with peft, the LoRAs loaded by `load_lora_weights` and scaled by `set_adapters`."""
    import peft  # noqa: F401  (a test extra: diffusers needs it for LoRA; a missing one fails, never skips)
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(files))]
    for file, name in zip(files, names):
        ref.load_lora_weights(str(file), adapter_name=name)
    ref.set_adapters(names, adapter_weights=scales)
    x, t, context = inputs
    with torch.no_grad():
        unet = ref.unet(x, t, encoder_hidden_states=context).sample
        text = ref.text_encoder(pipe.tokenizer([PROMPT, ""])).last_hidden_state
    return unet, text


def check_against(ours, theirs, base) -> None:
    for a, b, c in zip(ours, theirs, base):
        assert (b - c).abs().max() > 1e-2 * c.abs().max()  # the LoRA changes the output noticeably
        assert_parity(a, b, rel=1e-4)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "peft_rslora_patterns"])
def test_matches_diffusers(model, inputs, tmp_path, fmt):
    pipe, folder = model
    base = outputs(pipe, inputs)
    lora = random_lora(pipe, seed=1)
    if fmt == "kohya":
        file = kohya_file(lora, tmp_path / f"{fmt}.safetensors")
    else:  # rank-stabilised scaling alpha / sqrt(rank), and per-module alphas by peft's patterns
        config = {"unet": {"use_rslora": True, "alpha_pattern": {"to_q": 8.0}},
                  "text_encoder": {"use_rslora": True, "alpha_pattern": {"q_proj": 0.5}}}
        file = peft_file(lora, tmp_path / f"{fmt}.safetensors", config=config if fmt != "peft" else None)
    assert pipe.load_lora(file, scale=0.7) == fmt
    try:
        assert pipe.loras == {fmt: 0.7}
        check_against(outputs(pipe, inputs), reference_outputs(folder, [file], [0.7], inputs, pipe), base)
    finally:
        pipe.unload_lora()


def test_two_loras_with_their_own_scales(model, inputs, tmp_path):
    """Two LoRAs at once (one kohya, one peft) equal diffusers' two adapters; each layer's change is the sum."""
    pipe, folder = model
    base = outputs(pipe, inputs)
    a = kohya_file(random_lora(pipe, seed=2), tmp_path / "a.safetensors")
    b = peft_file(random_lora(pipe, seed=3), tmp_path / "b.safetensors")
    layers = {"linear": pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
              "conv": pipe.unet.get_submodule("up_blocks.0.resnets.1.conv2")}
    x = {"linear": torch.randn(2, 7, 128), "conv": torch.randn(1, 64, 6, 6)}

    def layer_outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: m(x[k]) for k, m in layers.items()}

    plain, alone = layer_outputs(), []
    for file, scale in ((a, 0.8), (b, -0.5)):
        pipe.load_lora(file, scale=scale)
        alone.append(layer_outputs())
        pipe.unload_lora()
    pipe.load_lora(a, scale=0.8)
    pipe.load_lora(b, scale=-0.5)
    try:
        assert pipe.loras == {"a": 0.8, "b": -0.5}
        for k, both in layer_outputs().items():
            assert_parity(both, alone[0][k] + alone[1][k] - plain[k], rel=1e-5)
        check_against(outputs(pipe, inputs), reference_outputs(folder, [a, b], [0.8, -0.5], inputs, pipe), base)
    finally:
        pipe.unload_lora()


def test_unload_and_scale_changes_are_exact(model, inputs, tmp_path):
    pipe, _ = model
    base = outputs(pipe, inputs)
    a = kohya_file(random_lora(pipe, seed=4), tmp_path / "a.safetensors")
    b = kohya_file(random_lora(pipe, seed=5), tmp_path / "b.safetensors")
    pipe.load_lora(a, scale=0.6)
    only_a = outputs(pipe, inputs)
    pipe.load_lora(b, name="second")
    pipe.set_lora_scale("second", 0.0)  # scale 0 skips the LoRA: exactly the outputs without it
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe, inputs), only_a))
    pipe.set_lora_scale("second", 1.0)
    pipe.unload_lora("second")
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe, inputs), only_a))
    pipe.set_lora_scale("a", 0.3)
    pipe.unload_lora()
    assert pipe.loras == {}
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe, inputs), base))
    assert not any(m._forward_hooks for m in targets(pipe).values())
    with pytest.raises(InvalidInputError, match="no LoRA named 'a'"):
        pipe.unload_lora("a")


def test_ldm_names_and_alternative_layouts_equal_the_diffusers_names(model, inputs, tmp_path):
    """kohya's original (ldm) layer names, Linear LoRAs on 1x1 convs (2-D weights) and the older diffusers
    keys all give bit-identical outputs to the kohya diffusers-path file."""
    pipe, _ = model
    lora = random_lora(pipe, seed=6)
    pipe.load_lora(kohya_file(lora, tmp_path / "ref.safetensors"))
    expected = outputs(pipe, inputs)
    pipe.unload_lora()

    names = kohya_names({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    ldm = {path: name for name, (part, path) in names.items() if part == "unet" and name != kohya_name(part, path)}
    assert ldm["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q")
    assert ldm["up_blocks.0.resnets.0.conv1"] == "lora_unet_output_blocks_0_0_in_layers_2"
    ldm_file = kohya_file(lora, tmp_path / "ldm.safetensors",
                          names=lambda part, path: ldm.get(path, kohya_name(part, path)) if part == "unet"
                          else kohya_name(part, path))

    flat = {k: (d.flatten(1) if k[1].endswith(("proj_in", "proj_out")) else d, u.flatten(1) if u.ndim == 4 else u)
            for k, (d, u) in lora.items()}  # (rank, in) on SD1's 1x1 conv proj_in / proj_out
    flat_file = kohya_file(flat, tmp_path / "flat.safetensors")

    old, processor = {}, {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    te_old = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for (part, path), (down, up) in lora.items():
        head, _, last = path.rpartition(".") if not path.endswith("to_out.0") else (path[:-9], "", "to_out.0")
        if part == "unet" and last in processor:
            stem = f"unet.{head}.processor.{processor[last]}"
        elif part == "text_encoder" and last in te_old:
            stem = f"text_encoder.text_model.{head}.{te_old[last]}"
        else:
            stem = peft_name(part, path, text_model=True) + (".lora" if part == "unet" else ".lora_linear_layer")
        old[f"{stem}.down.weight"], old[f"{stem}.up.weight"] = down, up
        old[f"{peft_name(part, path)}.alpha"] = torch.tensor(ALPHA)
    save_file(old, str(tmp_path / "old.safetensors"))

    for file in (ldm_file, flat_file, tmp_path / "old.safetensors"):
        pipe.load_lora(file)
        try:
            assert all(torch.equal(x, y) for x, y in zip(outputs(pipe, inputs), expected)), file.name
        finally:
            pipe.unload_lora()


def test_by_hand_alpha_defaults_to_rank_and_locon(model, tmp_path):
    """A Linear and a 3x3 conv (LoCon) against W + scale * alpha / rank * up @ down computed by hand."""
    pipe, _ = model
    lora = random_lora(pipe, seed=7, rank=3)
    linear, conv = ("text_encoder", "encoder.layers.0.self_attn.q_proj"), ("unet", "down_blocks.0.resnets.0.conv1")
    picked = {linear: lora[linear], conv: lora[conv]}
    g = torch.Generator().manual_seed(2)
    x_lin, x_conv = torch.randn(2, 5, 128, generator=g), torch.randn(1, 32, 8, 8, generator=g)
    for alpha, factor in ((None, 1.0), (1.5, 0.5)):  # no alpha key: alpha = rank
        pipe.load_lora(kohya_file(picked, tmp_path / "hand.safetensors", alpha=alpha), scale=0.9)
        try:
            q, c = pipe.text_encoder.get_submodule(linear[1]), pipe.unet.get_submodule(conv[1])
            down, up = lora[linear]
            w = q.weight + 0.9 * factor * up @ down
            assert_parity(q(x_lin).detach(), F.linear(x_lin, w, q.bias).detach(), rel=1e-5)
            down, up = lora[conv]
            w = c.weight + 0.9 * factor * torch.einsum("or,rikl->oikl", up.flatten(1), down)
            assert_parity(c(x_conv).detach(), F.conv2d(x_conv, w, c.bias, padding=1).detach(), rel=1e-5)
        finally:
            pipe.unload_lora()


def test_sd2_linear_projections_take_conv_shaped_weights(inputs, tmp_path):
    """SD2's proj_in / proj_out are Linear: a LoRA stored as 1x1 convs (rank, in, 1, 1) gives the same outputs."""
    pipe = random_pipeline(TINY_SD2, seed=4)
    lora = random_lora(pipe, seed=8)
    g = torch.Generator().manual_seed(3)
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([50.0]), torch.randn(1, 7, 128, generator=g)
    pipe.load_lora(kohya_file(lora, tmp_path / "linear.safetensors"))
    with torch.no_grad():
        expected = pipe.unet(x, t, context)
    pipe.unload_lora()
    conv = {k: ((d[:, :, None, None], u[:, :, None, None]) if k[1].endswith(("proj_in", "proj_out")) else (d, u))
            for k, (d, u) in lora.items()}
    pipe.load_lora(kohya_file(conv, tmp_path / "conv.safetensors"))
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, context), expected)


def test_half_precision_and_moving_the_model(model, inputs, tmp_path):
    """The LoRA follows the model's dtype: loaded in bfloat16, or loaded in float32 and then moved."""
    pipe, folder = model
    file = kohya_file(random_lora(pipe, seed=9), tmp_path / "l.safetensors")
    pipe.load_lora(file, scale=0.5)
    try:
        expected = outputs(pipe, inputs)
    finally:
        pipe.unload_lora()
    half = sdtorch.load(folder, dtype=torch.bfloat16)
    half.load_lora(file, scale=0.5)
    x, t, context = inputs
    for p in (half, sdtorch.load(folder)):
        if p is not half:
            p.load_lora(file, scale=0.5)
            p.to(dtype=torch.bfloat16)
        with torch.no_grad():
            unet = p.unet(x.bfloat16(), t, context.bfloat16())
            text = p.text_encoder(p.tokenizer([PROMPT, ""]))
        assert unet.dtype == text.dtype == torch.bfloat16
        assert_parity(unet, expected[0], rel=5e-2)
        assert_parity(text, expected[1], rel=5e-2)


def test_bad_files_are_refused_with_the_key(model, tmp_path):
    pipe, _ = model
    lora = random_lora(pipe, seed=10)
    good = {}
    for (part, path), (down, up) in list(lora.items())[:3]:
        good[f"{kohya_name(part, path)}.lora_down.weight"], good[f"{kohya_name(part, path)}.lora_up.weight"] = down, up
    (_, path), (down, up) = next(iter(lora.items()))
    cases = {
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": "no such Linear or Conv2d",
        f"{kohya_name('unet', path)}.lora_mid.weight": "Tucker",
        f"{kohya_name('unet', path)}.hada_w1_a": "LoHa",
        f"{kohya_name('unet', path)}.dora_scale": "DoRA",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": "SDXL",
        "unet.conv_in.lora_B.bias": "not a LoRA tensor name",
        "model.diffusion_model.input_blocks.0.0.weight": "not a LoRA tensor name",
    }
    for i, (key, message) in enumerate(cases.items()):
        save_file({**good, key: torch.zeros(1)}, str(tmp_path / f"bad{i}.safetensors"))
        with pytest.raises(CheckpointError, match=message) as caught:
            pipe.load_lora(tmp_path / f"bad{i}.safetensors")
        assert key in str(caught.value)
    narrow = up[:, :2].contiguous()  # rank 2 against the down weight's rank 4
    save_file({**good, f"{kohya_name('unet', path)}.lora_up.weight": narrow}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"has shape .* another model"):
        pipe.load_lora(tmp_path / "shape.safetensors")
    save_file({**good, "lora_unet_input_blocks_0_0.lora_down.weight": lora["unet", "conv_in"][0].clone()},
              str(tmp_path / "twice.safetensors"))  # conv_in under its diffusers and its ldm name
    with pytest.raises(CheckpointError, match="lora_unet_input_blocks_0_0.lora_down.weight' name the same layer"):
        pipe.load_lora(tmp_path / "twice.safetensors")
    save_file({f"{kohya_name('unet', path)}.lora_down.weight": down}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="no matching up weight"):
        pipe.load_lora(tmp_path / "half.safetensors")
    assert pipe.loras == {} and not any(m._forward_hooks for m in targets(pipe).values())
    pipe.load_lora(kohya_file({k: lora[k] for k in list(lora)[:3]}, tmp_path / "ok.safetensors"))
    try:
        with pytest.raises(InvalidInputError, match="already loaded"):
            pipe.load_lora(tmp_path / "ok.safetensors")
        with pytest.raises(InvalidInputError, match="finite"):
            pipe.set_lora_scale("ok", float("nan"))
    finally:
        pipe.unload_lora()


def test_diffusers_folder_and_pickle(model, inputs, tmp_path):
    """A folder holding pytorch_lora_weights.safetensors loads under the folder's name; a .pt as its stem."""
    pipe, _ = model
    lora = random_lora(pipe, seed=11)
    (tmp_path / "my_style").mkdir()
    peft_file(lora, tmp_path / "my_style" / "pytorch_lora_weights.safetensors")
    pipe.load_lora(tmp_path / "my_style")
    expected = outputs(pipe, inputs)
    pipe.unload_lora()
    sd = {}
    for (part, module), (down, up) in lora.items():
        stem = peft_name(part, module, text_model=True)
        sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"], sd[f"{stem}.alpha"] = down, up, torch.tensor(ALPHA)
    torch.save(sd, tmp_path / "pickled.pt")
    assert pipe.load_lora(tmp_path / "pickled.pt") == "pickled"
    try:
        assert all(torch.equal(x, y) for x, y in zip(outputs(pipe, inputs), expected))
    finally:
        pipe.unload_lora()
    assert pipe.load_lora(tmp_path / "my_style") == "my_style"
    pipe.unload_lora()


def test_generation_with_a_lora(model, tmp_path):
    """The whole pipeline (under inference_mode) runs the LoRA; unloading gives back the very same image."""
    pipe, _ = model
    settings = dict(num_inference_steps=2, height=32, width=32, seed=1)
    before = np.asarray(pipe(PROMPT, **settings)[0])
    pipe.load_lora(kohya_file(random_lora(pipe, seed=12), tmp_path / "style.safetensors"), scale=0.8)
    try:
        assert not np.array_equal(np.asarray(pipe(PROMPT, **settings)[0]), before)
    finally:
        pipe.unload_lora()
    assert np.array_equal(np.asarray(pipe(PROMPT, **settings)[0]), before)


def test_lora_hash_is_a1111s(tmp_path):
    """sha256 of the tensor data after the header (kohya's addnet hash), first 12 hex digits; a hash the file
    records in `sshs_model_hash` wins (as in A1111); a pickle hashes whole."""
    tensors = {"lora_unet_conv_in.lora_down.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"ss_output_name": "a"})
    data = (tmp_path / "a.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(tmp_path / "a.safetensors") == hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "b"})  # same tensors, same hash
    assert lora_hash(tmp_path / "b.safetensors") == lora_hash(tmp_path / "a.safetensors")
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert lora_hash(tmp_path / "c.safetensors") == "ABCDEF012345"
    torch.save(tensors, tmp_path / "d.pt")
    assert lora_hash(tmp_path / "d.pt") == hashlib.sha256((tmp_path / "d.pt").read_bytes()).hexdigest()[:12]
