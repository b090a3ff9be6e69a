"""Running a planned txt2img / img2img job on the worker thread, and A1111's answer to it.

Iteration k of n_iter generates one GenerationRequest (seeds running on over the job). Skip ends the running
iteration and goes on; interrupt ends the job. Either way the answer holds the images finished so far, as
A1111's does: `{images: [base64 PNG], parameters: the request, info: JSON string}`; after them, as the ControlNet
extension appends them, its units' detected maps (an IP-Adapter unit's: its image; `info`'s infotexts cover the
generated images only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..generation import GenerationResult
from ..infotext import parse_infotext
from ..outputs import plan_outputs, write_images
from .controlnet_units import detected_maps
from .encoding import encode_png
from .host import LoadedModel, ModelHost
from .payloads import GenerationJob
from .queue import Interrupted, Progress, Skipped


def run_generation(job: GenerationJob, host: ModelHost, progress: Progress, outdir: Path) -> dict[str, Any]:
    """Generate `job`'s iterations with `progress` as the sampler callback; the response body."""
    model = host.get(job.checkpoint)
    host.keep_controlnets({str(source) for request in job.requests for source in
                           [*(unit.model for unit in request.controlnet),
                            *(s for unit in request.ip_adapter for s in (unit.model, unit.image_encoder))]})
    outputs = None
    if job.save_images:  # the folder is checked before the work
        outputs = plan_outputs(outdir / f"{job.kind}-images", job.image_count())
    progress.job_count, progress.preview = len(job.requests), model.preview
    results: list[GenerationResult] = []
    for index, request in enumerate(job.requests):
        if progress.interrupted:
            break
        progress.begin_iteration(index)
        try:
            results.append(model.pipe(request=request, callback=progress.on_step))
        except Skipped:
            continue
        except Interrupted:
            break
    images = [image for result in results for image in result]
    if outputs is not None and images:
        write_images(outputs, images)
    maps = detected_maps(results[0].request, job.detected_maps) if results and job.detected_maps else []
    return {"images": [encode_png(image) for image in images + maps] if job.send_images else [],
            "parameters": job.parameters, "info": json.dumps(_info(job, model, results, images, progress))}


def _info(job: GenerationJob, model: LoadedModel, results: list[GenerationResult], images: list[Image.Image],
          progress: Progress) -> dict[str, Any]:
    """A1111's `info`: the job's settings as run (defaults filled in) and each image's prompt, seed and text."""
    request = results[0].request if results else job.requests[0]
    texts = [image.info["parameters"] for image in images]
    read = [parse_infotext(text) for text in texts]
    prompts = request.prompts()
    negative = request.negative_prompt if isinstance(request.negative_prompt, str) else request.negative_prompt[0]
    if job.kind == "img2img":
        strength = request.denoising_strength
    else:
        strength = request.hires.hr_denoising_strength if request.hires is not None else None
    return {
        "prompt": prompts[0], "all_prompts": [r.request.prompt for r in read],
        "negative_prompt": negative, "all_negative_prompts": [r.request.negative_prompt for r in read],
        "seed": images[0].info["seed"] if images else request.seed, "all_seeds": [i.info["seed"] for i in images],
        "subseed": read[0].request.subseed if read else request.subseed,
        "all_subseeds": [r.request.subseed for r in read], "subseed_strength": request.subseed_strength,
        "width": request.width, "height": request.height, "sampler_name": request.sampler_name,
        "scheduler": request.scheduler, "cfg_scale": request.cfg_scale, "steps": request.steps,
        "batch_size": request.batch_size, "n_iter": len(job.requests), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model.pipe.model_name, "sd_model_hash": model.pipe.model_hash,
        "sd_vae_name": read[0].extra.get("VAE") if read else None,  # the VAE file that decoded, if one did
        "sd_vae_hash": read[0].extra.get("VAE hash") if read else None,
        "seed_resize_from_w": request.seed_resize_from_w, "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": strength, "extra_generation_params": {"Schedule type": request.scheduler},
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": progress.job_timestamp,
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": model.pipe.config.is_inpainting and request.mask is not None,
        "version": read[0].version if read else None,
        "interrupted": progress.interrupted,
        "warnings": list(dict.fromkeys([*job.warnings, *(w for r in results for w in r.warnings)])),
    }
