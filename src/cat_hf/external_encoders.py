"""Frozen external encoders that give the targets of Representation Regularization (RR).

During pretraining the CAT student's CLS token goes through a linear projector and is regressed onto one
pooled embedding per clip from a frozen "teacher" encoder (LAION-CLAP, AST, BEATs, ... in the paper). This
module gives every such teacher one small interface, `ExternalEncoder`:

- `encoder(waveforms, indices=...)` -> float32 tensor (B, embedding_dim) on `encoder.device`, computed under
  `torch.no_grad()` with the teacher frozen in eval mode. Waveforms are 16 kHz mono clips (a list of 1-D
  arrays or a (B, N) tensor); a teacher that runs at another rate gets them resampled automatically.
- `embedding_dim`, `sampling_rate` (the rate the teacher itself runs at), `name`, `requires_audio`,
  `.to(device)`, and `check_embedding_dim(expected)` to compare with the student's RR projector.

Implementations: `PrecomputedEmbeddings` (a dataset column or a cache written by `cat-hf embed`, looked up
by example index), `TransformersAudioEncoder` (AST, CLAP, Whisper, wav2vec2 / HuBERT / data2vec-audio,
another CAT), `CallableEncoder` (any Python function). `build_external_encoder(spec)` builds one from
the string / dict specs used in the YAML recipes.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from .audio import check_mono_clip
from .embedding_cache import EmbeddingCache
from .teachers import TEACHERS, load_embedder, teacher_names


logger = logging.getLogger(__name__)

#: Sampling rate of the waveforms the CAT pipeline hands to external encoders.
INPUT_SAMPLING_RATE = 16000

#: Name of the CAT config field that must equal the external encoder's embedding size.
RR_EMBEDDING_DIM_FIELD = "rr_embedding_dim"

Waveforms = Sequence[np.ndarray] | Sequence[torch.Tensor] | np.ndarray | torch.Tensor


class EmbeddingDimMismatchError(ValueError):
    """The external encoder's embedding size differs from the size the student's RR projector outputs."""


def _resample(array: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    # One resampler for the whole project (soxr based); imported lazily to keep this module light.
    from .feature_extraction_cat import resample_audio

    return np.asarray(resample_audio(array, orig_sr, target_sr), dtype=np.float32)


def _as_waveform_list(waveforms: Waveforms) -> list[np.ndarray]:
    """Normalises a batch of mono clips to a list of contiguous 1-D float32 numpy arrays."""
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        if waveforms.ndim == 1:
            raise ValueError(
                f"Expected a batch of waveforms but got a 1-D array of shape {tuple(waveforms.shape)}; "
                "wrap a single clip in a list ([clip]) or add a batch dimension (clip[None])."
            )
        if waveforms.ndim != 2:
            raise ValueError(
                f"A waveform batch tensor must be (batch, samples), got shape {tuple(waveforms.shape)}; "
                "mix multi-channel audio down to mono first."
            )
    clips = []
    for i, clip in enumerate(waveforms):
        if isinstance(clip, torch.Tensor):
            clip = clip.detach().to("cpu", torch.float32).numpy()
        clips.append(np.ascontiguousarray(check_mono_clip(np.asarray(clip, dtype=np.float32), f"waveform {i}")))
    if not clips:
        raise ValueError("Got an empty batch of waveforms; pass at least one clip.")
    return clips


@contextlib.contextmanager
def _fixed_numpy_seed(seed: int = 0):
    """Some feature extractors (CLAP's `fusion`/`rand_trunc`) crop with the global numpy RNG; pin it so a
    clip always maps to the same embedding, then restore the caller's RNG state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class ExternalEncoder(abc.ABC):
    """A frozen encoder mapping 16 kHz clips (or example indices) to one embedding per clip.

    Subclasses set `name`, `embedding_dim` and `sampling_rate` and implement `_encode`.
    """

    name: str
    embedding_dim: int
    #: Rate the encoder itself runs at; 16 kHz input is resampled to it automatically.
    sampling_rate: int = INPUT_SAMPLING_RATE
    #: False for lookups of precomputed embeddings (no audio needed, only example indices).
    requires_audio: bool = True

    def __init__(self) -> None:
        self._device = torch.device("cpu")
        self._resample_logged: set[tuple[int, int]] = set()

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> ExternalEncoder:
        """Moves the encoder (and where its outputs land) to `device`; returns self."""
        self._device = torch.device(device)
        return self

    def eval(self) -> ExternalEncoder:
        """External encoders are always in eval mode; present so they can stand in for an nn.Module."""
        return self

    def check_embedding_dim(self, expected: int | None, *, field: str = RR_EMBEDDING_DIM_FIELD) -> None:
        """Raises `EmbeddingDimMismatchError` naming both sizes and the config field when they differ."""
        if expected is None:
            raise EmbeddingDimMismatchError(
                f"The model has no Representation Regularization projector ({field}=None) but an external "
                f"encoder {self.name!r} ({self.embedding_dim}-d) was given; set `{field}: {self.embedding_dim}` "
                f"in the model config (cat-hf pretrain: --set model.{field}={self.embedding_dim}), or drop the "
                "external encoder."
            )
        if int(expected) != int(self.embedding_dim):
            raise EmbeddingDimMismatchError(
                f"External encoder {self.name!r} gives {self.embedding_dim}-d embeddings but the student's RR "
                f"projector outputs {expected}-d vectors; set `{field}: {self.embedding_dim}` in the model "
                f"config (cat-hf pretrain: --set model.{field}={self.embedding_dim}), or choose an encoder whose "
                f"embeddings are {expected}-d."
            )

    def prepare(self, waveforms: Waveforms, sampling_rate: int = INPUT_SAMPLING_RATE) -> list[np.ndarray]:
        """Validates a batch and resamples it to the encoder's own rate (logged once per rate pair)."""
        clips = _as_waveform_list(waveforms)
        if int(sampling_rate) != int(self.sampling_rate):
            key = (int(sampling_rate), int(self.sampling_rate))
            if key not in self._resample_logged:
                self._resample_logged.add(key)
                logger.warning(
                    "External encoder %r runs at %d Hz; resampling its %d Hz input automatically.",
                    self.name, self.sampling_rate, sampling_rate,
                )
            clips = [_resample(clip, sampling_rate, self.sampling_rate) for clip in clips]
        return clips

    def __call__(
        self,
        waveforms: Waveforms | None = None,
        *,
        indices: Sequence[int] | torch.Tensor | np.ndarray | None = None,
        sampling_rate: int = INPUT_SAMPLING_RATE,
    ) -> torch.Tensor:
        """Embeds a batch: `waveforms` at `sampling_rate` (default 16 kHz) and/or dataset `indices`.

        Returns a float32 tensor (B, embedding_dim) on `self.device`, without gradient.
        """
        with torch.no_grad():
            if self.requires_audio:
                if waveforms is None:
                    raise ValueError(f"External encoder {self.name!r} needs the waveforms of the batch; pass them.")
                clips = self.prepare(waveforms, sampling_rate)
                batch_size = len(clips)
                out = self._encode(clips)
            else:
                if indices is None:
                    raise ValueError(
                        f"External encoder {self.name!r} looks embeddings up by example index; pass "
                        "indices=<the dataset indices of the batch>."
                    )
                indices = _as_index_list(indices)
                batch_size = len(indices)
                out = self._lookup(indices)
            out = self._check_output(out, batch_size)
        return out.to(self._device)

    def _check_output(self, out: Any, batch_size: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        out = out.detach().to(torch.float32)
        if out.ndim != 2 or out.shape[0] != batch_size or out.shape[1] != self.embedding_dim:
            raise ValueError(
                f"External encoder {self.name!r} returned shape {tuple(out.shape)} for a batch of {batch_size} "
                f"clips, expected ({batch_size}, {self.embedding_dim}); fix the encoder or its declared "
                f"embedding_dim (now {self.embedding_dim})."
            )
        if not torch.isfinite(out).all():
            raise ValueError(
                f"External encoder {self.name!r} produced NaN/inf embeddings; check its input audio and dtype "
                "(half precision can overflow: try dtype=float32)."
            )
        return out

    def _encode(self, clips: list[np.ndarray]) -> torch.Tensor:  # pragma: no cover - abstract for audio encoders
        raise NotImplementedError

    def _lookup(self, indices: list[int]) -> torch.Tensor:  # pragma: no cover - only for precomputed encoders
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, embedding_dim={self.embedding_dim}, "
            f"sampling_rate={self.sampling_rate}, device={str(self._device)!r})"
        )


def _as_index_list(indices: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().reshape(-1).tolist()
    elif isinstance(indices, np.ndarray):
        indices = indices.reshape(-1).tolist()
    return [int(i) for i in indices]


# ---------------------------------------------------------------------------------------------------------
# (a) precomputed embeddings
# ---------------------------------------------------------------------------------------------------------


class PrecomputedEmbeddings(ExternalEncoder):
    """Embeddings computed beforehand, looked up by example index (no audio, no teacher at train time).

    `column_or_cache` is one of:
    - an `EmbeddingCache`, or the folder of one written by `cat-hf embed`; with `dataset` given, the cache
      must have been computed for that corpus (fingerprint check);
    - the name of a column of `dataset` holding one vector per row (read by rows at lookup time);
    - an array-like of shape (num_examples, D): a tensor, a numpy array, or a loaded dataset column.
    """

    requires_audio = False

    def __init__(self, column_or_cache: Any, *, dataset: Any = None, name: str | None = None) -> None:
        super().__init__()
        self._cache: EmbeddingCache | None = None
        self._table: Any = None
        self._rows: Any = None
        self._column: str | None = None
        if isinstance(column_or_cache, (str, os.PathLike)):
            columns = getattr(dataset, "column_names", None) or []
            if isinstance(column_or_cache, str) and column_or_cache in columns:
                self._init_column(dataset, column_or_cache)
                self.name = name or self.name
                return
            if not Path(column_or_cache).is_dir():
                what = f"a column of the dataset (columns: {columns}) nor " if dataset is not None else ""
                raise ValueError(
                    f"{str(column_or_cache)!r} is neither {what}an embedding cache folder; compute one with "
                    "`cat-hf embed CORPUS --encoder SPEC --output-dir FOLDER`."
                )
            column_or_cache = EmbeddingCache(column_or_cache, corpus=dataset)
        if isinstance(column_or_cache, EmbeddingCache):
            self._cache = column_or_cache
            self.embedding_dim = column_or_cache.dim
            self.sampling_rate = column_or_cache.sampling_rate
            self.name = name or f"cache:{column_or_cache.encoder_name}"
            self._length = len(column_or_cache)
            return
        table = column_or_cache
        if isinstance(table, (np.ndarray, torch.Tensor)):
            table = torch.as_tensor(table).to(torch.float32)
            if table.ndim != 2:
                raise ValueError(f"Precomputed embeddings must be (num_examples, dim), got shape {tuple(table.shape)}.")
        if len(table) == 0:
            raise ValueError("The precomputed embeddings are empty; compute them first (cat-hf embed).")
        first = np.asarray(table[0], dtype=np.float32)
        if first.ndim != 1:
            raise ValueError(f"Each precomputed embedding must be a 1-D vector, got shape {first.shape} for example 0.")
        self._table = table
        self.embedding_dim = int(first.shape[0])
        self.name = name or "precomputed"
        self._length = len(table)

    @classmethod
    def from_column(cls, dataset: Any, column: str) -> PrecomputedEmbeddings:
        """Embeddings stored in `dataset[column]`, read by rows at lookup time (never the whole column)."""
        names = getattr(dataset, "column_names", None) or []
        if column not in names:
            raise ValueError(
                f"The dataset has no column {column!r} (columns: {names}); compute embeddings with `cat-hf embed` "
                "and use `cache:<folder>`, or add the column to the dataset."
            )
        return cls(column, dataset=dataset)

    def _init_column(self, dataset: Any, column: str) -> None:
        if len(dataset) == 0:
            raise ValueError("The dataset is empty; it cannot hold precomputed embeddings.")
        self._rows = dataset.select_columns([column]).with_format("numpy")
        self._column = column
        first = np.asarray(self._rows[0][column], dtype=np.float32)
        if first.ndim != 1:
            raise ValueError(f"Column {column!r} must hold 1-D embedding vectors, got shape {first.shape} in row 0.")
        self.embedding_dim = int(first.shape[0])
        self.name = f"column:{column}"
        self._length = len(dataset)

    def __len__(self) -> int:
        return self._length

    def _lookup(self, indices: list[int]) -> torch.Tensor:
        for i in indices:
            if not 0 <= i < self._length:
                raise IndexError(
                    f"Example index {i} is outside the {self._length} precomputed embeddings of {self.name!r}; "
                    "the cache or column was computed for another corpus."
                )
        if self._cache is not None:
            return self._cache.get_batch(indices)
        if self._rows is not None:
            rows = self._rows[indices][self._column]
            return torch.as_tensor(np.stack([np.asarray(r, dtype=np.float32) for r in rows]))
        if isinstance(self._table, torch.Tensor):
            return self._table[torch.as_tensor(indices, dtype=torch.long)]
        return torch.as_tensor(np.stack([np.asarray(self._table[i], dtype=np.float32) for i in indices]))


# ---------------------------------------------------------------------------------------------------------
# (b) transformers audio models
# ---------------------------------------------------------------------------------------------------------

# model_type -> family (how the model is fed and pooled).
_MODEL_FAMILIES: dict[str, str] = {
    "audio-spectrogram-transformer": "ast",
    "clap": "clap",
    "whisper": "whisper",
    "wav2vec2": "wav2vec2",
    "hubert": "wav2vec2",
    "data2vec-audio": "wav2vec2",
    "cat": "cat",
}

# family -> allowed poolings, the first one is the default ("auto").
_POOLINGS: dict[str, tuple[str, ...]] = {
    "ast": ("pooler", "mean", "cls", "logits"),
    "clap": ("projection",),
    "whisper": ("mean", "logits"),
    "wav2vec2": ("mean", "logits"),
    "cat": ("pooler", "cls", "mean", "logits"),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_MODEL_FAMILIES))

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


class TransformersAudioEncoder(ExternalEncoder):
    """Any supported transformers audio model (hub name or local folder), frozen, with its own feature
    extractor at its own sampling rate, pooled to one vector per clip.

    Pooling per model type (`pooling="auto"` picks the first):
    - AST: "pooler" (mean of the two CLS tokens, 768-d for base), "mean" (all tokens), "cls", "logits".
    - CLAP: "projection": `ClapModel.get_audio_features`, the L2-normalised projected audio embedding.
    - Whisper: "mean" of the encoder frames that hold real audio (not the 30 s padding), "logits".
    - wav2vec2 / HuBERT / data2vec-audio: "mean" of the last hidden state over unpadded frames, "logits".
    - CAT: "pooler" (pooler_output), "cls", "mean" (patch tokens), "logits".
    "logits" loads the checkpoint's audio classification head (e.g. AST's 527 AudioSet logits).
    `layer` (an index into the model's `hidden_states`, 0 = embeddings, negative allowed) replaces the last
    hidden state for the "mean" / "cls" poolings; note that in transformers the last entry of
    `hidden_states` may precede the model's final LayerNorm, unlike `last_hidden_state`.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        pooling: str = "auto",
        layer: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = torch.float32,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoFeatureExtractor

        self.name_or_path = str(name_or_path)
        self.dtype = _resolve_dtype(dtype)
        try:
            config = AutoConfig.from_pretrained(self.name_or_path, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise ValueError(
                f"Cannot load the external encoder {self.name_or_path!r}: it is neither a local model folder with a "
                f"config.json nor a reachable Hub model ({err}). Check the path, or download the model first."
            ) from err
        model_type = getattr(config, "model_type", None)
        if model_type not in _MODEL_FAMILIES:
            raise ValueError(
                f"{self.name_or_path!r} is a {model_type!r} model, which TransformersAudioEncoder does not support; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. Wrap other models with "
                "CallableEncoder (spec 'python:module:function')."
            )
        self.model_type = model_type
        self.family = _MODEL_FAMILIES[model_type]
        allowed = _POOLINGS[self.family]
        self.pooling = allowed[0] if pooling in (None, "auto") else pooling
        if self.pooling not in allowed:
            raise ValueError(
                f"pooling={pooling!r} is not available for {model_type!r} models; use one of {('auto',) + allowed}."
            )
        if layer is not None and self.pooling not in ("mean", "cls"):
            raise ValueError(
                f"layer={layer} only applies to the 'mean'/'cls' poolings, not {self.pooling!r}; drop `layer` or "
                "change `pooling`."
            )
        self.layer = layer

        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(
                self.name_or_path, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load a feature extractor for {self.name_or_path!r} ({err}); save the model's "
                "feature extractor next to it (feature_extractor.save_pretrained(folder))."
            ) from err
        self.sampling_rate = int(self.feature_extractor.sampling_rate)

        self.model = self._load_model(trust_remote_code)
        self.model.eval()
        self.model.requires_grad_(False)
        self.config = self.model.config
        self.embedding_dim = self._infer_embedding_dim()
        suffix = f":{self.pooling}" + (f":layer{self.layer}" if self.layer is not None else "")
        self.name = f"hf:{self.name_or_path}{suffix}"
        self.to(device)
        if self.layer is not None:
            num_states = self._num_hidden_states()
            if not -num_states <= self.layer < num_states:
                raise ValueError(
                    f"layer={self.layer} is out of range for {self.name_or_path!r}, which has {num_states} hidden "
                    f"states (0 = embeddings ... {num_states - 1} = last layer)."
                )

    # -- loading ---------------------------------------------------------------------------------------------

    def _load_model(self, trust_remote_code: bool) -> torch.nn.Module:
        from transformers import AutoModel, AutoModelForAudioClassification

        kwargs = {"dtype": self.dtype, "trust_remote_code": trust_remote_code}
        if self.pooling == "logits":
            try:
                model = AutoModelForAudioClassification.from_pretrained(self.name_or_path, **kwargs)
            except ValueError as err:
                raise ValueError(
                    f"pooling='logits' needs an audio classification head, which {self.model_type!r} models do not "
                    f"have in transformers ({err}); use another pooling."
                ) from err
            return model
        model = AutoModel.from_pretrained(self.name_or_path, **kwargs)
        if self.family == "whisper":
            model = model.get_encoder()  # the decoder is never needed for an audio embedding
        return model

    def _infer_embedding_dim(self) -> int:
        config = self.config
        if self.pooling == "logits":
            return int(config.num_labels)
        if self.family == "clap":
            return int(config.projection_dim)
        if self.family == "whisper":
            return int(config.d_model)
        return int(config.hidden_size)

    def _num_hidden_states(self) -> int:
        config = self.config
        layers = getattr(config, "encoder_layers", None) if self.family == "whisper" else None
        if layers is None:
            layers = config.num_hidden_layers
        return int(layers) + 1

    def to(self, device: str | torch.device) -> TransformersAudioEncoder:
        super().to(device)
        self.model.to(self._device)
        return self

    # -- encoding --------------------------------------------------------------------------------------------

    def _inputs(self, clips: list[np.ndarray], **kwargs: Any) -> dict[str, torch.Tensor]:
        features = self.feature_extractor(clips, sampling_rate=self.sampling_rate, return_tensors="pt", **kwargs)
        inputs = {}
        for key, value in features.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(self._device)
            inputs[key] = value.to(self.dtype) if value.is_floating_point() else value
        return inputs

    def _hidden(self, outputs: Any) -> torch.Tensor:
        if self.layer is None:
            return outputs.last_hidden_state
        return outputs.hidden_states[self.layer]

    def _encode(self, clips: list[np.ndarray]) -> torch.Tensor:
        return getattr(self, f"_encode_{self.family}")(clips)

    def _encode_ast(self, clips: list[np.ndarray]) -> torch.Tensor:
        inputs = self._inputs(clips)
        if self.pooling == "logits":
            return self.model(input_values=inputs["input_values"]).logits
        outputs = self.model(input_values=inputs["input_values"], output_hidden_states=self.layer is not None)
        if self.pooling == "pooler":
            return outputs.pooler_output
        hidden = self._hidden(outputs)
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)

    def _encode_clap(self, clips: list[np.ndarray]) -> torch.Tensor:
        # The fused checkpoints take 4 stacked mel crops ("fusion"), the unfused ones a single mel ("rand_trunc").
        fusion = bool(getattr(self.config.audio_config, "enable_fusion", False))
        features, is_longer = [], []
        for clip in clips:
            # Clips longer than the extractor's window are cropped with numpy's global RNG: a fixed seed per
            # clip keeps every clip's embedding the same whatever batch it comes in.
            with _fixed_numpy_seed():
                inputs = self._inputs([clip], truncation="fusion" if fusion else "rand_trunc")
            features.append(inputs["input_features"])
            is_longer.append(inputs["is_longer"])
        outputs = self.model.get_audio_features(
            input_features=torch.cat(features), is_longer=torch.cat(is_longer) if fusion else None
        )
        # transformers 5.x returns a BaseModelOutputWithPooling whose pooler_output is the normalised projection.
        return outputs.pooler_output if not isinstance(outputs, torch.Tensor) else outputs

    def _encode_whisper(self, clips: list[np.ndarray]) -> torch.Tensor:
        inputs = self._inputs(clips, return_attention_mask=True)
        features = inputs["input_features"]
        if self.pooling == "logits":
            return self.model(input_features=features).logits
        outputs = self.model(input_features=features, output_hidden_states=self.layer is not None)
        hidden = self._hidden(outputs)
        # Whisper pads every clip to 30 s; its two convolutions halve the mel frame rate (stride 2, padding 1),
        # so encoder frame j sees mel frames 2j-1..2j+1: a clip with m real mel frames fills ceil(m / 2) frames.
        mel_frames = inputs["attention_mask"].sum(dim=-1)
        valid = ((mel_frames + 1) // 2).clamp(min=1, max=hidden.shape[1])
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < valid[:, None]
        return _masked_mean(hidden, mask)

    def _encode_wav2vec2(self, clips: list[np.ndarray]) -> torch.Tensor:
        use_mask = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        # Padding is invisible only with an attention mask and a single positional conv whose input is zeroed
        # at padded frames. Checkpoints trained without masks (group-norm feature encoders, e.g. wav2vec2-base)
        # and data2vec-audio (5 stacked positional convs that spread padding into the clip) get pad-free
        # batches instead: clips of equal length together, so batching never changes a clip's embedding.
        if (not use_mask or self.model_type == "data2vec-audio") and len({len(c) for c in clips}) > 1:
            return _encode_by_length(clips, self._encode_wav2vec2)
        inputs = self._inputs(clips, padding=True, return_attention_mask=use_mask)
        attention_mask = inputs.get("attention_mask")
        if self.pooling == "logits":
            return self.model(input_values=inputs["input_values"], attention_mask=attention_mask).logits
        outputs = self.model(
            input_values=inputs["input_values"], attention_mask=attention_mask,
            output_hidden_states=self.layer is not None,
        )
        hidden = self._hidden(outputs)
        if attention_mask is None:
            return hidden.mean(dim=1)
        frame_mask = self.model._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
        return _masked_mean(hidden, frame_mask)

    def _encode_cat(self, clips: list[np.ndarray]) -> torch.Tensor:
        inputs = self._inputs(clips)
        model_inputs = {"input_values": inputs["input_values"]}
        if "attention_mask" in inputs:
            model_inputs["attention_mask"] = inputs["attention_mask"]
        if self.pooling == "logits":
            return self.model(**model_inputs).logits
        outputs = self.model(**model_inputs, output_hidden_states=self.layer is not None)
        if self.pooling == "pooler":
            return outputs.pooler_output
        hidden = self._hidden(outputs)
        if self.pooling == "cls":
            return hidden[:, 0]
        extra = int(getattr(self.config, "num_extra_tokens", 1))
        padding = getattr(outputs, "token_padding_mask", None)
        if padding is None:
            return hidden[:, extra:].mean(dim=1)
        return _masked_mean(hidden[:, extra:], ~padding[:, extra:])


def _encode_by_length(clips: list[np.ndarray], encode: Callable[[list[np.ndarray]], torch.Tensor]) -> torch.Tensor:
    """Encodes groups of equal-length clips (no padding) and puts the rows back in input order."""
    groups: dict[int, list[int]] = {}
    for i, clip in enumerate(clips):
        groups.setdefault(len(clip), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(clips)
    for members in groups.values():
        out = encode([clips[i] for i in members])
        for i, row in zip(members, out):
            rows[i] = row
    return torch.stack(rows)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------
# (c) any Python callable
# ---------------------------------------------------------------------------------------------------------


class CallableEncoder(ExternalEncoder):
    """Wraps a Python callable `fn(batch) -> (B, embedding_dim)` as a frozen external encoder.

    `fn` receives the clips resampled to `sampling_rate`: a list of 1-D float32 numpy arrays
    (`input_format="list"`), or a zero-padded (B, N) float32 tensor on the encoder's device
    (`input_format="tensor"`). It may return a numpy array or a tensor. An `nn.Module` is put in eval
    mode, frozen and moved with `.to(device)`.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        embedding_dim: int,
        sampling_rate: int = INPUT_SAMPLING_RATE,
        name: str | None = None,
        *,
        input_format: str = "list",
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableEncoder needs a callable, got {type(fn).__name__}.")
        if int(embedding_dim) <= 0:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim}.")
        if input_format not in ("list", "tensor"):
            raise ValueError(f"input_format must be 'list' or 'tensor', got {input_format!r}.")
        self.fn = fn
        self.embedding_dim = int(embedding_dim)
        self.sampling_rate = int(sampling_rate)
        self.input_format = input_format
        self.name = name or f"python:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        if isinstance(fn, torch.nn.Module):
            fn.eval()
            fn.requires_grad_(False)

    def to(self, device: str | torch.device) -> CallableEncoder:
        super().to(device)
        if isinstance(self.fn, torch.nn.Module):
            self.fn.to(self._device)
        return self

    def _encode(self, clips: list[np.ndarray]) -> Any:
        if self.input_format == "tensor":
            batch = torch.zeros(len(clips), max(len(c) for c in clips), dtype=torch.float32)
            for i, clip in enumerate(clips):
                batch[i, : len(clip)] = torch.from_numpy(clip)
            return self.fn(batch.to(self._device))
        return self.fn(clips)


