"""sdtorch beside diffusers and OpenVINO on this machine: same SD 1.5-size weights, same threads, one process.

    .venv/bin/python benchmarks/compare.py                       # everything, writes the table into README.md
    .venv/bin/python benchmarks/compare.py --only unet --sizes 256 --no-readme

Every model is SD 1.5-sized with random weights (seeded); diffusers' modules are built first and their state
dicts loaded into sdtorch's, and the OpenVINO model is diffusers' UNet converted here with
`openvino.convert_model` and computing at the run's dtype; in float32 runs on a CPU with native bfloat16, also at
OpenVINO's own default there (bfloat16 arithmetic on the float32 model), beside sdtorch's `--compile-backend
openvino-bf16`, which does the same. Runs alternate between the implementations (A B C A B C ...) and each row reports
the median. Rows:

  unet            one guided UNet step (batch 2: negative + prompt, 77-token contexts) at each --sizes,
                  float32, and bfloat16 where the CPU has it natively
  text            encoding a prompt and a negative prompt (batch 2, 77 tokens)
  vae             decoding one 512x512 latent
  generation      a whole --gen-size txt2img of --gen-steps DPM++ 2M steps, CFG 7 (encode, denoise, decode);
                  also with step caching (--deep-cache N [N ...]) on the plain and the last sdtorch variant,
                  whose picture differs (PSNR printed)
  load            loading the original-layout single file (float32) into a ready pipeline
  rss             peak resident memory of a fresh process that loads the single file and runs that generation
                  (sdtorch in float32, and in bfloat16 where native, each also with --compile-backend openvino,
                  and the last with each --deep-cache, against diffusers in float32); the OpenVINO ones twice,
                  first converting the UNet, then importing the graph that run kept on disk

sdtorch's variants: the plain path, `--compile` (inductor), `--compile-backend openvino` (/ openvino-bf16) and
`--compile --quantize int8` (int8 linear layers; without --compile where --no-inductor): --no-* flags drop them.
Ratios are diffusers' time over the other's (above 1: faster than diffusers). "Peak used" is the UNet step's
arithmetic (counted with torch's FlopCounterMode) per second, by the fastest implementation computing in the
row's dtype, over the machine's measured matmul rate in that dtype (a 4096 x 4096 matmul): what its cores are
seen to reach.
`--device cuda` (benchmarks/gpu.sh) runs the same on a GPU, without OpenVINO and the RSS row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtorch import openvino_cache

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
README_BEGIN, README_END = "<!-- compare.py: begin -->", "<!-- compare.py: end -->"
COLD_WARM = (" (converts)", " (graph kept on disk)")  # the two OpenVINO memory runs


# ----------------------------------------------------------------------------- the machine


def cpu_features() -> dict[str, object]:
    """What this CPU offers for the kernels that matter: model, cores, vector ISA, native bf16."""
    flags: set[str] = set()
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1).strip()
    return {
        "model": model,
        "threads": torch.get_num_threads(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
    }


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 4096, repeats: int = 3) -> float:
    """The best FLOP/s of an n x n matmul in `dtype`: the rate this machine reaches on dense math."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _sync() -> None:
    """Wait for queued GPU work, so that a timing covers it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- timing


@dataclass
class Row:
    """One benchmark: the seconds of every implementation's runs, alternated."""

    name: str
    runs: dict[str, Callable[[], object]]
    times: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)  # each implementation's last result
    flops: float | None = None

    def measure(self, repeats: int, warmup: int = 1) -> Row:
        with torch.inference_mode():
            for _ in range(warmup):
                for fn in self.runs.values():
                    fn()
            for _ in range(repeats):
                for label, fn in self.runs.items():
                    start = time.perf_counter()
                    self.outputs[label] = fn()
                    _sync()
                    self.times.setdefault(label, []).append(time.perf_counter() - start)
        self.runs = {}  # the closures hold models (OpenVINO's too): let them go
        return self

    def median(self, label: str) -> float:
        return statistics.median(self.times[label])


