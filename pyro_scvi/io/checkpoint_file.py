"""Checkpoint files of a training run: never half-listed, and checked when read.

A checkpoint must cost little at every epoch, so its tensors (weights, Adam's moments, random
states) are copied straight into one of two preallocated *slot* files, ``slot-0.bin`` and
``slot-1.bin``, used in turn and kept mapped in memory while a run writes checkpoints
(:mod:`pyro_scvi.io.slot_file`): a checkpoint is one copy into pages the file system already
holds, checksummed in the same pass, with no new file and no serialisation. The rest goes
through ``torch.save``. The checkpoint of epoch ``k`` is then

* ``epoch-0000k.pt``: the rest (counters, history, settings, Python's random state), a
  ``torch.save`` file read back with ``weights_only=True`` and the allow-list of
  :mod:`pyro_scvi.io.safe_unpickle`;
* its tensors in one slot file;
* ``epoch-0000k.json``: the manifest, listing where each tensor is in the slot, its dtype and
  shape and the sum of its 64-bit words, and the size of ``epoch-0000k.pt``.

Order of writing: the manifest that points at the slot about to be reused is deleted first, the
slot is written, then ``epoch-0000k.pt`` and the manifest, each to a temporary name and renamed
into place. So a checkpoint exists exactly when its manifest does, and a process killed while
writing leaves the newest complete checkpoint, in the other slot, untouched. Reading checks the
small file's CRC-32s (``torch.save`` stores one per record) and each tensor's sum, and refuses a
checkpoint that fails, naming the previous one, which stays usable. One run at a time writes to a
directory (:func:`lock_directory`).

The files are flushed to the disk by the operating system, not by ``fsync`` at each epoch: a
killed process loses nothing, and a machine that crashes may lose the newest checkpoints, which
the checks above then refuse.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from .safe_unpickle import safe_torch_load
from .slot_file import SlotFile, word_sum

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "write_checkpoint", "list_checkpoints",
           "read_checkpoint", "remove_temporaries", "lock_directory"]

CHECKPOINT_FORMAT = "pyro-scvi-checkpoint"
CHECKPOINT_VERSION = 1
_MANIFEST = re.compile(r"^epoch-(\d+)\.json$")
_TEMPORARY_PREFIX = ".partial-"
_LOCK = ".lock"
#: tensors of at least this many bytes (and a multiple of 4) go to the slot file, the others into
#: the ``torch.save`` part: through ``torch.save`` a tensor costs ~0.1 ms of pickling and a zip
#: record, in the slot a microsecond
LARGE_BYTES = 4
_PLACEHOLDER = "pyro-scvi-slot-tensor"


def _names(epoch: int) -> tuple[str, str]:
    return f"epoch-{epoch:05d}.pt", f"epoch-{epoch:05d}.json"


def _is_large(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.layout == torch.strided
            and value.numel() * value.element_size() >= LARGE_BYTES
            and (value.numel() * value.element_size()) % 4 == 0)


def _split_large(value, large: list):
    """``value`` with its large CPU tensors replaced by placeholders (appended to ``large``)."""
    if _is_large(value):
        large.append(value.detach().to("cpu").contiguous())
        return {_PLACEHOLDER: len(large) - 1}
    if isinstance(value, dict):
        return {key: _split_large(item, large) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_split_large(item, large) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _join_large(value, large: list):
    if isinstance(value, dict):
        if set(value) == {_PLACEHOLDER}:
            return large[value[_PLACEHOLDER]]
        return {key: _join_large(item, large) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_join_large(item, large) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _replace_atomically(directory: Path, name: str, write) -> int:
    """``write(path)`` a temporary file of ``directory``, rename it to ``name``; returns its size."""
    handle, staging = tempfile.mkstemp(prefix=f"{_TEMPORARY_PREFIX}{name}.", dir=directory)
    os.close(handle)
    try:
        write(staging)
        size = os.path.getsize(staging)
        os.replace(staging, directory / name)
        return size
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def write_checkpoint(directory, epoch: int, payload: dict, slots: dict[int, SlotFile] | None = None) -> Path:
    """Write ``payload`` as the checkpoint of ``epoch`` (slot, the rest, then manifest); returns the
    manifest's path. The older of two checkpoints is replaced.

    ``slots``: the open :class:`SlotFile` of each slot number, kept by the caller between
    checkpoints (filled here as needed); without it the slot files are opened and closed here.
    """
    if slots is None:
        slots = {}
        try:
            return write_checkpoint(directory, epoch, payload, slots)
        finally:
            for slot_file in slots.values():
                slot_file.close()
    directory = Path(directory)
    found = list_checkpoints(directory)
    newest_slot = _slot_of(found[-1][1]) if found else None
    slot = 0 if newest_slot is None else 1 - newest_slot
    for old_epoch, manifest_path in found[:-1] if newest_slot is not None else found:
        _delete(directory, old_epoch, manifest_path)  # nothing may point at the slot being rewritten
    large: list[torch.Tensor] = []
    small = _split_large(payload, large)
    slot_file = slots.get(slot)
    if slot_file is None:
        slot_file = slots[slot] = SlotFile(directory / f"slot-{slot}.bin")
    entries = slot_file.write(large)
    data_name, manifest_name = _names(epoch)
    size = _replace_atomically(directory, data_name, lambda path: torch.save(small, path))
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": int(epoch),
                "file": data_name, "bytes": size, "slot": slot, "tensors": entries}
    _replace_atomically(directory, manifest_name, lambda path: Path(path).write_text(json.dumps(manifest)))
    return directory / manifest_name


def _slot_of(manifest_path: Path) -> int | None:
    try:
        return int(json.loads(manifest_path.read_text()).get("slot", 0))
    except (OSError, ValueError, TypeError):
        return None


def _delete(directory: Path, epoch: int, manifest_path: Path) -> None:
    manifest_path.unlink(missing_ok=True)  # first: a checkpoint is listed only while whole
    (directory / _names(epoch)[0]).unlink(missing_ok=True)


def list_checkpoints(directory) -> list[tuple[int, Path]]:
    """``(epoch, manifest path)`` of the checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir()
             if (match := _MANIFEST.match(path.name)) is not None]
    return sorted(found)


