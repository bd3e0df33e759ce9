"""Clip and frame embeddings of a CAT encoder, from raw waveforms of any length.

    embedder = CATEmbedder.from_pretrained("my-cat-model")            # or CATEmbedder(model, feature_extractor)
    clips = embedder.clip_embeddings(audio, sampling_rate=16000)     # (B, D)
    frames = embedder.frame_embeddings(audio, sampling_rate=16000)   # .embeddings (B, T', D), .timestamps (B, T') ms

`audio` is a list of 1-D waveforms, a (B, T) tensor or array (B clips), or one 1-D waveform (B = 1), at any
sampling rate (resampled to the model's). The functional forms `clip_embeddings(model, feature_extractor, audio)`
and `frame_embeddings(...)` build an embedder for one call.

The time grid (`TimeGrid`, the one place where it is derived from the model config and the feature extractor):

- A frame embedding is one time patch of the model: `patch_size` fbank frames (16 x 10 ms), so the native hop is
  160 ms. Its frequency tokens (8 for 128 mel bins) are averaged (`frequency="mean"`) or concatenated
  (`"concat"`, 8 D).
- Half a patch of padding frames (the extractor's padded-frame value, what the model saw after short clips in
  training) is put before the clip, so that patch t is centred on its frames at `t * hop + centre_offset` ms
  (7.5 ms: the 25 ms window of a frame reaches 15 ms past its 10 ms hop). Only patches centred inside the clip
  are returned: no timestamp lies past the clip's end, and the last one is less than a hop before it.
- `hop_ms` finer than the native hop (80, 40, 20 or 10 ms) runs the clip once per sub-hop offset, shifted by
  `k * hop_ms` (whole fbank frames), and interleaves the passes: timestamps are exactly `hop_ms` apart.
- One model pass covers at most `config.max_time_patches` patches (12288 frames, 122.9 s). Longer audio goes
  through overlapping passes whose fbank frames are computed from sample ranges that start on frame boundaries,
  from the whole clip's mean-subtracted waveform: every fbank frame equals the whole clip's. Each pass keeps the
  patches nearest its centre (the overlap is split in the middle), so each patch sees at least half the overlap
  of context on both sides. `plan()` tells which passes a clip gets.
- Padded batches carry a frame attention mask: a clip gives the same rows alone and in any batch.

Clip embeddings (`pooling="cls"`: the CLS token; `"mean"`: the mean of the real patch tokens) are the model's
plain forward pass on the clip's features (the same numbers as `feature_extractor(padding="longest")` +
`model(**inputs)`); clips longer than one pass average their passes' CLS tokens (weighted by the patches each
pass keeps) or their kept patch tokens. `layer` picks a hidden state (0 = the input of the first block, -1 =
the output of the last) or averages several.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .audio import check_mono_clip
from .configuration_cat import CATConfig
from .feature_extraction_cat import (
    CATFeatureExtractor,
    _as_float32_samples,
    _frame_geometry,
    resample_audio,
)
from .modeling_cat import CATModel

logger = logging.getLogger(__name__)

Frequency = Literal["mean", "concat"]
Pooling = Literal["cls", "mean"]
AudioBatch = Any  # list of 1-D arrays/tensors, a (B, T) tensor/array, or one 1-D waveform

_FREQUENCY_MODES = ("mean", "concat")
_POOLING_MODES = ("cls", "mean")

#: Default overlap of consecutive passes over long audio, as a fraction of a pass.
DEFAULT_OVERLAP_FRACTION = 0.125


# ----------------------------------------------------------------------------------------------------------------
# The time grid
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeGrid:
    """Where a CAT model's time patches sit in the waveform (all derived from the config and the extractor).

    Attributes:
        sampling_rate: samples per second of the model's input.
        frame_shift: samples between fbank frames (160 at 16 kHz); frame_length: samples per frame (400).
        patch_frames: fbank frames per time patch (`config.patch_size`).
        max_patches: time patches of the longest single pass (`config.max_time_patches`).
    """

    sampling_rate: int
    frame_shift: int
    frame_length: int
    patch_frames: int
    max_patches: int

    @classmethod
    def of(cls, config: CATConfig, feature_extractor: CATFeatureExtractor) -> TimeGrid:
        window, shift, _ = _frame_geometry(
            feature_extractor.sampling_rate, feature_extractor.frame_length_ms, feature_extractor.frame_shift_ms
        )
        return cls(
            sampling_rate=int(feature_extractor.sampling_rate), frame_shift=shift, frame_length=window,
            patch_frames=int(config.patch_size), max_patches=int(config.max_time_patches),
        )

    @property
    def hop_ms(self) -> float:
        """Native hop between frame embeddings (160 ms): one time patch."""
        return self.patch_frames * self.frame_shift * 1000.0 / self.sampling_rate

    @property
    def pad_frames(self) -> int:
        """Padding frames before the clip (and at most after it) in frame passes: half a patch."""
        return self.patch_frames // 2

    @property
    def centre_offset_ms(self) -> float:
        """Time of the first frame embedding: the centre of patch 0's frames, half a patch of padding included."""
        return self._centre2(-self.pad_frames) * 500.0 / self.sampling_rate

    @property
    def max_pass_frames(self) -> int:
        """Fbank frames of the longest single pass (12288)."""
        return self.max_patches * self.patch_frames

    @property
    def max_pass_seconds(self) -> float:
        """Audio of the longest single pass, in seconds (122.905 s at 16 kHz)."""
        return self.samples_of_frames(self.max_pass_frames) / self.sampling_rate

    def samples_of_frames(self, frames: int) -> int:
        """Samples that `frames` consecutive fbank frames read."""
        return (frames - 1) * self.frame_shift + self.frame_length

    def _centre2(self, first_frame: int) -> int:
        """Twice the centre sample of a patch whose first frame is `first_frame` (an integer: no rounding)."""
        return 2 * first_frame * self.frame_shift + (self.patch_frames - 1) * self.frame_shift + self.frame_length

    def substeps(self, hop_ms: float | None) -> int:
        """Passes needed for `hop_ms` (1 for the native hop); it must divide the patch into whole frames."""
        if hop_ms is None:
            return 1
        allowed = [self.hop_ms / n for n in range(1, self.patch_frames + 1) if self.patch_frames % n == 0]
        for n in range(1, self.patch_frames + 1):
            if self.patch_frames % n == 0 and math.isclose(self.hop_ms / n, float(hop_ms), rel_tol=0, abs_tol=1e-9):
                return n
        raise ValueError(
            f"hop_ms={hop_ms!r} is not a hop this model can give; use one of {[f'{a:g}' for a in allowed]} "
            f"(the {self.hop_ms:g} ms patch hop divided into whole {self.frame_shift * 1000 / self.sampling_rate:g} "
            "ms frames)."
        )


