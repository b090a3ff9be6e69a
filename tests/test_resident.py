"""resident.release_file_pages: a checkpoint's file-backed weight pages leave this process's memory and read back
unchanged; pages the process wrote and anonymous memory are never let go of (no value is lost)."""

import os

import torch
from conftest import psnr, random_pipeline, resident_pages
from safetensors.torch import save_file

import sdtorch
from sdtorch.checkpoints.io import read_safetensors
from sdtorch.configs import TINY_SD1
from sdtorch.resident import release_file_pages

PAGE = os.sysconf("SC_PAGE_SIZE")


def mapped_weights(tmp_path):
    """Two 1 MiB float32 tensors read from a safetensors file as views of it, and the values written."""
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.randn(512, 512, generator=g), "b": torch.randn(256, 1024, generator=g)}
    save_file(values, tmp_path / "w.safetensors")
    tensors, _ = read_safetensors(tmp_path / "w.safetensors")
    return tensors, values


def test_file_backed_pages_are_let_go_of_and_read_back_unchanged(tmp_path):
    tensors, values = mapped_weights(tmp_path)
    a = tensors["a"]
    assert resident_pages(a) == 0  # a view of the file: nothing read yet
    assert torch.equal(a, values["a"])
    pages = resident_pages(a)
    assert pages >= a.numel() * 4 // PAGE - 1  # read: resident
    assert release_file_pages([a]) >= pages * PAGE
    assert resident_pages(a) == 0
    assert torch.equal(a, values["a"])  # read back from the file


def test_written_pages_and_anonymous_memory_are_kept(tmp_path):
    tensors, values = mapped_weights(tmp_path)
    b = tensors["b"]
    b[:64].add_(1.0)  # a weight changed in place: those pages are this process's private copy now
    b[64:].sum()  # the rest only read
    written = 64 * 1024 * 4 // PAGE
    release_file_pages([b])
    assert resident_pages(b) == written  # exactly the written pages stay
    torch.testing.assert_close(b[:64], values["b"][:64] + 1.0, rtol=0, atol=0)  # the change is not lost
    assert torch.equal(b[64:], values["b"][64:])

    anonymous = values["a"].clone()  # ordinary memory (as weights cast while loading are)
    assert release_file_pages([anonymous]) == 0
    assert resident_pages(anonymous) >= anonymous.numel() * 4 // PAGE - 1
    assert torch.equal(anonymous, values["a"])


def test_a_generation_lets_go_of_the_text_encoders_file_pages(tmp_path):
    """Prompts are encoded once per generation: the text encoder's weights, views of the checkpoint file, leave
    memory after it and read back unchanged for the next."""
    file = sdtorch.save(random_pipeline(TINY_SD1, seed=3), tmp_path / "tiny.safetensors", format="single_file")
    pipe = sdtorch.load(file)
    settings = dict(width=32, height=32, steps=2, cfg_scale=7.0, seed=5)
    first = pipe("a red circle", **settings)[0]
    pages = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters()) // PAGE
    assert sum(resident_pages(p) for p in pipe.text_encoder.parameters()) < pages / 10  # tensors' edge pages stay
    assert sum(resident_pages(p) for p in pipe.unet.parameters()) > 100  # the UNet's, used at every step, are not
    assert psnr(pipe("a red circle", **settings)[0], first) == float("inf")
