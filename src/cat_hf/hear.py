"""The HEAR API (https://hearbenchmark.com/hear-api.html) for CAT models: no user code needed.

    hear-validator cat_hf.hear -m MODEL_FOLDER
    python -m heareval.embeddings.runner cat_hf.hear --model MODEL_FOLDER --tasks-dir TASKS

`load_model(folder)` loads any CAT model folder (encoder, classifier or pretraining checkpoint with its feature
extractor). Scene embeddings are the clip embeddings of `cat_hf.embeddings` (the config's pooling: CLS by
default); timestamp embeddings are frame embeddings every 40 ms by default (HEAR asks for at most 50 ms; four
shifted passes of the 160 ms patch grid), centred in their patches, none past the end of the audio. Keyword
arguments of `load_model` choose other settings, e.g. `load_model(folder, hop_ms=160, layer=[-1, -2])`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .embeddings import CATEmbedder

#: Hop of the timestamp embeddings unless `load_model(..., hop_ms=...)` says otherwise (HEAR suggests <= 50 ms).
DEFAULT_HOP_MS = 40.0


class CATHearModel(torch.nn.Module):
    """What `load_model` returns: a torch module (so that `.to(device)` moves the encoder) with HEAR's attributes
    `sample_rate`, `scene_embedding_size` and `timestamp_embedding_size`, and the `embedder` doing the work."""

    def __init__(self, embedder: CATEmbedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.encoder = embedder.model  # registered, so that HEAR's model.to(device) moves it
        self.sample_rate = int(embedder.sampling_rate)
        self.scene_embedding_size = int(embedder.clip_embedding_size)
        self.timestamp_embedding_size = int(embedder.frame_embedding_size)


def load_model(model_file_path: str = "", **kwargs: Any) -> CATHearModel:
    """Loads the CAT model folder `model_file_path`; `kwargs` are `CATEmbedder` options (and `device`, `dtype`)."""
    if not model_file_path:
        raise ValueError(
            "cat_hf.hear needs a CAT model folder: hear-validator cat_hf.hear -m FOLDER (a folder written by "
            "save_pretrained, with its preprocessor_config.json)."
        )
    if not os.path.isdir(model_file_path) and os.path.exists(model_file_path):
        raise ValueError(
            f"{model_file_path} is a file; cat_hf.hear loads a CAT model folder (config.json, model.safetensors and "
            "preprocessor_config.json), e.g. one written by `cat-hf finetune` or `cat-hf convert`."
        )
    kwargs.setdefault("hop_ms", DEFAULT_HOP_MS)
    return CATHearModel(CATEmbedder.from_pretrained(model_file_path, **kwargs))


def get_timestamp_embeddings(audio: torch.Tensor, model: CATHearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (n_sounds, n_timestamps, timestamp_embedding_size) float32, timestamps (n_sounds,
    n_timestamps) in ms) of `audio` (n_sounds, n_samples) at `model.sample_rate`, on the audio's device."""
    _check_model(model)
    frames = model.embedder.frame_embeddings(audio, sampling_rate=model.sample_rate)
    device = audio.device if isinstance(audio, torch.Tensor) else torch.device("cpu")
    return frames.embeddings.to(device), frames.timestamps.to(device)


def get_scene_embeddings(audio: torch.Tensor, model: CATHearModel) -> torch.Tensor:
    """(n_sounds, scene_embedding_size) float32 embeddings of `audio` (n_sounds, n_samples), on its device."""
    _check_model(model)
    embeddings = model.embedder.clip_embeddings(audio, sampling_rate=model.sample_rate)
    return embeddings.to(audio.device if isinstance(audio, torch.Tensor) else torch.device("cpu"))


def _check_model(model: Any) -> None:
    if not isinstance(model, CATHearModel):
        raise ValueError(
            f"model is a {type(model).__name__}; pass the object that cat_hf.hear.load_model(folder) returned."
        )


__all__ = ["CATHearModel", "DEFAULT_HOP_MS", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]
