"""The `sdtorch` command line: `sdtorch info SRC`, `sdtorch convert SRC DST --to diffusers|single-file`."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .errors import SdtorchError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the detected parameterisation (SD2 768 models predict v)")


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoints.loading import load

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
