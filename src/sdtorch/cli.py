"""The `sdtorch` command line.

    sdtorch generate PROMPT [--model SRC] [options]   txt2img / img2img / inpainting, PNGs with A1111 parameters
                                                      (no --model: the shipped shapes-world model)
    sdtorch generate --from image.png [--model SRC]   re-create an image from the parameters it carries
    sdtorch info SRC | image.png                      describe a model, or print an image's parameters
    sdtorch convert SRC DST --to diffusers|single-file [--overwrite]
    sdtorch eval [--model SRC] [--prompts N]          judge a shapes-world model's images against their prompts
    sdtorch train configs/shapes.toml --workdir DIR   train a model from scratch by a recipe (resumable)
    sdtorch serve [--model SRC] [--port 7860]         AUTOMATIC1111-compatible HTTP API and web page
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
import unicodedata
from typing import TYPE_CHECKING, Any
from pathlib import Path

from .errors import InvalidInputError, SdtorchError
from .request import GROUPS, UNIT_FIELDS, GenerationRequest, HiresFix, Limits, fields_of, from_fields

if TYPE_CHECKING:
    import torch

    from .pipeline import Pipeline


def _dtype(name: str) -> torch.dtype:
    from .configs import DTYPES

    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the detected parameterisation (SD2 768 models predict v)")
    p.add_argument("--few-step", action="store_true",
                   help="the model is distilled for a few steps (SDXL Turbo / Lightning): unset settings default to "
                        "4 steps of Euler a, SGM Uniform, CFG 1 (a diffusers folder with a trailing scheduler does "
                        "so already); convert records it")


def _load(args: argparse.Namespace, source: str, **options: Any) -> Pipeline:
    """The model the command's load options (`_add_load_options`) describe."""
    from .checkpoints.loading import load
    from .request import FEW_STEP_DEFAULTS

    pipe = load(source, prediction_type=args.prediction_type, **options)
    if args.few_step:
        pipe.defaults = FEW_STEP_DEFAULTS
    return pipe


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_BIDI_CONTROLS = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def printable(text: str, keep_newlines: bool = True) -> str:
    """`text` with control characters (ANSI escapes, carriage returns, bidi overrides) shown escaped, so that
    text from a file (a PNG's parameters, a file name) cannot drive the terminal."""
    def escape(c: str) -> str:
        if c == "\t" or (c == "\n" and keep_newlines):
            return c
        if unicodedata.category(c) == "Cc" or ord(c) in _BIDI_CONTROLS:
            return c.encode("unicode_escape").decode("ascii")
        return c

    return "".join(escape(c) for c in text)


