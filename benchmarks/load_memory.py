"""Peak memory and time of loading a full-size single file into float16 / bfloat16.

    .venv/bin/python benchmarks/load_memory.py [--family sd1|sd2|sdxl|sdxl-refiner] [--sdxl] [--dtype float16 bfloat16]

Writes a full-size original-layout checkpoint with random float16 weights (once, in --workdir; tensor by tensor,
so writing holds one tensor, not the model), then loads it with `sdtorch.load` in a fresh process per dtype and
prints the peak resident memory the load added (the peak RSS during the load, VmHWM, minus the RSS before it),
its ratio to the file's size and to the model's size in the target dtype (the goal: at most 1.3x, i.e. no float32
detour and no second copy), and the load time. A float16 file loaded as float16 is mapped, not read: its pages
come in when first used, so the peak is also measured after every weight has been read once ("in use").
`--sdxl` is `--family sdxl`: SDXL base, both text encoders, about 6.9 GB in float16.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time, torch, sdtorch
from sdtorch.models.tokenizer import CLIPTokenizer

def status(field):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
CLIPTokenizer.default()  # the vocabulary is not model weights: build it before measuring
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
start = time.perf_counter()
pipe = sdtorch.load(path, dtype=dtype)
seconds = time.perf_counter() - start
peak = status("VmHWM")
params = [p for m in pipe.modules.values() for p in m.parameters()]
with torch.no_grad():
    for p in params:  # read every weight once, as a first generation would
        p.sum()
in_use = status("VmHWM")
size = sum(p.numel() * p.element_size() for p in params)
print(json.dumps({"before": before, "after": peak, "in_use": in_use, "model_bytes": size, "seconds": seconds,
                  "kind": pipe.config.kind}))
"""

CONFIGS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL_REFINER"}


def original_shapes(family: str) -> dict[str, torch.Tensor]:
    """The model's tensors under their original single-file names, as meta tensors (names and shapes only)."""
    import sdtorch.configs
    from sdtorch.checkpoints.keymaps import parts_to_original
    from sdtorch.models.sdxl_text import text_encoder_for
    from sdtorch.models.unet import UNet
    from sdtorch.models.vae import AutoencoderKL

    config = getattr(sdtorch.configs, CONFIGS[family])
    with torch.device("meta"):
        models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text_encoder": text_encoder_for(config)}
    return parts_to_original({name: m.state_dict() for name, m in models.items()}, config)


def write_checkpoint(path: Path, family: str) -> None:
    """A safetensors file of random float16 weights, written one tensor at a time (no sdtorch metadata: a foreign
    file, whose architecture loading reads from the tensors)."""
    shapes = original_shapes(family)
    header, offset = {}, 0
    for name, tensor in shapes.items():
        nbytes = tensor.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    generator = torch.Generator().manual_seed(0)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for tensor in shapes.values():
            values = torch.empty(tensor.shape, dtype=torch.float16)
            values.normal_(0.0, 0.02, generator=generator)
            if values.numel():
                f.write(memoryview(values.reshape(-1).view(torch.uint8).numpy()))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", choices=list(CONFIGS))
    parser.add_argument("--sdxl", action="store_true", help="SDXL base (--family sdxl)")
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--workdir", default="/tmp/sdtorch-bench")
    args = parser.parse_args()
    family = "sdxl" if args.sdxl else args.family
    path = Path(args.workdir) / f"{family}-random-fp16.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_checkpoint(path, family)
    file_size = path.stat().st_size
    print(f"file: {path} ({file_size / 2**30:.2f} GiB)")
    for dtype in args.dtype:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        added, in_use = r["after"] - r["before"], r["in_use"] - r["before"]
        gib = 2**30
        model = r["model_bytes"]
        print(f"{dtype:>9}: {r['kind']}, model {model / gib:.2f} GiB; load {r['seconds']:.1f}s added peak RSS "
              f"{added / gib:.2f} GiB = {added / file_size:.2f}x file ({added / model:.2f}x model); with every "
              f"weight read once {in_use / gib:.2f} GiB = {in_use / file_size:.2f}x file ({in_use / model:.2f}x model); "
              f"process peak {r['in_use'] / gib:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
