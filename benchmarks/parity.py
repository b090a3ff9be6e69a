"""Parity at full SD sizes: sdtorch vs diffusers / transformers with identical (random) weights.

    .venv/bin/python benchmarks/parity.py [--family sd1 sd2] [--size 256]

Each part is built at the real SD 1.5 / SD 2.1 size, the reference's random weights are loaded into
sdtorch's model, and both run on the same input in float32. Prints the max abs error per part and the
error relative to max(1, max |reference|) (the tests' bar is 1e-5).
"""

from __future__ import annotations

import argparse
import time

import torch

from sdtorch.configs import SD1, SD2, ModelConfig
from sdtorch.models.clip import CLIPTextEncoder
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.models.unet import UNet
from sdtorch.models.vae import AutoencoderKL

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def diffusers_kwargs(cfg) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (ours - ref).abs().max().item()
    return err, err / max(1.0, ref.abs().max().item())


def compare(name: str, ours_fn, ref_fn) -> None:
    start = time.perf_counter()
    with torch.no_grad():
        ref = ref_fn()
        ours = ours_fn()
    err, rel = errors(ours, ref)
    verdict = "ok" if rel <= 1e-5 else "MISMATCH"
    print(f"  {name:<22} max|ref| {ref.abs().max().item():9.3f}  max abs err {err:.2e}  rel {rel:.2e}  "
          f"{verdict}  ({time.perf_counter() - start:.0f}s)", flush=True)


def run_family(config: ModelConfig, size: int) -> None:
    from diffusers import AutoencoderKL as RefVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    print(f"{config.family}: {size}x{size} images, {size // 8}x{size // 8} latents, float32", flush=True)
    pad = "<|endoftext|>" if config.family == "sd1" else "!"
    ids = CLIPTokenizer.default(pad_token=pad)([PROMPT])

    ref_text = CLIPTextModel(CLIPTextConfig(**config.text_encoder.to_diffusers())).eval()
    text = CLIPTextEncoder(config.text_encoder).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    compare("text encoder", lambda: text(ids), lambda: ref_text(ids).last_hidden_state)
    if config.family == "sd1":
        compare("text encoder, skip 2", lambda: text(ids, clip_skip=2),
                lambda: ref_text.final_layer_norm(ref_text(ids, output_hidden_states=True).hidden_states[-2]))
    with torch.no_grad():
        context = ref_text(ids).last_hidden_state
    del ref_text, text

    ref_unet = UNet2DConditionModel(**diffusers_kwargs(config.unet)).eval()
    unet = UNet(config.unet).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    latents = torch.randn(1, 4, size // 8, size // 8)
    t = torch.tensor([500])
    compare("unet", lambda: unet(latents, t, context), lambda: ref_unet(latents, t, context).sample)
    del ref_unet, unet

    ref_vae = RefVAE(**diffusers_kwargs(config.vae)).eval()
    vae = AutoencoderKL(config.vae).eval()
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    image = torch.rand(1, 3, size, size) * 2 - 1
    compare("vae encode mean", lambda: vae.encode(image).mean, lambda: ref_vae.encode(image).latent_dist.mean)
    compare("vae encode logvar", lambda: vae.encode(image).logvar, lambda: ref_vae.encode(image).latent_dist.logvar)
    compare("vae decode", lambda: vae.decode(latents), lambda: ref_vae.decode(latents).sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sd1", "sd2"], choices=["sd1", "sd2"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are /8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for family in args.family:
        run_family(SD1 if family == "sd1" else SD2, args.size)


if __name__ == "__main__":
    main()
