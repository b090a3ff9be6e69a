"""Parity at full SD sizes: sdtorch vs diffusers / transformers with identical (random) weights.

    .venv/bin/python benchmarks/parity.py [--family sd1 sd2 sdxl sdxl-refiner] [--size 256]

Each part is built at the real SD 1.5 / SD 2.1 / SDXL base / SDXL refiner size, the reference's random weights
are loaded into sdtorch's model, and both run on the same input in float32. Prints the max abs error per part
and the error relative to max(1, max |reference|) (the tests' bar is 1e-5). Parts are compared one at a time
and sdtorch's model shares the reference's weight tensors, so SDXL's 2.6B-parameter UNet fits in memory once.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdtorch.configs import SD1, SD2, SDXL, SDXL_REFINER, ModelConfig
from sdtorch.models.clip import CLIPTextEncoder
from sdtorch.models.sdxl_text import SDXLTextEncoder
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.models.unet import UNet
from sdtorch.models.vae import AutoencoderKL

FAMILIES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER}
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

    compare_unet_and_vae(config, size, context)


def compare_unet_and_vae(config: ModelConfig, size: int, context: torch.Tensor,
                         added: dict[str, torch.Tensor] | None = None) -> None:
    """UNet (with SDXL's `added` text_embeds / time_ids) and VAE against diffusers, one at a time."""
    from diffusers import AutoencoderKL as RefVAE
    from diffusers import UNet2DConditionModel

    added = added or {}
    ref_unet = UNet2DConditionModel(**diffusers_kwargs(config.unet)).eval()
    unet = shared_twin(UNet, config.unet, ref_unet)
    latents = torch.randn(1, 4, size // 8, size // 8)
    t = torch.tensor([500])
    compare("unet", lambda: unet(latents, t, context, **added),
            lambda: ref_unet(latents, t, context, added_cond_kwargs=added or None).sample)
    del ref_unet, unet

    ref_vae = RefVAE(**diffusers_kwargs(config.vae)).eval()
    vae = shared_twin(AutoencoderKL, config.vae, ref_vae)
    image = torch.rand(1, 3, size, size) * 2 - 1
    compare("vae encode mean", lambda: vae.encode(image).mean, lambda: ref_vae.encode(image).latent_dist.mean)
    compare("vae encode logvar", lambda: vae.encode(image).logvar, lambda: ref_vae.encode(image).latent_dist.logvar)
    compare("vae decode", lambda: vae.decode(latents), lambda: ref_vae.decode(latents).sample)


def shared_twin(cls, config, reference: torch.nn.Module) -> torch.nn.Module:
    """sdtorch's `cls(config)` holding the reference's own weight tensors (same names; no second copy)."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def run_sdxl(config: ModelConfig, size: int) -> None:
    """SDXL base or refiner: each text encoder's penultimate hidden state, bigG's pooled embedding, the UNet with
    the pooled embedding and time ids, and the VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    print(f"{config.family}: {size}x{size} images, {size // 8}x{size // 8} latents, float32", flush=True)
    ids = CLIPTokenizer.default()([PROMPT])  # pads with end-of-text; each encoder re-pads with its own id
    ours = SDXLTextEncoder(config.text_encoders).eval()
    contexts = []
    for i, (cfg, part) in enumerate(zip(config.text_encoders, ours.encoders)):
        hf = CLIPTextConfig(**cfg.to_diffusers())
        ref = (CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel)(hf).eval()
        state = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
        part.load_state_dict(state, strict=True)
        own_ids = ids.masked_fill(torch.arange(77) > int((ids[0] == cfg.eos_token_id).int().argmax()), cfg.pad_token_id)
        with torch.no_grad():
            out = ref(own_ids, output_hidden_states=True)
        compare(f"text encoder {i}", lambda p=part, x=own_ids: p(x), lambda o=out: o.hidden_states[-2])
        contexts.append(out.hidden_states[-2])
        if cfg.with_projection:
            compare(f"text encoder {i} pooled", lambda p=part, x=own_ids: p.encode(x)[1], lambda o=out: o.text_embeds)
            pooled = out.text_embeds
        del ref
    with torch.no_grad():
        context, ours_pooled = ours.encode(ids)
    compare("context (concatenated)", lambda: context, lambda: torch.cat(contexts, dim=-1))
    compare("pooled (both encoders)", lambda: ours_pooled, lambda: pooled)
    del ours
    side = float(size)
    ids_ = [side, side, 0.0, 0.0, side, side] if config.num_time_ids == 6 else [side, side, 0.0, 0.0, 6.0]
    added = dict(text_embeds=pooled, time_ids=torch.tensor([ids_]))
    compare_unet_and_vae(config, size, torch.cat(contexts, dim=-1), added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sd1", "sd2"], choices=list(FAMILIES))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are /8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for family in args.family:
        config = FAMILIES[family]
        (run_sdxl if config.is_sdxl else run_family)(config, args.size)


if __name__ == "__main__":
    main()
