"""X-ARES (https://github.com/jimbozhang/xares) encoders for CAT models, in one line of the user's encoder file:

    # cat_encoder.py
    import cat_hf.xares
    CATEncoder = cat_hf.xares.encoder_class("MODEL_FOLDER")

    python -m xares.run cat_encoder.py src/tasks/*.py

X-ARES instantiates the file's one attribute whose name ends with "Encoder" without arguments, checks it with
`check_audio_encoder`, moves it to its device and calls it on (batch, samples) tensors at `sampling_rate`. The
encoder returns frame embeddings (batch, frames, output_dim) every `hop_size_in_ms` (160 ms by default; pass
`hop_ms=40` etc. for finer grids), from `cat_hf.embeddings`. Nothing here imports torchaudio or X-ARES.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .embeddings import CATEmbedder


class CATXaresEncoder(torch.nn.Module):
    """An X-ARES audio encoder over a CAT model folder. `options` are `CATEmbedder` options (and `device`,
    `dtype`). Subclasses made by `encoder_class` fix the folder and options, as X-ARES needs."""

    def __init__(self, model_folder: str | os.PathLike, **options: Any) -> None:
        super().__init__()
        self.embedder = CATEmbedder.from_pretrained(model_folder, **options)
        self.encoder = self.embedder.model  # registered, so that X-ARES's .to(device) moves it
        self.sampling_rate = int(self.embedder.sampling_rate)
        self.output_dim = int(self.embedder.frame_embedding_size)
        self.hop_size_in_ms = float(self.embedder.hop_ms)

    def forward(self, audio: torch.Tensor, sampling_rate: int | None = None) -> torch.Tensor:
        """(batch, samples) audio at `sampling_rate` (default: `self.sampling_rate`) -> (batch, frames, output_dim)
        float32 frame embeddings on the audio's device."""
        frames = self.embedder.frame_embeddings(audio, sampling_rate=sampling_rate or self.sampling_rate)
        device = audio.device if isinstance(audio, torch.Tensor) else torch.device("cpu")
        return frames.embeddings.to(device)


def encoder_class(
    model_folder: str | os.PathLike, *, name: str = "CATEncoder", **options: Any
) -> type[CATXaresEncoder]:
    """A `CATXaresEncoder` subclass named `name` (X-ARES wants a name ending in "Encoder") whose constructor takes
    no arguments and loads `model_folder` with `options` (`CATEmbedder` options, `device`, `dtype`)."""
    if not isinstance(name, str) or not name.isidentifier() or not name.endswith("Encoder"):
        raise ValueError(f"name={name!r} must be a Python identifier ending in 'Encoder', as X-ARES looks it up.")
    if not os.path.isdir(model_folder) and os.path.exists(model_folder):
        raise ValueError(f"{model_folder} is a file; pass the CAT model folder (config.json, weights, preprocessor).")
    folder = os.fspath(model_folder)

    def __init__(self) -> None:
        CATXaresEncoder.__init__(self, folder, **options)

    return type(name, (CATXaresEncoder,), {"__init__": __init__, "__doc__": f"CAT encoder of {folder} for X-ARES."})


__all__ = ["CATXaresEncoder", "encoder_class"]
