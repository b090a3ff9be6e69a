"""Hostile and broken model files: every one ends in an SdtorchError naming the file, never a traceback.

Crafted safetensors files are written byte by byte (8-byte little-endian header length, JSON header,
data); broken diffusers folders are a saved tiny model with one file corrupted; hub failures are made
against servers on 127.0.0.1 or by raising huggingface_hub's own exceptions: no test uses the network.
"""

import json
import re
import shutil
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import sdtorch
from sdtorch.checkpoints import io as checkpoint_io
from sdtorch.checkpoints.keymaps import parts_to_original
from sdtorch.checkpoints.loading import MODEL_CLASSES
from sdtorch.cli import main
from sdtorch.configs import TINY_SD1
from sdtorch.errors import ArchitectureError, CheckpointError, SdtorchError, UnsafeCheckpointError

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # one valid entry: 2 floats, 8 bytes


def safetensors_bytes(header: dict | bytes, data: bytes = b"\0" * 8, header_len: int | None = None) -> bytes:
    """A safetensors file by hand: header length (u64 LE), the JSON header, the data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def assert_fails_clearly(source: Path | str, pattern: str, error: type[SdtorchError] = CheckpointError,
                         capsys=None, **load_options) -> None:
    """`sdtorch.load(source)` raises `error` naming `source`, matching `pattern`; `sdtorch info` says so in one line."""
    with pytest.raises(error) as caught:
        sdtorch.load(source, **load_options)
    message = str(caught.value)
    assert str(source) in message, message
    assert re.search(pattern, message), message
    if capsys is not None:
        capsys.readouterr()
        assert main(["info", str(source)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdtorch: error:") and err.count("\n") == 1 and "Traceback" not in err, err


# ---- crafted safetensors files --------------------------------------------------------------------

BAD_SAFETENSORS = {
    "empty file": (b"", "empty"),
    "shorter than a header length": (b"\x01\0\0\0", "neither a safetensors file"),
    "header length past the end": (safetensors_bytes(b"{}", b"", header_len=1000), "1000-byte header in a 10-byte"),
    "header length 2**63": (safetensors_bytes(b"{}", b"", header_len=2**63), "header"),
    "header length 2**64-1": (safetensors_bytes(b"{}", b"", header_len=2**64 - 1), "header"),
    "header length cuts the JSON": (safetensors_bytes(b'{"w": {}}', b"", header_len=4), "corrupt safetensors header"),
    "header not JSON": (safetensors_bytes(b"{not json}"), "corrupt safetensors header"),
    "header not UTF-8": (safetensors_bytes(b'{"\xff": 1}'), "corrupt safetensors header"),
    "header nested too deep": (safetensors_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "corrupt"),
    "header integer too long": (safetensors_bytes(b'{"a": 1' + b"0" * 5000 + b"}"), "corrupt safetensors header"),
    "header a JSON array": (safetensors_bytes(b"[1, 2]"), "neither a safetensors file"),
    "metadata a list": (safetensors_bytes({"__metadata__": [1], "w": F32x2}), "__metadata__"),
    "metadata value an int": (safetensors_bytes({"__metadata__": {"a": 1}, "w": F32x2}), "__metadata__"),
    "entry a list": (safetensors_bytes({"w": [0, 8]}), "'w'.*not an object"),
    "entry a string": (safetensors_bytes({"w": "F32"}), "'w'.*not an object"),
    "dtype missing": (safetensors_bytes({"w": {"shape": [2], "data_offsets": [0, 8]}}), "dtype None"),
    "dtype unknown": (safetensors_bytes({"w": {**F32x2, "dtype": "F33"}}), "dtype 'F33'"),
    "dtype a list": (safetensors_bytes({"w": {**F32x2, "dtype": ["F32"]}}), "dtype"),
    "shape missing": (safetensors_bytes({"w": {"dtype": "F32", "data_offsets": [0, 8]}}), "shape None"),
    "shape negative": (safetensors_bytes({"w": {**F32x2, "shape": [-2]}}), "shape"),
    "shape of floats": (safetensors_bytes({"w": {**F32x2, "shape": [2.0]}}), "shape"),
    "shape of strings": (safetensors_bytes({"w": {**F32x2, "shape": ["2"]}}), "shape"),
    "shape a string": (safetensors_bytes({"w": {**F32x2, "shape": "2"}}), "shape"),
    "shape of booleans": (safetensors_bytes({"w": {**F32x2, "shape": [True, 2]}}), "shape"),
    "shape past int64": (safetensors_bytes({"w": {**F32x2, "shape": [2**70]}}), "shape"),
    "shape with a zero and a huge dim": (safetensors_bytes({"w": {**F32x2, "shape": [0, 2**62]}}), "8 bytes for shape"),
    "offsets missing": (safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}), "data_offsets None"),
    "offsets strings": (safetensors_bytes({"w": {**F32x2, "data_offsets": ["0", "8"]}}), "data_offsets"),
    "offsets negative": (safetensors_bytes({"w": {**F32x2, "data_offsets": [-8, 0]}}), "data_offsets"),
    "offsets reversed": (safetensors_bytes({"w": {**F32x2, "data_offsets": [8, 0]}}), "data_offsets"),
    "offsets three ints": (safetensors_bytes({"w": {**F32x2, "data_offsets": [0, 4, 8]}}), "data_offsets"),
    "offsets a dict": (safetensors_bytes({"w": {**F32x2, "data_offsets": {"begin": 0}}}), "data_offsets"),
    "bytes do not match the shape": (safetensors_bytes({"w": {**F32x2, "shape": [3]}}), "8 bytes for shape \\[3\\]"),
    "offsets past the end": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2000], "data_offsets": [0, 8000]}}), "truncated"),
    "overlapping tensors": (
        safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12), "'b' overlaps"),
    "gap between tensors": (
        safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, b"\0" * 20), "bytes 8-12 are in no"),
    "bytes after the last tensor": (safetensors_bytes({"w": F32x2}, b"\0" * 16), "8 bytes after the last tensor"),
    "valid but no Stable Diffusion weights": (safetensors_bytes({"w": F32x2}), "no Stable Diffusion weights"),
}


@pytest.mark.parametrize("case", BAD_SAFETENSORS)
def test_crafted_safetensors(case, tmp_path, capsys):
    data, pattern = BAD_SAFETENSORS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert_fails_clearly(path, pattern, capsys=capsys)  # `info` reads shapes only (device="meta")
    assert_fails_clearly(path, pattern)  # a full load reads the tensors


def test_reading_functions_refuse_a_folder_or_an_unreadable_file(tmp_path, monkeypatch):
    for read in (checkpoint_io.detect_format, checkpoint_io.read_safetensors, checkpoint_io.read_shapes,
                 checkpoint_io.read_checkpoint, checkpoint_io.read_pickle_checkpoint):
        with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder"):
            read(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"w": F32x2}))

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(checkpoint_io, "open", denied, raising=False)  # works when the tests run as root too
    with pytest.raises(CheckpointError, match=f"cannot read {path}: Permission denied"):
        sdtorch.load(path)


def test_a_valid_handmade_file_still_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    empty = {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]}
    path.write_bytes(safetensors_bytes({"__metadata__": {"k": "v"}, "w": F32x2, "e": empty},
                                       struct.pack("<2f", 1.5, -2.0)))
    tensors, metadata = checkpoint_io.read_safetensors(path)
    assert metadata == {"k": "v"} and tensors["w"].tolist() == [1.5, -2.0] and tensors["e"].shape == (0, 3)
    shapes, _ = checkpoint_io.read_shapes(path)
    assert shapes["w"].device.type == "meta" and shapes["e"].dtype == torch.float16


# ---- pickle checkpoints (.ckpt) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """A whole tiny SD1 model in the original layout, random weights."""
    torch.manual_seed(0)
    configs = {"unet": TINY_SD1.unet, "vae": TINY_SD1.vae, "text_encoder": TINY_SD1.text_encoder}
    parts = {name: {k: torch.randn_like(v) * 0.05 for k, v in cls(configs[name]).state_dict().items()}
             for name, cls in MODEL_CLASSES.items()}
    return parts_to_original(parts, TINY_SD1)


def _zip_with(archive: bytes, replace: dict[str, bytes]) -> bytes:
    """A torch.save archive with some members' bytes replaced (matched by name suffix)."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = next((v for suffix, v in replace.items() if name.endswith(suffix)), src.read(name))
            dst.writestr(name, data)
    return out.getvalue()


