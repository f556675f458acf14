"""Checkpoint files of a training run: on disk whole or not at all, and checked when read.

The checkpoint of epoch ``k`` is two files in the checkpoint directory:

* ``epoch-0000k.ckpt``: the ``torch.save`` payload (tensors and plain data only, so it reads back
  with ``torch.load(weights_only=True)`` and the allow-list of :mod:`pyro_scvi.io.safe_unpickle`);
* ``epoch-0000k.json``: its manifest, with the format, the epoch and the size of the ``.ckpt`` file.

Each file is written under a temporary name, flushed to the disk (``fsync``) and renamed into
place, the manifest last. A checkpoint exists once its manifest does, so a process killed while
writing leaves at most a temporary file (removed by the next writer) and the checkpoints before it
untouched. Reading checks the size against the manifest and every record of the file against the
CRC-32 that ``torch.save`` stores with it (its format is a zip archive), and refuses a file that
fails either, naming the previous checkpoint, which is still usable. The CRC-32 comes with
``torch.save`` at no extra cost; a cryptographic digest would add a pass over the file per epoch.
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

__all__ = ["CHECKPOINT_FORMAT", "write_checkpoint", "list_checkpoints", "read_checkpoint",
           "prune_checkpoints", "remove_temporaries"]

CHECKPOINT_FORMAT = "pyro-scvi-checkpoint"
CHECKPOINT_VERSION = 1
_MANIFEST = re.compile(r"^epoch-(\d+)\.json$")
_TEMPORARY_PREFIX = ".partial-"


def _names(epoch: int) -> tuple[str, str]:
    return f"epoch-{epoch:05d}.ckpt", f"epoch-{epoch:05d}.json"


def _write_atomically(directory: Path, name: str, write) -> int:
    """``write(path)`` a temporary file of ``directory``, fsync it, rename it to ``name``; returns its
    size in bytes."""
    handle, staging = tempfile.mkstemp(prefix=f"{_TEMPORARY_PREFIX}{name}.", dir=directory)
    os.close(handle)
    try:
        write(staging)
        with open(staging, "rb+") as file:
            os.fsync(file.fileno())
            size = os.fstat(file.fileno()).st_size
        os.replace(staging, directory / name)
        return size
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(directory, epoch: int, payload: dict) -> Path:
    """Write ``payload`` as the checkpoint of ``epoch`` (data file, then manifest); returns the data file."""
    directory = Path(directory)
    data_name, manifest_name = _names(epoch)
    # a path, not a file object: torch then writes from C++ without copying through Python
    size = _write_atomically(directory, data_name, lambda path: torch.save(payload, path))
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": int(epoch),
                "file": data_name, "bytes": size}
    _write_atomically(directory, manifest_name, lambda path: Path(path).write_text(json.dumps(manifest)))
    _sync_directory(directory)
    return directory / data_name


def list_checkpoints(directory) -> list[tuple[int, Path]]:
    """``(epoch, manifest path)`` of the checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir()
             if (match := _MANIFEST.match(path.name)) is not None]
    return sorted(found)


def _check_against_manifest(manifest_path: Path) -> Path:
    """The data file of a manifest, after checking its size and its records' CRC-32; ``ValueError``
    naming the fault."""
    try:
        manifest = json.loads(manifest_path.read_text())
        data_path = manifest_path.parent / manifest["file"]
        expected_size = int(manifest["bytes"])
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
        if int(manifest.get("version", 0)) > CHECKPOINT_VERSION:
            raise ValueError(f"version {manifest['version']} is newer than this pyro-scvi reads "
                             f"({CHECKPOINT_VERSION}); upgrade pyro-scvi")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _CorruptCheckpoint(f"its manifest {manifest_path.name} is unreadable ({error})") from None
    if not data_path.is_file():
        raise _CorruptCheckpoint(f"its data file {data_path.name} is missing")
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
    return data_path


class _CorruptCheckpoint(ValueError):
    pass


def read_checkpoint(directory, map_location="cpu") -> tuple[int, dict]:
    """``(epoch, payload)`` of the newest checkpoint in ``directory``, verified against its manifest.

    Raises ``FileNotFoundError`` when there is none, and ``ValueError`` when the newest one is damaged
    (naming the fault and the previous checkpoint, which stays usable).
    """
    found = list_checkpoints(directory)
    if not found:
        raise FileNotFoundError(
            f"No checkpoint to resume from in {directory} (no epoch-*.json manifest): train with "
            "checkpoint_dir=... first, or pass resume=False to start a new run."
        )
    epoch, manifest_path = found[-1]
    try:
        data_path = _check_against_manifest(manifest_path)
        payload = safe_torch_load(data_path, map_location=map_location)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise _CorruptCheckpoint(f"{data_path.name} is not a pyro-scvi checkpoint")
    except ValueError as error:
        raise ValueError(_refusal(directory, epoch, manifest_path, error, found[:-1])) from None
    return epoch, payload


def _refusal(directory, epoch: int, manifest_path: Path, error: Exception, older) -> str:
    data_name, _ = _names(epoch)
    message = f"The checkpoint of epoch {epoch} in {directory} is refused: {error}."
    if older:
        previous, _ = older[-1]
        message += (f" The previous checkpoint (epoch {previous}) is intact: delete or move away "
                    f"{data_name} and {manifest_path.name} to resume from it.")
    else:
        message += " There is no earlier checkpoint; start a new run (resume=False)."
    return message


def prune_checkpoints(directory, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (manifest first, so none is ever half-listed)."""
    for epoch, manifest_path in list_checkpoints(directory)[:-keep]:
        data_path = manifest_path.with_name(_names(epoch)[0])
        manifest_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)


def remove_temporaries(directory) -> None:
    """Delete temporary files a killed writer left in ``directory``."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.glob(f"{_TEMPORARY_PREFIX}*"):
            path.unlink(missing_ok=True)