class StandardisedEmbeddings(ExternalEncoder):
    """Precomputed embeddings shifted and scaled per dimension to mean 0 and standard deviation 1 over the corpus.

    A teacher's raw embedding can be dominated by an offset shared by every clip (aisfx: 87 % of the energy) or have
    a tiny scale (Resemblyzer's unit vectors: variance 0.0016 per dimension); standardised, every teacher and every
    part of a concatenation of teachers weighs the same in an MSE, and the RR weight means the same for all.
    """

    requires_audio = False

    def __init__(self, base: PrecomputedEmbeddings, rows: Sequence[int], batch_size: int = 4096):
        super().__init__()
        if base.requires_audio:
            raise ValueError("StandardisedEmbeddings needs precomputed embeddings (rows looked up by index).")
        rows = list(rows)
        if len(rows) < 2:
            raise ValueError("Standardising RR targets needs at least two embedded clips.")
        total = torch.zeros(base.embedding_dim, dtype=torch.float64)
        square = torch.zeros(base.embedding_dim, dtype=torch.float64)
        for first in range(0, len(rows), batch_size):
            chunk = base(indices=rows[first:first + batch_size]).double().cpu()
            total += chunk.sum(0)
            square += chunk.square().sum(0)
        self.mean = (total / len(rows)).float()
        self.std = (square / len(rows) - (total / len(rows)).square()).clamp_min(0).sqrt().float().clamp_min(1e-6)
        self.base = base
        self.name = f"{base.name} (standardised)"
        self.embedding_dim = base.embedding_dim
        self.sampling_rate = base.sampling_rate

    def to(self, device: str | torch.device) -> StandardisedEmbeddings:
        super().to(device)
        self.base.to(device)
        return self

    def _lookup(self, indices: list[int]) -> torch.Tensor:
        return (self.base(indices=indices).cpu() - self.mean) / self.std


