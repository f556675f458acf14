"""One device resolver for training, loading and the one-process data-parallel path."""

import pytest
import torch

from pyro_scvi.infer.device import resolve_device, use_cuda
from pyro_scvi.infer.distributed import data_parallel_for


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cpu_without_cuda(no_cuda):
    for devices in ("auto", None, 1, "1", -1, "-1", 0, [0], (0,)):
        assert resolve_device("auto", devices) == torch.device("cpu")
        assert resolve_device("cpu", devices) == torch.device("cpu")
    assert not use_cuda("auto") and not use_cuda("cpu")


def test_cuda_indices(with_cuda):
    assert use_cuda("auto") and use_cuda("gpu") and use_cuda("cuda") and not use_cuda("cpu")
    for devices in ("auto", None, 1, "1", -1, "-1", 0, [0]):
        assert resolve_device("gpu", devices) == torch.device("cuda:0")
    assert resolve_device("auto", [3]) == torch.device("cuda:3")
    assert resolve_device("cuda", "2") == torch.device("cuda:2")
    assert resolve_device("cpu", "auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device index"):
        resolve_device("gpu", -3)


def test_device_strings_are_used_as_given(no_cuda):
    assert resolve_device("auto", "cuda:1") == resolve_device("cpu", ["cuda:1"]) == torch.device("cuda:1")


def test_messages(no_cuda):
    with pytest.raises(ValueError, match="accelerator='mps' is not one of 'auto', 'cpu', 'gpu', 'cuda'"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="accelerator='gpu' but CUDA is not available; use "
                                         "accelerator='cpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="accelerator='cuda' but CUDA is not available"):
        use_cuda("cuda")
    with pytest.raises(ValueError, match=r"devices=\[0, 1\]: this runs on a single device; pass one index"):
        resolve_device("cpu", [0, 1])
    with pytest.raises(ValueError, match="devices=2: this runs on a single device .*strategy='ddp'"):
        resolve_device("cpu", 2)


def test_one_process_data_parallel_uses_the_same_resolver(no_cuda, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert data_parallel_for("auto", 1, "ddp").device == torch.device("cpu")
    assert data_parallel_for("cpu", [0], "ddp").device == torch.device("cpu")
    with pytest.raises(ValueError, match="accelerator='gpu' but CUDA is not available"):
        data_parallel_for("gpu", 1, "ddp")
    with pytest.raises(ValueError, match="accelerator='tpu' is not one of"):
        data_parallel_for("tpu", "auto", "ddp")
