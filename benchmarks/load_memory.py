"""Peak memory and time of loading a full-size single file into float16 / bfloat16.

    .venv/bin/python benchmarks/load_memory.py [--family sd1] [--dtype float16 bfloat16]

Writes a full-size original-layout checkpoint with random float16 weights (once, in --workdir), then
loads it with `sdtorch.load` in a fresh process per dtype and prints the peak resident memory the load
added (the peak RSS during the load, VmHWM, minus the RSS before it), its ratio to the model's size in the target
dtype (the goal: below 1.3x, i.e. no float32 detour and no second copy), and the load time.
"""

from __future__ import annotations

import argparse
import json
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
size = sum(p.numel() * p.element_size() for m in pipe.modules.values() for p in m.parameters())
print(json.dumps({"before": before, "after": peak, "model_bytes": size, "seconds": seconds}))
"""


def write_checkpoint(path: Path, family: str) -> None:
    from sdtorch.checkpoints.io import write_safetensors
    from sdtorch.checkpoints.keymaps import parts_to_original
    from sdtorch.checkpoints.loading import MODEL_CLASSES
    from sdtorch.configs import SD1, SD2

    config = SD1 if family == "sd1" else SD2
    part_configs = {"unet": config.unet, "vae": config.vae, "text_encoder": config.text_encoder}
    parts = {}
    for name, cls in MODEL_CLASSES.items():
        with torch.device("meta"):
            shapes = cls(part_configs[name]).state_dict()
        parts[name] = {k: (torch.randn(v.shape, dtype=torch.float16) * 0.02) for k, v in shapes.items()}
    write_safetensors(parts_to_original(parts, config), path)  # no sdtorch metadata: a foreign file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2"])
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--workdir", default="/tmp/sdtorch-bench")
    args = parser.parse_args()
    path = Path(args.workdir) / f"{args.family}-random-fp16.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_checkpoint(path, args.family)
    print(f"file: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    for dtype in args.dtype:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        added = r["after"] - r["before"]
        print(f"{dtype:>9}: model {r['model_bytes'] / 2**30:.2f} GiB, load added peak RSS {added / 2**30:.2f} GiB "
              f"= {added / r['model_bytes']:.2f}x model size (process peak {r['after'] / 2**30:.2f} GiB), "
              f"{r['seconds']:.1f}s")


if __name__ == "__main__":
    main()
