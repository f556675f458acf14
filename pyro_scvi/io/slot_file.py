"""A checkpoint's slot file: a preallocated file, mapped into memory, that tensors are copied into.

Checkpointing every epoch must cost little, and on a CPU the cost is memory bandwidth: the
tensors of an scVI model on all genes are tens of megabytes. So a slot file stays open and
mapped while a run writes checkpoints, and a checkpoint copies each tensor once, straight into
the file's pages in the page cache (no ``write`` call per page, no serialisation), computing its
checksum (:func:`word_sum`) in the same pass. The copy is a small C kernel (``csrc/slot_copy.c``,
built on first use, see :mod:`pyro_scvi.c_kernels`) that splits large tensors between threads
and, on x86-64, writes them with streaming stores that leave the caches to the training; without
a C compiler it is ``Tensor.copy_`` followed by the sum, and where the file system cannot map
files, ``os.pwrite``. All paths give the same bytes and checksums. A file that grows (the
pickled history at its end grows each epoch) gets room to spare, so that it is rarely mapped
anew: a new mapping's pages fault in again, which costs more than the copy.

The file's blocks are reserved when it grows (``posix_fallocate``), so a full disk is an
``OSError`` then, not a fault while copying. Another process must not truncate a mapped file;
:func:`pyro_scvi.io.checkpoint_file.lock_directory` keeps a second run out of the directory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

from ..c_kernels import CKernel

__all__ = ["SlotFile", "word_sum", "padded_size", "copy_path"]

#: offsets of tensors in the file are multiples of this (a cache line: aligned vector stores)
ALIGNMENT = 64
#: room a growing file gets beyond what it needs (the pickled history at its end grows each epoch,
#: and each growth maps the file anew, whose pages then fault in again): 1 MiB, or 1/32 of the file
HEADROOM_BYTES, HEADROOM_FRACTION = 1 << 20, 32


def word_sum(tensor: torch.Tensor) -> int:
    """Sum of a tensor's bytes read as 64-bit integers (32-bit when its size is not a multiple of 8),
    modulo 2⁶⁴: a cheap check that changes with any flipped bit."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.numel() % 8 == 0:
        return int(data.view(torch.int64).sum()) % 2**64
    return int(data.view(torch.int32).sum(dtype=torch.int64)) % 2**64


def padded_size(n_bytes: int) -> int:
    """The bytes a tensor of ``n_bytes`` takes in a slot: zeros pad it to whole 32-bit words, which
    its checksum covers."""
    return -(-int(n_bytes) // 4) * 4


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of the contiguous CPU ``tensor``, padded with zeros to whole 32-bit words."""
    data = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    if data.numel() % 4:
        data = torch.cat([data, data.new_zeros(padded_size(data.numel()) - data.numel())])
    return data


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.slot_copy.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    library.slot_copy.restype = None
    library.slot_copy_build_flags.restype = ctypes.c_char_p
    library.slot_copy_streams.restype = ctypes.c_int


_KERNEL = CKernel(Path(__file__).with_name("csrc") / "slot_copy.c", _declare, "the slot-copy kernel")


def copy_path() -> str:
    """How checkpoints copy tensors here: ``"kernel (FLAGS)"`` or ``"torch (REASON)"``."""
    library = _KERNEL.load()
    if library is None or os.environ.get("PYRO_SCVI_SLOT_COPY") == "torch":
        return f"torch ({_KERNEL.reason or '$PYRO_SCVI_SLOT_COPY=torch'})"
    stores = "streaming stores" if library.slot_copy_streams() else "cached stores"
    return f"kernel ({stores}; {library.slot_copy_build_flags().decode()})"


def _layout(words: list[torch.Tensor]) -> tuple[list[int], int]:
    """Offsets of the byte tensors ``words`` one after the other, each aligned, and the end of the last."""
    offsets, end = [], 0
    for data in words:
        offsets.append(end)
        end += -(-data.numel() // ALIGNMENT) * ALIGNMENT
    return offsets, end


def _reserve(fd: int, start: int, end: int) -> None:
    """Allocate the file's blocks in ``[start, end)`` (growing it to ``end``)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, start, end - start)
        return
    zeros = bytes(1 << 20)  # macOS: write zeros, which allocates
    for offset in range(start, end, len(zeros)):
        os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)


class SlotFile:
    """One slot file, kept open and mapped between checkpoints; :meth:`close` when the run ends."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._size = 0

    def write(self, tensors: list[torch.Tensor]) -> list[dict]:
        """Copy the contiguous CPU ``tensors`` into the file; returns each one's manifest entry:
        ``offset``, ``bytes`` (unpadded), ``shape``, ``dtype`` and ``word_sum`` (of the padded bytes)."""
        words = [_words(tensor) for tensor in tensors]
        offsets, end = _layout(words)
        self._open(end)
        if self._map is None:
            sums = self._write_unmapped(words, offsets)
        else:
            sums = self._copy_mapped(words, offsets)
        return [{"offset": offset, "bytes": t.numel() * t.element_size(), "shape": list(t.shape),
                 "dtype": str(t.dtype).removeprefix("torch."), "word_sum": total}
                for t, offset, total in zip(tensors, offsets, sums)]

    def _open(self, size: int) -> None:
        """Open (again, if the file was replaced) and map the file, at least ``size`` bytes long."""
        if self._fd is not None:
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                same = False
            if not same or size > self._size:
                self.close()
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            current = os.fstat(fd).st_size
            if current < size:
                grown = size + max(HEADROOM_BYTES, size // HEADROOM_FRACTION)
                _reserve(fd, current, grown)
                current = grown
            self._size = current
            try:
                self._map = mmap.mmap(fd, self._size) if self._size else None
            except (OSError, ValueError):
                self._map = None  # a file system without shared mappings: pwrite
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _copy_mapped(self, words: list[torch.Tensor], offsets: list[int]) -> list[int]:
        library = _KERNEL.load()
        if library is None or os.environ.get("PYRO_SCVI_SLOT_COPY") == "torch":
            pages = torch.frombuffer(self._map, dtype=torch.uint8)
            for data, offset in zip(words, offsets):
                pages[offset: offset + data.numel()].copy_(data)
            return [word_sum(data) for data in words]
        count = len(words)
        sources = torch.tensor([data.data_ptr() for data in words], dtype=torch.int64)
        sizes = torch.tensor([data.numel() for data in words], dtype=torch.int64)
        where = torch.tensor(offsets, dtype=torch.int64)
        sums = torch.empty(count, dtype=torch.int64)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        library.slot_copy(count, sources.data_ptr(), sizes.data_ptr(), base, where.data_ptr(),
                          sums.data_ptr(), torch.get_num_threads())
        return [int(value) % 2**64 for value in sums.tolist()]

    def _write_unmapped(self, words: list[torch.Tensor], offsets: list[int]) -> list[int]:
        for data, offset in zip(words, offsets):
            view, written = memoryview(data.numpy()), 0
            while written < view.nbytes:
                written += os.pwrite(self._fd, view[written:], offset + written)
        return [word_sum(data) for data in words]

    def close(self) -> None:
        """Unmap and close the file (its pages reach the disk as the operating system flushes them)."""
        if self._map is not None:
            self._map.close()  # no tensor views it any more: the copies hold it only while they run
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._size = 0