# ----------------------------------------------------------------------------------------------------------------
# Outputs and plans
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FrameEmbeddings:
    """Frame embeddings of a batch of clips.

    embeddings: (B, T', D) float32; rows past `lengths[b]` (clips shorter than the batch's longest) are zero.
    timestamps: (B, T') float64, the centre of every row in milliseconds from the clip's start; NaN past
        `lengths[b]`. Real timestamps are exactly `hop_ms` apart, start at `centre_offset_ms` and end within one
        hop before the clip's end.
    lengths: (B,) int64 number of real rows of every clip.
    """

    embeddings: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def clip(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (T_b, D), timestamps (T_b,)) of clip `index`, without padding rows."""
        n = int(self.lengths[index])
        return self.embeddings[index, :n], self.timestamps[index, :n]


@dataclass(frozen=True)
class Pass:
    """One model pass over part of a clip.

    offset: sub-hop offset index k (the pass is shifted by k * hop_ms; 0 for clip embeddings).
    first_frame: clip fbank frame of the pass's first frame (negative: padding frames come first).
    num_patches: time patches of the pass.
    keep: (lo, hi) patch indices of the offset's patch sequence that this pass provides (the pass covers patches
        `first_patch .. first_patch + num_patches` of it).
    first_patch: index of the pass's first patch in its offset's patch sequence.
    """

    offset: int
    first_frame: int
    num_patches: int
    first_patch: int
    keep: tuple[int, int]


@dataclass
class _Clip:
    wave: torch.Tensor  # mono, model rate, mean-subtracted when the extractor subtracts it
    num_frames: int
    stamp_samples: int  # samples of the clip (at the model rate) inside which timestamps must lie


# ----------------------------------------------------------------------------------------------------------------
# The embedder
# ----------------------------------------------------------------------------------------------------------------


class CATEmbedder:
    """Clip and frame embeddings of a CAT encoder (see the module docstring for the time grid).

    Args:
        model: a `CATModel`, or any CAT head model (its encoder is used).
        feature_extractor: the model's `CATFeatureExtractor`.
        layer: hidden state to use: None = the last block's output, an int index into `hidden_states` (0 = the input
            of the first block, `num_hidden_layers` or -1 = the last block), or a sequence of them (averaged).
        frequency: "mean" (average the frequency tokens of a time patch, D) or "concat" (frequency order, F x D).
        pooling: clip pooling, "cls" or "mean" (of the real patch tokens). Default: the config's pooling ("mean"
            for "lin_softmax").
        hop_ms: hop of frame embeddings; None = one patch (160 ms). Finer hops cost one pass per sub-hop.
        batch_size: model passes per forward call.
        chunk_seconds: longest audio of one pass (default and maximum: `max_pass_seconds`).
        chunk_overlap_seconds: overlap of consecutive passes over longer audio (default: 1/8 of a pass).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        feature_extractor: CATFeatureExtractor,
        *,
        layer: int | Sequence[int] | None = None,
        frequency: Frequency = "mean",
        pooling: Pooling | None = None,
        hop_ms: float | None = None,
        batch_size: int = 8,
        chunk_seconds: float | None = None,
        chunk_overlap_seconds: float | None = None,
    ) -> None:
        encoder = getattr(model, "base_model", model)
        if not isinstance(encoder, CATModel):
            raise ValueError(
                f"CATEmbedder needs a CAT model (CATModel or a CAT head model), got {type(model).__name__}; load one "
                "with CATEmbedder.from_pretrained(folder)."
            )
        if not isinstance(feature_extractor, CATFeatureExtractor):
            raise ValueError(
                f"CATEmbedder needs the model's CATFeatureExtractor, got {type(feature_extractor).__name__}; load it "
                "with CATFeatureExtractor.from_pretrained(folder)."
            )
        self.model = encoder.eval()
        self.feature_extractor = feature_extractor
        config = encoder.config
        self.grid = TimeGrid.of(config, feature_extractor)
        self.layers = self._check_layers(layer, config.num_hidden_layers)
        if frequency not in _FREQUENCY_MODES:
            raise ValueError(f"frequency={frequency!r} is not supported; use one of {_FREQUENCY_MODES}.")
        self.frequency = frequency
        if pooling is None:
            pooling = config.pooling if config.pooling in _POOLING_MODES else "mean"
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling={pooling!r} is not supported; use one of {_POOLING_MODES}.")
        self.pooling = pooling
        self.substeps = self.grid.substeps(hop_ms)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.chunk_patches, self.overlap_patches = self._chunking(chunk_seconds, chunk_overlap_seconds)
        # The fbank of chunks must equal the whole clip's: the clip mean is subtracted here, once per clip, with
        # the extractor's own arithmetic, and the extractor then leaves the chunks' means alone.
        self._chunk_extractor = copy.copy(feature_extractor)
        self._chunk_extractor.subtract_waveform_mean = False

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> CATEmbedder:
        """An embedder for the CAT model folder (or Hub name) `folder`: any CAT folder (encoder, classifier or
        pretraining checkpoint) with its feature extractor. `options` are those of `CATEmbedder`."""
        from transformers.utils import logging as hf_logging

        try:
            feature_extractor = CATFeatureExtractor.from_pretrained(folder)
        except OSError as err:
            raise ValueError(
                f"{folder} has no CAT feature extractor (preprocessor_config.json); save it next to the model with "
                "feature_extractor.save_pretrained(folder)."
            ) from err
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a head folder's classifier weights are expected to stay unused
        try:
            model = CATModel.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}))
        finally:
            hf_logging.set_verbosity(verbosity)
        if device is not None:
            model.to(device)
        return cls(model, feature_extractor, **options)

    # -- properties ----------------------------------------------------------------------------------------------

    @property
    def sampling_rate(self) -> int:
        return self.grid.sampling_rate

    @property
    def hop_ms(self) -> float:
        """Hop between frame embeddings, in milliseconds."""
        return self.grid.hop_ms / self.substeps

    @property
    def centre_offset_ms(self) -> float:
        """Timestamp of the first frame embedding."""
        return self.grid.centre_offset_ms

    @property
    def max_pass_seconds(self) -> float:
        """Longest audio that one model pass covers."""
        return self.grid.max_pass_seconds

    @property
    def frame_embedding_size(self) -> int:
        hidden = self.model.config.hidden_size
        return hidden * self.model.config.frequency_patches if self.frequency == "concat" else hidden

    @property
    def clip_embedding_size(self) -> int:
        return self.model.config.hidden_size if self.pooling == "cls" else self.frame_embedding_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- public API ----------------------------------------------------------------------------------------------

    def clip_embeddings(self, audio: AudioBatch, sampling_rate: int | None = None) -> torch.Tensor:
        """(B, clip_embedding_size) float32 embeddings, on CPU."""
        return self.pooled_clip_embeddings(audio, sampling_rate, (self.pooling,))[self.pooling]

    def pooled_clip_embeddings(self, audio: AudioBatch, sampling_rate: int | None = None,
                               poolings: Sequence[Pooling] = _POOLING_MODES) -> dict[str, torch.Tensor]:
        """{pooling: (B, size) float32 embeddings on CPU} for several poolings from one pass of the model (e.g. to
        compare CLS and mean pooling in a probe)."""
        unknown = [p for p in poolings if p not in _POOLING_MODES]
        if unknown or not poolings:
            raise ValueError(f"poolings={tuple(poolings)!r}: use one or more of {_POOLING_MODES}.")
        clips = self._prepare(audio, sampling_rate)
        plans = [self.plan_clip(clip.num_frames) for clip in clips]
        sizes = {"cls": self.model.config.hidden_size, "mean": self.frame_embedding_size}
        sums = {p: torch.zeros(len(clips), sizes[p], dtype=torch.float64) for p in poolings}
        counts = torch.zeros(len(clips), dtype=torch.float64)
        for index, step, cls_token, patches in self._run(clips, plans):
            lo, hi = step.keep
            if "cls" in sums:
                sums["cls"][index] += cls_token.double() * (hi - lo)
            if "mean" in sums:
                sums["mean"][index] += patches[lo - step.first_patch : hi - step.first_patch].double().sum(0)
            counts[index] += hi - lo
        return {p: (total / counts[:, None]).float() for p, total in sums.items()}

    def frame_embeddings(self, audio: AudioBatch, sampling_rate: int | None = None) -> FrameEmbeddings:
        """Frame embeddings every `hop_ms` with their timestamps (see `FrameEmbeddings`), on CPU."""
        clips = self._prepare(audio, sampling_rate)
        counts = [self.num_frame_embeddings(clip.stamp_samples) for clip in clips]
        plans = [self.plan_frames(clip.num_frames, count) for clip, count in zip(clips, counts)]
        longest = max(counts)
        embeddings = torch.zeros(len(clips), longest, self.frame_embedding_size)
        for index, step, _cls, patches in self._run(clips, plans):
            lo, hi = step.keep
            rows = torch.arange(lo, hi) * self.substeps + step.offset
            embeddings[index, rows] = patches[lo - step.first_patch : hi - step.first_patch]
        positions = torch.arange(longest, dtype=torch.float64)
        timestamps = self.centre_offset_ms + positions * self.hop_ms
        lengths = torch.tensor(counts, dtype=torch.int64)
        timestamps = timestamps.expand(len(clips), -1).clone()
        timestamps[positions[None, :] >= lengths[:, None]] = float("nan")
        return FrameEmbeddings(embeddings=embeddings, timestamps=timestamps, lengths=lengths)

    def num_frame_embeddings(self, num_samples: int) -> int:
        """Frame embeddings of a clip of `num_samples` samples (at the model's rate): those centred inside it."""
        grid = self.grid
        step2 = 2 * grid.patch_frames // self.substeps * grid.frame_shift
        first2 = grid._centre2(-grid.pad_frames)
        return max(0, (2 * num_samples - first2) // step2 + 1)

    def plan_clip(self, num_frames: int) -> list[Pass]:
        """The passes of a clip embedding over `num_frames` fbank frames (one pass up to `chunk_seconds`)."""
        patches = -(-num_frames // self.grid.patch_frames)
        return [Pass(0, first * self.grid.patch_frames, stop - first, first, keep)
                for first, stop, keep in self._windows(patches)]

    def plan_frames(self, num_frames: int, count: int) -> list[Pass]:
        """The passes giving `count` frame embeddings of a clip of `num_frames` fbank frames, offset by offset."""
        grid = self.grid
        step = grid.patch_frames // self.substeps
        passes = []
        for offset in range(self.substeps):
            patches = len(range(offset, count, self.substeps))
            origin = offset * step - grid.pad_frames
            passes += [Pass(offset, origin + first * grid.patch_frames, stop - first, first, keep)
                       for first, stop, keep in self._windows(patches)]
        return passes

    # -- internals -----------------------------------------------------------------------------------------------

    @staticmethod
    def _check_layers(layer: int | Sequence[int] | None, depth: int) -> tuple[int, ...] | None:
        if layer is None:
            return None
        layers = (layer,) if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) else tuple(layer)
        if not layers:
            raise ValueError("layer is an empty sequence; give at least one hidden-state index.")
        checked = []
        for value in layers:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not -depth - 1 <= value <= depth:
                raise ValueError(
                    f"layer {value!r} is not a hidden-state index of this {depth}-block model; use 0 (input of the "
                    f"first block) to {depth} (last block), negative indices from the end, or a list to average."
                )
            checked.append(int(value) % (depth + 1))
        return None if checked == [depth] else tuple(checked)

    def _chunking(self, chunk_seconds: float | None, overlap_seconds: float | None) -> tuple[int, int]:
        grid = self.grid
        patch_seconds = grid.hop_ms / 1000.0
        if chunk_seconds is None:
            patches = grid.max_patches
        else:
            if not chunk_seconds > 0:
                raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds!r}.")
            patches = min(grid.max_patches, int(chunk_seconds / patch_seconds + 1e-9))
            if patches < 2:
                raise ValueError(
                    f"chunk_seconds={chunk_seconds} is shorter than two patches ({2 * patch_seconds:g} s); passes "
                    "need room to overlap."
                )
        if overlap_seconds is None:
            overlap = max(1, round(patches * DEFAULT_OVERLAP_FRACTION))
        else:
            overlap = round(overlap_seconds / patch_seconds)
            if not 0 <= overlap < patches:
                raise ValueError(
                    f"chunk_overlap_seconds={overlap_seconds} must be at least 0 and shorter than a pass "
                    f"({patches * patch_seconds:g} s)."
                )
        return patches, overlap

    def _windows(self, patches: int) -> list[tuple[int, int, tuple[int, int]]]:
        """Passes (first, stop, (keep_lo, keep_hi)) over `patches` patches: one if it fits, else overlapping
        passes of `chunk_patches` (the last one ends at the end), each keeping the patches up to the middle of
        its overlaps."""
        size = self.chunk_patches
        if patches <= size:
            return [(0, patches, (0, patches))] if patches else []
        stride = size - self.overlap_patches
        starts = list(range(0, patches - size, stride)) + [patches - size]
        bounds = [0] + [(starts[i + 1] + starts[i] + size) // 2 for i in range(len(starts) - 1)] + [patches]
        return [(s, s + size, (bounds[i], bounds[i + 1])) for i, s in enumerate(starts)]

    def _prepare(self, audio: AudioBatch, sampling_rate: int | None) -> list[_Clip]:
        rate = self.sampling_rate
        if sampling_rate is None:
            logger.warning(
                "No sampling_rate given to CATEmbedder: the audio is read as %d Hz; pass sampling_rate= to be sure.",
                rate,
            )
            sampling_rate = rate
        elif isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.number)) \
                or not sampling_rate > 0:
            raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}.")
        clips = []
        subtract = bool(self.feature_extractor.subtract_waveform_mean)
        for index, samples in enumerate(_split_clips(audio)):
            original = samples.shape[0]
            if sampling_rate != rate:
                samples = resample_audio(samples, sampling_rate, rate, backend=self._resample_backend())
            wave = torch.from_numpy(np.array(samples, dtype=np.float32, copy=True))
            total = wave.sum()
            if not bool(torch.isfinite(total)):
                raise ValueError(
                    f"clip {index} contains NaN or Inf samples (or samples too large to sum); clean it (e.g. with "
                    "np.nan_to_num) first."
                )
            if subtract:
                wave = wave - total / wave.numel()  # exactly the extractor's per-clip mean subtraction
            num_frames = self.feature_extractor.num_frames(wave.numel())
            if num_frames < 1:
                raise ValueError(
                    f"clip {index} has {wave.numel()} samples at {rate} Hz: shorter than one "
                    f"{self.feature_extractor.frame_length_ms:g} ms frame ({self.grid.frame_length} samples); pad "
                    "it or drop it."
                )
            inside = min(wave.numel(), int(original * rate // sampling_rate))
            clips.append(_Clip(wave=wave, num_frames=num_frames, stamp_samples=inside))
        return clips

    def _resample_backend(self) -> str:
        return self.feature_extractor._resolve_backend(None)

    def _run(self, clips: list[_Clip], plans: list[list[Pass]]) -> Iterator[tuple[int, Pass, torch.Tensor, torch.Tensor]]:
        """Runs every pass of every clip, `batch_size` passes per forward; yields (clip, pass, CLS (D,), patch
        embeddings (num_patches, frame_embedding_size)) as float32 CPU tensors."""
        steps = [(index, step) for index, plan in enumerate(plans) for step in plan]
        for first in range(0, len(steps), self.batch_size):
            group = steps[first : first + self.batch_size]
            hidden = self._forward([(clips[i], step) for i, step in group])
            config = self.model.config
            extra, bins = config.num_extra_tokens, config.frequency_patches
            for row, (index, step) in enumerate(group):
                tokens = hidden[row, extra : extra + step.num_patches * bins].reshape(step.num_patches, bins, -1)
                patches = tokens.mean(1) if self.frequency == "mean" else tokens.flatten(1)
                yield index, step, hidden[row, 0], patches

    @torch.no_grad()
    def _forward(self, passes: list[tuple[_Clip, Pass]]) -> torch.Tensor:
        """The chosen hidden state (B, tokens, D) float32 on CPU of a batch of passes."""
        grid = self.grid
        device = self.device
        slices, placement = [], []
        for clip, step in passes:
            first = max(step.first_frame, 0)
            stop = min(step.first_frame + step.num_patches * grid.patch_frames, clip.num_frames)
            start_sample = first * grid.frame_shift
            slices.append(clip.wave[start_sample : start_sample + grid.samples_of_frames(stop - first)])
            placement.append((first - step.first_frame, stop - first))
        features = self._chunk_extractor(
            slices, sampling_rate=grid.sampling_rate, padding="longest", return_attention_mask=False,
            return_tensors="pt", device=device,
        )["input_values"]
        length = max(step.num_patches for _, step in passes) * grid.patch_frames
        inputs = features.new_full((len(passes), length, features.shape[-1]), self.feature_extractor.padded_frame_value)
        mask = torch.zeros(len(passes), length, dtype=torch.int64, device=device)
        for row, (left, count) in enumerate(placement):
            inputs[row, left : left + count] = features[row, :count]
            mask[row, : left + count] = 1
        outputs = self.model(
            input_values=inputs, attention_mask=mask, output_hidden_states=self.layers is not None, return_dict=True
        )
        if self.layers is None:
            hidden = outputs.last_hidden_state
        else:
            hidden = sum(outputs.hidden_states[i].float() for i in self.layers) / len(self.layers)
        return hidden.float().cpu()


def _split_clips(audio: AudioBatch) -> list[np.ndarray]:
    """The clips of `audio` as 1-D float32 arrays: a 2-D array or tensor is a (B, T) batch."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        if audio.ndim == 1:
            items = [audio]
        elif audio.ndim == 2:
            items = list(audio)
        else:
            raise ValueError(
                f"audio has shape {tuple(audio.shape)}; pass a (batch, samples) array or tensor, a list of 1-D "
                "waveforms, or one 1-D waveform (downmix multi-channel audio first, e.g. x.mean(axis=0))."
            )
    elif isinstance(audio, (list, tuple)):
        if not audio:
            raise ValueError("no audio given (empty list); pass at least one waveform.")
        if all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in audio):
            items = [np.asarray(audio, dtype=np.float32)]
        else:
            items = list(audio)
    else:
        raise ValueError(
            f"audio has unsupported type {type(audio).__name__}; pass a list of 1-D waveforms, a (batch, samples) "
            "array or tensor, or one 1-D waveform (decode files first, e.g. with cat_hf.audio.load_audio)."
        )
    if not items:
        raise ValueError("no audio given (a batch of 0 clips); pass at least one waveform.")
    return [check_mono_clip(_as_float32_samples(item, f"clip {i}"), f"clip {i}") for i, item in enumerate(items)]


# ----------------------------------------------------------------------------------------------------------------
# Functional forms
# ----------------------------------------------------------------------------------------------------------------


def clip_embeddings(
    model: torch.nn.Module,
    feature_extractor: CATFeatureExtractor,
    audio: AudioBatch,
    sampling_rate: int | None = None,
    **options: Any,
) -> torch.Tensor:
    """(B, D) clip embeddings of `audio`; `options` are those of `CATEmbedder`."""
    return CATEmbedder(model, feature_extractor, **options).clip_embeddings(audio, sampling_rate)


def frame_embeddings(
    model: torch.nn.Module,
    feature_extractor: CATFeatureExtractor,
    audio: AudioBatch,
    sampling_rate: int | None = None,
    **options: Any,
) -> FrameEmbeddings:
    """Frame embeddings and timestamps of `audio`; `options` are those of `CATEmbedder`."""
    return CATEmbedder(model, feature_extractor, **options).frame_embeddings(audio, sampling_rate)


__all__ = [
    "CATEmbedder",
    "FrameEmbeddings",
    "Pass",
    "TimeGrid",
    "clip_embeddings",
    "frame_embeddings",
]
