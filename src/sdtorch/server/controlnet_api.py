"""The A1111 ControlNet extension's own endpoints (its scripts/api.py), same paths and shapes:

    GET  /controlnet/version                  {"version": 3}
    GET  /controlnet/model_list?update=true   {"model_list": ["name [hash]", ...]}  (update rescans the folder)
    GET  /controlnet/module_list?alias_names=false
                                              {"module_list": [...], "module_detail": {name: {model_free, sliders}}}
    GET  /controlnet/control_types            {"control_types": {tag: {module_list, model_list, default_option,
                                                                       default_model}}}
    GET  /controlnet/settings                 {"control_net_unit_count": 3}
    POST /controlnet/detect                   {"info": "Success", "images": [base64 PNG, ...]}

The units of a generation come through /sdapi/v1/txt2img and img2img's alwayson_scripts (controlnet_units.py).
The modules listed are sdtorch's preprocessors (preprocessors.py) and the extension's IP-Adapter modules
(ip_adapter_modules.py), with its "IP-Adapter" control type. Detect runs sdtorch's preprocessors: the weight-free
ones; a module that runs a network is refused (422), and so are the IP-Adapter modules: the extension answers those
with CLIP's output as torch-pickled tensors (ip-adapter-auto: refused there too), no image.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..errors import InvalidInputError
from ..images import load_image
from ..preprocessors import get_preprocessor, preprocess
from .controlnet_units import UNIT_COUNT, reset_out_of_range, visible_map
from .encoding import encode_png, image_bytes
from .errors import ApiError
from .ip_adapter_modules import find_ip_module, listed_preprocessors, module_list
from .schemas import (
    ControlNetControlTypes, ControlNetDetectRequest, ControlNetDetectResponse, ControlNetModelList,
    ControlNetModuleList, ControlNetSettings, ControlNetVersion,
)
from .service import Service

API_VERSION = 3  # the extension's external_code.get_api_version()
# the extension's Preprocessor.tag_to_filters: other words a model of each control type has in its name
_TAG_FILTERS = {"instructp2p": ["ip2p"], "segmentation": ["seg"], "normalmap": ["normal"],
                "t2i-adapter": ["t2i_adapter", "t2iadapter", "t2ia"], "ip-adapter": ["ip_adapter", "ipadapter"],
                "openpose": ["openpose", "densepose"], "instant-id": ["instant_id", "instantid"],
                "scribble": ["sketch"], "tile": ["blur"]}
_UNION_TAGS = ("openpose", "depth", "softedge", "scribble", "canny", "lineart", "mlsd", "normalmap", "segmentation",
               "inpaint", "tile")  # what a ControlNet Union model ("union" in its name) also serves


def controlnet_router(service: Service) -> APIRouter:
    """The /controlnet/* routes over the service's ControlNet folder."""
    router = APIRouter(prefix="/controlnet", tags=["controlnet"])

    @router.get("/version", response_model=ControlNetVersion)
    async def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @router.get("/model_list", response_model=ControlNetModelList)
    def model_list(update: bool = True) -> dict[str, list[str]]:  # sync: a rescan hashes new files
        if update:
            service.controlnets.refresh()
        return {"model_list": service.controlnets.titles()}

    @router.get("/module_list", response_model=ControlNetModuleList)
    async def modules(alias_names: bool = False) -> dict[str, Any]:
        return module_list(alias_names)

    @router.get("/control_types", response_model=ControlNetControlTypes)
    async def control_types() -> dict[str, Any]:
        return {"control_types": control_type_table(["None", *service.controlnets.titles()])}

    @router.get("/settings", response_model=ControlNetSettings)
    async def settings() -> dict[str, int]:
        return {"control_net_unit_count": UNIT_COUNT}

    @router.post("/detect", response_model=ControlNetDetectResponse)
    def detect(request: ControlNetDetectRequest) -> dict[str, Any]:  # sync: runs in a worker thread
        return run_detect(request)

    return router


def control_type_table(models: list[str]) -> dict[str, dict[str, Any]]:
    """The extension's control types ("All", then its preprocessors' tags sorted): per type the preprocessors
    (labels) and models (by name) that serve it, and its defaults (global_state.select_control_type)."""
    ordered = listed_preprocessors()
    tags = sorted({tag for p in ordered for tag in p.tags})
    table = {"All": {"module_list": [p.label for p in ordered], "model_list": models, "default_option": "none",
                     "default_model": "None"}}
    for tag in tags:
        pattern = tag.lower()
        filters = [pattern, *_TAG_FILTERS.get(pattern, []), *(["union"] if pattern in _UNION_TAGS else [])]
        chosen = [m for m in models if m.lower() == "none" or any(f in m.lower() for f in filters)]
        default_model = "None"
        if len(chosen) > 1:
            default_model = next((m for m in chosen if "11" in m.split("[")[0]), chosen[1])
        modules = [p for p in ordered if tag in p.tags or p.label == "none"]
        table[tag] = {"module_list": [p.label for p in modules], "model_list": chosen,
                      "default_option": (modules[1] if len(modules) > 1 else modules[0]).label,
                      "default_model": default_model}
    return table


def run_detect(request: ControlNetDetectRequest) -> dict[str, Any]:
    """The extension's /controlnet/detect: each image through the module, its map as a base64 PNG."""
    module = request.controlnet_module
    try:
        ip_module = find_ip_module(module)
    except InvalidInputError as e:
        raise ApiError(422, f"Module not supported: {e}") from None
    if ip_module is not None:
        raise ApiError(422, f"Module not supported: {ip_module.label!r} encodes the image with CLIP for an IP-Adapter; "
                            "the extension's detect answers that as torch-pickled tensors (no image), which sdtorch "
                            "does not send: use the module in a txt2img / img2img unit")
    try:
        p = get_preprocessor(module)
    except InvalidInputError as e:
        raise ApiError(422, f"Module not available: {e}") from None
    if p.needs_weights:
        raise ApiError(422, f"Module not supported: {p.label!r} runs a network sdtorch does not run yet")
    images, masks = request.controlnet_input_images, request.controlnet_masks
    if not images:
        raise ApiError(422, "No image selected")
    if p.requires_mask and len(masks) != len(images):
        raise ApiError(422, f"Preprocessor {module} requires `controlnet_masks` param.")
    sliders, _ = reset_out_of_range(p, {"processor_res": request.controlnet_processor_res,
                                        "threshold_a": request.controlnet_threshold_a,
                                        "threshold_b": request.controlnet_threshold_b})
    maps = []
    for i, text in enumerate(images):
        image = load_image(image_bytes(text, f"controlnet_input_images[{i}]"))
        mask = (load_image(image_bytes(masks[i], f"controlnet_masks[{i}]"))
                if p.requires_mask and i < len(masks) else None)  # a module that takes no mask ignores it
        maps.append(encode_png(visible_map(preprocess(p.name, image, *sliders.values(), mask=mask))))
    return {"info": "Success", "images": maps}

