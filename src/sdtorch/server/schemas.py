"""The HTTP API's request and response models (pydantic, shown at /docs), A1111's names and shapes.

The generation requests are made from GenerationRequest's field table (request.py), not written out again:
each field keeps its type and help, with A1111's API default where that differs from the table's
(`A1111_DEFAULTS`, the one place for them). Around them stand the fields only the API has (`n_iter`,
`send_images`, `override_settings`, ...). Fields a client sends that are in neither are ignored, as A1111
ignores them; the values of known ones are checked by `GenerationRequest.validate` when the job is planned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..request import ExtrasUpscale, GenerationRequest, HiresFix, Inpainting, fields_of

# A1111's API defaults where they differ from GenerationRequest's; the model's own size and CFG stay the
# defaults (512 for SD1, as A1111's; 64 and CFG 4 for the built-in model, which draws badly at A1111's 7; other
# checkpoints: the pipeline's 7.5). A1111's default sampler is `sampler_index`'s "Euler".
A1111_DEFAULTS: dict[str, Any] = {
    "steps": 50, "sampler_name": None, "inpaint_full_res": True, "resize_mode": 0,
}
# Fields of the table the API spells its own way, or does not take: images come as base64 `init_images` /
# `mask`, hires and inpainting settings flat, clip skip and ENSD from the options (payloads.REQUEST_OPTIONS), ControlNet
# units in alwayson_scripts (controlnet_units.py), IP-Adapter units there too (the extension's IP-Adapter modules)
_NOT_IN_API = {"init_image", "mask", "hires", "inpaint", "clip_skip", "eta_noise_seed_delta", "controlnet",
               "ip_adapter"}
# Table fields whose API type or meaning reads differently: (type, help)
_API_SPELLING: dict[str, tuple[Any, str]] = {
    "sampler_name": (str | None, 'A1111 name, e.g. "Euler a", "DPM++ 2M" (None: sampler_index)'),
    "resize_mode": (int | str, "0 just resize, 1 crop and resize, 2 resize and fill (or those names)"),
    "inpainting_mask_invert": (bool, "1: repaint the black part of the mask instead"),
}
_TXT2IMG_HELP = {"denoising_strength": "the hires fix's second-pass denoising strength (with enable_hr)"}


def _table_fields(cls: type, skip: set[str] = frozenset(), help: dict[str, str] | None = None) -> dict[str, Any]:
    """pydantic field definitions for the fields of one request class (GenerationRequest or a group)."""
    fields = {}
    for f, hint in fields_of(cls):
        if f.name in _NOT_IN_API or f.name in skip:
            continue
        kind, description = _API_SPELLING.get(f.name, (hint, f.metadata.get("help", "")))
        default = A1111_DEFAULTS.get(f.name, f.default)
        fields[f.name] = (kind, Field(default, description=(help or {}).get(f.name, description)))
    return fields


# The table fields each endpoint takes (payloads.py passes exactly these on to GenerationRequest)
TXT2IMG_TABLE = {**_table_fields(GenerationRequest, skip={"resize_mode"}, help=_TXT2IMG_HELP),
                 **_table_fields(HiresFix, skip={"hr_denoising_strength"})}
IMG2IMG_TABLE = {**_table_fields(GenerationRequest), **_table_fields(Inpainting)}
HIRES_FIELDS = {f.name for f in dataclasses.fields(HiresFix)}

_COMMON: dict[str, Any] = {
    "sampler_index": (str, Field("Euler", description="A1111's legacy sampler field, used without sampler_name")),
    "n_iter": (int, Field(1, ge=1, description="batch count: iterations of batch_size images; image i uses seed + i")),
    "send_images": (bool, Field(True, description="return the images (base64 PNGs) in the response")),
    "save_images": (bool, Field(False, description="also save them to the server's outputs folder")),
    "override_settings": (dict[str, Any], Field(default_factory=dict, description=(
        "options for this request only: sd_model_checkpoint (a title of /sdapi/v1/sd-models), "
        "CLIP_stop_at_last_layers (clip skip)"))),
    "override_settings_restore_afterwards": (bool, Field(True, description="false: the overrides stay set")),
    "force_task_id": (str | None, Field(None, description="this job's id in /sdapi/v1/progress's queue")),
    "script_name": (str | None, Field(None, description=(
        "A1111's selectable script (X/Y/Z plot, ...): sdtorch has none, so any name is refused (422)"))),
    "script_args": (list[Any], Field(default_factory=list, description="the script's arguments (with script_name)")),
    # A1111 features sdtorch lacks: accepted, and a warning in info's warnings when asked for (payloads.py)
    "restore_faces": (bool | None, Field(None, description="face restoration: not in sdtorch (a warning if true)")),
    "hr_checkpoint_name": (str | None, Field(None, description="a hires pass model: not in sdtorch (a warning)")),
    "alwayson_scripts": (dict[str, Any], Field(default_factory=dict, description=(
        'scripts run with every generation: {"controlnet": {"args": [unit, ...]}} (the A1111 ControlNet '
        "extension's units, IP-Adapter modules included; models from /controlnet/model_list); other scripts are "
        "ignored"))),
}
_IGNORE_EXTRA = ConfigDict(extra="ignore")

Txt2ImgRequest = create_model(
    "StableDiffusionTxt2ImgProcessingAPI", __config__=_IGNORE_EXTRA, **TXT2IMG_TABLE, **_COMMON,
    enable_hr=(bool, Field(False, description="the hires fix: a second pass at hr_scale x the size")),
)
Img2ImgRequest = create_model(
    "StableDiffusionImg2ImgProcessingAPI", __config__=_IGNORE_EXTRA, **IMG2IMG_TABLE, **_COMMON,
    init_images=(list[str], Field(..., min_length=1, max_length=1, description=(
        "the source image: base64 or a data: URI (one image)"))),
    mask=(str | None, Field(None, description="inpainting mask (white = repaint): base64 or a data: URI")),
    inpainting_fill=(int, Field(0, description="accepted and ignored: sdtorch inpaints from the original (A1111's 1)")),
    include_init_images=(bool, Field(False, description="echo init_images and mask in the response's parameters")),
)


# A1111's Extras upscale: ExtrasUpscale's fields (its names and defaults are A1111's), and what only the API has
EXTRAS_TABLE = _table_fields(ExtrasUpscale)
_EXTRAS_ONLY: dict[str, Any] = {
    "codeformer_weight": (float, Field(0.0, description="accepted; no effect (no face restoration)")),
    "upscale_first": (bool, Field(False, description="accepted; no effect (no face restoration to order it with)")),
    "show_extras_results": (bool, Field(True, description="accepted; the results are always returned")),
}
ExtrasSingleImageRequest = create_model(
    "ExtrasSingleImageRequest", __config__=_IGNORE_EXTRA, **EXTRAS_TABLE, **_EXTRAS_ONLY,
    image=(str, Field(..., description="the image: base64 or a data: URI")),
)


class FileData(BaseModel):
    data: str = Field(description="the image: base64 or a data: URI")
    name: str = Field(description="its file name")


ExtrasBatchImagesRequest = create_model(
    "ExtrasBatchImagesRequest", __config__=_IGNORE_EXTRA, **EXTRAS_TABLE, **_EXTRAS_ONLY,
    imageList=(list[FileData], Field(..., min_length=1, description="the images")),
)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description='the "postprocessing" text as HTML')
    image: str = Field(description="raw base64 PNG, carrying the source's parameters text and the postprocessing text")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="raw base64 PNGs, each carrying its A1111 parameters text")
    parameters: dict[str, Any] = Field(description="the request, defaults filled in")
    info: str = Field(description="JSON: prompt, all_prompts, seed, all_seeds, infotexts, ...")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class QueueInfo(BaseModel):
    current: str | None = Field(description="the running job's id")
    pending: list[str] = Field(description="ids of the jobs waiting, first to run first")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the current job")
    eta_relative: float = Field(description="seconds left in the current job (estimate)")
    state: ProgressState
    current_image: str | None = Field(description="base64 PNG preview of the current latents")
    textinfo: str | None
    queue: QueueInfo


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class PNGInfoRequest(BaseModel):
    image: str = Field(description="base64 image or data: URI")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the image's parameters text")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the parameters text read A1111's way")


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, dict[str, Any]] = Field(description="files not loaded: {name: {path, reason}}")


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


# ---- the A1111 ControlNet extension's endpoints (/controlnet/*, controlnet_api.py) ---------------------------


class ControlNetVersion(BaseModel):
    version: int = Field(description="the extension's API version (3)")


class ControlNetModelList(BaseModel):
    model_list: list[str] = Field(description='"name [hash]" of each model in --controlnet-dir')


class ControlNetModuleList(BaseModel):
    module_list: list[str] = Field(description="preprocessor names (alias_names: their UI labels)")
    module_detail: dict[str, Any] = Field(description="per module: model_free, sliders [{name, value, min, max, step}]")


class ControlNetControlType(BaseModel):
    module_list: list[str]
    model_list: list[str]
    default_option: str
    default_model: str


class ControlNetControlTypes(BaseModel):
    control_types: dict[str, ControlNetControlType]


class ControlNetSettings(BaseModel):
    control_net_unit_count: int = Field(description="the units a generation takes")


class ControlNetDetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = Field("none", description="the preprocessor (/controlnet/module_list)")
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_processor_res: int = Field(-1, description="the preprocessor's resolution (-1: its default)")
    controlnet_threshold_a: float = Field(-1, description="its first slider (-1: the default)")
    controlnet_threshold_b: float = Field(-1, description="its second slider (-1: the default)")
    controlnet_masks: list[str] = Field(default_factory=list, description="base64 masks, one an image (inpaint)")
    low_vram: bool = Field(False, description="accepted; no effect")


class ControlNetDetectResponse(BaseModel):
    info: str = Field(description='"Success"')
    images: list[str] = Field(description="the detected maps, raw base64 PNGs")
