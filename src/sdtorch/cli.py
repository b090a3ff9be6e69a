"""The `sdtorch` command line.

    sdtorch generate PROMPT [--model SRC] [options]   txt2img / img2img / inpainting, PNGs with A1111 parameters
                                                      (no --model: the shipped shapes-world model)
    sdtorch generate --from image.png [--model SRC]   re-create an image from the parameters it carries
    sdtorch info SRC | image.png                      describe a model, or print an image's parameters
    sdtorch convert SRC DST --to diffusers|single-file
    sdtorch eval [--model SRC] [--prompts N]          judge a shapes-world model's images against their prompts
    sdtorch train configs/shapes.toml --workdir DIR   train a model from scratch by a recipe (resumable)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from .configs import DTYPES
from .errors import InvalidInputError, SdtorchError


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the detected parameterisation (SD2 768 models predict v)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_CFG = 7.5  # A1111's and diffusers' habit, for the checkpoints users bring
BUILT_IN_MODEL_CFG = 4.0  # the shapes model's best (`sdtorch eval`: all correct 90.5% at 4, 77.5% at 7.5)


def _guidance(args: argparse.Namespace) -> float:
    """--cfg, or the default of the model in use: the built-in shapes model draws best at a lower scale."""
    if args.cfg is not None:
        return args.cfg
    return BUILT_IN_MODEL_CFG if args.model is None else DEFAULT_CFG


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoints.loading import load

    if args.source.lower().endswith(IMAGE_SUFFIXES):
        from .infotext import read_infotext

        text = read_infotext(args.source)
        print(text if text is not None else f"{args.source} carries no generation parameters")
        return
    pipe = load(args.source, device="meta", prediction_type=args.prediction_type)
    cfg, report = pipe.config, pipe.report
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for m in pipe.modules.values() for p in m.parameters()})
    print(f"source:          {report.source} ({report.format})")
    print(f"kind:            {cfg.kind}")
    print(f"prediction type: {cfg.prediction_type} ({report.prediction_type_origin})")
    print(f"dtype:           {', '.join(dtypes)}")
    print(f"unet:            {cfg.unet.in_channels}-channel input, channels {list(cfg.unet.block_channels)}, "
          f"context {cfg.unet.context_dim}, heads {list(cfg.unet.num_heads)}")
    print(f"vae:             channels {list(cfg.vae.block_channels)}, {cfg.vae.latent_channels} latent channels, "
          f"scaling factor {cfg.vae.scaling_factor}")
    te = cfg.text_encoder
    print(f"text encoder:    width {te.width}, {te.num_layers} layers, {te.num_heads} heads, {te.activation}")
    for name, count in pipe.parameter_counts().items():
        print(f"parameters:      {name:<13} {count:>13,}")
    if report.ignored_keys:
        shown = ", ".join(report.ignored_keys[:5]) + (" ..." if len(report.ignored_keys) > 5 else "")
        print(f"ignored keys:    {len(report.ignored_keys)} ({shown})")


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoints.loading import load
    from .checkpoints.saving import save

    start = time.perf_counter()
    pipe = load(args.source, dtype=args.dtype, prediction_type=args.prediction_type)
    out = save(pipe, args.destination, format=args.to)
    print(f"wrote {out} ({args.to}, {pipe.config.kind}, {pipe.config.prediction_type}) "
          f"in {time.perf_counter() - start:.1f}s")


def _from_image(args: argparse.Namespace) -> None:
    """Fill unset generation arguments from the A1111 parameters an image carries."""
    from .infotext import parse_infotext, read_infotext

    text = read_infotext(args.from_image)
    if text is None:
        raise InvalidInputError(f"{args.from_image} carries no generation parameters to re-create it from")
    p = parse_infotext(text)
    fill = {"prompt": p.prompt, "negative": p.negative_prompt, "steps": p.steps, "cfg": p.cfg_scale,
            "sampler": p.sampler, "schedule": p.schedule, "seed": p.seed, "width": p.width, "height": p.height,
            "clip_skip": p.clip_skip}
    if p.hires_upscale:
        fill |= {"hires_scale": p.hires_upscale, "hires_steps": p.hires_steps, "hires_upscaler": p.hires_upscaler,
                 "hires_denoise": p.denoising_strength}
    for key, value in fill.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)


class _Progress:
    """A tqdm bar over sampler steps (it/s and ETA), opened on the first step of each sampling pass."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, step) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or step.index == 0:
            self.close()
            self.bar = tqdm(total=step.total, unit="step", file=sys.stderr, leave=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_generate(args: argparse.Namespace) -> None:
    from .checkpoints.loading import load

    if args.from_image:
        _from_image(args)
    if not args.prompt:
        raise InvalidInputError("give a prompt (or --from image.png)")
    pipe = load(args.model, dtype=args.dtype, prediction_type=args.prediction_type)
    options = {}
    if args.hires_scale:
        options |= {"enable_hr": True, "hr_scale": args.hires_scale, "hr_second_pass_steps": args.hires_steps,
                    "hr_upscaler": args.hires_upscaler or "Latent", "hr_denoising_strength": args.hires_denoise or 0.7}
    if args.mask_blur is not None:
        options["mask_blur"] = args.mask_blur
    progress = _Progress(enabled=not args.quiet)
    start = time.perf_counter()
    try:
        images = pipe(
            args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps or 20,
            guidance_scale=_guidance(args), sampler=args.sampler or "DPM++ 2M",
            schedule=args.schedule, seed=-1 if args.seed is None else args.seed, width=args.width, height=args.height,
            num_images_per_prompt=args.batch, image=args.init_image, strength=args.strength, mask_image=args.mask,
            clip_skip=args.clip_skip or 1, callback=progress, **options,
        )
    finally:
        progress.close()
    for message in options.get("warnings", []):
        print(f"sdtorch: warning: {message}", file=sys.stderr)
    for path in _output_paths(args.out, images):
        print(path)
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def _output_paths(out: str, images: list) -> list[Path]:
    """Write each image (atomically, with its parameters) and return the paths."""
    from .infotext import save_png

    target = Path(out)
    if target.suffix.lower() == ".png":
        names = [target] if len(images) == 1 else [target.with_name(f"{target.stem}-{i}.png") for i in range(len(images))]
    else:
        target.mkdir(parents=True, exist_ok=True)
        taken = len(list(target.glob("*.png")))
        names = [target / f"{taken + i:05d}-{img.info['seed']}.png" for i, img in enumerate(images)]
    return [save_png(img, name, img.info["parameters"]) for img, name in zip(images, names)]


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoints.io import write_json
    from .checkpoints.loading import load
    from .evaluation.generation import evaluate, format_report

    pipe = load(args.model)
    report = evaluate(
        pipe, args.prompts, args.held_out, seed=args.seed, guidance_scale=_guidance(args), compare_guidance=not args.no_compare,
        steps=args.steps, sampler=args.sampler, schedule=args.schedule,
        progress=lambda done, total: print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)


def cmd_train(args: argparse.Namespace) -> None:
    from .training.recipe import run_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    model = run_recipe(args.config, args.workdir, until=args.until)
    print(model if model.is_dir() else args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtorch", description="Stable Diffusion in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a model: kind, sizes, dtype, prediction type, parameters")
    info.add_argument("source", help="single file, diffusers folder or hub id")
    _add_load_options(info)
    info.set_defaults(run=cmd_info)

    convert = sub.add_parser("convert", help="convert between single-file and diffusers layouts")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--to", required=True, choices=("diffusers", "single-file"))
    convert.add_argument("--dtype", type=_dtype, default=None, help="float32 (default), float16 or bfloat16")
    _add_load_options(convert)
    convert.set_defaults(run=cmd_convert)

    gen = sub.add_parser("generate", help="generate images (txt2img, img2img, inpainting)")
    gen.add_argument("prompt", nargs="?", help="what to draw (A1111 syntax: (word:1.2), [word], BREAK)")
    gen.add_argument("--model", help="single file, diffusers folder or hub id (default: the shipped shapes model)")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--steps", type=int, help="sampling steps (default 20)")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7.5; 4 for the built-in model)")
    gen.add_argument("--sampler", help='A1111 name, e.g. "DPM++ 2M" (default), "Euler a", "DDIM", "UniPC"')
    gen.add_argument("--schedule", help="Automatic, Karras, Exponential, Uniform, SGM Uniform (default: the sampler's)")
    gen.add_argument("--seed", type=int, help="-1 or unset: random; image i of a batch uses seed + i")
    gen.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--height", type=int, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--batch", type=int, default=1, help="images to generate")
    gen.add_argument("--init-image", help="img2img / inpainting source image")
    gen.add_argument("--strength", type=float, default=0.75, help="img2img denoising strength in (0, 1]")
    gen.add_argument("--mask", help="inpainting mask (white = repaint)")
    gen.add_argument("--mask-blur", type=int, help="mask blur in pixels (default 4)")
    gen.add_argument("--clip-skip", type=int, help="A1111 Clip skip (1 = last layer)")
    gen.add_argument("--hires-scale", type=float, help="hires fix: upscale factor for a second pass")
    gen.add_argument("--hires-steps", type=int, help="hires fix: second-pass steps (default: --steps)")
    gen.add_argument("--hires-upscaler", choices=("Latent", "Latent (nearest)", "Lanczos"))
    gen.add_argument("--hires-denoise", type=float, help="hires fix: second-pass denoising strength (default 0.7)")
    gen.add_argument("--dtype", type=_dtype, default=None, help="float32 (default), float16 or bfloat16")
    gen.add_argument("--from", dest="from_image", help="re-create an image from the parameters in this PNG")
    gen.add_argument("--out", default="outputs", help="output folder, or a .png path (default: outputs/)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_load_options(gen)
    gen.set_defaults(run=cmd_generate)

    ev = sub.add_parser("eval", help="score a shapes-world model: per-attribute accuracy judged on generated images")
    ev.add_argument("--model", help="model to evaluate (default: the shipped shapes model)")
    ev.add_argument("--prompts", type=int, default=500, help="prompts of (shape, colour) pairs seen in training")
    ev.add_argument("--held-out", type=int, default=100, help="prompts of held-out (shape, colour) pairs")
    ev.add_argument("--seed", type=int, default=0, help="prompt i is drawn from this seed and generated with seed + i")
    ev.add_argument("--cfg", type=float, help="guidance scale (default 7.5; 4 for the built-in model), compared with 1 "
                    "unless --no-compare")
    ev.add_argument("--no-compare", action="store_true", help="skip the unguided run")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--sampler", default="DPM++ 2M")
    ev.add_argument("--schedule", default="Karras")
    ev.add_argument("--json", help="also write the report here")
    ev.set_defaults(run=cmd_eval)

    train = sub.add_parser("train", help="train a model from scratch by a recipe (e.g. configs/shapes.toml)")
    train.add_argument("config", help="recipe file (TOML)")
    train.add_argument("--workdir", required=True, help="where stages keep checkpoints; re-run to resume")
    train.add_argument("--until", help="stop after this stage (tokenizer, vae, latents, clip, unet, model, metrics)")
    train.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SdtorchError as e:
        print(f"sdtorch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
