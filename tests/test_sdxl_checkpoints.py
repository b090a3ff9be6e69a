"""SDXL checkpoints: original single files (base, refiner, inpainting) read from their tensors alone, diffusers
folders written by diffusers itself, sdtorch's own saves in both formats read back by sdtorch and diffusers, and
broken or mismatched files refused with a clear message."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_parity, random_pipeline
from safetensors.torch import load_file, save_file

import sdtorch
from sdtorch.checkpoints.detect import infer_config
from sdtorch.checkpoints.keymaps import original_to_parts, parts_to_original
from sdtorch.cli import main
from sdtorch.configs import SDXL, SDXL_REFINER, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdtorch.errors import ArchitectureError, CheckpointError, MissingKeysError
from sdtorch.models.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# SDXL in miniature, following the conventions sizes are read back by (head width 64 in CLIP and the UNet): CLIP
# ViT-L and OpenCLIP bigG (with a 32-wide projection), levels without and with attention, transformer depth 1 and
# 2 (the base, one a level) or 2 everywhere (the refiner, 4 levels, the last without attention).
CLIP_L = TextEncoderConfig(width=64, num_layers=2, num_heads=1, mlp_width=128, projection_dim=64,
                           hidden_state_output=True)
CLIP_G = TextEncoderConfig(width=128, num_layers=3, num_heads=2, mlp_width=256, activation="gelu", pad_token_id=0,
                           projection_dim=32, hidden_state_output=True, with_projection=True)
VAE = VAEConfig(block_channels=(32, 64), layers_per_block=1, scaling_factor=0.13025)
BASE = ModelConfig(
    family="sdxl",
    unet=UNetConfig(block_channels=(64, 64, 128), attention_levels=(False, True, True), layers_per_block=1,
                    num_heads=(1, 1, 2), context_dim=64 + 128, use_linear_proj=True, transformer_depth=(0, 1, 2),
                    sample_size=128, addition_time_embed_dim=8, addition_in_dim=32 + 6 * 8),
    vae=VAE, text_encoder=CLIP_L, text_encoder_2=CLIP_G,
)
REFINER = ModelConfig(
    family="sdxl-refiner",
    unet=UNetConfig(block_channels=(64, 64, 128, 128), attention_levels=(False, True, True, False),
                    layers_per_block=1, num_heads=(1, 1, 2, 2), context_dim=128, use_linear_proj=True,
                    transformer_depth=2, sample_size=128, addition_time_embed_dim=8, addition_in_dim=32 + 5 * 8),
    vae=VAE, text_encoder=CLIP_G,
)
INPAINT = BASE.replace(unet=dataclasses.replace(BASE.unet, in_channels=9))
CONFIGS = {"sdxl": BASE, "sdxl-refiner": REFINER, "sdxl-inpaint": INPAINT}
PROMPT = "a red circle in the top left"


def tensors(pipe) -> dict[str, torch.Tensor]:
    """A pipeline's weights under their original single-file names."""
    return parts_to_original({name: m.state_dict() for name, m in pipe.modules.items()}, pipe.config)


def extras(config: ModelConfig) -> dict[str, torch.Tensor]:
    """What released SDXL files carry besides the model: position ids, OpenCLIP's logit scale, DDPM buffers."""
    bigg = "conditioner.embedders.1.model." if config.family == "sdxl" else "conditioner.embedders.0.model."
    out = {bigg + "logit_scale": torch.tensor(4.6), "alphas_cumprod": torch.rand(1000)}
    if config.family == "sdxl":
        out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


@pytest.fixture(scope="module")
def original_files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """kind -> (a foreign original-layout single file without sdtorch metadata, the tensors sdtorch keeps)."""
    root = tmp_path_factory.mktemp("sdxl-files")
    files = {}
    for seed, (kind, config) in enumerate(CONFIGS.items()):
        state = tensors(random_pipeline(config, seed=10 + seed))
        path = root / f"{kind}.safetensors"
        save_file({**state, **extras(config)}, str(path))
        files[kind] = path, state
    return files


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---- original single files ----------------------------------------------------------------------------------

