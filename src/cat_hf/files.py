"""Atomic file writing: every file the package writes appears whole or not at all.

A file is written under a temporary name in its destination folder and renamed with `os.replace` (atomic on POSIX
and Windows), so a crash, a full disk or a killed job never leaves a half-written JSON, CSV or checkpoint behind.
(`feature_extraction_cat.py` keeps its own copy: it must stay self-contained for `trust_remote_code` users.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """Strict-JSON view of a value: NaN/inf -> None, numpy scalars -> Python, paths -> str, keys -> str."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(payload), indent=indent, allow_nan=False) + "\n")


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a fresh temporary folder next to `folder`, then move its files into `folder` one by one
    with `os.replace`, so no reader ever sees a half-written file. Files of `folder` that `write` does not produce
    are left alone."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(temporary)
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
