"""OpenVINO's compiled graphs on disk (sdtorch/openvino_cache.py): a later build imports the kept graph instead of
converting, gives the same outputs, and any change that decides the graph names another file; a bad file, a
failed write or the cache turned off lose nothing."""

import copy
import gc
import mmap
import os
import time
import warnings

import pytest
import torch
from conftest import assert_parity, resident_pages

from sdtorch import openvino_cache
from sdtorch.compiled import _SplitCall
from sdtorch.openvino_runtime import compile_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(openvino_cache.CACHE_ENV, str(tmp_path / "graphs"))
    return tmp_path / "graphs"


def inputs(side: int = 16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, side, side, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 128, generator=g)


def small():
    """A module that converts in a fraction of a second, for the cache's bookkeeping, and its input."""
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU()).eval(), torch.randn(1, 4, 8, 8)


def kept(cache):
    return sorted(cache.glob(f"*{openvino_cache.SUFFIX}"))


def refuse_converting(monkeypatch):
    import openvino as ov

    def convert_model(*args, **kwargs):
        raise AssertionError("converted although the graph was kept")

    monkeypatch.setattr(ov, "convert_model", convert_model)


def test_a_later_build_imports_the_kept_graph_and_gives_the_same_outputs(unet, cache, monkeypatch):
    x, t, context = inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
    first = compile_module(unet, (x, t, context))
    assert len(kept(cache)) == 1 and first.weights_file is not None  # built, kept, and read back from the file
    refuse_converting(monkeypatch)
    second = compile_module(unet, (x, t, context))
    assert second.weights_file is not None  # imported, reading its weights from the kept file
    gc.collect()
    outputs = [second(x, t, context)[0] for _ in range(2)]  # the second after the file's pages were dropped
    assert all(torch.equal(out, first(x, t, context)[0]) for out in outputs)
    assert_parity(outputs[1], expected)
    assert len(kept(cache)) == 1


def test_a_lower_precision_graph_of_float32_weights_is_built_from_weights_cast_to_it(unet, cache):
    """float32 weights computed in bfloat16 are traced cast to it: the kept graph's weights take half the bytes,
    and the output stays within bfloat16's rounding of the float32 module's."""
    x, t, context = inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
    compile_module(unet, (x, t, context))
    (full,) = kept(cache)
    outputs = compile_module(unet, (x, t, context), precision=torch.bfloat16)(x, t, context)[0]
    (half,) = set(kept(cache)) - {full}
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert full.stat().st_size - half.stat().st_size >= 0.45 * weights
    error = ((outputs - expected).abs().max() / expected.abs().max()).item()
    assert 1e-4 < error < 0.05  # bfloat16 arithmetic: rounded, not lost


def test_a_graph_not_kept_on_disk_holds_what_it_was_made_from(unet, monkeypatch):
    """Without the cache, the graph reads constants from the tensors it was traced from: a cast copy must live as
    long as the graph (freed, the graph read freed memory)."""
    monkeypatch.setenv(openvino_cache.CACHE_ENV, "off")
    x, t, context = inputs()
    run = compile_module(unet, (x, t, context), precision=torch.bfloat16)
    assert run.weights_file is None and run.traced is not None
    gc.collect()
    outputs = [run(x, t, context)[0] for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])
    with torch.no_grad():
        expected = unet(x, t, context)
    assert ((outputs[0] - expected).abs().max() / expected.abs().max()).item() < 0.05


def test_a_graph_files_pages_are_let_go_of_while_the_first_inference_runs_and_after_each(tmp_path):
    page = os.sysconf("SC_PAGE_SIZE")
    content = os.urandom(64 * page)
    (tmp_path / "graph").write_bytes(content)
    with (tmp_path / "graph").open("rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    view = torch.frombuffer(mapping, dtype=torch.uint8)
    with openvino_cache.pages_let_go(mapping, during=True, every=0.01):  # as in the first inference
        view.sum()  # OpenVINO reading the weights to repack them
        deadline = time.monotonic() + 60  # a generous bound on a loaded machine: the thread looks every 10 ms
        while resident_pages(view) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident_pages(view) == 0  # let go of while the block still runs
    with openvino_cache.pages_let_go(mapping, during=False):  # a later inference
        view.sum()
        assert resident_pages(view) == 64
    assert resident_pages(view) == 0
    assert bytes(mapping) == content  # read back from the file


def test_what_decides_the_graph_names_another_file(unet):
    x, t, context = inputs()
    key = openvino_cache.graph_key(unet, (x, t, context), {})
    assert openvino_cache.graph_key(copy.deepcopy(unet), (x, t, context), {}) == key  # same weights, same graph
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        weight = next(changed.parameters())
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))  # one ulp
    others = [
        openvino_cache.graph_key(changed, (x, t, context), {}),
        openvino_cache.graph_key(unet, inputs(24), {}),
        openvino_cache.graph_key(unet, (x, t, context), {"INFERENCE_PRECISION_HINT": "bf16"}),
        openvino_cache.graph_key(_SplitCall(unet, 1, with_deep=False), (x, t, context), {}),
        openvino_cache.graph_key(_SplitCall(unet, 2, with_deep=False), (x, t, context), {}),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_a_file_that_does_not_import_is_removed_and_the_graph_built_again(cache):
    module, x = small()
    compile_module(module, (x,))
    (path,) = kept(cache)
    garbage = b"not an OpenVINO graph" * 100
    path.write_bytes(garbage)
    with pytest.warns(UserWarning, match="does not import"):
        run = compile_module(module, (x,))
    with torch.no_grad():
        assert_parity(run(x)[0], module(x))
    assert kept(cache) == [path] and path.read_bytes() != garbage  # built and kept again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_module(module, (x,)).weights_file is not None


def test_off_keeps_nothing_and_a_failed_write_warns_and_still_runs(tmp_path, monkeypatch):
    module, x = small()
    with torch.no_grad():
        expected = module(x)
    monkeypatch.setenv(openvino_cache.CACHE_ENV, "off")
    assert openvino_cache.cache_dir() is None
    assert_parity(compile_module(module, (x,))(x)[0], expected)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(openvino_cache.CACHE_ENV, str(blocker / "graphs"))  # a folder below a file: mkdir fails
    with pytest.warns(UserWarning, match="could not keep the OpenVINO graph"):
        run = compile_module(module, (x,))
    assert_parity(run(x)[0], expected)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_the_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(openvino_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert openvino_cache.cache_dir() == tmp_path / "sdtorch" / "openvino"


def test_the_least_recently_used_graphs_go_beyond_the_budget(cache, monkeypatch):
    module, x = small()
    compile_module(module, (x,))
    (first,) = kept(cache)
    monkeypatch.setattr(openvino_cache, "MAX_CACHE_BYTES", first.stat().st_size + 1)
    compile_module(module, (torch.randn(1, 4, 16, 16),))  # another graph: the older one no longer fits
    (second,) = kept(cache)
    assert second != first