def _saved(obj, legacy: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


BAD_PICKLES = {
    "zip cut in half": (lambda good: good[: len(good) // 2], "corrupt or truncated PyTorch checkpoint"),
    "zip cut to 10 bytes": (lambda good: good[:10], "corrupt or truncated"),
    "zip of other files": (lambda good: _plain_zip(), "corrupt or truncated"),
    "data.pkl garbage": (lambda good: _zip_with(good, {"data.pkl": b"garbage!!"}), "unreadable"),
    "data.pkl empty": (lambda good: _zip_with(good, {"data.pkl": b""}), "corrupt or truncated"),
    "data.pkl truncated": (lambda good: _zip_with(good, {"data.pkl": _zip_member(good, "data.pkl")[:40]}),
                           "refused|corrupt"),
    "tensor data short": (lambda good: _zip_with(good, {"data/0": b"\0" * 4}), "corrupt or truncated"),
    "legacy pickle garbage": (lambda good: b"\x80\x02garbage", "unreadable"),
    "legacy pickle one byte": (lambda good: b"\x80", "corrupt or truncated"),
    "legacy pickle cut": (lambda good: _saved({"w": torch.zeros(4)}, legacy=True)[:60], "corrupt or truncated"),
    "top level a list": (lambda good: _saved([torch.zeros(2)]), "top level is a list"),
    "top level a tensor": (lambda good: _saved(torch.zeros(2)), "top level is a Tensor"),
    "state_dict a list": (lambda good: _saved({"state_dict": [torch.zeros(2)]}), "state_dict is a list"),
    "state_dict with int keys": (lambda good: _saved({"state_dict": {1: torch.zeros(2)}}), "key 1; tensor names"),
    "only optimizer state": (lambda good: _saved({"optimizer": {"w": torch.zeros(2)}, "step": 3}),
                             "no Stable Diffusion weights"),
}


def _plain_zip() -> bytes:
    """A zip archive that is not a torch.save one."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("readme.txt", "hello")
    return out.getvalue()


def _zip_member(archive: bytes, suffix: str) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


@pytest.mark.parametrize("case", BAD_PICKLES)
def test_broken_pickle_checkpoints(case, tmp_path, capsys):
    make, pattern = BAD_PICKLES[case]
    path = tmp_path / "model.ckpt"
    path.write_bytes(make(_saved({"state_dict": {"w": torch.zeros(3)}})))
    assert_fails_clearly(path, pattern, capsys=capsys)


def test_pickle_refusal_names_what_was_asked_for(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(_saved({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}))
    assert_fails_clearly(path, r"refused to unpickle: the file asks for (builtins\.)?print,", UnsafeCheckpointError)


def test_integer_weights_are_refused(tiny_state, tmp_path, capsys):
    path = tmp_path / "ints.ckpt"
    path.write_bytes(_saved({"state_dict": {k: v.to(torch.int8) for k, v in tiny_state.items()}}))
    assert_fails_clearly(path, "not floating point.*int8", ArchitectureError, capsys=capsys)


# ---- broken diffusers folders ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tiny_state, tmp_path_factory) -> Path:
    """A saved tiny diffusers model; tests corrupt copies of it."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny")
    save_file(tiny_state, str(root / "model.safetensors"))
    return sdtorch.save(sdtorch.load(root / "model.safetensors"), root / "diffusers", format="diffusers")


def _edit_json(file: str, **changes):
    def edit(folder: Path) -> None:
        path = folder / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _write(file: str, data: bytes):
    def write(folder: Path) -> None:
        (folder / file).write_bytes(data)
    return write


def _remove_key(file: str, key: str):
    def remove(folder: Path) -> None:
        path = folder / file
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}))
    return remove