def unet_flops(unet: torch.nn.Module, args: tuple) -> float:
    """FLOPs of one call (a multiply-add counts 2), SDPA included."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(*args)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- the models


def write_models(workdir: Path) -> tuple[Path, Path]:
    """SD 1.5-size random weights (diffusers' own initialisation, seeded) saved once by sdtorch as an
    original-layout single file and a diffusers folder, both float32: (file, folder)."""
    import diffusers
    import transformers

    import sdtorch
    from sdtorch.configs import SD1
    from sdtorch.models.clip import CLIPTextEncoder
    from sdtorch.models.tokenizer import CLIPTokenizer
    from sdtorch.models.unet import UNet
    from sdtorch.models.vae import AutoencoderKL
    from sdtorch.pipeline import Pipeline

    file, folder = workdir / "sd15-random.safetensors", workdir / "sd15-random"
    if file.exists() and folder.is_dir():
        return file, folder
    print(f"writing {file} and {folder} (once) ...", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    kwargs = lambda cfg: {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}  # noqa: E731
    pairs = [
        (transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD1.text_encoder.to_diffusers())),
         CLIPTextEncoder(SD1.text_encoder)),
        (diffusers.UNet2DConditionModel(**kwargs(SD1.unet)), UNet(SD1.unet)),
        (diffusers.AutoencoderKL(**kwargs(SD1.vae)), AutoencoderKL(SD1.vae)),
    ]
    for reference, ours in pairs:
        ours.load_state_dict(reference.state_dict(), strict=True)
    pipe = Pipeline(CLIPTokenizer.default(), *(ours.eval() for _, ours in pairs), SD1)
    sdtorch.save(pipe, file, format="single_file", overwrite=True)
    sdtorch.save(pipe, folder, format="diffusers", overwrite=True)
    return file, folder


def diffusers_pipeline(folder: Path, dtype: torch.dtype = torch.float32, file: Path | None = None):
    """diffusers' StableDiffusionPipeline (from the single file when given, with the folder's configs) with
    DPM++ 2M Karras set as sdtorch's "DPM++ 2M" / "Karras" computes it."""
    import diffusers

    cls = diffusers.StableDiffusionPipeline
    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if file is None:
        pipe = cls.from_pretrained(folder, **common)
    else:
        pipe = cls.from_single_file(file, config=str(folder), local_files_only=True, **common)
    config = {**pipe.scheduler.config, "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": True,
              "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"}
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_generate(pipe, size: int, steps: int):
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                guidance_scale=7.0, generator=torch.Generator().manual_seed(0)).images[0]


def sdtorch_generate(pipe, size: int, steps: int, deep_cache: int = 1):
    return pipe(PROMPT, NEGATIVE, height=size, width=size, steps=steps, sampler="DPM++ 2M", schedule="Karras",
                cfg_scale=7.0, deep_cache=deep_cache, generator=torch.Generator().manual_seed(0))[0]


def openvino_unet(unet, example: tuple, dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """diffusers' UNet converted with openvino.convert_model and compiled for this CPU at `dtype` (None: OpenVINO's
    default precision, bfloat16 where native) (sdtorch.openvino_runtime, as `--compile-backend openvino` converts
    sdtorch's); returns a callable like the UNet's."""
    from sdtorch.openvino_runtime import compile_module

    class Traced(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, context):
            return self.unet(x, t, context).sample

    run = compile_module(Traced(unet), example, precision=dtype)
    return lambda x, t, context: run(x, t, context)[0]


# ----------------------------------------------------------------------------- the rows


def unet_rows(ours: dict, theirs, sizes: list[int], dtype: torch.dtype, openvino: bool, repeats: int,
              device: torch.device) -> list[Row]:
    """A guided UNet step at each size: diffusers, OpenVINO (diffusers' UNet converted) and sdtorch's variants."""
    rows = []
    for size in sizes:
        g = torch.Generator().manual_seed(size)
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)
        context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        runs: dict[str, Callable[[], object]] = {"diffusers": lambda: theirs.unet(x, t, context).sample}
        if openvino:
            ov_unet = openvino_unet(theirs.unet, (x.float(), t, context.float()), dtype)  # CPU only
            runs["openvino"] = lambda: ov_unet(x, t, context)
            if "sdtorch --compile-backend openvino-bf16" in ours:  # float32 on a CPU with native bfloat16
                ov_default = openvino_unet(theirs.unet, (x.float(), t, context.float()), None)
                runs["openvino (its default: bf16 math)"] = lambda: ov_default(x, t, context)
        for label, pipe in ours.items():
            runs[label] = lambda pipe=pipe: (pipe.compiled_unet or pipe.unet)(x, t, context)
        with torch.inference_mode():
            reference = runs["diffusers"]().float()
            for label, fn in runs.items():
                err = (fn().float() - reference).abs().max().item() / reference.abs().max().item()
                print(f"    unet {size} {label}: max error relative to diffusers' max {err:.1e}", flush=True)
        row = Row(f"UNet guided step {size}x{size}", runs)
        row.flops = unet_flops(ours["sdtorch"].unet, (x, t, context))
        rows.append(row.measure(repeats))
        del runs
        for pipe in ours.values():  # each OpenVINO graph holds its own weights: keep one size's at a time
            if pipe.compiled_unet is not None and pipe.compiled_unet.openvino:
                pipe.compile(pipe.compiled_unet.backend)
    return rows


