"""The torch device of Lightning-style ``accelerator`` / ``devices`` arguments (one resolver for
training, loading and query mapping, and for the data-parallel code path with one process).

``accelerator``: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"gpu"`` or ``"cuda"``.
``devices``: ``"auto"``, ``None``, ``1`` or ``-1`` (the first device), a device index, a list of one
index, or a torch device string such as ``"cuda:1"`` (used as is). Several devices mean
data-parallel training, which :mod:`pyro_scvi.infer.distributed` sets up under torchrun.
"""

from __future__ import annotations

import torch

__all__ = ["ACCELERATORS", "use_cuda", "resolve_device"]

#: values of ``accelerator``
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def use_cuda(accelerator: str = "auto") -> bool:
    """Whether ``accelerator`` selects CUDA; ``ValueError`` for an unknown value, or for ``"gpu"`` /
    ``"cuda"`` without CUDA."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not one of {', '.join(map(repr, ACCELERATORS))}.")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} but CUDA is not available; use accelerator='cpu'.")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_device(accelerator: str = "auto", devices="auto") -> torch.device:
    """One torch device from ``accelerator`` and ``devices`` (see the module docstring).

    ``ValueError`` for an unknown accelerator, for CUDA asked for but missing, and for more than one
    device (with how to train data-parallel).
    """
    cuda = use_cuda(accelerator)
    listed = isinstance(devices, (list, tuple))
    if listed:
        if len(devices) != 1:
            raise ValueError(f"devices={devices!r}: this runs on a single device; pass one index "
                             "(data-parallel training is train(devices=N, strategy='ddp') under torchrun).")
        devices = devices[0]
    if isinstance(devices, str) and devices.startswith("cuda"):
        return torch.device(devices)
    if listed:  # a list holds device indices, not a number of devices
        index = int(devices)
    elif devices in ("auto", None, 1, "1", -1, "-1"):
        index = 0
    elif isinstance(devices, int) and devices > 1:
        raise ValueError(f"devices={devices}: this runs on a single device (data-parallel training is "
                         "train(devices=N, strategy='ddp') under torchrun).")
    else:
        index = int(devices)
    if not cuda:
        return torch.device("cpu")
    if index < 0:
        raise ValueError(f"devices={devices!r} is not a device index (use 'auto', -1 or an index ≥ 0).")
    return torch.device(f"cuda:{index}")
