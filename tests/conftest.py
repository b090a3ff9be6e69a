"""Shared test helpers: the parity tolerance every model part is held to."""

import pytest
import torch


def assert_parity(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference <= rel * max(1, max |reference|) (the issue's float32 parity bar)."""
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    bound = rel * max(1.0, reference.abs().max().item())
    err = (ours.float() - reference.float()).abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} exceeds {bound:.3e}"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads cost more than they give (and thrash on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    """A tiny SD1-layout UNet with random weights: the real model the sampler tests run."""
    from sdtorch.configs import TINY_SD1
    from sdtorch.models.unet import UNet

    torch.manual_seed(1234)
    return UNet(TINY_SD1.unet).eval()


@pytest.fixture(scope="module")
def context():
    """A (1, 7, 128) text context for the tiny UNet."""
    return torch.randn(1, 7, 128, generator=torch.Generator().manual_seed(7))