def test_original_names_are_sdxls():
    """The names SDXL's released files and A1111 / ComfyUI / diffusers' single-file loader use."""
    names = tensors(random_pipeline(BASE, seed=0))
    for key, shape in {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 64),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight": (64, 64),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 128),
        "conditioner.embedders.1.model.positional_embedding": (77, 128),
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight": (3 * 128, 128),
        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.weight": (128, 256),
        "conditioner.embedders.1.model.ln_final.bias": (128,),
        "conditioner.embedders.1.model.text_projection": (128, 32),  # used as x @ text_projection
        "model.diffusion_model.label_emb.0.0.weight": (256, 32 + 6 * 8),
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight": (128, 192),
        "first_stage_model.decoder.mid.attn_1.q.weight": (64, 64, 1, 1),
    }.items():
        assert tuple(names[key].shape) == shape, key
    refiner = tensors(random_pipeline(REFINER, seed=0))
    assert "conditioner.embedders.0.model.text_projection" in refiner
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer")) for k in refiner)


# Names and shapes in the released sd_xl_base_1.0 / sd_xl_refiner_1.0 files, one anchor per rule.
FULL_SIZE_ANCHORS = {
    "sdxl": {
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    },
    "sdxl-refiner": {
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.model.transformer.resblocks.31.attn.out_proj.weight": (1280, 1280),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight": (768, 1280),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (768, 768, 3, 3),
    },
}


@pytest.mark.parametrize("config", [SDXL, SDXL_REFINER], ids=["sdxl", "sdxl-refiner"])
def test_full_size_layout_and_detection_on_meta_device(config):
    """Full-size SDXL (meta tensors: names and shapes only): the released files' anchors, and the presets read back."""
    from sdtorch.models.sdxl_text import text_encoder_for
    from sdtorch.models.unet import UNet
    from sdtorch.models.vae import AutoencoderKL

    with torch.device("meta"):
        models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text_encoder": text_encoder_for(config)}
    parts = {name: m.state_dict() for name, m in models.items()}
    sd = parts_to_original(parts, config)
    anchors = FULL_SIZE_ANCHORS[config.family]
    assert {k: tuple(sd[k].shape) for k in anchors} == anchors
    assert infer_config(sd) == config
    back, ignored = original_to_parts(sd, config)
    assert ignored == []
    assert {p: {k: v.shape for k, v in d.items()} for p, d in back.items()} == \
        {p: {k: v.shape for k, v in d.items()} for p, d in parts.items()}


@torch.no_grad()
def test_original_layout_is_what_diffusers_single_file_converters_read():
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = random_pipeline(BASE, seed=1)
    original = tensors(pipe)
    assert_same_tensors(convert_ldm_unet_checkpoint(original, BASE.unet.to_diffusers()), pipe.unet.state_dict())
    assert_same_tensors(convert_ldm_vae_checkpoint(original, BASE.vae.to_diffusers()), pipe.vae.state_dict())
    clip_l, clip_g = pipe.text_encoder.encoders
    text = convert_ldm_clip_checkpoint(original)
    assert_same_tensors({k.removeprefix("text_model."): v for k, v in text.items()}, clip_l.state_dict())
    model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G.to_diffusers()))
    text = convert_open_clip_checkpoint(model, original, prefix="conditioner.embedders.1.model.")
    assert_same_tensors({k.removeprefix("text_model."): v for k, v in text.items()}, clip_g.state_dict())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_single_file_kind_and_sizes_are_read_from_the_tensors(kind, original_files):
    path, state = original_files[kind]
    pipe = sdtorch.load(path)
    assert pipe.config == CONFIGS[kind] and pipe.config.kind == kind
    assert pipe.config.prediction_type == "epsilon" and pipe.report.prediction_type_origin == "detected"
    assert sorted(pipe.report.ignored_keys) == sorted(extras(CONFIGS[kind]))  # skipped on purpose, and said so
    assert_same_tensors(tensors(pipe), state)
    assert pipe.vae.scaling_factor == 0.13025
    # the pipeline's one tokenizer is the first encoder's: ViT-L pads with end-of-text, bigG (the refiner's) with 0
    assert pipe.tokenizer.pad_token_id == (0 if kind == "sdxl-refiner" else 49407)


