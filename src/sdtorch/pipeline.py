"""The Pipeline: Stable Diffusion's four parts, where they came from, and `__call__` to generate.

`sdtorch.load()` returns one; `pipe("a prompt", steps=20)` returns images: the settings make a
`GenerationRequest` (request.py) and `generation.py` runs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters.embeddings import load_embedding, loaded_embeddings, unload_embedding
from .adapters.lora import LoraAdapters
from .checkpoints.io import file_sha256
from .compiled import CompiledDecoder, CompiledUNet
from .configs import ModelConfig
from .errors import InvalidInputError
from .generation import GenerationResult, run
from .models.clip import CLIPTextEncoder
from .models.sdxl_text import SDXLTextEncoder
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .quantization import quantize_unet
from .request import GenerationRequest, Limits, ModelDefaults
from .sampling.common import Callback

if TYPE_CHECKING:
    from .checkpoints.vae_files import LoadedVae




@dataclass
class LoadReport:
    """What loading found: the source, its format, the detected kind and what was skipped."""

    source: str
    format: str  # "single_file" | "diffusers"
    prediction_type_origin: str  # "detected" | "user" | "file"
    ignored_keys: list[str] = field(default_factory=list)


class Pipeline:
    """Tokenizer, text encoder, UNet and VAE of one Stable Diffusion model (SDXL: `text_encoder` is its
    encoders together, an `SDXLTextEncoder`)."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextEncoder | SDXLTextEncoder,
        unet: UNet,
        vae: AutoencoderKL,
        config: ModelConfig,
        report: LoadReport | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.config = config
        self.report = report
        # what a request's unset steps, sampler, schedule and CFG become: the files' (the built-in model's CFG 4;
        # FEW_STEP_DEFAULTS for a diffusers folder whose scheduler says "trailing", as SDXL Turbo's / Lightning's do)
        self.defaults = ModelDefaults()
        self.limits = Limits()  # upper bounds every request is checked against before any work
        self.lora_adapters = LoraAdapters()  # the LoRAs applied to the UNet and text encoder (adapters/lora.py)
        self.lora_dir: Path | None = None  # where a prompt's <lora:name:weight> tags find their files
        self.compiled_unet: CompiledUNet | None = None  # set by compile(): generation runs the UNet through it
        self.compiled_decoder: CompiledDecoder | None = None  # set by compile(): decodes latents
        self.quantized: str | None = None  # set by quantize(): the UNet's linear layers' quantisation
        self._refiner: tuple[str, Pipeline] | None = None  # (name, model) of the refiner requests last named
        self._controlnets: dict[str, nn.Module] = {}  # ControlNets requests named, by resolved path
        self._adapters: dict[tuple[str, str], nn.Module] = {}  # IP-Adapters and image encoders, by kind and path
        # where a request's refiner_checkpoint is looked up (the server: its listed checkpoints only, so a client
        # never makes it open an arbitrary path); None: the name is a local path
        self.refiner_lookup: Callable[[str], str | None] | None = None
        self.loaded_vae: LoadedVae | None = None  # the VAE file load_vae put in place of the checkpoint's own

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move every model part (in place) and return self."""
        for module in self.modules.values():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 8 for SD's VAE (2 per downsampling level)."""
        return 2 ** (len(self.config.vae.block_channels) - 1)

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (512 for SD1, 768 for SD2's v-models)."""
        return self.config.unet.sample_size * self.vae_scale_factor

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's model hash: the first 10 hex digits of the single file's sha256 (None for folders)."""
        if self.report is None or self.report.format != "single_file":
            return None
        return file_sha256(self.report.source)[:10]

    @property
    def model_name(self) -> str | None:
        return Path(self.report.source).stem if self.report is not None else None

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        request: GenerationRequest | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        refiner: Pipeline | None = None,
        **settings: Any,
    ) -> GenerationResult:
        """Generate images: txt2img, img2img (`image`, `strength`) or inpainting (`image` + `mask_image`).

        settings: the fields of `GenerationRequest` by their A1111 names (`steps`, `cfg_scale`, `sampler_name`,
            `scheduler`, `seed`, `width`, `height`, `batch_size`, `denoising_strength`, `clip_skip`, `eta`,
            `resize_mode`, `enable_hr` with `hr_scale` / `hr_upscaler` / `hr_second_pass_steps` / `hr_resize_x` /
            `hr_resize_y` / `hr_denoising_strength`, `mask_blur`, `inpainting_mask_invert`, `inpaint_full_res`,
            `inpaint_full_res_padding`, `mask_overlay`, `tiled_decode`, `refiner_checkpoint`, `refiner_switch_at`,
            `controlnet`: a list of `ControlNetUnit`s or dicts of their fields, A1111's ControlNet extension's names)
            or diffusers' names (`num_inference_steps`, `guidance_scale`, `sampler`, `schedule`,
            `num_images_per_prompt`, `image`, `strength`, `mask_image`).
            An unknown name is an error naming the closest valid one. Or pass a whole `request`.
        seed: image i of the batch uses seed + i (A1111); -1 (the default) picks one (reported in the infotext).
        generator: instead of seeds, one torch.Generator drives all noise in diffusers' order.
        refiner: a second model that finishes the sampling from `refiner_switch_at` (default 0.8) on, as A1111's
            refiner does (SDXL's refiner after its base); or name its checkpoint with `refiner_checkpoint`.
        Returns a list of PIL images (a GenerationResult, which also has `.request` and `.warnings`); each image
        carries its A1111 text in `img.info["parameters"]` and its seed in `img.info["seed"]`.
        """
        if request is None:
            if prompt is not None:
                settings["prompt"] = prompt
            if negative_prompt is not None:
                settings["negative_prompt"] = negative_prompt
            request = GenerationRequest.from_kwargs(**settings)
        elif prompt is not None or negative_prompt is not None or settings:
            raise InvalidInputError("pass either a request or prompt and settings, not both")
        return run(self, request, generator=generator, callback=callback, limits=self.limits, refiner=refiner)

    def load_refiner(self, name: str) -> Pipeline:
        """The refiner a request names (`refiner_checkpoint`: a local checkpoint file or diffusers folder, or with
        `refiner_lookup` set, a name it knows), loaded with `sdtorch.load` on this pipeline's device and dtype and
        kept for the requests after (one at a time)."""
        if self._refiner is not None and self._refiner[0] == name:
            return self._refiner[1]
        if self.refiner_lookup is not None:
            source = self.refiner_lookup(name)
        elif Path(name).expanduser().exists():
            source = str(Path(name).expanduser())
        else:
            raise InvalidInputError(f"refiner_checkpoint {name!r} is not a checkpoint file or diffusers folder "
                                    "(an infotext names a refiner A1111's way, \"name [hash]\": give its path)")
        from .checkpoints.loading import load

        self._refiner = None  # let the previous refiner go before the next loads
        refiner = load(source, dtype=self.dtype, device=self.device)
        if self.loaded_vae is not None:  # A1111's "SD VAE" setting holds for whichever model runs
            refiner.load_vae(self.loaded_vae.source)
        self._refiner = (name, refiner)
        return refiner

    def load_controlnet(self, source: str | os.PathLike) -> nn.Module:
        """The model of a request's ControlNet unit (`ControlNetUnit.model`: a file or diffusers folder): a ControlNet
        or, as the A1111 extension also takes, a T2I-Adapter; loaded strictly on this pipeline's device and dtype,
        checked to fit its UNet, and kept for later requests (`unload_controlnets`)."""
        from .checkpoints.controlnet_files import load_controlnet
        from .checkpoints.t2i_adapter_files import is_t2i_adapter, load_t2i_adapter

        key = str(Path(source).expanduser().resolve())
        if key not in self._controlnets:
            base = self.unet.config
            self._controlnets[key] = (
                load_t2i_adapter(source, self.dtype, self.device, base=base, latent_scale=self.vae_scale_factor)
                if is_t2i_adapter(source) else load_controlnet(source, self.dtype, self.device, base=base))
        return self._controlnets[key]

    def unload_controlnets(self) -> None:
        """Forget the ControlNets, T2I- and IP-Adapters and image encoders kept by `load_controlnet`,
        `load_ip_adapter` and `load_image_encoder`."""
        self._controlnets.clear()
        self._adapters.clear()

    def load_ip_adapter(self, source: str | os.PathLike) -> nn.Module:
        """The IP-Adapter of a request's unit (`IPAdapterUnit.model`), loaded strictly on this pipeline's device and
        dtype, checked to fit its UNet, and kept for later requests."""
        from .checkpoints.ip_adapter_files import load_ip_adapter

        key = ("ip_adapter", str(Path(source).expanduser().resolve()))
        if key not in self._adapters:
            self._adapters[key] = load_ip_adapter(source, self.dtype, self.device, unet=self.unet)
        return self._adapters[key]

    def load_image_encoder(self, source: str | os.PathLike) -> nn.Module:
        """A CLIP vision tower for IP-Adapters (`IPAdapterUnit.image_encoder`), on this pipeline's device and dtype,
        kept for later requests."""
        from .checkpoints.ip_adapter_files import load_clip_vision

        key = ("image_encoder", str(Path(source).expanduser().resolve()))
        if key not in self._adapters:
            self._adapters[key] = load_clip_vision(source, self.dtype, self.device)
        return self._adapters[key]

    def load_vae(self, path: str | os.PathLike | None) -> Pipeline:
        """Decode (and encode) with a separately given VAE, as A1111's "SD VAE" setting does; None: the checkpoint's
        own VAE again, exactly. Returns self.

        `path`: an original-layout file (`vae-ft-mse-840000-ema-pruned.safetensors` / `.ckpt`, `sdxl_vae.safetensors`;
        `first_stage_model.` prefix or not) or a diffusers AutoencoderKL (`sdxl-vae-fp16-fix`: its folder or its
        `diffusion_pytorch_model.safetensors`). It must have this model's VAE architecture (else an error naming the
        file and the tensor, and nothing changes); the model keeps its scaling factor, dtype and device. Images then
        carry "VAE hash" and "VAE" in their infotext (A1111's keys: the file's sha256 cut to 10 digits, its name).
        """
        from .checkpoints.vae_files import swap_vae

        self.loaded_vae = swap_vae(self.vae, self.config, path, self.loaded_vae)
        return self

    def compile(self, backend: str | bool | None = "inductor") -> Pipeline:
        """Run the UNet and the VAE decoder compiled when generating; returns self. backend: "inductor" (torch.compile,
        weights frozen; also True), "openvino" (OpenVINO's CPU runtime; needs the `openvino` package),
        "openvino-bf16" (the same, computing in bfloat16 on a float32 model too, as OpenVINO does by default where the
        CPU has native bfloat16: the picture changes by bfloat16's rounding), or None / False (off).

        Except for openvino-bf16, the same images as the plain path within float rounding; each new image size compiles first (minutes at
        SD sizes on a CPU). Runs with a LoRA applied use the plain UNet. See sdtorch/compiled.py.
        """
        if backend is True:
            backend = "inductor"
        _refuse_openvino_quantized(backend, self.quantized)
        self.compiled_unet = CompiledUNet(self.unet, backend) if backend else None
        self.compiled_decoder = CompiledDecoder(self.vae, backend) if backend else None
        return self

    def quantize(self, mode: str | None = "int8") -> Pipeline:
        """int8 dynamic quantisation of the UNet's linear layers (sdtorch/quantization.py); returns self. One-way: the
        picture changes by int8's rounding, and the float weights come back only by loading the model again.
        None: nothing (the CLI's default)."""
        if mode is None or mode == self.quantized:
            return self
        if self.quantized:
            raise InvalidInputError(f"the UNet is already {self.quantized}-quantised; load the model again first")
        _refuse_openvino_quantized(self.compiled_unet and self.compiled_unet.backend, mode)
        quantize_unet(self.unet, mode)
        self.quantized = mode
        return self

    def load_embedding(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt / .bin / .safetensors, diffusers learned_embeds; SDXL: an
        A1111 / kohya file with clip_l and clip_g vectors, into each of its encoders) and return its name, which
        prompts then use: by default the file's stem (A1111) or its token (diffusers)."""
        return load_embedding(self.tokenizer, self.text_encoder, path, name)

    def unload_embedding(self, name: str | None = None) -> None:
        """Forget one loaded embedding (None: all of them); prompts encode exactly as before it was loaded."""
        unload_embedding(self.text_encoder, name)

    @property
    def embeddings(self) -> dict[str, int]:
        """The loaded textual-inversion embeddings: name -> number of vectors (token positions it takes)."""
        return loaded_embeddings(self.text_encoder)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Apply a LoRA file (kohya or diffusers; a folder: its pytorch_lora_weights.safetensors) to the UNet and the
        text encoder(s) (SDXL: both of its encoders, `lora_te1_` / `lora_te2_`); return its name."""
        return self.lora_adapters.load(path, {"unet": self.unet, "text_encoder": self.text_encoder}, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA by name (None: all); the models then compute exactly what they did before."""
        self.lora_adapters.unload(name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        self.lora_adapters.set_scale(name, scale)

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs."""
        return self.lora_adapters.scales

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules.items()}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v / 1e6:.1f}M" for k, v in self.parameter_counts().items())
        return f"Pipeline(kind={self.config.kind}, prediction={self.config.prediction_type}, {counts})"


def _refuse_openvino_quantized(backend: str | bool | None, quantized: str | None) -> None:
    """InvalidInputError where an openvino compile backend would meet a quantised UNet (OpenVINO cannot trace it)."""
    if isinstance(backend, str) and backend.startswith("openvino") and quantized:
        raise InvalidInputError(f"the {backend} backend cannot run a quantised UNet ({quantized}): use one of them")
