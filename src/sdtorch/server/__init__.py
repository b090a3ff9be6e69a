"""`sdtorch serve`: an AUTOMATIC1111-compatible HTTP API (FastAPI) and a web page, on the models sdtorch loads.

    app.py        the routes: /sdapi/v1/* (A1111's), /docs, the page in static/ at /
    service.py    what each endpoint does: the options, the catalogue, the queue, the loaded model
    payloads.py   an A1111 payload -> a planned job of validated GenerationRequests (every check before queueing)
    schemas.py    the pydantic models, made from GenerationRequest's field table with A1111's defaults
    queue.py      one worker thread, first come first served; progress, interrupt, skip
    jobs.py       running a job (n_iter iterations) and A1111's response with its `info`
    host.py       the one loaded model;  catalog.py  models, LoRAs and ControlNets found by scanning folders
    controlnet_units.py  the ControlNet extension's units in alwayson_scripts, and its detected maps
    controlnet_api.py    the ControlNet extension's /controlnet/* endpoints (model_list, detect, ...)
    ip_adapter_modules.py  the extension's IP-Adapter modules (ip-adapter_clip_h...) and their CLIP vision towers
    preview.py    live previews of the latents;  encoding.py  base64 in and out
    auth.py       HTTP Basic;  errors.py  A1111's JSON errors

    from sdtorch.server.app import create_app
    from sdtorch.server.service import ServerConfig

Nothing is imported here, so that `sdtorch serve` can refuse bad flags before torch loads.
"""