def test_v_pred_marker_and_user_override(original_files, tmp_path):
    path, state = original_files["sdxl"]
    assert sdtorch.load(path, prediction_type="v_prediction").config.prediction_type == "v_prediction"
    marked = tmp_path / "vpred.safetensors"
    save_file({**load_file(str(path)), "v_pred": torch.tensor([])}, str(marked))  # A1111 / ComfyUI's marker
    pipe = sdtorch.load(marked)
    assert pipe.config.prediction_type == "v_prediction" and "v_pred" in pipe.report.ignored_keys
    assert sdtorch.load(marked, prediction_type="epsilon").config.prediction_type == "epsilon"


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner"])
def test_single_file_round_trip_gives_the_same_tensors_and_images(kind, original_files, tmp_path):
    path, state = original_files[kind]
    first = sdtorch.load(path)
    single = sdtorch.save(first, tmp_path / "again.safetensors", format="single_file")
    assert_same_tensors(load_file(str(single)), state)
    second = sdtorch.load(single)
    assert second.config == first.config and second.report.prediction_type_origin == "file"
    folder = sdtorch.save(second, tmp_path / "diffusers", format="diffusers")
    third = sdtorch.load(folder)
    assert third.config == first.config
    assert_same_tensors(tensors(third), state)
    settings = dict(num_inference_steps=3, width=32, height=32, seed=7, guidance_scale=5.0)
    images = [np.asarray(pipe(PROMPT, **settings)[0]) for pipe in (first, second, third)]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load(original_files, dtype):
    path, state = original_files["sdxl"]
    pipe = sdtorch.load(path, dtype=dtype)
    assert {p.dtype for m in pipe.modules.values() for p in m.parameters()} == {dtype}
    ours = tensors(pipe)
    assert all(torch.equal(ours[k], state[k].to(dtype)) for k in state)


