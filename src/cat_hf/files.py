"""Files written whole, with ordinary permissions, and checked whole before they are trusted.

A file is written under a temporary name in its destination folder and renamed with `os.replace` (atomic on POSIX
and Windows), so a crash, a full disk or a killed job never leaves a half-written JSON, CSV or checkpoint behind.
Temporary files and folders are created private (0600 / 0700); what replaces a file keeps that file's mode, and a
new file gets the mode `open()` would give it (0666 / 0777 less the umask), like its neighbours.
(`feature_extraction_cat.py` keeps its own copy: it must stay self-contained for `trust_remote_code` users.)

Reading side: `zip_damage` checks the CRC-32 of every member of a zip archive (torch's checkpoint format), and
`damaged_tensors` flags weights that no trained model holds (NaN, infinity, or beyond the float16 range), which is
what overwritten bytes in a safetensors file (a format without checksums) turn into in practice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Largest magnitude a weight of a trained model is taken to have: the float16 maximum (65504). Values beyond it
#: overflow mixed-precision training; random bytes written over float32 data land there in about half the cases.
MAX_PLAUSIBLE_WEIGHT = 65504.0


class DamagedFileError(ValueError):
    """A file that should hold whole, valid data does not (failed checksum, truncated, impossible values)."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` give a new file / folder: 0666 / 0777 less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give `root` (a file or a folder, recursively) the modes of newly created files and folders. For what was
    written through temporary files or folders, which are created private (mkstemp 0600, mkdtemp 0700; safetensors
    writes its files 0600 too)."""
    root = Path(root)
    files, folders = default_mode(), default_mode(directory=True)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            os.chmod(path, folders if path.is_dir() else files)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename. The file keeps the mode of the
    file it replaces, or gets the default mode of a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = default_mode()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """Strict-JSON view of a value: NaN/inf -> None, numpy scalars -> Python, paths -> str, keys -> str, tuples ->
    lists; any other object -> `default(object)` (when given)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, default) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if default is not None and not isinstance(value, (str, int, float, bool, type(None))):
        return default(value)
    return value


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(payload), indent=indent, allow_nan=False) + "\n")


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a fresh temporary folder next to `folder`, then move its files into `folder` one by one
    with `os.replace`, so no reader ever sees a half-written file. Files of `folder` that `write` does not produce
    are left alone. What is moved gets the default modes of new files and folders (the temporary folder is
    private, and some writers create private files)."""
    folder = Path(folder)
    resolved = folder.resolve()  # "." and ".." have no name to derive the temporary folder's from
    resolved.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".tmp", dir=resolved.parent))
    try:
        write(temporary)
        apply_default_modes(temporary)
        folder.mkdir(exist_ok=True)
        for path in sorted(temporary.rglob("*")):
            target = folder / path.relative_to(temporary)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on an existing folder while reading and rewriting a file in it, so that several
    processes adding to the same file (e.g. two evaluations into one model folder) do not lose each other's
    additions. POSIX advisory lock (flock on the folder itself: no lock file is left behind); elsewhere none."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


# ----------------------------------------------------------------------------------------------------------------
# Checking what is read


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def zip_damage(path: str | os.PathLike) -> str | None:
    """None when `path` is a zip archive whose members all match their stored CRC-32 (or is not a zip archive:
    nothing to check); else what is wrong, e.g. "member 'archive/data/159' fails its CRC-32 check"."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        return f"its zip structure is damaged ({type(error).__name__}: {error})"
    return f"member {bad!r} fails its CRC-32 check" if bad else None


def safetensors_damage(path: str | os.PathLike) -> str | None:
    """None when a .safetensors file's header parses and its tensors fit in the file; else what is wrong (a
    truncated file fails this). Reads the header only."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as stream:
            (header_length,) = struct.unpack("<Q", stream.read(8))
            if header_length > size - 8:
                return f"its header claims {header_length} bytes but the file has {size}"
            header = json.loads(stream.read(header_length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its header is unreadable ({type(error).__name__}: {error})"
    if 8 + header_length + end != size:
        return f"its tensors need {8 + header_length + end} bytes but the file has {size} (truncated?)"
    return None


def damaged_tensors(tensors: Iterable[tuple[str, Any]], limit: int = 5) -> list[str]:
    """Descriptions of the floating-point tensors holding NaN, infinity or magnitudes beyond
    MAX_PLAUSIBLE_WEIGHT (at most `limit`, e.g. "layers.0.mlp.fc1.weight: 3 NaN/inf, 12 values beyond ±65504")."""
    import torch

    found = []
    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        values = tensor.detach()
        finite = torch.isfinite(values)
        nonfinite = int((~finite).sum())
        huge = int((values.abs() > MAX_PLAUSIBLE_WEIGHT).logical_and(finite).sum())
        if nonfinite or huge:
            parts = ([f"{nonfinite} NaN/inf"] if nonfinite else []) + (
                [f"{huge} values beyond ±{MAX_PLAUSIBLE_WEIGHT:g}"] if huge else [])
            found.append(f"{name}: {', '.join(parts)}")
            if len(found) >= limit:
                break
    return found


def check_safetensors_values(path: str | os.PathLike) -> None:
    """DamagedFileError unless every tensor of a .safetensors file can be read and holds plausible values."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as reader:
            bad = damaged_tensors((name, reader.get_tensor(name)) for name in reader.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedFileError(
            f"{path} cannot be read as safetensors ({error}); it is truncated or damaged."
        ) from error
    if bad:
        raise DamagedFileError(
            f"{path} holds weights no trained model has ({'; '.join(bad)}): the file is damaged (overwritten or "
            "corrupted bytes). Restore it from where it came from (a backup, the Hub) or re-save the model."
        )
