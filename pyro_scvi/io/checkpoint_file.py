"""Checkpoint files of a training run: never half-listed, and checked when read.

A checkpoint must cost little at every epoch, so it is written into one of two preallocated
*slot* files, ``slot-0.bin`` and ``slot-1.bin``, used in turn and kept mapped in memory while a
run writes checkpoints (:mod:`pyro_scvi.io.slot_file`): every tensor (weights, Adam's moments,
random states) is copied once into pages the file system already holds and checksummed in the
same pass, with no new file and no serialisation. What is left (counters, history, settings,
Python's random state: plain Python values) is pickled into the same slot, after the tensors.
The checkpoint of epoch ``k`` is then its slot and the manifest ``epoch-0000k.json``, which
lists where each tensor and the pickled rest are in the slot, with dtype, shape and checksum.

Order of writing: the manifest that points at the slot about to be reused is deleted first, the
slot is written, then the manifest, to a temporary name renamed into place. So a checkpoint
exists exactly when its manifest does, and a process killed while writing leaves the newest
complete checkpoint, in the other slot, untouched. Reading checks every checksum and refuses a
checkpoint that fails, naming the previous one, which stays usable. The rest is read with the
restricted unpickler of :mod:`pyro_scvi.io.safe_unpickle`, which builds plain values only. One run
at a time writes to a directory (:func:`lock_directory`).

The files are flushed to the disk by the operating system, not by ``fsync`` at each epoch: a
killed process loses nothing, and a machine that crashes may lose the newest checkpoints, which
the checks above then refuse.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from .safe_unpickle import safe_unpickle
from .slot_file import SlotFile, padded_size, word_sum

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "write_checkpoint", "list_checkpoints",
           "read_checkpoint", "remove_temporaries", "lock_directory"]

CHECKPOINT_FORMAT = "pyro-scvi-checkpoint"
CHECKPOINT_VERSION = 2
_MANIFEST = re.compile(r"^epoch-(\d+)\.json$")
_TEMPORARY_PREFIX = ".partial-"
_LOCK = ".lock"
_PLACEHOLDER = "pyro-scvi-slot-tensor"
#: values that hold no tensor: returned as they are by :func:`_split_tensors`
_ATOMS = (int, float, str, bool, type(None), bytes)


def _names(epoch: int) -> tuple[str, str]:
    """The names of ``epoch``'s rest file (written by format 1 only) and manifest."""
    return f"epoch-{epoch:05d}.pt", f"epoch-{epoch:05d}.json"


def _split_tensors(value, tensors: list):
    """``value`` with its tensors replaced by placeholders (the tensors, on the CPU and contiguous,
    are appended to ``tensors``)."""
    if type(value) in _ATOMS:
        return value
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"checkpoints hold strided tensors only, not {value.layout}")
        tensors.append(value.detach().to("cpu").contiguous())
        return {_PLACEHOLDER: len(tensors) - 1}
    if isinstance(value, dict):
        return {key: _split_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_split_tensors(item, tensors) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _join_tensors(value, tensors: list):
    """Inverse of :func:`_split_tensors`."""
    if type(value) in _ATOMS:
        return value
    if isinstance(value, dict):
        if set(value) == {_PLACEHOLDER}:
            return tensors[value[_PLACEHOLDER]]
        return {key: _join_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_join_tensors(item, tensors) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _write_manifest(directory: Path, name: str, manifest: dict) -> None:
    """Write the manifest under a temporary name and rename it into place (the run holds the
    directory's lock, so the temporary name is its own)."""
    staging = directory / f"{_TEMPORARY_PREFIX}{name}"
    try:
        staging.write_text(json.dumps(manifest))
        os.replace(staging, directory / name)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_checkpoint(directory, epoch: int, payload: dict, slots: dict[int, SlotFile] | None = None) -> Path:
    """Write ``payload`` (tensors and plain Python values) as the checkpoint of ``epoch`` (slot, then
    manifest); returns the manifest's path. The older of two checkpoints is replaced.

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
    tensors: list[torch.Tensor] = []
    rest = pickle.dumps(_split_tensors(payload, tensors), protocol=pickle.HIGHEST_PROTOCOL)
    slot_file = slots.get(slot)
    if slot_file is None:
        slot_file = slots[slot] = SlotFile(directory / f"slot-{slot}.bin")
    *entries, rest_entry = slot_file.write([*tensors, torch.frombuffer(bytearray(rest), dtype=torch.uint8)])
    manifest_name = _names(epoch)[1]
    _write_manifest(directory, manifest_name, {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": int(epoch), "slot": slot,
        "tensors": entries, "rest": rest_entry})
    return directory / manifest_name


def _slot_of(manifest_path: Path) -> int | None:
    try:
        return int(json.loads(manifest_path.read_text()).get("slot", 0))
    except (OSError, ValueError, TypeError):
        return None


def _delete(directory: Path, epoch: int, manifest_path: Path) -> None:
    manifest_path.unlink(missing_ok=True)  # first: a checkpoint is listed only while whole
    (directory / _names(epoch)[0]).unlink(missing_ok=True)  # the rest, in format 1


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
        if int(manifest.get("version", 0)) != CHECKPOINT_VERSION:
            raise ValueError(f"it has format version {manifest.get('version')}, and this pyro-scvi reads "
                             f"version {CHECKPOINT_VERSION}: use the pyro-scvi that wrote it, or a new run")
        for key in ("slot", "tensors", "rest"):
            manifest[key]  # noqa: B018 (a KeyError names the missing entry)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _CorruptCheckpoint(f"its manifest {manifest_path.name} is unreadable ({error})") from None
    return manifest


def _read_slot(path: Path, entries: list[dict], labels: list[str]) -> list[torch.Tensor]:
    """The tensors ``entries`` lists, each checked against its checksum (``labels`` name them)."""
    if not path.is_file():
        raise _CorruptCheckpoint(f"its tensor file {path.name} is missing")
    end = max((e["offset"] + padded_size(e["bytes"]) for e in entries), default=0)
    if path.stat().st_size < end:
        raise _CorruptCheckpoint(f"{path.name} has {path.stat().st_size} bytes, the manifest needs {end} "
                                 "(truncated)")
    tensors = []
    with open(path, "rb") as file:
        for entry, label in zip(entries, labels):
            file.seek(entry["offset"])
            raw = bytearray(file.read(padded_size(entry["bytes"])))
            data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            if word_sum(data) != int(entry["word_sum"]) % 2**64:
                raise _CorruptCheckpoint(f"{label} in {path.name} does not match its checksum (the file was "
                                         "damaged or overwritten after it was written)")
            dtype = getattr(torch, entry["dtype"])
            tensors.append(data[: entry["bytes"]].view(dtype).reshape(entry["shape"]))
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
        slot_path = directory / f"slot-{int(manifest['slot'])}.bin"
        labels = [f"tensor {i}" for i in range(len(manifest["tensors"]))] + ["the pickled rest"]
        *tensors, rest = _read_slot(slot_path, [*manifest["tensors"], manifest["rest"]], labels)
        rest = safe_unpickle(rest.numpy().tobytes())
        payload = _join_tensors(rest, [t.to(map_location) for t in tensors])
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise _CorruptCheckpoint(f"{manifest_path.name} does not describe a pyro-scvi checkpoint")
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