# ---------------------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------------------

_SPEC_HELP = (
    f"use a shipped teacher ({', '.join(sorted(TEACHERS))}, or several joined by '+'), "
    "'hf:<hub name or folder>', 'cache:<folder written by cat-hf embed>', 'column:<dataset column>' or "
    "'python:<module or file.py>:<function, ExternalEncoder instance or class>' (options as '?key=value&...', "
    "e.g. 'hf:MODEL?pooling=mean&layer=6'), "
    "or a dict with `type` set to one of teacher/hf/cache/column/python"
)

_SPEC_TYPES = ("teacher", "hf", "cache", "column", "python")


def parse_encoder_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turns a string spec ("hf:NAME?pooling=mean") or a dict spec into a dict with a `type` key."""
    if isinstance(spec, Mapping):
        out = dict(spec)
        if out.get("type") not in _SPEC_TYPES:
            raise ValueError(f"Encoder spec {dict(spec)!r} has no valid `type`; {_SPEC_HELP}.")
        return out
    if teacher_names(spec) is not None:
        return {"type": "teacher", "name": spec}
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"Cannot read external encoder spec {spec!r}; {_SPEC_HELP}.")
    kind, _, rest = spec.partition(":")
    if kind not in _SPEC_TYPES:
        raise ValueError(f"Unknown external encoder kind {kind!r} in {spec!r}; {_SPEC_HELP}.")
    target, _, query = rest.partition("?")
    if not target:
        raise ValueError(f"External encoder spec {spec!r} names nothing after '{kind}:'; {_SPEC_HELP}.")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        options[key] = _parse_option_value(value)
    field = {"teacher": "name", "hf": "name_or_path", "cache": "path", "column": "column", "python": "target"}[kind]
    return {"type": kind, field: target, **options}


def _parse_option_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _import_target(target: str) -> Any:
    """Resolves 'package.module:attr' or '/path/to/file.py:attr'."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"Python encoder target {target!r} must be 'module:function' or '/path/file.py:function'."
        )
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ValueError(f"Python encoder file {str(path)!r} does not exist; fix the path in the encoder spec.")
        digest = hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:16]
        unique = f"_cat_hf_external_encoder_{digest}"
        module = sys.modules.get(unique)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(
                f"Cannot import {module_name!r} for the Python encoder {target!r} ({err}); install it or put it "
                "on PYTHONPATH."
            ) from err
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise ValueError(f"{module_name!r} has no attribute {attr!r} (Python encoder {target!r}).") from err
    return obj


