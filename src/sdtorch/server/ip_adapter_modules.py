"""The A1111 ControlNet extension's IP-Adapter preprocessors, as its API names and lists them, and the CLIP vision
tower each one needs (its scripts/preprocessor/legacy/preprocessor_compiled.py, ip_adapter_auto.py and
ipadapter/presets.py):

    module (name)                    label                            CLIP vision file (clip_vision/)
    ip-adapter-auto                  ip-adapter-auto                  by the model's name (the extension's presets)
    ip-adapter_clip_sd15             ip-adapter_clip_h                clip_h.pth   (OpenCLIP ViT-H/14)
    ip-adapter_clip_sdxl             ip-adapter_clip_g                clip_g.pth   (OpenCLIP ViT-bigG/14)
    ip-adapter_clip_sdxl_plus_vith   ip-adapter_clip_sdxl_plus_vith   clip_h.pth

A unit with one of these modules is an IP-Adapter unit (its model an IP-Adapter file of --controlnet-dir), run by
sdtorch as a GenerationRequest's `ip_adapter` unit with the tower from `--clip-vision-dir`. The extension's other
IP-Adapter modules (FaceID's InsightFace embeddings, PuLID) are refused by name. Their sliders are listed as the
extension lists them: its legacy modules set an unused `resolution` attribute, not `slider_resolution`, so the
default Resolution slider shows (the value is not used).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInputError
from ..preprocessors import RESOLUTION, Preprocessor, sorted_preprocessors

TAG = "IP-Adapter"  # the extension's control type of these modules
# The towers: file stem -> (what it is, where the extension downloads it from into clip_vision/<stem>.pth)
CLIP_VISION = {
    "clip_h": ("OpenCLIP ViT-H/14", "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/"
                                    "pytorch_model.bin"),
    "clip_g": ("OpenCLIP ViT-bigG/14", "https://huggingface.co/lllyasviel/Annotators/resolve/main/clip_g.pth"),
}
EXTENSION_FOLDER = "extensions/sd-webui-controlnet/annotator/downloads/clip_vision/"


@dataclass(frozen=True)
class IPAdapterModule:
    """One of the extension's IP-Adapter modules: as listed (`preprocessor`: name, label, sliders, priority, tags)
    and the CLIP vision tower it runs (`clip_vision`: the file's stem; None: ip-adapter-auto, by the model)."""

    preprocessor: Preprocessor
    clip_vision: str | None

    @property
    def name(self) -> str:
        return self.preprocessor.name

    @property
    def label(self) -> str:
        return self.preprocessor.label


def _module(name: str, label: str, clip_vision: str | None, priority: int = 0) -> IPAdapterModule:
    return IPAdapterModule(Preprocessor(name, label, resolution=RESOLUTION, priority=priority, tags=(TAG,)),
                           clip_vision)


AUTO = "ip-adapter-auto"
IP_ADAPTER_MODULES: tuple[IPAdapterModule, ...] = (
    _module(AUTO, AUTO, None, priority=1000),
    _module("ip-adapter_clip_sd15", "ip-adapter_clip_h", "clip_h", priority=100),
    _module("ip-adapter_clip_sdxl", "ip-adapter_clip_g", "clip_g"),
    _module("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith", "clip_h"),
)
# The extension's IP-Adapter modules sdtorch does not run (name or label -> why)
_FACE_ID = "takes InsightFace face embeddings (the ip-adapter-faceid models), which sdtorch does not compute"
REFUSED = {
    "ip-adapter_face_id": _FACE_ID,
    "ip-adapter_face_id_plus": _FACE_ID + " beside CLIP's",
    "ip-adapter_pulid": "is PuLID (facexlib, InsightFace and EVA-CLIP), which sdtorch does not run",
}
_BY_ALIAS = {alias.lower(): m for m in IP_ADAPTER_MODULES for alias in (m.name, m.label)}

# ip-adapter-auto: the extension's IPAdapterPreset table, model name (before " [hash]") -> module label
_CLIP_H, _CLIP_G = "ip-adapter_clip_h", "ip-adapter_clip_g"
_FACE, _FACE_PLUS = "ip-adapter_face_id", "ip-adapter_face_id_plus"
PRESETS: dict[str, str] = {
    "ip-adapter_sd15_light": _CLIP_H, "ip-adapter_sd15_light_v11": _CLIP_H, "ip-adapter_sd15_vit-G": _CLIP_G,
    "ip-adapter_sd15": _CLIP_H, "ip-adapter-plus_sd15": _CLIP_H, "ip-adapter_sd15_plus": _CLIP_H,
    "ip-adapter_plus_composition_sd15": _CLIP_H, "ip-adapter-plus-face_sd15": _CLIP_H,
    "ip-adapter-full-face_sd15": _CLIP_H, "ip-adapter-faceid_sd15": _FACE, "ip-adapter-faceid-plus_sd15": _FACE_PLUS,
    "ip-adapter-faceid-plusv2_sd15": _FACE_PLUS, "ip-adapter-faceid-portrait_sd15": _FACE,
    "ip-adapter-faceid-portrait-v11_sd15": _FACE, "ip-adapter_sdxl": _CLIP_G, "ip-adapter_sdxl_vit-h": _CLIP_H,
    "ip-adapter-plus_sdxl_vit-h": _CLIP_H, "ip-adapter_plus_composition_sdxl": _CLIP_H,
    "ip-adapter-plus-face_sdxl_vit-h": _CLIP_H, "ip-adapter-faceid_sdxl": _FACE,
    "ip-adapter-faceid-plusv2_sdxl": _FACE_PLUS, "ip-adapter-faceid-portrait_sdxl": _FACE,
    "ip-adapter_pulid_sdxl_fp16": "ip-adapter_pulid",
}


def find_ip_module(name: object) -> IPAdapterModule | None:
    """The IP-Adapter module called `name` (its name or label, any case); None for other modules. The extension's
    IP-Adapter modules sdtorch does not run raise InvalidInputError."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if key in REFUSED:
        raise InvalidInputError(f"{name!r} {REFUSED[key]}; sdtorch runs the CLIP IP-Adapter modules "
                                f"({', '.join(m.name for m in IP_ADAPTER_MODULES)})")
    return _BY_ALIAS.get(key)


def auto_module(model_name: str) -> IPAdapterModule:
    """What ip-adapter-auto runs for a model (its name, " [hash]" or not), as the extension's presets say."""
    name = model_name.split("[")[0].strip()
    if name not in PRESETS:
        raise InvalidInputError(f"ip-adapter-auto: {name!r} is not one of the extension's IP-Adapter presets (it "
                                "picks by the file names h94/IP-Adapter gives); pick the module: ip-adapter_clip_h "
                                "(ViT-H adapters) or ip-adapter_clip_g (ip-adapter_sdxl, ip-adapter_sd15_vit-G)")
    found = find_ip_module(PRESETS[name])  # the FaceID and PuLID presets raise here
    assert found is not None
    return found


def listed_preprocessors() -> list[Preprocessor]:
    """sdtorch's preprocessors and the IP-Adapter modules in the extension's order: "none" first, then by priority
    and label, descending (its Preprocessor.get_sorted_preprocessors)."""
    first, *rest = sorted_preprocessors()
    rest += [m.preprocessor for m in IP_ADAPTER_MODULES]
    return [first] + sorted(rest, key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)


def module_list(alias_names: bool = False) -> dict[str, object]:
    """The extension's GET /controlnet/module_list over `listed_preprocessors` (see preprocessors.module_list)."""
    modules = listed_preprocessors()
    names = [p.label if alias_names else p.name for p in modules]
    detail = {n: dict(model_free=False, sliders=[s.api_json() for s in p.sliders()]) for n, p in zip(names, modules)}
    return {"module_list": names, "module_detail": detail}
