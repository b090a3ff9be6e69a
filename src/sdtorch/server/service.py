"""The server's state and what each endpoint does, apart from HTTP: the model catalogue, the loaded model,
the job queue, the options (A1111's settings that the API reads and writes)."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from ..errors import InvalidInputError
from ..infotext import infotext_items, read_infotext
from ..request import GenerationRequest, Limits
from .catalog import Checkpoints, ClipVisionFiles, ControlNetModels, scan_loras
from .controlnet_units import NO_DETECTMAP_OPTION
from .encoding import decode_base64
from .extras import plan_extras, run_extras
from .host import ModelHost
from .jobs import run_generation
from .payloads import MODEL_OPTION, REQUEST_OPTIONS, plan_generation
from .queue import Progress, TaskQueue


@dataclass(frozen=True)
class ServerConfig:
    """What `sdtorch serve` was started with."""

    model: str | None = None  # --model: loaded first (None: the built-in model)
    models_dir: Path | None = None  # more models to offer, by title
    lora_dir: Path | None = None  # what <lora:name:weight> in a prompt finds
    controlnet_dir: Path | None = None  # the ControlNets (and T2I- and IP-Adapters) ControlNet units name
    clip_vision_dir: Path | None = None  # the IP-Adapter modules' CLIP vision towers: clip_h.pth, clip_g.pth
    embeddings_dir: Path | None = None  # textual inversions loaded with each model
    vae: Path | None = None  # --vae: a VAE file or folder used instead of each model's own
    outdir: Path = Path("outputs")  # where save_images writes (txt2img-images/, img2img-images/)
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs for HTTP Basic; empty: no auth
    limits: Limits = field(default_factory=Limits)
    dtype: torch.dtype | None = None
    compile: str | None = None  # Pipeline.compile's backend (compiled.BACKENDS); None: the plain UNet
    quantize: str | None = None  # Pipeline.quantize's mode (quantization.QUANTIZE_MODES); None: float weights


class Service:
    """Everything the endpoints share. Models are touched only by the queue's worker thread."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.checkpoints = Checkpoints(config.model, config.models_dir)
        self.loras = scan_loras(config.lora_dir)
        self.controlnets = ControlNetModels(config.controlnet_dir)
        self.clip_vision = ClipVisionFiles(config.clip_vision_dir)
        self.host = ModelHost(config.limits, config.lora_dir, config.embeddings_dir, config.dtype, config.compile,
                              quantize=config.quantize, vae=config.vae,
                              refiner_lookup=lambda name: self.checkpoints.find(name).source)
        self.queue = TaskQueue()
        self.options: dict[str, Any] = {
            MODEL_OPTION: self.checkpoints.default.title, NO_DETECTMAP_OPTION: False,
            **{option: getattr(GenerationRequest(), name) for option, name in REQUEST_OPTIONS.items()},
            "samples_format": "png",
            "outdir_txt2img_samples": str(config.outdir / "txt2img-images"),
            "outdir_img2img_samples": str(config.outdir / "img2img-images"),
        }
        try:  # the first model now, so that a broken one stops the server at start and the first job is quick
            self._submit("load", lambda _: self.host.get(self.checkpoints.default)).result()
        except BaseException:
            self.queue.close()
            raise

    def _submit(self, kind: str, work: Callable[[Progress], Any], task_id: str | None = None) -> Future:
        return self.queue.submit(Progress(task_id or self.queue.new_id(kind), kind), work)

    def close(self) -> None:
        self.queue.close()

    # ---- generation -------------------------------------------------------------------------------

    async def generate(self, payload: BaseModel, kind: str) -> dict[str, Any]:
        """Plan (all checks, before queueing), queue, wait: the A1111 response body."""
        job = await asyncio.to_thread(plan_generation, payload, kind, self.checkpoints, self.options,
                                      self.config.limits, self.controlnets, self.clip_vision)  # decodes images
        future = self._submit(kind, lambda progress: run_generation(job, self.host, progress, self.config.outdir),
                              payload.force_task_id)
        response = await asyncio.wrap_future(future)
        self._set_options(job.lasting_options)
        return response

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """A1111's /progress of the running task (zeros when idle), with the queue's order."""
        task = self.queue.current
        progress = task.progress if task is not None else Progress("", "")
        return {
            "progress": progress.fraction(), "eta_relative": progress.eta(),
            "state": {"skipped": progress.skipped, "interrupted": progress.interrupted, "stopping_generation": False,
                      "job": progress.job, "job_count": progress.job_count, "job_timestamp": progress.job_timestamp,
                      "job_no": progress.job_no, "sampling_step": progress.sampling_step,
                      "sampling_steps": progress.sampling_steps},
            "current_image": None if skip_current_image else progress.preview_png(),
            "textinfo": progress.textinfo() if task is not None else None,
            "queue": {"current": progress.task_id or None, "pending": self.queue.pending()},
        }

    # ---- options and models -----------------------------------------------------------------------

    async def set_options(self, values: dict[str, Any]) -> None:
        """A1111's POST options: sd_model_checkpoint loads that model (after the jobs queued before it);
        CLIP_stop_at_last_layers (clip skip) and eta_noise_seed_delta (ENSD) set those fields of requests that do
        not override them (REQUEST_OPTIONS, checked by the request's rules); control_net_no_detectmap true leaves
        the ControlNet extension's detected maps out of the responses. Other keys are ignored."""
        for option, name in REQUEST_OPTIONS.items():
            if option in values:
                try:
                    GenerationRequest(**{name: values[option]}).validate(self.config.limits)
                except InvalidInputError as error:
                    raise InvalidInputError(f"{option}: {error}") from None
        if not isinstance(values.get(NO_DETECTMAP_OPTION, False), bool):
            raise InvalidInputError(f"{NO_DETECTMAP_OPTION} must be true or false, not {values[NO_DETECTMAP_OPTION]!r}")
        if MODEL_OPTION in values:
            checkpoint = self.checkpoints.find(str(values[MODEL_OPTION]))
            await asyncio.wrap_future(self._submit("load", lambda _: self.host.get(checkpoint)))
            values = {**values, MODEL_OPTION: checkpoint.title}
        self._set_options(values)

    def _set_options(self, values: dict[str, Any]) -> None:
        kept = (MODEL_OPTION, NO_DETECTMAP_OPTION, *REQUEST_OPTIONS)
        self.options.update({k: v for k, v in values.items() if k in kept})

    async def unload_checkpoint(self) -> None:
        """A1111's unload-checkpoint: free the model's memory after the jobs queued before; the next job reloads it."""
        await asyncio.wrap_future(self._submit("unload", lambda _: self.host.unload()))

    async def reload_checkpoint(self) -> None:
        """A1111's reload-checkpoint: load the current model (sd_model_checkpoint) now if it is not loaded."""
        checkpoint = self.checkpoints.find(str(self.options[MODEL_OPTION]))
        await asyncio.wrap_future(self._submit("load", lambda _: self.host.get(checkpoint)))

    async def refresh_embeddings(self) -> None:
        """A1111's refresh-embeddings: the embeddings folder read again into the loaded model."""
        await asyncio.wrap_future(self._submit("embeddings", lambda _: self.host.reload_embeddings()))

    def sd_models(self) -> list[dict[str, Any]]:
        return [checkpoint.item() for checkpoint in self.checkpoints.items]

    def refresh_checkpoints(self) -> None:
        self.checkpoints.refresh()

    def refresh_loras(self) -> None:
        self.loras = scan_loras(self.config.lora_dir)

    def embeddings(self) -> dict[str, Any]:
        loaded = self.host.loaded
        if loaded is None:
            return {"loaded": {}, "skipped": {}}
        width = loaded.pipe.config.text_encoder.width
        found = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                        "vectors": vectors} for name, vectors in loaded.pipe.embeddings.items()}
        skipped = {}
        for line in loaded.embeddings.skipped:
            path, _, reason = line.partition(": ")
            skipped[Path(path).stem] = {"path": path, "reason": reason}
        return {"loaded": found, "skipped": skipped}

    # ---- images -----------------------------------------------------------------------------------

    async def extras(self, payload: BaseModel, images: list[tuple[str, str]]) -> tuple[list[str], str]:
        """A1111's Extras upscale of `images` ((base64, what errors call it)): checked first, then run by the queue
        like any job. Returns (base64 PNGs, html_info)."""
        job = await asyncio.to_thread(plan_extras, payload, images, self.config.limits)
        return await asyncio.wrap_future(self._submit("extras", lambda _: run_extras(job)))

    def cmd_flags(self) -> dict[str, Any]:
        """A1111's /cmd-flags: the command-line settings a client may ask about, under A1111's flag names (the
        ControlNet extension's for its folder); never the credentials."""
        config = self.config
        folders = {"ckpt_dir": config.models_dir, "lora_dir": config.lora_dir, "embeddings_dir": config.embeddings_dir,
                   "controlnet_dir": config.controlnet_dir, "vae_path": config.vae}
        return {"api": True, "nowebui": False, **{k: None if v is None else str(v) for k, v in folders.items()}}

    @staticmethod
    def png_info(image: str) -> dict[str, Any]:
        """A1111's png-info: the image's parameters text, its other text chunks, and the text read A1111's way."""
        data = decode_base64(image, "image")
        text = read_infotext(data) or ""
        try:
            with Image.open(io.BytesIO(data)) as opened:
                items = {k: v for k, v in opened.info.items() if isinstance(v, str) and k != "parameters"}
        except (UnidentifiedImageError, OSError):
            raise InvalidInputError("image is not an image file Pillow recognises") from None
        return {"info": text, "items": items, "parameters": infotext_items(text) if text else {}}


def memory() -> dict[str, Any]:
    """A1111's /memory: this process's RAM (and the GPU's, when there is one)."""
    process = psutil.Process(os.getpid())
    rss, total = process.memory_info().rss, psutil.virtual_memory().total
    ram = {"free": total - rss, "used": rss, "total": total}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, gpu_total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    cuda = {"system": {"free": free, "used": gpu_total - free, "total": gpu_total},
            "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                          "peak": stats.get("allocated_bytes.all.peak", 0)},
            "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                         "peak": stats.get("reserved_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}