def build_external_encoder(
    spec: str | Mapping[str, Any] | ExternalEncoder,
    *,
    dataset: Any = None,
    device: str | torch.device | None = None,
) -> ExternalEncoder:
    """Builds an external encoder from a spec (see `parse_encoder_spec`).

    `dataset` is needed by 'column:' specs and, for 'cache:' specs, lets the cache verify it was computed
    for this corpus. `device` overrides the spec's device.
    """
    if isinstance(spec, ExternalEncoder):
        return spec.to(device) if device is not None else spec
    options = parse_encoder_spec(spec)
    kind = options.pop("type")
    if device is not None:
        options["device"] = device
    device = options.pop("device", None)
    label = spec if isinstance(spec, str) else None

    def unexpected(allowed: tuple[str, ...]) -> None:
        extra = sorted(set(options) - set(allowed))
        if extra:
            raise ValueError(f"Unknown option(s) {extra} for a '{kind}' encoder spec; allowed: {sorted(allowed)}.")

    if kind == "teacher":
        unexpected(("name", "pretrained", "download"))
        embedder = load_embedder(options.pop("name"), **options)
        encoder = CallableEncoder(embedder, embedder.embedding_dim, embedder.sampling_rate, name=embedder.name)
    elif kind == "hf":
        unexpected(("name_or_path", "pooling", "layer", "dtype", "trust_remote_code"))
        encoder: ExternalEncoder = TransformersAudioEncoder(
            options.pop("name_or_path"), device=device or "cpu", **options
        )
    elif kind == "cache":
        unexpected(("path", "name"))
        encoder = PrecomputedEmbeddings(EmbeddingCache(options["path"], corpus=dataset), name=options.get("name"))
    elif kind == "column":
        unexpected(("column",))
        if dataset is None:
            raise ValueError(
                f"Encoder spec 'column:{options['column']}' reads a dataset column, but no dataset was given; "
                "pass dataset=<the training dataset> to build_external_encoder."
            )
        encoder = PrecomputedEmbeddings.from_column(dataset, options["column"])
    else:
        target = options.pop("target")
        obj = _import_target(target)
        if isinstance(obj, ExternalEncoder):
            unexpected(())
            encoder = obj
        elif isinstance(obj, type) and issubclass(obj, ExternalEncoder):
            encoder = obj(**options)  # an encoder class, built with the spec's options
        else:
            unexpected(("embedding_dim", "sampling_rate", "name", "input_format"))
            embedding_dim = options.pop("embedding_dim", None) or getattr(obj, "embedding_dim", None)
            if embedding_dim is None:
                raise ValueError(
                    f"Python encoder {target!r} does not say its embedding size; add '?embedding_dim=D' to the "
                    f"spec, set `embedding_dim: D` in the dict spec, or give the function an `embedding_dim` "
                    "attribute."
                )
            sampling_rate = options.pop("sampling_rate", None) or getattr(obj, "sampling_rate", INPUT_SAMPLING_RATE)
            encoder = CallableEncoder(
                obj, int(embedding_dim), int(sampling_rate), name=options.pop("name", None) or label or f"python:{target}",
                **options,
            )
    if device is not None:
        encoder.to(device)
    return encoder


__all__ = [
    "INPUT_SAMPLING_RATE",
    "RR_EMBEDDING_DIM_FIELD",
    "SUPPORTED_MODEL_TYPES",
    "CallableEncoder",
    "EmbeddingDimMismatchError",
    "ExternalEncoder",
    "PrecomputedEmbeddings",
    "StandardisedEmbeddings",
    "TransformersAudioEncoder",
    "build_external_encoder",
    "parse_encoder_spec",
]
