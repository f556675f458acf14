"""The slot file of checkpoints: every copy path writes the same bytes and checksums, and the
checksum is the sum of the tensor's words (checked against numpy)."""

from __future__ import annotations

import mmap
import shutil

import numpy as np
import pytest
import torch

from pyro_scvi.c_kernels import CKernel
from pyro_scvi.io import slot_file
from pyro_scvi.io.slot_file import ALIGNMENT, HEADROOM_BYTES, SlotFile, padded_size, word_sum


def _tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(700, 900, generator=generator),  # 2.4 MB: split between threads by the kernel
        torch.randn(3, generator=generator),  # 12 bytes: summed as 32-bit words
        -torch.arange(1, 6, dtype=torch.int32),  # negative 32-bit words
        torch.randint(-2**62, 2**62, (33,), generator=generator),  # int64 that overflow the sum
        torch.tensor([True, False, True, True]),
        torch.randn(5, 7, dtype=torch.float64, generator=generator).t().contiguous(),
        torch.tensor([True, False, True]),  # 3 bytes: padded to one word
        torch.tensor([-3, 7, 1], dtype=torch.int16),
        torch.empty(0, 4),
    ]


def _expected_sum(tensor: torch.Tensor) -> int:
    raw = tensor.numpy().tobytes()
    raw += bytes(-len(raw) % 4)  # zeros pad a tensor to whole 32-bit words
    words = np.frombuffer(raw, dtype=np.int64 if len(raw) % 8 == 0 else np.int32)
    return sum(int(w) for w in words) % 2**64


def test_word_sum_is_the_sum_of_the_words_modulo_2_to_the_64():
    for tensor in _tensors():
        if tensor.numel() * tensor.element_size() % 4 == 0:
            assert word_sum(tensor) == _expected_sum(tensor)
    flipped = _tensors()[0].clone()
    flipped.view(torch.int32)[123, 45] ^= 1 << 7
    assert word_sum(flipped) != word_sum(_tensors()[0])


def _written(tmp_path, name: str) -> tuple[list[dict], bytes]:
    target = SlotFile(tmp_path / name)
    try:
        entries = target.write(_tensors())
        entries_again = target.write(_tensors())  # a second checkpoint into the open, mapped file
    finally:
        target.close()
    assert entries == entries_again
    return entries, (tmp_path / name).read_bytes()


@pytest.mark.parametrize("path", ["kernel", "torch", "pwrite"])
def test_every_copy_path_writes_the_same_bytes_and_checksums(path, tmp_path, monkeypatch):
    if path == "kernel" and slot_file._KERNEL.load() is None:
        pytest.skip(f"no C kernel here: {slot_file._KERNEL.reason}")
    if path == "torch":
        monkeypatch.setenv("PYRO_SCVI_SLOT_COPY", "torch")
    if path == "pwrite":  # a file system that cannot map files
        def no_mapping(*args, **kwargs):
            raise OSError("mmap: operation not supported")
        monkeypatch.setattr(mmap, "mmap", no_mapping)
    entries, data = _written(tmp_path, f"{path}.bin")
    for tensor, entry in zip(_tensors(), entries):
        assert entry["offset"] % ALIGNMENT == 0
        raw = data[entry["offset"]: entry["offset"] + padded_size(entry["bytes"])]
        assert raw == tensor.numpy().tobytes() + bytes(-entry["bytes"] % 4)
        assert entry["word_sum"] == _expected_sum(tensor)
        assert entry["shape"] == list(tensor.shape) and entry["dtype"] == str(tensor.dtype)[6:]
    assert path in slot_file.copy_path() or path != "torch"


def test_a_replaced_or_grown_file_is_opened_again(tmp_path):
    target = SlotFile(tmp_path / "slot.bin")
    small = [torch.ones(16)]
    try:
        target.write(small)
        (tmp_path / "slot.bin").unlink()  # e.g. the directory was cleaned during the run
        target.write(small)
        assert (tmp_path / "slot.bin").stat().st_size == ALIGNMENT + HEADROOM_BYTES
        entries = target.write([torch.ones(16), torch.full((1000,), 2.0)])  # within the headroom
        assert entries[-1]["offset"] == ALIGNMENT
        assert (tmp_path / "slot.bin").stat().st_size == ALIGNMENT + HEADROOM_BYTES
        target.write([torch.ones(HEADROOM_BYTES // 4 + 32)])  # beyond it: grown (and mapped) again
        assert (tmp_path / "slot.bin").stat().st_size == HEADROOM_BYTES + 128 + HEADROOM_BYTES
        assert torch.equal(torch.from_file(str(tmp_path / "slot.bin"), size=16, dtype=torch.float32),
                           torch.ones(16))
    finally:
        target.close()


@pytest.mark.parametrize("compiler", ["gcc-11", "gcc-12", "gcc-13", "clang-14", "clang-16", "clang"])
def test_other_compilers_build_a_kernel_that_writes_the_same(compiler, tmp_path, monkeypatch):
    """The copy kernel built by every other compiler installed here (in its own cache folder) writes
    the bytes and checksums of the torch path."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("PYRO_SCVI_CACHE", str(tmp_path / "cache"))
    built = CKernel(slot_file._KERNEL.source, slot_file._declare, "the slot-copy kernel")
    assert built.load() is not None, built.reason
    monkeypatch.setattr(slot_file, "_KERNEL", built)
    assert "kernel (streaming stores" in slot_file.copy_path() or not built.library.slot_copy_streams()
    entries, data = _written(tmp_path, "built.bin")
    monkeypatch.setenv("PYRO_SCVI_SLOT_COPY", "torch")
    assert _written(tmp_path, "torch.bin") == (entries, data)