def _replace_with_folder(file: str):
    def replace(folder: Path) -> None:
        (folder / file).unlink()
        (folder / file).mkdir()
    return replace


def _pickle_weights(obj):
    def write(folder: Path) -> None:
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(_saved(obj))
    return write


UNET, VAE, TEXT, SCHEDULER = "unet/config.json", "vae/config.json", "text_encoder/config.json", \
    "scheduler/scheduler_config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"

# case -> (corruption, the file the message must name, pattern)
BROKEN_FOLDERS = {
    "unet config not JSON": (_write(UNET, b"{oops"), UNET, "not valid JSON"),
    "unet config a JSON list": (_write(UNET, b"[1, 2]"), UNET, "a JSON list, not an object"),
    "unet config not UTF-8": (_write(UNET, b'{"a": "\xff"}'), UNET, "not valid JSON"),
    "unet config empty": (_write(UNET, b""), UNET, "not valid JSON"),
    "unet config a folder": (_replace_with_folder(UNET), UNET, "cannot read"),
    "unet config missing": (lambda f: (f / UNET).unlink(), UNET, "missing"),
    "unet channels missing": (_remove_key(UNET, "block_out_channels"), UNET, "lacks block_out_channels"),
    "unet channels a string": (_edit_json(UNET, block_out_channels="abc"), UNET, "block_channels.*'abc'"),
    "unet channels a number": (_edit_json(UNET, block_out_channels=5), UNET, "block_channels"),
    "unet channels negative": (_edit_json(UNET, block_out_channels=[-32, 64]), UNET, "must be between 1 and"),
    "unet channels past int64": (_edit_json(UNET, block_out_channels=[2**33, 2**70]), UNET, "must be between 1 and"),
    "unet context width huge": (_edit_json(UNET, cross_attention_dim=2**70), UNET, "context_dim must be between"),
    "unet sample size huge": (_edit_json(UNET, sample_size=2**40), UNET, "sample_size must be between"),
    "unet channels of strings": (_edit_json(UNET, block_out_channels=["32", "64"]), UNET, "block_channels"),
    "unet layers a string": (_edit_json(UNET, layers_per_block="1"), UNET, "layers_per_block.*'1'"),
    "unet layers absurd": (_edit_json(UNET, layers_per_block=10**9), UNET, "layers_per_block must be between 1 and"),
    "unet layers zero": (_edit_json(UNET, layers_per_block=0), UNET, "layers_per_block must be between 1 and"),
    "unet levels absurd": (_edit_json(UNET, block_out_channels=[32] * 1000), UNET, "1000 levels"),
    "unet no levels": (_edit_json(UNET, block_out_channels=[]), UNET, "0 levels"),
    "unet groups not dividing": (_edit_json(UNET, norm_num_groups=7), UNET, "not divisible by norm_groups 7"),
    "unet eps negative": (_edit_json(UNET, norm_eps=-1), UNET, "norm_eps"),
    "unet block types not strings": (_edit_json(UNET, down_block_types=[1, 2]), UNET, "down_block_types"),
    "unet block types unknown": (_edit_json(UNET, down_block_types=["KDownBlock2D"] * 2), UNET, "down_block_types"),
    "unet block types too few": (_edit_json(UNET, down_block_types=["DownBlock2D"]), UNET, "one entry per level"),
    "unet heads a string": (_edit_json(UNET, attention_head_dim="x"), UNET, "num_heads"),
    "unet depth empty list": (_edit_json(UNET, transformer_layers_per_block=[]), UNET, "one entry per level"),
    "unet depth a dict": (_edit_json(UNET, transformer_layers_per_block={"a": 1}), UNET, "transformer_depth"),
    "unet linear proj a string": (_edit_json(UNET, use_linear_projection="yes"), UNET, "use_linear_proj"),
    "unet SDXL features": (_edit_json(UNET, addition_embed_type="text_time"), UNET, "lacks addition_time_embed_dim"),
    "vae channels missing": (_remove_key(VAE, "block_out_channels"), VAE, "lacks block_out_channels"),
    "vae scaling a string": (_edit_json(VAE, scaling_factor="big"), VAE, "scaling_factor"),
    "vae scaling zero": (_edit_json(VAE, scaling_factor=0), VAE, "scaling_factor must be a positive"),
    "vae latent channels null": (_edit_json(VAE, latent_channels=None), VAE, "latent_channels"),
    "text config missing width": (_remove_key(TEXT, "hidden_size"), TEXT, "lacks hidden_size"),
    "text layers a float": (_edit_json(TEXT, num_hidden_layers=2.5), TEXT, "num_layers"),
    "text vocab negative": (_edit_json(TEXT, vocab_size=-5), TEXT, "vocab_size must be between 1 and"),
    "text eps a string": (_edit_json(TEXT, layer_norm_eps="1e-5"), TEXT, "layer_norm_eps"),
    "scheduler not JSON": (_write(SCHEDULER, b"\x00\x01"), SCHEDULER, "not valid JSON"),
    "scheduler steps a string": (_edit_json(SCHEDULER, num_train_timesteps="1000"), SCHEDULER, "num_train_timesteps"),
    "scheduler betas reversed": (_edit_json(SCHEDULER, beta_start=0.5, beta_end=0.1), SCHEDULER, "beta_start"),
    "scheduler beta NaN": (_write(SCHEDULER, b'{"beta_start": NaN}'), SCHEDULER, "beta_start"),
    "scheduler unknown schedule": (_edit_json(SCHEDULER, beta_schedule="cosine"), SCHEDULER, "'cosine'"),
    "scheduler prediction type": (_edit_json(SCHEDULER, prediction_type="sample"), SCHEDULER, "'sample' is not"),
    "scheduler prediction a list": (_edit_json(SCHEDULER, prediction_type=[1]), SCHEDULER, "prediction_type"),
    "weights missing": (lambda f: (f / UNET_WEIGHTS).unlink(), "unet", "no weights file"),
    "weights a folder": (_replace_with_folder(UNET_WEIGHTS), "unet", "no weights file"),
    "weights truncated": (lambda f: _write(UNET_WEIGHTS, (f / UNET_WEIGHTS).read_bytes()[:1000])(f),
                          UNET_WEIGHTS, "truncated"),
    "weights empty": (_write(UNET_WEIGHTS, b""), UNET_WEIGHTS, "empty"),
    "weights a pickled list": (_pickle_weights([torch.zeros(2)]), "unet/diffusion_pytorch_model.bin", "a list"),
    "weights of another shape": (_edit_json(UNET, block_out_channels=[64, 128]), "", r"unet: \d+ tensor shape.*"
                                 r"file vs config.*conv_in\.weight \(32, 4, 3, 3\) vs \(64, 4, 3, 3\)"),
    "heads not dividing the width": (_edit_json(TEXT, num_attention_heads=3), "", "not divisible by num_heads 3"),
    "unknown activation": (_edit_json(TEXT, hidden_act="relu"), "", "unknown activation 'relu'"),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_diffusers_folder(case, tiny_folder, tmp_path, capsys):
    corrupt, file, pattern = BROKEN_FOLDERS[case]
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    corrupt(folder)
    error = ArchitectureError if case.startswith(("weights of", "heads", "unknown")) else CheckpointError
    with pytest.raises(error) as caught:
        sdtorch.load(folder)
    message = str(caught.value)
    assert str(folder / file) in message and re.search(pattern, message), message
    capsys.readouterr()
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtorch: error:") and err.count("\n") == 1 and "Traceback" not in err, err


def test_garbage_model_index_is_not_needed(tiny_folder, tmp_path):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    (folder / "model_index.json").write_bytes(b"\xff garbage")
    assert sdtorch.load(folder, device="meta").config.unet == TINY_SD1.unet  # sdtorch reads the parts' own configs


def test_bad_load_arguments(tiny_folder):
    for options, pattern in [({"dtype": torch.int8}, "dtype"), ({"dtype": "fp16"}, "dtype"),
                             ({"device": "gpu:x"}, "device 'gpu:x'")]:
        with pytest.raises(sdtorch.errors.InvalidInputError, match=pattern):
            sdtorch.load(tiny_folder, **options)
    with pytest.raises(sdtorch.errors.InvalidInputError, match="source"):
        sdtorch.load(42)


# ---- the hub, without the network ------------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at 127.0.0.1 with an empty cache; returns a function setting the endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")  # never the user's token, and no login prompt

    def point_at(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)

    point_at("http://127.0.0.1:9")  # the discard port: nothing listens, the connection is refused
    return point_at


def _serve(status: int, headers: dict[str, str]) -> ThreadingHTTPServer:
    """A local HTTP server answering every request with `status` and `headers` (as the hub does for errors)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_unreachable(hub, capsys):
    assert_fails_clearly("someone/tiny-model", "could not reach the Hugging Face hub.*not in the local cache",
                         capsys=capsys)


def test_hub_that_never_answers_times_out(hub, monkeypatch):
    from huggingface_hub import constants

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does), never answers
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    hub(f"http://127.0.0.1:{listener.getsockname()[1]}")
    start = time.monotonic()
    try:
        assert_fails_clearly("someone/tiny-model", "could not reach.*Timeout.*HF_HUB_ETAG_TIMEOUT")
    finally:
        listener.close()
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("status, code, pattern", [
    (404, "RepoNotFound", "no model 'someone/tiny-model' on the hub.*private.*HF_TOKEN"),
    (401, "RepoNotFound", "no model 'someone/tiny-model' on the hub"),
    (403, "GatedRepo", "is gated.*huggingface.co/someone/tiny-model"),
])
def test_hub_refuses(hub, status, code, pattern, capsys):
    server = _serve(status, {"X-Error-Code": code, "X-Error-Message": "nope"})
    hub(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert_fails_clearly("someone/tiny-model", pattern, capsys=capsys)
    finally:
        server.shutdown()


def test_hub_failing_download_and_invalid_ids(hub, monkeypatch):
    import types

    import huggingface_hub

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    assert_fails_clearly("some one/tiny model", "no such file or folder.*nor is it a valid hub id")
    assert_fails_clearly("models/missing.safetensors", "^no such file or folder")  # a typo, not a download
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: types.SimpleNamespace(sha="0" * 40))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", disk_full)
    assert_fails_clearly("someone/tiny-model", "could not fetch.*No space left.*local file or folder")
