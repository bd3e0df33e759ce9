"""Synthetic clips of three kinds that a tiny model tells apart in a few steps (shared by finetuning and LoRA tests)."""

from __future__ import annotations

import numpy as np

SR = 16000
CLASSES = ("clicks", "noise", "tone")


def synth(kind: str, seconds: float, rng: np.random.Generator, gain: float = 1.0) -> np.ndarray:
    """A float32 clip of one of `CLASSES`, scaled by `gain`: a low tone, white noise, or sparse clicks."""
    n = int(SR * seconds)
    if kind == "tone":
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(300, 500) * np.arange(n) / SR) + 0.01 * rng.standard_normal(n)
    elif kind == "noise":
        x = 0.1 * rng.standard_normal(n)
    elif kind == "clicks":
        x = 0.001 * rng.standard_normal(n)
        x[int(rng.integers(0, 800)) :: 800] = 0.5
    else:
        raise ValueError(f"unknown kind {kind!r}; use one of {CLASSES}")
    return (gain * x).astype(np.float32)
