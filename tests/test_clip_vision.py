"""The CLIP image encoder against transformers' CLIPVisionModelWithProjection with identical (random) weights, the
preprocessing against transformers' CLIP image processor (its Pillow backend, the classic one), and loading
transformers folders and single files."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_parity
from safetensors.torch import save_file
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModelWithProjection

from sdtorch.checkpoints.ip_adapter_files import infer_clip_vision_config, load_clip_vision
from sdtorch.errors import ArchitectureError, CheckpointError, InvalidInputError
from sdtorch.models.clip_vision import VIT_BIGG_14, VIT_H_14, CLIPImageEncoder, CLIPVisionConfig, preprocess

try:  # transformers 5: the Pillow backend has its own name (CLIPImageProcessor prefers torchvision's)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the Pillow one
    from transformers import CLIPImageProcessor as ImageProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny tower: 3x3 patches of 14 px, 3 layers; 128 wide with 2 heads so that a single file's heads (width / 64)
# and activation (QuickGELU up to 1024) are what the tensors imply
TINY = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=42,
            patch_size=14, projection_dim=24, hidden_act="quick_gelu")


def reference(**changes) -> CLIPVisionModelWithProjection:
    model = CLIPVisionModelWithProjection(HFVisionConfig(**{**TINY, **changes})).eval()
    with torch.no_grad():  # norms and biases away from their init
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_encoder_equals_transformers(activation):
    ref = reference(hidden_act=activation, num_attention_heads=4)
    config = CLIPVisionConfig.from_transformers(ref.config.to_dict())
    assert config.activation == activation and config.num_heads == 4
    ours = CLIPImageEncoder(config).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 42, 42)
    expected = ref(pixels, output_hidden_states=True)
    out = ours(pixels, output_hidden_states=True)
    assert_parity(out.image_embeds, expected.image_embeds)
    assert_parity(out.last_hidden_state, expected.last_hidden_state)
    assert len(out.hidden_states) == len(expected.hidden_states) == 4
    for a, b in zip(out.hidden_states, expected.hidden_states):
        assert_parity(a, b)
    for index in (-2, 0, -4, 3):  # -2: what IP-Adapter Plus takes
        assert_parity(ours.hidden_state(pixels, index), expected.hidden_states[index])
    assert ours(pixels).hidden_states is None
    # the config round trip
    assert CLIPVisionConfig.from_transformers(config.to_transformers()) == config


@torch.no_grad()
def test_encoder_checks_pixels():
    ours = CLIPImageEncoder(CLIPVisionConfig.from_transformers(TINY)).eval()
    for bad in (torch.randn(1, 3, 224, 224), torch.randn(3, 42, 42), torch.zeros(1, 3, 42, 42, dtype=torch.uint8)):
        with pytest.raises(InvalidInputError):
            ours(bad)
    with pytest.raises(InvalidInputError, match="out of range"):
        ours.hidden_state(torch.randn(1, 3, 42, 42), index=5)


def _image(w: int, h: int, mode: str, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = rng.choice([0, 128, 255], (h, w))
    return PIL.Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


@pytest.mark.parametrize("w, h, mode", [(300, 200, "RGB"), (199, 301, "RGB"), (224, 224, "RGB"), (100, 37, "RGB"),
                                        (257, 255, "RGBA"), (90, 130, "L"), (225, 1000, "RGB")])
def test_preprocess_equals_clip_image_processor(w, h, mode):
    image = _image(w, h, mode, seed=w * h)
    expected = ImageProcessor()(images=image, return_tensors="pt").pixel_values
    ours = preprocess(image)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert_parity(ours, expected, rel=1e-6)


def test_preprocess_batch_and_size():
    images = [_image(64, 48, "RGB", 1), _image(30, 90, "RGB", 2)]
    batch = preprocess(images, size=42)
    assert batch.shape == (2, 3, 42, 42)
    expected = ImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    assert_parity(batch, expected(images=images, return_tensors="pt").pixel_values, rel=1e-6)
    with pytest.raises(InvalidInputError):
        preprocess([])
    with pytest.raises(InvalidInputError):
        preprocess(torch.zeros(3, 8, 8))


@torch.no_grad()
def test_load_folder_and_single_files(tmp_path):
    ref = reference()
    pixels = torch.randn(2, 3, 42, 42)
    expected = ref(pixels).image_embeds
    ref.save_pretrained(tmp_path / "image_encoder")  # config.json + model.safetensors
    model = load_clip_vision(tmp_path / "image_encoder")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_parity(model(pixels).image_embeds, expected)

    # a single file (ComfyUI clip_vision / A1111 clip_h.pth layout): the config is read from the tensors; the
    # position_ids buffer older transformers saved is skipped
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    save_file(sd, tmp_path / "clip_vision.safetensors")
    model = load_clip_vision(tmp_path / "clip_vision.safetensors")
    assert model.config == CLIPVisionConfig.from_transformers(TINY)
    assert model.load_report == ["vision_model.embeddings.position_ids"]
    assert_parity(model(pixels).image_embeds, expected)

    # a pickle, read with weights_only, in float16
    torch.save(sd, tmp_path / "clip_h.pth")
    model = load_clip_vision(tmp_path / "clip_h.pth", dtype=torch.float16)
    assert model.visual_projection.weight.dtype == torch.float16
    assert_parity(model.float()(pixels).image_embeds, expected, rel=2e-2)

    # a whole CLIPModel's file: the text tower is skipped (and reported)
    whole = {**sd, "text_model.final_layer_norm.weight": torch.ones(8), "text_projection.weight": torch.ones(4, 8),
             "logit_scale": torch.tensor(1.0)}
    save_file(whole, tmp_path / "clip.safetensors")
    model = load_clip_vision(tmp_path / "clip.safetensors")
    assert "text_projection.weight" in model.load_report
    assert_parity(model(pixels).image_embeds, expected)


def test_single_file_config_of_released_towers():
    """ViT-H/14 and ViT-bigG/14 shapes (on the meta device) are read back as the presets."""
    for preset in (VIT_H_14, VIT_BIGG_14):
        with torch.device("meta"):
            sd = CLIPImageEncoder(preset).state_dict()
        assert infer_clip_vision_config(sd) == preset


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_clip_vision(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip_vision(tmp_path / "empty")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps(HFVisionConfig(**TINY).to_dict()))
    with pytest.raises(CheckpointError, match="no weights file"):
        load_clip_vision(tmp_path / "folder")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError):
        load_clip_vision(tmp_path / "corrupt.safetensors")
    save_file({"visual.transformer.resblocks.0.ln_1.weight": torch.ones(4)}, tmp_path / "open_clip.safetensors")
    with pytest.raises(ArchitectureError, match="OpenCLIP"):
        load_clip_vision(tmp_path / "open_clip.safetensors")
    sd = {k: v.contiguous() for k, v in reference().state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "visual_projection.weight"}, tmp_path / "no_proj.safetensors")
    with pytest.raises(ArchitectureError, match="visual_projection"):
        load_clip_vision(tmp_path / "no_proj.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.2.mlp.fc2" not in k}, tmp_path / "partial.safetensors")
    with pytest.raises(ArchitectureError, match="missing"):
        load_clip_vision(tmp_path / "partial.safetensors")
    with pytest.raises(ArchitectureError):
        CLIPVisionConfig(width=30, num_heads=4)