def text_row(ours: dict, theirs, repeats: int, device: torch.device) -> Row:
    ids = theirs.tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids = ids.to(device)
    runs = {"diffusers": lambda: theirs.text_encoder(ids)[0]}
    runs.update({label: (lambda pipe=pipe: pipe.text_encoder(ids)) for label, pipe in ours.items()})
    return Row("text encoding (2 x 77 tokens)", runs).measure(repeats)


def vae_row(ours: dict, theirs, dtype: torch.dtype, repeats: int, device: torch.device) -> Row:
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    runs = {"diffusers": lambda: theirs.vae.decode(latents).sample}
    runs.update({label: (lambda decode=pipe.compiled_decoder or pipe.vae.decode: decode(latents))
                 for label, pipe in ours.items()})  # the warm-up run converts the openvino variants' decoders
    return Row("VAE decode 512x512", runs).measure(repeats)


def generation_row(ours: dict, theirs, size: int, steps: int, repeats: int, deep_cache: list[int]) -> Row:
    """The whole txt2img, and with step caching at each interval of `deep_cache` (above 1) on the compiled
    pipeline; prints each sdtorch variant's PSNR against diffusers' picture (same math, same noise) and the cached
    ones' against sdtorch's own."""
    import numpy as np

    def psnr(a, b) -> float:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        mse = ((x - y) ** 2).mean()
        return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)

    cached_labels = dict.fromkeys(["sdtorch", list(ours)[-1]])  # the plain and the last variant
    for label, pipe in ours.items():
        if pipe.compiled_unet is not None:  # compile for this size untimed (one step), as a warm cache would
            sdtorch_generate(pipe, size, 1)
            if any(n > 1 for n in deep_cache) and label in cached_labels:
                sdtorch_generate(pipe, size, 2, 2)  # and the shallow part's graph
    runs = {"diffusers": lambda: diffusers_generate(theirs, size, steps)}
    runs.update({label: (lambda pipe=pipe: sdtorch_generate(pipe, size, steps)) for label, pipe in ours.items()})
    cached = {f"{label} --deep-cache {n}": (label, n) for label in cached_labels for n in deep_cache if n > 1}
    runs.update({cached_label: (lambda pipe=ours[label], n=n: sdtorch_generate(pipe, size, steps, n))
                 for cached_label, (label, n) in cached.items()})
    row = Row(f"whole {size}x{size} {steps}-step generation", runs).measure(repeats, warmup=0)
    for label in runs:
        if label != "diffusers":
            print(f"    generation {label}: PSNR against diffusers' image "
                  f"{psnr(row.outputs[label], row.outputs['diffusers']):.1f} dB", flush=True)
    for cached_label, (label, _) in cached.items():
        print(f"    generation {cached_label}: PSNR against {label}'s image without it "
              f"{psnr(row.outputs[cached_label], row.outputs[label]):.1f} dB", flush=True)
    return row


def load_row(file: Path, folder: Path, repeats: int) -> Row:
    """Loading the float32 single file into a pipeline ready to generate (the file is in the page cache)."""
    import sdtorch

    runs = {"diffusers": lambda: diffusers_pipeline(folder, file=file), "sdtorch": lambda: sdtorch.load(file)}
    return Row("load the single file (float32)", runs).measure(repeats)


RSS_CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import compare

def peak():  # bytes: VmHWM, the process's peak resident set
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

impl, file, folder, size, steps = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
name, dtype_name, *flags = impl.split()  # e.g. "sdtorch bfloat16 --compile-backend openvino", "... --deep-cache 2"
options = dict(zip(flags[::2], flags[1::2]))
start = time.perf_counter()
with torch.inference_mode():
    if name == "diffusers":
        compare.diffusers_generate(compare.diffusers_pipeline(compare.Path(folder), file=compare.Path(file)), size, steps)
    else:
        import sdtorch
        pipe = sdtorch.load(file, dtype=getattr(torch, dtype_name)).compile(options.get("--compile-backend"))
        compare.sdtorch_generate(pipe, size, steps, int(options.get("--deep-cache", 1)))
