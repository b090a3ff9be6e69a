"""Load: 50 txt2img requests at concurrency 8 over real HTTP, an interrupt mid-queue, and memory afterwards."""

import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
from serving import decode_image, running_server

from sdtorch.infotext import parse_infotext
from sdtorch.server.service import ServerConfig

REQUESTS, CONCURRENCY, WARM_UP = 50, 8, 8
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")


def payload(i: int) -> dict:
    return {"prompt": f"a {COLOURS[i % 8]} {SHAPES[i % 6]}, number {i}", "seed": 1000 + i, "steps": 3,
            "sampler_name": "Euler", "force_task_id": f"job-{i}"}


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_fifty_requests_at_concurrency_eight(one_thread):
    with running_server(ServerConfig()) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        def post(body: dict):
            return client.post("/sdapi/v1/txt2img", body)

        assert all(a.status == 200 for a in pool.map(post, [payload(-1 - i) for i in range(WARM_UP)]))
        before = rss()

        start = time.monotonic()
        futures = [pool.submit(post, payload(i)) for i in range(REQUESTS)]
        long_answer: dict = {}

        def long_job() -> None:  # sent when 20 are done: the queue has work before and after it
            while sum(f.done() for f in futures) < 20:
                time.sleep(0.01)
            long_answer["answer"] = client.post("/sdapi/v1/txt2img", {"prompt": "long", "steps": 150, "seed": 1,
                                                                      "force_task_id": "long"})

        sender = threading.Thread(target=long_job)
        sender.start()
        deadline = time.monotonic() + 120
        while True:  # interrupt it once it runs
            progress = client.get("/sdapi/v1/progress?skip_current_image=true").body
            if progress["queue"]["current"] == "long" and progress["state"]["sampling_step"] >= 1:
                break
            assert time.monotonic() < deadline, "the long job never ran"
            time.sleep(0.01)
        client.post("/sdapi/v1/interrupt")
        answers = [f.result() for f in futures]
        sender.join(60)
        elapsed = time.monotonic() - start

        long = long_answer["answer"]
        assert long.status == 200 and long.body["images"] == [] and json.loads(long.body["info"])["interrupted"]
        for i, answer in enumerate(answers):  # every one answered, with its own image
            assert answer.status == 200, answer.body
            assert len(answer.body["images"]) == 1 and not json.loads(answer.body["info"])["interrupted"]
            read = parse_infotext(decode_image(answer.body["images"][0]).info["parameters"])
            assert (read.request.prompt, read.request.seed) == (payload(i)["prompt"], payload(i)["seed"])
        after = rss()
        print(f"\n{REQUESTS} requests at concurrency {CONCURRENCY}: {elapsed:.1f} s; "
              f"RSS {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB")
        assert after <= before * 1.10, f"RSS grew from {before / 2**20:.0f} MiB to {after / 2**20:.0f} MiB"
