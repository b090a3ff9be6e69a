"""The FastAPI application: AUTOMATIC1111's /sdapi/v1 endpoints, its ControlNet extension's /controlnet/*
(controlnet_api.py), OpenAPI docs at /docs, the web page at /.

    app = create_app(ServerConfig(model=None))   # the built-in model; uvicorn.run(app, host="127.0.0.1", port=7860)

Handlers only translate HTTP: the work is in service.py, the checks in payloads.py, the errors in errors.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI
from fastapi.staticfiles import StaticFiles

from ..infotext import SCHEDULE_LABELS
from ..request import LATENT_UPSCALERS, PIXEL_UPSCALERS, SCHEDULES
from ..sampling.samplers import SAMPLERS, SCHEDULE_NAMES
from .auth import BasicAuth
from .controlnet_api import controlnet_router
from .errors import ApiError, install_error_handlers
from .schemas import (
    EmbeddingsResponse, ExtrasBatchImagesRequest, ExtrasBatchImagesResponse, ExtrasSingleImageRequest,
    ExtrasSingleImageResponse, GenerationResponse, Img2ImgRequest, LoraItem, MemoryResponse, PNGInfoRequest,
    PNGInfoResponse, ProgressResponse, SamplerItem, SchedulerItem, ScriptsList, SDModelItem, Txt2ImgRequest,
)
from .service import ServerConfig, Service, memory

STATIC = Path(__file__).resolve().parent / "static"  # the web page


def sampler_items() -> list[dict[str, Any]]:
    """GET /samplers: every sampler with its other names and A1111's options (its default schedule, ...)."""
    items = []
    for info in SAMPLERS:
        options = {"scheduler": info.default_schedule} if info.default_schedule != "automatic" else {}
        options |= {name: "True" for name in ("second_order", "discard_penultimate_sigma") if getattr(info, name)}
        items.append({"name": info.name, "aliases": list(info.aliases), "options": options})
    return items


def scheduler_items() -> list[dict[str, Any]]:
    """GET /schedulers, in A1111's shape (rho and inner-model needs as A1111 states them for these schedules)."""
    names = {label: name for name, label in SCHEDULE_LABELS.items()}
    items = []
    for label in SCHEDULES:
        name = names[label]
        kind = SCHEDULE_NAMES[name]
        aliases = [a for a, k in SCHEDULE_NAMES.items() if k == kind and a not in (name, label.lower())]
        items.append({"name": name, "label": label, "aliases": aliases or None,
                      "default_rho": 7.0 if name == "karras" else -1.0,
                      "need_inner_model": name in ("uniform", "sgm_uniform")})
    return items


async def _nothing() -> list:
    return []


def create_app(config: ServerConfig) -> FastAPI:
    """Load the first model and build the app (Basic auth over everything when `config.api_auth`)."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="sdtorch", lifespan=lifespan, description=(
        "An AUTOMATIC1111-compatible API for sdtorch's models. Generation requests are made from "
        "sdtorch.GenerationRequest's fields with A1111's defaults; unknown fields are ignored."))
    app.state.service = service
    install_error_handlers(app)
    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(payload: Txt2ImgRequest) -> dict[str, Any]:
        return await service.generate(payload, "txt2img")

    @api.post("/img2img", response_model=GenerationResponse)
    async def img2img(payload: Img2ImgRequest) -> dict[str, Any]:
        return await service.generate(payload, "img2img")

    @api.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return service.progress(skip_current_image)

    @api.post("/interrupt")
    async def interrupt() -> dict:
        service.queue.interrupt()
        return {}

    @api.post("/skip")
    async def skip() -> dict:
        service.queue.skip()
        return {}

    @api.get("/samplers", response_model=list[SamplerItem])
    async def samplers() -> list[dict[str, Any]]:
        return sampler_items()

    @api.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers() -> list[dict[str, Any]]:
        return scheduler_items()

    @api.get("/sd-models", response_model=list[SDModelItem])
    async def sd_models() -> list[dict[str, Any]]:
        return service.sd_models()

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:  # sync: FastAPI runs it in a thread (it hashes new files)
        service.refresh_checkpoints()

    @api.get("/options")
    async def get_options() -> dict[str, Any]:
        return dict(service.options)

    @api.post("/options")
    async def set_options(values: Annotated[dict[str, Any], Body()]) -> None:
        await service.set_options(values)

    @api.get("/loras", response_model=list[LoraItem])
    async def loras() -> list[dict[str, Any]]:
        return [lora.item() for lora in service.loras]

    @api.post("/refresh-loras")
    def refresh_loras() -> None:
        service.refresh_loras()

    @api.post("/unload-checkpoint")
    async def unload_checkpoint() -> None:
        await service.unload_checkpoint()

    @api.post("/reload-checkpoint")
    async def reload_checkpoint() -> None:
        await service.reload_checkpoint()

    @api.post("/refresh-embeddings")
    async def refresh_embeddings() -> None:
        await service.refresh_embeddings()

    @api.post("/refresh-vae")
    async def refresh_vae() -> None:  # the VAE is the one --vae names, read when a model loads: nothing to scan
        return None

    @api.get("/embeddings", response_model=EmbeddingsResponse)
    async def embeddings() -> dict[str, Any]:
        return service.embeddings()

    @api.post("/png-info", response_model=PNGInfoResponse)
    def png_info(request: PNGInfoRequest) -> dict[str, Any]:
        return service.png_info(request.image)

    @api.get("/scripts", response_model=ScriptsList)
    async def scripts() -> dict[str, list[str]]:
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}  # the alwayson scripts it takes

    @api.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:  # the pixel upscalers (hires fix, extras), A1111's model-free
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in PIXEL_UPSCALERS]

    @api.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @api.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(payload: ExtrasSingleImageRequest) -> dict[str, Any]:
        images, html_info = await service.extras(payload, [(payload.image, "image")])
        return {"html_info": html_info, "image": images[0]}

    @api.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(payload: ExtrasBatchImagesRequest) -> dict[str, Any]:
        named = [(item.data, f"imageList[{i}] ({item.name!r})") for i, item in enumerate(payload.imageList)]
        images, html_info = await service.extras(payload, named)
        return {"html_info": html_info, "images": images}

    @api.post("/interrogate")
    async def interrogate() -> None:
        raise ApiError(404, "Model not found: sdtorch has no interrogate models (CLIP interrogator, DeepBooru)")

    @api.get("/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        return service.cmd_flags()

    @api.get("/sd-vae")
    async def sd_vae() -> list[dict[str, str]]:  # the VAE given with --vae, which every model decodes with
        vae = config.vae
        return [] if vae is None else [{"model_name": Path(vae).name, "filename": str(Path(vae).resolve())}]

    for listing in ("script-info", "prompt-styles", "hypernetworks", "face-restorers", "realesrgan-models",
                    "sd-modules"):  # empty in sdtorch
        api.add_api_route(f"/{listing}", _nothing, methods=["GET"], response_model=list)

    @api.get("/memory", response_model=MemoryResponse)
    def memory_usage() -> dict[str, Any]:
        return memory()

    known = {route.path for route in api.routes}

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def unknown(path: str) -> None:  # else the web page's mount answers a POST with 405
        if f"{api.prefix}/{path}" in known:
            raise ApiError(405, "Method Not Allowed")
        raise ApiError(404, "Not Found")

    app.include_router(api)
    app.include_router(controlnet_router(service))  # the A1111 ControlNet extension's /controlnet/*
    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)
    return app