def test_meta_load_and_cli_info_and_convert(original_files, tmp_path, capsys):
    for kind, (path, state) in original_files.items():
        assert sdtorch.load(path, device="meta").config == CONFIGS[kind]
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"kind:            {kind}\n" in out
        assert "text encoder:    width " + ("128" if kind == "sdxl-refiner" else "64") in out
        assert ("text encoder 2:  width 128, 3 layers, 2 heads, gelu, projection 32" in out) == (kind != "sdxl-refiner")
        assert "added condition: pooled text 32 + " in out
    path, state = original_files["sdxl"]
    assert main(["convert", str(path), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    index = json.loads((tmp_path / "d" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert main(["info", str(tmp_path / "d")]) == 0
    assert "kind:            sdxl\n" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "s.safetensors"), "--to", "single-file"]) == 0
    assert_same_tensors(tensors(sdtorch.load(tmp_path / "s.safetensors")), state)


# ---- broken and mismatched files -------------------------------------------------------------------------------

def _without(*prefixes):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _with(**changes):
    return lambda sd: {**sd, **{k.replace("__", "."): v for k, v in changes.items()}}


def _refiner_text(sd):
    """The base's UNet and VAE with the refiner's text encoder (bigG alone)."""
    refiner = tensors(random_pipeline(REFINER, seed=3))
    return {**_without("conditioner.")(sd), **{k: v for k, v in refiner.items() if k.startswith("conditioner.")}}


def _swap_embedders(sd):
    first, second = "conditioner.embedders.0.", "conditioner.embedders.1."
    swap = {first: second, second: first}
    return {next((new + k[len(old):] for old, new in swap.items() if k.startswith(old)), k): v for k, v in sd.items()}


BIGG = "conditioner.embedders.1.model."
BROKEN = {
    "no bigG": (_without(BIGG), ArchitectureError, r"neither SDXL base's .* nor the refiner's"),
    "embedders swapped": (_swap_embedders, ArchitectureError, r"\(openclip, clip\) are neither SDXL base's"),
    "refiner text, base UNet": (_refiner_text, ArchitectureError,
                                r"expects 192-wide text context but the sdxl-refiner text encoder is 128 wide"),
    "no addition embedding": (_without("model.diffusion_model.label_emb."), ArchitectureError,
                              "needs the addition embedding"),
    "addition of another width": (_with(**{"model.diffusion_model.label_emb.0.0.weight": torch.zeros(256, 83)}),
                                  ArchitectureError, "83 inputs, which is not the 32-wide pooled text embedding"),
    "a bigG tensor missing": (_without(BIGG + "transformer.resblocks.1.attn.in_proj_weight"), MissingKeysError,
                              r"text_encoder: .*encoders\.1\.encoder\.layers\.1\.self_attn\.q_proj\.weight"),
    "projection missing": (_without(BIGG + "text_projection"), ArchitectureError, "lacks text_projection"),
    "projection of another width": (_with(**{BIGG + "text_projection": torch.zeros(64, 32)}), ArchitectureError,
                                    "first dimension must be 128"),
    "a tensor of no part": (_with(**{BIGG + "attn_pool.weight": torch.zeros(2)}), ArchitectureError,
                            r"1 tensor\(s\) fit no part of a sdxl model: conditioner\.embedders\.1\.model\.attn_pool"),
    "EDM model": (_with(**{"edm_vpred.sigma_max": torch.tensor(80.0)}), ArchitectureError, "EDM v-prediction"),
    "no VAE": (_without("first_stage_model."), ArchitectureError, "only part of a model .*no VAE"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_or_mismatched_sdxl_files_are_refused_clearly(case, original_files, tmp_path, capsys):
    edit, error, pattern = BROKEN[case]
    path = tmp_path / "broken.safetensors"
    save_file(edit(load_file(str(original_files["sdxl"][0]))), str(path))
    with pytest.raises(error, match=pattern):
        sdtorch.load(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtorch: error:") and err.count("\n") == 1


def test_truncated_sdxl_file(original_files, tmp_path):
    data = original_files["sdxl"][0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        sdtorch.load(cut)


# ---- diffusers folders -----------------------------------------------------------------------------------------

def _perturbed(model):
    """Norm affines and biases moved away from their init, so that parity checks see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_tokenizer(folder: Path, pad: str):
    from transformers import CLIPTokenizer as HFTokenizer

    CLIPTokenizer.default(pad_token=pad).save(folder)
    return HFTokenizer.from_pretrained(folder)


def diffusers_pipeline(config: ModelConfig, scratch: Path):
    """A diffusers SDXL pipeline (the refiner: img2img) of random tiny diffusers / transformers parts."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def args(cfg):
        return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}

    torch.manual_seed(5)
    parts = dict(unet=_perturbed(UNet2DConditionModel(**args(config.unet))),
                 vae=_perturbed(AutoencoderKL(**args(config.vae))),
                 text_encoder_2=_perturbed(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G.to_diffusers()))),
                 tokenizer_2=_hf_tokenizer(scratch / "tok2", "!"),
                 scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  steps_offset=1, timestep_spacing="leading"))
    if config.family == "sdxl-refiner":
        return StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                **parts)
    parts.update(text_encoder=_perturbed(CLIPTextModel(CLIPTextConfig(**CLIP_L.to_diffusers()))),
                 tokenizer=_hf_tokenizer(scratch / "tok", "<|endoftext|>"))
    return StableDiffusionXLPipeline(**parts)