def cmd_info(args: argparse.Namespace) -> None:
    if args.source.lower().endswith(IMAGE_SUFFIXES):
        from .infotext import read_infotext

        text = read_infotext(args.source)
        print(printable(text) if text is not None else f"{printable(args.source)} carries no generation parameters")
        return
    pipe = _load(args, args.source, device="meta")
    cfg, report = pipe.config, pipe.report
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for m in pipe.modules.values() for p in m.parameters()})
    print(f"source:          {report.source} ({report.format})")
    print(f"kind:            {cfg.kind}")
    print(f"prediction type: {cfg.prediction_type} ({report.prediction_type_origin})")
    print(f"dtype:           {', '.join(dtypes)}")
    unet = cfg.unet
    depth = f", transformer depth {list(unet.level_depths)}" if not isinstance(unet.transformer_depth, int) else ""
    print(f"unet:            {unet.in_channels}-channel input, channels {list(unet.block_channels)}, "
          f"context {unet.context_dim}, heads {list(unet.num_heads)}{depth}")
    if unet.has_addition:
        print(f"added condition: pooled text {cfg.pooled_dim} + {cfg.num_time_ids} size numbers x "
              f"{unet.addition_time_embed_dim}")
    print(f"vae:             channels {list(cfg.vae.block_channels)}, {cfg.vae.latent_channels} latent channels, "
          f"scaling factor {cfg.vae.scaling_factor}")
    for i, te in enumerate(cfg.text_encoders):
        label = "text encoder:" if i == 0 else f"text encoder {i + 1}:"
        projection = f", projection {te.projection_dim}" if te.with_projection else ""
        print(f"{label:<17}width {te.width}, {te.num_layers} layers, {te.num_heads} heads, {te.activation}{projection}")
    defaults = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(pipe.defaults).items())
    print(f"defaults:        {defaults}")
    counts = pipe.parameter_counts()
    if cfg.is_sdxl and len(cfg.text_encoders) > 1:  # each encoder's share too
        for i, encoder in enumerate(pipe.text_encoder.encoders):
            counts[f"text_encoder.{i}"] = sum(p.numel() for p in encoder.parameters())
    for name, count in counts.items():
        print(f"parameters:      {name:<14} {count:>13,}")
    if report.ignored_keys:
        shown = ", ".join(report.ignored_keys[:5]) + (" ..." if len(report.ignored_keys) > 5 else "")
        print(f"ignored keys:    {len(report.ignored_keys)} ({shown})")


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoints.saving import check_destination, save

    check_destination(args.destination, args.to, args.overwrite)  # before the load, which may take minutes
    start = time.perf_counter()
    pipe = _load(args, args.source, dtype=args.dtype)
    out = save(pipe, args.destination, format=args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to}, {pipe.config.kind}, {pipe.config.prediction_type}) "
          f"in {time.perf_counter() - start:.1f}s")


def _request(args: argparse.Namespace) -> GenerationRequest:
    """The generation request of a `generate` command: the image's parameters (--from), then the flags given."""
    base = GenerationRequest()
    if args.from_image:
        from .infotext import parse_infotext, read_infotext

        text = read_infotext(args.from_image)
        if text is None:
            raise InvalidInputError(f"{args.from_image} carries no generation parameters to re-create it from")
        base = parse_infotext(text).request
    given = {dest: getattr(args, dest) for dest in _FLAGS if getattr(args, dest) is not None}
    top = {name: v for dest, v in given.items() if (name := _FLAGS[dest][1]) and _FLAGS[dest][0] is None}
    if args.prompt is not None:
        top["prompt"] = args.prompt
    for group in GROUPS:
        changes = {_FLAGS[dest][1]: v for dest, v in given.items() if _FLAGS[dest][0] == group}
        current = getattr(base, group)
        if group == "hires" and (changes or args.hires) and current is None:
            current = HiresFix()
        if changes:
            current = dataclasses.replace(current, **changes)
        top[group] = current
    for name, cls in UNIT_FIELDS.items():  # unit i's flags over unit i of --from's (an infotext has no images)
        given_units, known = getattr(args, name) or [], getattr(base, name)
        if given_units:
            units = [dataclasses.replace(known[i], **given) if i < len(known) else given
                     for i, given in enumerate(given_units)]
            top[name] = [from_fields(cls, unit, f"{name} unit #{i + 1}") for i, unit in enumerate(units)]
    request = base.replace(**top)
    if not request.prompt and not args.from_image:
        raise InvalidInputError("give a prompt (or --from image.png)")
    return request


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


def _folder(flag: str, value: str | None) -> Path | None:
    """A folder flag's value (None when not given); InvalidInputError when it is not a folder."""
    if value is not None and not Path(value).is_dir():
        raise InvalidInputError(f"{flag} {value} is not a folder")
    return None if value is None else Path(value)


def _vae(value: str | None) -> Path | None:
    """--vae's value (None when not given); InvalidInputError when there is no such file or folder."""
    if value is not None and not Path(value).expanduser().exists():
        raise InvalidInputError(f"--vae {value}: no such file or folder")
    return None if value is None else Path(value).expanduser()


