"""One whole SDXL image beside diffusers: full-size SDXL base, random weights, a fresh process each.

    .venv/bin/python benchmarks/sdxl_generation.py [--size 1024] [--steps 20] [--dtype float32 | bfloat16 | float16]
                                                   [--device cpu | cuda]

SDXL base is built with diffusers' and transformers' own random initialisation (seeded) and saved once as a
diffusers folder in float16 (6.9 GB, in --workdir). Then, for diffusers and for sdtorch in turn, a fresh process
loads that folder in --dtype and draws one --size image (DPM++ 2M Karras, CFG 7, one seeded generator, so both
should draw the same picture): it reports the load time, the generation time (text encoding, sampling and VAE
decode) and its peak resident memory (VmHWM; on a GPU also the peak of allocated GPU memory). The parent prints a table with sdtorch/diffusers ratios and the
PSNR of sdtorch's picture against diffusers'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"

CHILD = r"""
import json, sys, time
import torch

def peak():  # bytes: VmHWM, the process's peak resident set
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

impl, folder, dtype, size, steps, out = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), *map(int, sys.argv[4:6]), sys.argv[6]
prompt, negative = json.loads(sys.argv[7])
device = torch.device(sys.argv[8])
start = time.perf_counter()
with torch.inference_mode():
    if impl == "diffusers":
        import diffusers
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        config = {**pipe.scheduler.config, "use_karras_sigmas": True, "algorithm_type": "dpmsolver++",
                  "final_sigmas_type": "zero"}
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        image = pipe(prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
                     guidance_scale=7.0, generator=torch.Generator().manual_seed(0)).images[0]
    else:
        import sdtorch
        pipe = sdtorch.load(folder, dtype=dtype, device=device)
        loaded = time.perf_counter()
        image = pipe(prompt, negative, height=size, width=size, steps=steps, sampler="DPM++ 2M", schedule="Karras",
                     cfg_scale=7.0, generator=torch.Generator().manual_seed(0))[0]
done = time.perf_counter()
image.save(out)
gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
print(json.dumps({"load_s": loaded - start, "generate_s": done - loaded, "peak_bytes": peak(), "gpu_peak_bytes": gpu}))
"""


def write_folder(folder: Path) -> None:
    """SDXL base at full size with the reference libraries' random initialisation, saved as a float16 folder."""
    import diffusers
    import torch
    import transformers

    from sdtorch.configs import SDXL
    from sdtorch.models.tokenizer import CLIPTokenizer

    print(f"writing {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    kwargs = lambda cfg: {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}  # noqa: E731
    encoders = [
        cls(transformers.CLIPTextConfig(**cfg.to_diffusers())).half()
        for cls, cfg in ((transformers.CLIPTextModel, SDXL.text_encoder),
                         (transformers.CLIPTextModelWithProjection, SDXL.text_encoder_2))
    ]
    tokenizers = []
    for pad in ("<|endoftext|>", "!"):
        CLIPTokenizer.default(pad_token=pad).save(folder / "tmp-tokenizer")
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(folder / "tmp-tokenizer"))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**kwargs(SDXL.vae)).half(), text_encoder=encoders[0], text_encoder_2=encoders[1],
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=diffusers.UNet2DConditionModel(**kwargs(SDXL.unet)).half(), scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def psnr(a: Path, b: Path) -> float:
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="/tmp/sdtorch-sdxl")
    parser.add_argument("--only", choices=["diffusers", "sdtorch"], help="run one implementation")
    args = parser.parse_args()

    import torch

    workdir = Path(args.workdir)
    folder = workdir / "sdxl-random"
    if not (folder / "model_index.json").is_file():
        write_folder(folder)
    print(f"SDXL base, {args.size}x{args.size}, {args.steps} DPM++ 2M Karras steps, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {}
    for impl in [args.only] if args.only else ["diffusers", "sdtorch"]:
        image = workdir / f"{impl}-{args.size}-{args.steps}-{args.dtype}.png"
        out = subprocess.run([sys.executable, "-c", CHILD, impl, str(folder), args.dtype, str(args.size),
                              str(args.steps), str(image), json.dumps([PROMPT, NEGATIVE]), args.device],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"the {impl} run failed:\n{out.stderr[-3000:]}")
        results[impl] = {**json.loads(out.stdout.splitlines()[-1]), "image": image}
        r = results[impl]
        print(f"  {impl:<10} load {r['load_s']:7.1f} s   generate {r['generate_s']:7.1f} s   "
              f"peak RSS {r['peak_bytes'] / 2**30:6.2f} GiB"
              + (f"   peak GPU memory {r['gpu_peak_bytes'] / 2**30:6.2f} GiB" if r["gpu_peak_bytes"] else ""), flush=True)
    if len(results) == 2:
        ours, theirs = results["sdtorch"], results["diffusers"]
        print(f"  sdtorch / diffusers: generation {theirs['generate_s'] / ours['generate_s']:.2f}x faster, "
              f"load {theirs['load_s'] / ours['load_s']:.2f}x faster, peak RSS "
              f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}x; PSNR of sdtorch's picture against diffusers' "
              f"{psnr(ours['image'], theirs['image']):.1f} dB")


if __name__ == "__main__":
    main()