@torch.no_grad()
def assert_same_outputs(ours, theirs, config: ModelConfig) -> None:
    """Prompt embeddings (context and pooled), UNet and VAE outputs of an sdtorch and a diffusers pipeline agree."""
    prompt = [PROMPT, "an astronaut riding a horse, detailed"]
    context, pooled = ours.text_encoder.encode(ours.tokenizer(prompt))
    their_context, _, their_pooled, _ = theirs.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert_parity(context, their_context)
    assert_parity(pooled, their_pooled)
    x, t = torch.randn(2, config.unet.in_channels, 16, 16), torch.tensor([999, 17])
    ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]], dtype=torch.float32)
    ids = ids[:, : config.num_time_ids]
    out = ours.unet(x, t, context, text_embeds=pooled, time_ids=ids)
    added = {"text_embeds": pooled, "time_ids": ids}
    assert_parity(out, theirs.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_parity(ours.vae.decode(ours.vae.encode(image).mean),
                  theirs.vae.decode(theirs.vae.encode(image).latent_dist.mean).sample)


@pytest.mark.parametrize("config", [BASE, REFINER], ids=["sdxl", "sdxl-refiner"])
def test_folder_written_by_diffusers_loads_and_matches(config, tmp_path):
    reference = diffusers_pipeline(config, tmp_path)
    reference.save_pretrained(tmp_path / "model")
    pipe = sdtorch.load(tmp_path / "model")
    assert pipe.config == config  # family from the folders present, sizes from the configs, scale 0.13025
    assert pipe.report.format == "diffusers"
    assert not any(k.endswith("text_projection.weight") for k in pipe.report.ignored_keys)  # bigG's is used
    assert pipe.tokenizer.pad_token_id == (0 if config.family == "sdxl-refiner" else 49407)
    assert_same_outputs(pipe, reference, config)


@pytest.mark.parametrize("config", [BASE, REFINER, INPAINT], ids=["sdxl", "sdxl-refiner", "sdxl-inpaint"])
def test_diffusers_loads_what_sdtorch_saves(config, tmp_path):
    import diffusers

    pipe = random_pipeline(config, seed=8)
    folder = sdtorch.save(pipe, tmp_path / "d", format="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    expected = {"sdxl": "StableDiffusionXLPipeline", "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
                "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
    assert index["_class_name"] == expected[config.kind]
    reference = cls.from_pretrained(folder)
    assert type(reference.scheduler).__name__ == "EulerDiscreteScheduler"
    assert reference.scheduler.config.prediction_type == config.prediction_type
    encoders = list(pipe.text_encoder.encoders)
    theirs = {"unet": reference.unet, "vae": reference.vae, "text_encoder_2": reference.text_encoder_2}
    if config.family == "sdxl-refiner":
        assert reference.text_encoder is None and reference.tokenizer is None
        assert reference.config.requires_aesthetics_score
        ours = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder_2": encoders[0]}
    else:
        theirs["text_encoder"] = reference.text_encoder
        ours = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
    for name, module in ours.items():
        state = {k.removeprefix("text_model."): v for k, v in theirs[name].state_dict().items()}
        assert_same_tensors(state, module.state_dict())
    assert_same_outputs(pipe, reference, config)
    assert sdtorch.load(folder).config == config


def test_broken_sdxl_folders(tmp_path):
    import shutil

    folder = sdtorch.save(random_pipeline(BASE, seed=9), tmp_path / "d", format="diffusers")
    broken = Path(shutil.copytree(folder, tmp_path / "no-tokenizer-2"))
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match="sdxl diffusers folder without its tokenizer_2"):
        sdtorch.load(broken)
    broken = Path(shutil.copytree(folder, tmp_path / "no-text-encoder-2"))
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ArchitectureError, match="SDXL UNet .* no text_encoder_2"):
        sdtorch.load(broken)
    broken = Path(shutil.copytree(folder, tmp_path / "missing-projection"))
    state = load_file(str(broken / "text_encoder_2" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "text_projection.weight"},
              str(broken / "text_encoder_2" / "model.safetensors"))
    with pytest.raises(MissingKeysError, match=r"encoders\.1\.text_projection\.weight"):
        sdtorch.load(broken)
    broken = Path(shutil.copytree(folder, tmp_path / "refiner-without-base-text"))
    shutil.rmtree(broken / "text_encoder")  # read as a refiner: bigG alone cannot feed a 192-wide context
    with pytest.raises(ArchitectureError, match="add up to 128, not the UNet's context_dim 192"):
        sdtorch.load(broken)