def _compile_backend(args: argparse.Namespace) -> str | None:
    """The backend --compile / --compile-backend ask for (None: no compiling), checked before any model loads."""
    from .compiled import BACKENDS

    if args.compile_backend is not None and args.compile_backend not in BACKENDS:
        raise InvalidInputError(f"--compile-backend: unknown compile backend {args.compile_backend!r}; "
                                f"one of: {', '.join(BACKENDS)}")
    return args.compile_backend or (BACKENDS[0] if args.compile else None)


def _quantize(args: argparse.Namespace) -> str | None:
    """--quantize's mode (None: off), checked before any model loads."""
    from .quantization import QUANTIZE_MODES

    if args.quantize is not None and args.quantize not in QUANTIZE_MODES:
        raise InvalidInputError(f"--quantize: unknown quantisation {args.quantize!r}; "
                                f"one of: {', '.join(QUANTIZE_MODES)}")
    return args.quantize


def cmd_generate(args: argparse.Namespace) -> None:
    request = _request(args)
    limits = Limits.from_strings(args.limit)
    request.validate(limits)  # before torch and the model load: a bad request is refused at once

    from .outputs import plan_outputs, write_images

    lora_dir, embeddings_dir = _folder("--lora-dir", args.lora_dir), _folder("--embeddings-dir", args.embeddings_dir)
    vae = _vae(args.vae)
    outputs = plan_outputs(args.out, len(request.prompts()) * request.batch_size, overwrite=args.overwrite)
    backend, quantize = _compile_backend(args), _quantize(args)
    pipe = _load(args, args.model, dtype=args.dtype).quantize(quantize).compile(backend)
    if vae is not None:
        pipe.load_vae(vae)
    pipe.limits = limits
    pipe.lora_dir = lora_dir
    if embeddings_dir:
        from .adapters.embeddings import load_embeddings_dir

        for skipped in load_embeddings_dir(pipe, embeddings_dir).skipped:
            print(f"sdtorch: warning: embedding not loaded: {printable(skipped, keep_newlines=False)}", file=sys.stderr)
    progress = _Progress(enabled=not args.quiet)
    start = time.perf_counter()
    try:
        result = pipe(request=request, callback=progress)
    finally:
        progress.close()
    for message in result.warnings:
        print(f"sdtorch: warning: {printable(message, keep_newlines=False)}", file=sys.stderr)
    for path in write_images(outputs, result):
        print(path)
    print(f"{len(result)} image(s) in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from .server.auth import parse_api_auth

    limits = Limits.from_strings(args.limit)
    credentials = parse_api_auth(args.api_auth) if args.api_auth else ()
    if not 0 < args.port < 65536:
        raise InvalidInputError(f"--port {args.port} is not a port number (1-65535)")
    folders = dict(models_dir=_folder("--models-dir", args.models_dir), lora_dir=_folder("--lora-dir", args.lora_dir),
                   embeddings_dir=_folder("--embeddings-dir", args.embeddings_dir), vae=_vae(args.vae),
                   controlnet_dir=_folder("--controlnet-dir", args.controlnet_dir),
                   clip_vision_dir=_folder("--clip-vision-dir", args.clip_vision_dir))

    import uvicorn

    from .server.app import create_app
    from .server.service import ServerConfig

    config = ServerConfig(model=args.model, outdir=Path(args.out), api_auth=credentials, limits=limits,
                          dtype=args.dtype, compile=_compile_backend(args), quantize=_quantize(args),
                          **folders)
    app = create_app(config)  # loads the first model
    print(f"sdtorch: serving on http://{args.host}:{args.port} (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoints.io import write_json
    from .checkpoints.loading import load
    from .evaluation.generation import evaluate, format_report

    quantize = _quantize(args)
    pipe = load(args.model).quantize(quantize)
    guidance = pipe.defaults.cfg_scale if args.cfg is None else args.cfg
    report = evaluate(
        pipe, args.prompts, args.held_out, seed=args.seed, guidance_scale=guidance, compare_guidance=not args.no_compare,
        steps=args.steps, sampler=args.sampler, schedule=args.schedule, deep_cache=args.deep_cache,
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


# `sdtorch finetune` flags: one per FineTuneConfig field (help from the field), plus these keys of its sections
_FINETUNE_SECTION_FLAGS = {
    "dataset": {"data": "folder", "resolution": "resolution", "buckets": "buckets",
                "caption_dropout": "caption_dropout", "shuffle_tags": "shuffle_tags", "repeats": "repeats",
                "cache_latents": "cache_latents", "conditioning_folder": "conditioning_folder",
                "loss_mask_folder": "loss_mask_folder", "alpha_mask": "alpha_mask"},
    "textual_inversion": {"token": "name", "init_word": "init_word", "num_vectors": "num_vectors"},
    "dreambooth": {"instance_prompt": "instance_prompt", "class_prompt": "class_prompt", "class_dir": "class_dir",
                   "num_class_images": "num_class_images", "prior_loss_weight": "prior_loss_weight",
                   "dreambooth_lora": "lora"},
}


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    from .training.finetune import FineTuneConfig

    top = typing.get_type_hints(FineTuneConfig)
    flags = {f.name: (top[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(FineTuneConfig)
             if f.name not in _FINETUNE_SECTION_FLAGS}
    for section, keys in _FINETUNE_SECTION_FLAGS.items():
        (cls,) = [t for t in typing.get_args(top[section]) or (top[section],) if dataclasses.is_dataclass(t)]
        hints = typing.get_type_hints(cls)
        flags.update({flag: (hints[key], f"[{section}] {key}") for flag, key in keys.items()})
    for name, (hint, help_text) in flags.items():
        flag = "--" + name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(hint) is tuple:  # a repeatable flag, one value each time
            parser.add_argument(flag.removesuffix("s"), dest=name, action="append", default=None, help=help_text)
        else:
            kind = next((t for t in typing.get_args(hint) or (hint,) if t in (int, float, str)), str)
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def cmd_finetune(args: argparse.Namespace) -> None:
    import tomllib

    from . import tomlconfig
    from .training.finetune import FineTuneConfig, finetune

    table: dict = {}
    if args.config:
        try:
            table = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read fine-tune config {args.config}: {e}") from None
    for section, keys in _FINETUNE_SECTION_FLAGS.items():
        given = {key: getattr(args, flag) for flag, key in keys.items() if getattr(args, flag) is not None}
        if section in table or given or section == "dataset":
            table[section] = {**table.get(section, {}), **given}
    for f in dataclasses.fields(FineTuneConfig):
        if f.name not in _FINETUNE_SECTION_FLAGS and getattr(args, f.name) is not None:
            table[f.name] = getattr(args, f.name)
    source = args.config or "command line"
    if "folder" not in table["dataset"] or "out" not in table:
        raise InvalidInputError(f"{source}: fine-tuning needs --data DIR (or [dataset] folder) and --out DIR (or out)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = finetune(tomlconfig.from_table(FineTuneConfig, table, source=source))
    print(result)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in sdtorch's one-line form (exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"sdtorch: error: {printable(message, keep_newlines=False)} (see: {self.prog} --help)\n")


def _add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", metavar="MODE", help="int8: the UNet's linear layers in int8, inputs quantised "
                        "per token at each call (Pipeline.quantize); the picture changes (see README, Speed)")


def _add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true", help="run the UNet and the VAE decoder through torch.compile "
                        "(Pipeline.compile): "
                        "faster steps after a first compile of minutes per image size (see README, Speed)")
    parser.add_argument("--compile-backend", metavar="NAME", help="compile with this backend instead (implies "
                        "--compile): inductor (torch.compile's, the default), openvino (the UNet and the VAE decoder "
                        "on OpenVINO's CPU runtime; needs the openvino package) or openvino-bf16 (the same computing "
                        "in bfloat16, as OpenVINO does by default on CPUs with native bfloat16; changes the picture "
                        "slightly)")


def _add_limit_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                        help=f"raise or lower a limit ({', '.join(f'{f.name}={f.default}' for f in dataclasses.fields(Limits))})")


VAE_HELP = ("a VAE used instead of the model's own (A1111's SD VAE): an original-layout .safetensors / .ckpt "
            "or a diffusers AutoencoderKL folder or file, e.g. sdxl-vae-fp16-fix")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. `command`: the subcommand being run; `finetune`'s flags (made from its config
    classes, which import torch) are built only for it, so that other commands start fast."""
    parser = _Parser(prog="sdtorch", description="Stable Diffusion in plain PyTorch")
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
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing DST if it is a model of the same kind (nothing else is ever replaced)")
    _add_load_options(convert)
    convert.set_defaults(run=cmd_convert)

    gen = sub.add_parser("generate", help="generate images (txt2img, img2img, inpainting)")
    gen.add_argument("prompt", nargs="?", help="what to draw (A1111 syntax: (word:1.2), [word], BREAK)")
    gen.add_argument("--model", help="single file, diffusers folder or hub id (default: the shipped shapes model)")
    _add_request_flags(gen)
    _add_unit_flags(gen)
    gen.add_argument("--hires", action="store_true", help="hires fix with its defaults (any --hires-* flag turns it on)")
    gen.add_argument("--dtype", type=_dtype, default=None, help="float32 (default), float16 or bfloat16")
    _add_compile_flag(gen)
    _add_quantize_flag(gen)
    gen.add_argument("--lora-dir", help="folder of LoRA files that <lora:name:weight> in a prompt picks by name")
    gen.add_argument("--vae", help=VAE_HELP)
    gen.add_argument("--embeddings-dir", help="folder of textual-inversion embeddings, used by writing their name")
    gen.add_argument("--from", dest="from_image", help="re-create an image from the parameters it carries; "
                     "flags given override them")
    gen.add_argument("--out", default="outputs", help="output folder (A1111-style NNNNN-SEED.png names), or a "
                     ".png / .jpg / .webp path (default: outputs/)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_limit_flag(gen)
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
    ev.add_argument("--deep-cache", type=int, default=1, help="step caching interval (1: off; see generate --deep-cache)")
    _add_quantize_flag(ev)
    ev.add_argument("--json", help="also write the report here")
    ev.set_defaults(run=cmd_eval)

    train = sub.add_parser("train", help="train a model from scratch by a recipe (e.g. configs/shapes.toml)")
    train.add_argument("config", help="recipe file (TOML)")
    train.add_argument("--workdir", required=True, help="where stages keep checkpoints; re-run to resume")
    train.add_argument("--until", help="stop after this stage (tokenizer, vae, latents, clip, unet, model, metrics)")
    train.set_defaults(run=cmd_train)

    serve = sub.add_parser("serve", help="an AUTOMATIC1111-compatible HTTP API (/sdapi/v1, docs at /docs) and a web page")
    serve.add_argument("--model", help="the model loaded first (default: the shipped shapes model)")
    serve.add_argument("--models-dir", help="folder of more models (.safetensors, .ckpt, diffusers folders) "
                       "that clients select by title")
    serve.add_argument("--lora-dir", help="folder of LoRA files that <lora:name:weight> in a prompt picks by name")
    serve.add_argument("--embeddings-dir", help="folder of textual-inversion embeddings, used by writing their name")
    serve.add_argument("--controlnet-dir", help="folder of ControlNets, T2I- and IP-Adapters (.safetensors, .pth, "
                       ".pt, .ckpt, .bin, diffusers folders) that ControlNet units name (/controlnet/model_list)")
    serve.add_argument("--clip-vision-dir", help="folder of the CLIP vision towers of the IP-Adapter modules, named "
                       "as the A1111 ControlNet extension names them: clip_h.pth (ViT-H/14: ip-adapter_clip_h), "
                       "clip_g.pth (ViT-bigG/14: ip-adapter_clip_g), or .safetensors, or transformers folders")
    serve.add_argument("--vae", help=VAE_HELP + ", for every model loaded")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                       "only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="HTTP Basic auth on every path")
    serve.add_argument("--out", default="outputs", help="where save_images writes (default: outputs/)")
    serve.add_argument("--dtype", type=_dtype, default=None, help="float32 (default), float16 or bfloat16")
    _add_compile_flag(serve)
    _add_quantize_flag(serve)
    _add_limit_flag(serve)
    serve.set_defaults(run=cmd_serve)

    finetune = sub.add_parser("finetune", help="fine-tune a model on a captioned image folder (LoRA, full, "
                              "DreamBooth, ControlNet or textual inversion); resumable; all but textual inversion run "
                              "under accelerate launch / torchrun too")
    finetune.add_argument("config", nargs="?", help="fine-tune config (TOML); flags given override it")
    if command == "finetune":
        _add_finetune_flags(finetune)
    finetune.set_defaults(run=cmd_finetune)
    return parser


# argparse dest -> (group or None, field name), for the flags made from the request's field table
_FLAGS: dict[str, tuple[str | None, str]] = {}


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per request field that has one, with the field's type, choices and default in its help."""
    for group, cls in ((None, GenerationRequest), *GROUPS.items()):
        for f, hint in fields_of(cls):
            flag = f.metadata.get("cli")
            if flag is None:
                continue
            dest = flag.removeprefix("--").replace("-", "_")
            _FLAGS[dest] = (group, f.name)
            shown = f" (default {f.default})" if f.default not in (None, "") else ""
            if hint is bool:
                parser.add_argument(flag, dest=dest, action="store_const", const=True, help=f.metadata["help"])
                continue
            kinds = [t for t in typing.get_args(hint) or (hint,) if t in (int, float)]
            parser.add_argument(flag, dest=dest, type=kinds[0] if kinds else str, choices=f.metadata["choices"] or None,
                                help=f.metadata["help"] + shown)


# The flag that starts a unit of each unit list: the others set a field of the last unit started
UNIT_STARTS = {"controlnet": "image", "ip_adapter": "model"}


class _UnitFlag(argparse.Action):
    """A flag of a unit list (`args.<dest>`: one dict of fields a unit; `const`: the field): the list's starting
    flag (`UNIT_STARTS`) begins a unit, the others set a field of the last one begun."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        units = getattr(namespace, self.dest) or []
        setattr(namespace, self.dest, units)
        start = UNIT_STARTS[self.dest]
        if self.const == start:
            units.append({})
        elif not units:
            flag = next(f.metadata["cli"] for f, _ in fields_of(UNIT_FIELDS[self.dest]) if f.name == start)
            parser.error(f"{option_string} sets a field of the unit a {flag} starts: give it after that flag")
        units[-1][self.const] = True if self.nargs == 0 else value


def _add_unit_flags(parser: argparse.ArgumentParser) -> None:
    """The ControlNet and IP-Adapter unit flags, repeatable: a unit's starting flag, then its other flags."""
    for dest, cls in UNIT_FIELDS.items():
        for f, hint in fields_of(cls):
            kinds = [t for t in typing.get_args(hint) or (hint,) if t in (int, float)]
            shown = f" (default {f.default})" if f.default not in (None, "") and hint is not bool else ""
            parser.add_argument(f.metadata["cli"], dest=dest, action=_UnitFlag, const=f.name,
                                nargs=0 if hint is bool else None, type=None if hint is bool else (kinds or [str])[0],
                                choices=f.metadata["choices"] or None, help=f.metadata["help"] + shown)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every failure a user can cause ends in one line on stderr and exit code 2
    (130 for Ctrl-C), never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command=next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    try:
        args.run(args)
    except SdtorchError as e:
        print(f"sdtorch: error: {printable(str(e), keep_newlines=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtorch: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("sdtorch: error: out of memory; try a smaller size or batch, or --dtype bfloat16", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"sdtorch: error:{printable(where, keep_newlines=False)}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