class _CorruptCheckpoint(ValueError):
    pass


def _read_manifest(manifest_path: Path) -> dict:
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
        if int(manifest.get("version", 0)) > CHECKPOINT_VERSION:
            raise ValueError(f"version {manifest['version']} is newer than this pyro-scvi reads "
                             f"({CHECKPOINT_VERSION}); upgrade pyro-scvi")
        for key in ("file", "bytes", "slot", "tensors"):
            manifest[key]  # noqa: B018 (a KeyError names the missing entry)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _CorruptCheckpoint(f"its manifest {manifest_path.name} is unreadable ({error})") from None
    return manifest


def _read_small(data_path: Path, expected_size: int, map_location) -> dict:
    if not data_path.is_file():
        raise _CorruptCheckpoint(f"its file {data_path.name} is missing")
    size = data_path.stat().st_size
    if size != expected_size:
        raise _CorruptCheckpoint(f"{data_path.name} has {size} bytes, its manifest says {expected_size} "
                                 "(truncated or overwritten)")
    try:
        with zipfile.ZipFile(data_path) as archive:
            damaged = archive.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise _CorruptCheckpoint(f"{data_path.name} is not a readable archive ({error})") from None
    if damaged is not None:
        raise _CorruptCheckpoint(f"the CRC-32 of record {damaged!r} in {data_path.name} does not match "
                                 "(the file was damaged after it was written)")
    return safe_torch_load(data_path, map_location=map_location)


def _read_slot(path: Path, entries: list[dict]) -> list[torch.Tensor]:
    if not path.is_file():
        raise _CorruptCheckpoint(f"its tensor file {path.name} is missing")
    end = max((e["offset"] + e["bytes"] for e in entries), default=0)
    if path.stat().st_size < end:
        raise _CorruptCheckpoint(f"{path.name} has {path.stat().st_size} bytes, the manifest needs {end} "
                                 "(truncated)")
    tensors = []
    with open(path, "rb") as file:
        for index, entry in enumerate(entries):
            file.seek(entry["offset"])
            raw = bytearray(file.read(entry["bytes"]))
            dtype = getattr(torch, entry["dtype"])
            tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry["shape"])
            if word_sum(tensor) != int(entry["word_sum"]) % 2**64:
                raise _CorruptCheckpoint(f"tensor {index} in {path.name} does not match its checksum (the "
                                         "file was damaged or overwritten after it was written)")
            tensors.append(tensor)
    return tensors


def read_checkpoint(directory, map_location="cpu") -> tuple[int, dict]:
    """``(epoch, payload)`` of the newest checkpoint in ``directory``, checked against its manifest.

    Raises ``FileNotFoundError`` when there is none, and ``ValueError`` when the newest one is damaged
    (naming the fault and the previous checkpoint, which stays usable).
    """
    directory = Path(directory)
    found = list_checkpoints(directory)
    if not found:
        raise FileNotFoundError(
            f"No checkpoint to resume from in {directory} (no epoch-*.json manifest): train with "
            "checkpoint_dir=... first, or pass resume=False to start a new run."
        )
    epoch, manifest_path = found[-1]
    try:
        manifest = _read_manifest(manifest_path)
        small = _read_small(directory / manifest["file"], int(manifest["bytes"]), map_location)
        large = _read_slot(directory / f"slot-{int(manifest['slot'])}.bin", manifest["tensors"])
        payload = _join_large(small, [t.to(map_location) for t in large])
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise _CorruptCheckpoint(f"{manifest['file']} is not a pyro-scvi checkpoint")
    except ValueError as error:
        raise ValueError(_refusal(directory, epoch, manifest_path, error, found[:-1])) from None
    return epoch, payload


def _refusal(directory, epoch: int, manifest_path: Path, error: Exception, older) -> str:
    data_name, _ = _names(epoch)
    message = f"The checkpoint of epoch {epoch} in {directory} is refused: {error}."
    if older:
        previous, _ = older[-1]
        message += (f" The previous checkpoint (epoch {previous}) is intact: delete or move away "
                    f"{manifest_path.name} to resume from it.")
    else:
        message += " There is no earlier checkpoint; start a new run (resume=False)."
    return message


def lock_directory(directory):
    """Hold the directory for one writing run: returns an open file whose lock lasts until it is
    closed (or the process ends). ``RuntimeError`` when another process holds it."""
    handle = open(Path(directory) / _LOCK, "a+")  # noqa: SIM115 (the caller keeps it open)
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(
            f"Another run is writing checkpoints to {directory} (it holds {_LOCK} there): wait for it to "
            "end, or give this run its own checkpoint_dir."
        ) from None
    return handle


def remove_temporaries(directory) -> None:
    """Delete temporary files a killed writer left in ``directory``."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.glob(f"{_TEMPORARY_PREFIX}*"):
            path.unlink(missing_ok=True)