print(peak(), time.perf_counter() - start)
"""


def rss_row(file: Path, folder: Path, size: int, steps: int, bf16: bool, openvino: bool,
            deep_cache: list[int]) -> dict[str, float]:
    """Peak RSS (bytes) of a fresh process per implementation that loads the float32 single file and generates
    (sdtorch also loading it as bfloat16 where `bf16`, each with `--compile-backend openvino` where `openvino`, the
    float32 one with `openvino-bf16` where both, and the last with each `deep_cache` interval)."""
    ours = ["sdtorch float32", *(["sdtorch bfloat16"] if bf16 else [])]
    impls = ["diffusers float32", *ours, *(f"{ours[-1]} --deep-cache {n}" for n in deep_cache if n > 1)]
    # OpenVINO twice: the first process converts and keeps the graph on disk, the second imports it
    impls += [f"{impl} --compile-backend openvino{run}" for impl in ours if openvino for run in COLD_WARM]
    impls += [f"sdtorch float32 --compile-backend openvino-bf16{run}" for run in COLD_WARM if openvino and bf16]
    graphs = file.parent / "openvino-graphs-rss"  # the benchmark's own, emptied: the first run is a cold one
    shutil.rmtree(graphs, ignore_errors=True)
    env = {**os.environ, openvino_cache.CACHE_ENV: str(graphs)}
    peaks = {}
    for impl in impls:
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(Path(__file__).parent), impl.split(" (")[0],
                              str(file), str(folder), str(size), str(steps)], capture_output=True, text=True,
                             check=False, env=env)
        if out.returncode:
            sys.exit(f"the {impl} memory run failed:\n{out.stderr[-3000:]}")
        peak, seconds = out.stdout.split()[-2:]
        peaks[impl] = float(peak)
        print(f"    rss {impl}: peak {float(peak) / 2**30:.2f} GiB, load + generation {float(seconds):.0f}s", flush=True)
    return peaks


# ----------------------------------------------------------------------------- the table


def table(rows: list[tuple[str, Row]], peaks: dict[str, float], rss: dict[str, float] | None) -> str:
    """Markdown: one line per row, median seconds per implementation and diffusers' time over each."""
    labels = list(dict.fromkeys(label for _, row in rows for label in row.times))
    others = [label for label in labels if label != "diffusers"]
    head = ["benchmark", "dtype", *[f"{label} s" for label in labels], *[f"{label} speed-up" for label in others],
            "peak used"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dtype, row in rows:
        cells = [row.name, dtype]
        cells += [f"{row.median(label):.3f}" if label in row.times else "" for label in labels]
        cells += [f"{row.median('diffusers') / row.median(label):.2f}x" if label in row.times else "" for label in others]
        same_math = [label for label in row.times
                     if "int8" not in label and (dtype != "float32" or "bf16" not in label)]
        fastest = min(same_math, key=row.median)
        cells.append(f"{row.flops / row.median(fastest) / peaks[dtype]:.0%} ({fastest})" if row.flops else "")
        lines.append("| " + " | ".join(cells) + " |")
    fp32 = {row.name: row.median("diffusers") for dtype, row in rows if dtype == "float32"}
    for dtype, row in rows:  # a half-precision run against diffusers' float32 one: the issue's memory comparison
        if dtype != "float32" and row.name in fp32:
            ours = ", ".join(f"{label} {fp32[row.name] / row.median(label):.2f}x" for label in row.times)
            lines.append(f"| {row.name}, {dtype} against diffusers' float32 {fp32[row.name]:.3f} s | {dtype} | "
                         f"{ours} |" + " |" * (len(head) - 3))
    if rss:
        base = rss["diffusers float32"]
        ours = ", ".join(f"{impl} {peak / 2**30:.2f} GiB = {peak / base:.2f}x" for impl, peak in rss.items()
                         if impl.startswith("sdtorch"))
        lines.append(f"| peak RSS, load + whole generation | diffusers float32 | {base / 2**30:.2f} GiB | {ours} "
                     "of diffusers' |" + " |" * (len(head) - 4))
    return "\n".join(lines)


def write_readme(text: str, readme: Path) -> None:
    """Replace what stands between the README's compare.py markers (appending them under Benchmarks if absent)."""
    current = readme.read_text(encoding="utf-8")
    block = f"{README_BEGIN}\n{text}\n{README_END}"
    if README_BEGIN in current:
        start, end = current.index(README_BEGIN), current.index(README_END) + len(README_END)
        current = current[:start] + block + current[end:]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(current, encoding="utf-8")
    tmp.replace(readme)


# ----------------------------------------------------------------------------- main


def sdtorch_variants(file: Path, dtype: torch.dtype, device: torch.device, inductor: bool, openvino: bool,
                     int8: bool) -> dict:
    """The sdtorch pipelines to time: the default path, and each documented option on top of it (sharing its
    modules, but for int8, which replaces the UNet's linear layers in a pipeline of its own); the plain and the
    last one also run the generation row's step caching."""
    import sdtorch
    from sdtorch.openvino_runtime import native_bfloat16

    plain = sdtorch.load(file, dtype=dtype, device=device)
    variants = {"sdtorch": plain}
    if inductor:
        variants["sdtorch --compile"] = copy.copy(plain).compile()
    if openvino:
        variants["sdtorch --compile-backend openvino"] = copy.copy(plain).compile("openvino")
        if dtype == torch.float32 and native_bfloat16():
            variants["sdtorch --compile-backend openvino-bf16"] = copy.copy(plain).compile("openvino-bf16")
    if int8:  # compiled where inductor runs: its quantising of each input fuses there
        label = "sdtorch --compile --quantize int8" if inductor else "sdtorch --quantize int8"
        variants[label] = sdtorch.load(file, dtype=dtype, device=device).quantize("int8").compile(inductor)
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["unet", "text", "vae", "generation", "load", "rss"],
                        default=["unet", "text", "vae", "generation", "load", "rss"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="UNet step image sides")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        help="default: float32, and bfloat16 where the CPU has it natively")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (benchmarks/gpu.sh): no OpenVINO, no RSS")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median)")
    parser.add_argument("--gen-size", type=int, default=512)
    parser.add_argument("--gen-steps", type=int, default=20)
    parser.add_argument("--gen-repeats", type=int, default=2, help="timed whole generations per implementation")
    parser.add_argument("--deep-cache", type=int, nargs="+", default=[3],
                        help="the generation row's step-caching intervals on the plain and the last sdtorch variant, "
                             "a column each "
                             "(1: none)")
    parser.add_argument("--no-openvino", action="store_true", help="leave out OpenVINO (diffusers' UNet converted) "
                        "and sdtorch --compile-backend openvino / openvino-bf16")
    parser.add_argument("--no-inductor", action="store_true", help="leave out sdtorch --compile (inductor)")
    parser.add_argument("--no-int8", action="store_true", help="leave out sdtorch --quantize int8")
    parser.add_argument("--workdir", default="/tmp/sdtorch-compare", help="where the random model files are kept")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)

    features = cpu_features()
    device = torch.device(args.device)
    dtypes = args.dtypes or ["float32", *(["bfloat16"] if features["native_bf16"] else [])]
    peaks = {name: matmul_peak(getattr(torch, name), device) for name in dtypes}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else features["model"]
    print(f"CPU: {json.dumps(features)}\ndevice: {machine}", flush=True)
    print("measured matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)
    file, folder = write_models(Path(args.workdir))
    os.environ.setdefault(openvino_cache.CACHE_ENV, str(Path(args.workdir) / "openvino-graphs"))

    rows: list[tuple[str, Row]] = []
    for name in dtypes:
        dtype = getattr(torch, name)
        print(f"{name}:", flush=True)
        theirs = diffusers_pipeline(folder, dtype).to(device)
        openvino = not args.no_openvino and device.type == "cpu"
        ours = sdtorch_variants(file, dtype, device, not args.no_inductor, openvino, not args.no_int8)
        if "unet" in args.only:
            rows += [(name, r) for r in unet_rows(ours, theirs, args.sizes, dtype, openvino, args.repeats, device)]
        if "text" in args.only:
            rows.append((name, text_row(ours, theirs, args.repeats, device)))
        if "vae" in args.only:
            rows.append((name, vae_row(ours, theirs, dtype, args.repeats, device)))
        if "generation" in args.only:
            rows.append((name, generation_row(ours, theirs, args.gen_size, args.gen_steps, args.gen_repeats,
                                              args.deep_cache)))
        for dtype_name, row in rows:
            if dtype_name == name:
                print(f"  {row.name}: " + ", ".join(f"{k} {row.median(k):.3f}s" for k in row.times), flush=True)
            row.outputs.clear()
        del theirs, ours
        gc.collect()
    if "load" in args.only:
        rows.append(("float32", load_row(file, folder, args.repeats)))
    rss = (rss_row(file, folder, args.gen_size, args.gen_steps, features["native_bf16"], not args.no_openvino,
                   args.deep_cache)
           if "rss" in args.only and device.type == "cpu" else None)

    bf16 = "native" if features["native_bf16"] else "emulated (not timed)"
    peak_text = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    text = (f"Measured by `benchmarks/compare.py` on {machine}, {features['threads']} CPU threads, "
            f"torch {torch.__version__} ({features['torch_capability']}, bfloat16 {bf16}), "
            f"matmul peak {peak_text}.\n\n" + table(rows, peaks, rss))
    print("\n" + text)
    if not args.no_readme:
        write_readme(text, Path(args.readme))
        print(f"written into {args.readme}")


if __name__ == "__main__":
    main()
