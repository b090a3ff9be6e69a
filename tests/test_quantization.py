"""Pipeline.quantize("int8"): the int8 linear layers compute exactly their stated arithmetic, replace what they
should, keep the picture within a stated PSNR of the float one, and still take LoRAs."""

import pytest
import torch
from conftest import psnr, random_pipeline
from test_lora import kohya_file, outputs, random_lora
from torch import nn

import sdtorch
from sdtorch.cli import main
from sdtorch.configs import TINY_SD1, TINY_SD2
from sdtorch.errors import InvalidInputError
from sdtorch.quantization import Int8Linear, quantize_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_quantized(x: torch.Tensor) -> torch.Tensor:
    """x (R, C) rounded to int8 steps of max |row| / 127, per row, in float64 (written apart from the module)."""
    x = x.double()
    step = x.abs().max(dim=1, keepdim=True).values / 127
    return torch.round(x / step) * step


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_the_product_of_the_rounded_weights_and_inputs(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 24, bias=bias)
    x = torch.randn(2, 5, 48) * 3
    with torch.no_grad():
        rows = fake_quantized(x.reshape(-1, 48))
        expected = rows @ fake_quantized(linear.weight).T + (linear.bias.double() if bias else 0)
        out = Int8Linear(linear)(x)
        plain = linear(x)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.reshape(-1, 24).double(), expected, rtol=1e-5, atol=1e-5)
    assert 0 < (out - plain).abs().max() < 0.05 * plain.abs().max()  # int8's rounding: small, not nothing
    half = Int8Linear(linear.bfloat16())(x.bfloat16())
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
def test_only_the_transformer_blocks_linear_layers_are_replaced(config):
    unet = random_pipeline(config, seed=1).unet
    linear = {name for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
    expected = {name for name in linear if "transformer_blocks" in name or name.endswith(("proj_in", "proj_out"))}
    assert any("time_emb" in name for name in linear - expected)  # time embeddings stay float
    assert quantize_unet(unet, "int8") == len(expected)
    assert {name for name, m in unet.named_modules() if isinstance(m, Int8Linear)} == expected
    assert not any(isinstance(m, nn.Linear) for name, m in unet.named_modules() if name in expected)
    with pytest.raises(InvalidInputError, match="unknown quantisation 'int4'"):
        quantize_unet(unet, "int4")


def test_quantised_picture_stays_close_to_the_float_one():
    pipe = random_pipeline(TINY_SD1, seed=3)
    settings = dict(width=32, height=32, steps=4, cfg_scale=7.0, seed=5)
    plain = pipe("a red circle", **settings)[0]
    assert pipe.quantize("int8") is pipe and pipe.quantized == "int8"
    quantised = pipe("a red circle", **settings)[0]
    assert 35 <= psnr(quantised, plain) < float("inf")  # int8's rounding changes it, a little
    assert pipe.quantize("int8") is pipe  # again: nothing
    with pytest.raises(InvalidInputError, match="openvino backend cannot run a quantised UNet"):
        pipe.compile("openvino")


def test_loras_apply_to_the_quantised_layers_and_unload_exactly(tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 128, generator=g))
    file = kohya_file(random_lora(pipe, seed=7), tmp_path / "lora.safetensors")
    pipe.load_lora(file)
    float_with_lora = outputs(pipe, inputs)[0]
    float_hooks = len(pipe.lora_adapters._hooks)
    pipe.unload_lora()
    pipe.quantize("int8")
    before = outputs(pipe, inputs)[0]
    pipe.load_lora(file)
    assert len(pipe.lora_adapters._hooks) == float_hooks  # the same layers, quantised ones among them
    with_lora = outputs(pipe, inputs)[0]
    scale = float_with_lora.abs().max()
    assert (with_lora - float_with_lora).abs().max() < 0.05 * scale  # the LoRA's change, through int8 layers
    assert (with_lora - before).abs().max() > 0.1 * scale
    pipe.unload_lora()
    assert torch.equal(outputs(pipe, inputs)[0], before)


def test_cli_refuses_an_unknown_mode_before_loading(tmp_path, capsys):
    assert main(["generate", "a red circle", "--quantize", "int4", "--model", str(tmp_path / "missing")]) == 2
    assert "--quantize: unknown quantisation 'int4'; one of: int8" in capsys.readouterr().err


def test_cli_generates_quantised(tmp_path):
    folder = tmp_path / "model"
    sdtorch.save(random_pipeline(TINY_SD1, seed=2), folder, format="diffusers")
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--quantize", "int8", "--model", str(folder), "--out", str(out),
                 "--steps", "2", "--width", "32", "--height", "32", "--quiet"]) == 0
    assert out.is_file()


def test_compiled_quantised_unet_gives_the_plain_quantised_images():
    pipe = random_pipeline(TINY_SD1, seed=3).quantize("int8")
    settings = dict(width=32, height=32, steps=3, cfg_scale=7.0, seed=5)
    plain = pipe("a red circle", **settings)[0]
    compiled = pipe.compile()("a red circle", **settings)[0]
    assert pipe.compiled_unet._compiled is not None  # the graph ran, not the plain module
    assert psnr(compiled, plain) >= 50


def test_the_server_quantises_each_model_it_loads(tmp_path):
    from sdtorch.request import Limits
    from sdtorch.server.catalog import Checkpoint
    from sdtorch.server.host import ModelHost

    model = sdtorch.save(random_pipeline(TINY_SD1, seed=3), tmp_path / "tiny.safetensors", format="single_file")
    host = ModelHost(Limits(), None, None, quantize="int8")
    pipe = host.get(Checkpoint("tiny.safetensors", str(model), str(model))).pipe
    assert pipe.quantized == "int8" and any(isinstance(m, Int8Linear) for m in pipe.unet.modules())
