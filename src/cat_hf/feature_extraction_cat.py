# Copyright 2025 The cat-hf developers. Licensed under the Apache License, Version 2.0.
"""Feature extractor for CAT (Convolutional Audio Transformer).

Waveforms -> the model input of the original CAT pipeline: subtract the clip's mean, Kaldi log-mel filter bank
(``torchaudio.compliance.kaldi.fbank``, ``htk_compat=True``, Hann window, 128 bins, 25 ms frames, 10 ms shift,
dither 0), zero-pad or truncate to ``max_length`` frames, normalise as ``(x - mean) / (2 * std)``. A whole batch is
computed at once, in float32 PyTorch on CPU or GPU, in cache-sized chunks of frames; its speed beside transformers'
ASTFeatureExtractor and torchaudio's kaldi.fbank is printed by benchmarks/bench_feature_extraction.py.
Self-contained (numpy, torch, transformers; soxr and torchaudio imported lazily): it ships as remote code.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import weakref
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.utils import TensorType, cached_file, logging

logger = logging.get_logger(__name__)

__all__ = ["FEATURE_PRESETS", "CATFeatureExtractor", "downmix_to_mono", "kaldi_fbank_batch", "resample_audio"]

#: Length (10 ms frames) and log-mel statistics of the original CAT recipes (the single source of truth).
FEATURE_PRESETS: dict[str, dict[str, float | int]] = {
    "audioset": {"max_length": 1024, "mean": -4.268, "std": 4.569},
    "esc50": {"max_length": 512, "mean": -6.627, "std": 5.359},
    "speechcommands": {"max_length": 128, "mean": -6.846, "std": 5.565},
}
PATCH_FRAMES = 16  #: frames per time patch: ``padding="longest"`` rounds up to a multiple of it
DEFAULT_CHUNK_FRAMES = 1024  #: frames per CPU chunk, whose intermediates stay in the cache (benchmark: --chunk-frames)
_ACCELERATOR_CHUNK_FRAMES = 1 << 16  #: on GPUs bigger chunks are faster; ~0.5 GB of intermediates
_LOG_FLOOR = float(torch.finfo(torch.float32).eps)  #: Kaldi's floor for the mel energies before the log
_MAX_CHANNELS = 8  #: a 2-D array with at most this many rows (or columns) may be one multi-channel clip
_PADDING_STRATEGIES = ("max_length", "longest")
_RESAMPLE_BACKENDS = ("soxr", "torchaudio")
_CHANNEL_LAYOUTS = (None, "mono", "first", "last")


# -- waveform helpers (importable by other modules) -------------------------------------------------------------------


def _as_float32_samples(array: Any, what: str = "audio") -> np.ndarray:
    """`array` as a float32 numpy array; int16/int32 PCM is scaled to [-1, 1)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        array = (tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor).numpy()
    elif isinstance(array, (list, tuple)):
        try:
            array = np.asarray(array)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{what} is a ragged nested list; pass a 1-D array per clip.") from err
    elif not isinstance(array, np.ndarray):
        raise ValueError(f"{what} has unsupported type {type(array).__name__}; pass a numpy array, a torch tensor "
                         "or a list of floats (decode files first, e.g. with soundfile.read).")  # fmt: skip
    if array.dtype == np.float32:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    if array.dtype in (np.int16, np.int32):  # exact: a power-of-two scale
        return (array.astype(np.float64) / -np.iinfo(array.dtype).min).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise ValueError(f"{what} has integer dtype {array.dtype}, which is ambiguous (only int16 and int32 PCM are "
                         "scaled); pass float samples in [-1, 1] or int16 PCM.")  # fmt: skip
    raise ValueError(f"{what} has unsupported dtype {array.dtype}; pass real float samples in [-1, 1] or int16 PCM.")


def downmix_to_mono(array: Any, channel_axis: int | None = None) -> np.ndarray:
    """A float32 1-D waveform: a 1-D array as it is, a 2-D array averaged over its `channel_axis` (0 for torch's
    ``(channels, samples)``, 1 for soundfile's ``(samples, channels)``, `None` for the smaller axis)."""
    samples = _as_float32_samples(array)
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise ValueError(f"audio has {samples.ndim} dimensions (shape {tuple(samples.shape)}); pass a 1-D or a 2-D "
                         "multi-channel array per clip.")  # fmt: skip
    if channel_axis is None:
        channel_axis = 0 if samples.shape[0] <= samples.shape[1] else 1
    return samples.mean(axis=channel_axis, dtype=np.float32)


def resample_audio(array: Any, orig_sr: float, target_sr: float, backend: str = "soxr") -> np.ndarray:
    """A 1-D waveform (or 2-D multi-channel array, time = larger axis) from `orig_sr` to `target_sr`, as float32.
    ``backend="soxr"`` (default) or ``"torchaudio"`` (``functional.resample``; ImportError if not importable)."""
    if backend not in _RESAMPLE_BACKENDS:
        raise ValueError(f"resample backend {backend!r} is unknown; use one of {_RESAMPLE_BACKENDS}.")
    for name, rate in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0:
            raise ValueError(f"{name} must be a positive number of samples per second, got {rate!r}.")
    samples = _as_float32_samples(array)
    if samples.ndim not in (1, 2):
        raise ValueError(f"cannot resample an array with {samples.ndim} dimensions; pass a 1-D or 2-D array.")
    if orig_sr == target_sr:
        return samples
    time_last = samples.ndim == 2 and samples.shape[0] < samples.shape[1]  # soxr wants time first, torchaudio last
    if backend == "soxr":
        try:
            import soxr
        except ImportError as err:
            raise ImportError("resampling needs the soxr package: pip install soxr") from err
        out = soxr.resample(np.ascontiguousarray(samples.T if time_last else samples), float(orig_sr), float(target_sr))
        return np.ascontiguousarray(out.T if time_last else out, dtype=np.float32)
    try:
        import torchaudio.functional as ta_functional
    except Exception as err:  # ImportError, or an OSError/RuntimeError from a torchaudio that does not match torch
        raise ImportError("resample backend 'torchaudio' was asked for but torchaudio cannot be imported; install a "
                          "torchaudio matching your torch, or use backend='soxr'.") from err  # fmt: skip
    if not (float(orig_sr).is_integer() and float(target_sr).is_integer()):
        raise ValueError("the torchaudio backend needs integer sampling rates; use backend='soxr'.")
    swap = samples.ndim == 2 and not time_last
    out = ta_functional.resample(torch.from_numpy(np.ascontiguousarray(samples.T if swap else samples)),
                                 int(orig_sr), int(target_sr)).numpy()  # fmt: skip
    return np.ascontiguousarray(out.T if swap else out, dtype=np.float32)


# -- batched Kaldi filter bank ----------------------------------------------------------------------------------------


def _mel_scale(freq: Any) -> Any:
    """Kaldi's mel scale, 1127 ln(1 + f / 700); float32 tensors get a correctly rounded float32 log."""
    if isinstance(freq, torch.Tensor):
        # torch's vectorised float32 log differs by an ulp between CPU kinds, and an ulp here moves filter weights
        # by ~1e-5 (loud mel bins by ~5e-5); the float64 log rounded to float32 is the same on every machine.
        return 1127.0 * (1.0 + freq / 700.0).double().log().to(freq.dtype)
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=8)
def _kaldi_mel_banks(num_mel_bins: int, n_fft: int, sample_rate: float, low_freq: float,
                     high_freq: float) -> torch.Tensor:  # fmt: skip
    """Kaldi's triangular mel filters, (n_fft // 2 + 1, num_mel_bins) float32 (Nyquist row zero), in the float32
    operation order of torchaudio's ``get_mel_banks``: the weights are differences of mel values near 2000 divided by
    ~20 mel, so float32 rounding of the mel values is visible in the features."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"mel range low_freq={low_freq} / high_freq={high_freq} is invalid for Nyquist {nyquist}; use "
                         "0 <= low_freq < high_freq <= sampling_rate / 2 (high_freq <= 0 counts back from Nyquist).")
    mel_low = _mel_scale(low_freq)
    mel_delta = (_mel_scale(high_freq) - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)
    left, center, right = (mel_low + (index + k) * mel_delta for k in (0.0, 1.0, 2.0))
    fft_mel = _mel_scale((sample_rate / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32)).unsqueeze(0)
    banks = torch.minimum((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)).clamp(min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).t().contiguous()


def _frame_geometry(sample_rate: float, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int, int]:
    """(window, shift, n_fft) in samples, as Kaldi computes them: truncated, FFT size the next power of 2."""
    window, shift = int(sample_rate * frame_length_ms * 0.001), int(sample_rate * frame_shift_ms * 0.001)
    if window < 2 or shift < 1:
        raise ValueError(f"frame_length_ms={frame_length_ms} / frame_shift_ms={frame_shift_ms} give {window} / {shift} "
                         "samples per frame / hop; use the Kaldi defaults 25.0 / 10.0.")  # fmt: skip
    return window, shift, 1 << (window - 1).bit_length()


@lru_cache(maxsize=8)
def _mel_blocks(*mel_options: Any) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """The mel filters as dense blocks ``(row_lo, row_hi, col_lo, col_hi, weights)`` of a banded matrix: each group of
    16 neighbouring filters covers a short range of FFT bins, so eight small matmuls do 13 % of a dense one's work."""
    banks = _kaldi_mel_banks(*mel_options)
    blocks = []
    for columns in torch.arange(banks.shape[1]).split(16):
        used = banks[:, columns].ne(0).any(dim=1).nonzero().flatten()
        r0, r1 = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, 1)
        c0, c1 = int(columns[0]), int(columns[-1]) + 1
        blocks.append((r0, r1, c0, c1, banks[r0:r1, c0:c1].contiguous()))
    return tuple(blocks)


def _chunks(frames: Sequence[int], limit: int) -> Iterator[list[tuple[int, int, int]]]:
    """The frames of all clips in chunks of at most `limit`, as ``(clip, first, stop)`` pieces: short clips share a
    chunk, a clip longer than `limit` is cut into equal pieces."""
    chunk, size = [], 0
    for clip, count in enumerate(frames):
        step = -(-count // -(-count // limit))
        for first in range(0, count, step):
            stop = min(first + step, count)
            if chunk and size + stop - first > limit:
                yield chunk
                chunk, size = [], 0
            chunk.append((clip, first, stop))
            size += stop - first
    if chunk:
        yield chunk


def _fbank(clips: Sequence[torch.Tensor], frames: Sequence[int], out_frames: int, spec: CATFeatureExtractor,
           chunk_frames: int) -> torch.Tensor:  # fmt: skip
    """The kernel: clips (1-D float32 tensors on one device) -> (B, out_frames, bins) features of extractor `spec`.

    The first `frames[b]` frames of clip ``b`` are computed, the other rows get the padded-frame value. Per chunk, its
    frames (minus their clip's mean) are copied into a work buffer; per-frame DC removal, pre-emphasis, window,
    ``rfft``, power spectrum, banded mel matmuls and the log follow, in the Kaldi recipe's order (it decides the
    float32 rounding in quiet bins). The output is new memory that no later call writes.
    """
    device = clips[0].device
    window, shift, n_fft = _frame_geometry(spec.sampling_rate, spec.frame_length_ms, spec.frame_shift_ms)
    num_mel_bins = spec.num_mel_bins
    blocks = _mel_blocks(num_mel_bins, n_fft, float(spec.sampling_rate), float(spec.low_freq), float(spec.high_freq))
    blocks = [(r0, r1, c0, c1, weights.to(device)) for r0, r1, c0, c1, weights in blocks]
    hann_tail = torch.hann_window(window, periodic=False, device=device)[1:]  # the first sample is 0: see `padded`
    if device.type == "cpu":  # numpy gives large arrays transparent huge pages: far fewer faults on first writes
        out_numpy = np.empty((len(clips), out_frames, num_mel_bins), dtype=np.float32)
        out = torch.from_numpy(out_numpy)
        # share_memory_() (also run by torch.multiprocessing queues) moves a tensor's data and frees the old memory,
        # where numpy views taken before still point: kept until the tensor dies, no later allocation reuses it.
        weakref.finalize(out, lambda *_: None, out_numpy)
    else:
        out_numpy, out = None, torch.empty(len(clips), out_frames, num_mel_bins, device=device)
    chunks = list(_chunks(frames, chunk_frames))
    capacity = max(sum(stop - first for _, first, stop in chunk) for chunk in chunks)
    # Work buffers of this call alone: nested (re-entrant) and concurrent calls never share them. Columns 0 and
    # `window`.. of `padded` stay 0: the FFT's zero padding, and the Hann window's 0 (so Kaldi's x[-1] := x[0] is moot).
    raw = torch.empty(capacity, window, device=device)
    padded = torch.zeros(capacity, n_fft, device=device)
    power = torch.empty(capacity, n_fft // 2 + 1, device=device)
    mel = torch.empty(capacity, num_mel_bins, device=device)
    clip_frames = [clip.unfold(0, window, shift) for clip in clips]
    offsets: dict[int, Any] = {}
    scale = 1.0 / (2.0 * spec.std) if spec.do_normalize else 1.0
    offset = torch.tensor(-spec.mean * scale if spec.do_normalize else 0.0, device=device)
    for pieces in chunks:
        count, row = sum(stop - first for _, first, stop in pieces), 0
        for clip, first, stop in pieces:
            if clip not in offsets:  # summed right before its frames are copied, which then come from the cache
                total = clips[clip].sum()  # in float32, as the original's mean
                if not bool(torch.isfinite(total)):  # a NaN/Inf sample, or a sum past float32's range
                    total = clips[clip].sum(dtype=torch.float64)
                if not bool(torch.isfinite(total)):
                    bad = [i for i, wave in enumerate(clips) if not bool(torch.isfinite(wave).all())]
                    raise ValueError(f"clip(s) {bad} contain NaN or Inf samples; clean or drop them (e.g. with "
                                     "np.nan_to_num) before feature extraction.")  # fmt: skip
                offsets[clip] = (total / clips[clip].numel()).float() if spec.subtract_waveform_mean else 0.0
            torch.sub(clip_frames[clip][first:stop], offsets[clip], out=raw[row : row + stop - first])
            row += stop - first
        chunk = raw[:count]
        chunk.sub_(chunk.mean(dim=1, keepdim=True))
        emphasized = padded[:count, 1:window]
        torch.sub(chunk[:, 1:], chunk[:, :-1], alpha=float(spec.preemphasis_coefficient), out=emphasized)
        emphasized.mul_(hann_tail)
        squares = torch.view_as_real(torch.fft.rfft(padded[:count])).square_()  # re^2, im^2: no complex abs
        spectrum, energies = torch.add(squares[..., 0], squares[..., 1], out=power[:count]), mel[:count]
        del squares  # freed before the next chunk's rfft allocates as much: two alternating spectra fault more pages
        for r0, r1, c0, c1, weights in blocks:
            torch.mm(spectrum[:, r0:r1], weights, out=energies[:, c0:c1])
        energies.clamp_(min=_LOG_FLOOR)
        row = 0
        for clip, first, stop in pieces:
            rows = out[clip, first:stop]
            if out_numpy is not None:  # numpy's log is faster than torch's on CPU
                np.log(energies[row : row + stop - first].numpy(), out=out_numpy[clip, first:stop])
            else:
                torch.log(energies[row : row + stop - first], out=rows)
            if spec.do_normalize:
                torch.add(offset, rows, alpha=scale, out=rows)  # (log - mean) / (2 std) in one pass
            row += stop - first
    for clip, count in enumerate(frames):
        out[clip, count:].fill_(spec.padded_frame_value)
    return out


def kaldi_fbank_batch(
    waveforms: torch.Tensor, lengths: torch.Tensor | Sequence[int], *, sample_rate: float = 16000.0,
    num_mel_bins: int = 128, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
    preemphasis_coefficient: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0,
    num_output_frames: int | None = None, padding_value: float = 0.0, normalize: tuple[float, float] | None = None,
    chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``torchaudio.compliance.kaldi.fbank(x, htk_compat=True, use_energy=False, window_type="hanning", dither=0.0)``
    of each clip ``waveforms[b, :lengths[b]]`` (each at least one frame) of a zero-padded (B, N) batch, in one pass.

    Returns ``(fbank, frames)``: (B, T, num_mel_bins) on the device of `waveforms`, T = `num_output_frames` (default:
    the longest clip's; longer clips are truncated), `padding_value` past a clip's frames, ``(fbank - mean) / (2 *
    std)`` if `normalize` = ``(mean, std)``; and the real frames per clip, int64 (B,). `chunk_frames` frames are
    processed at a time (``None``: all at once, best on GPU).
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}.")
    window, shift, _ = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lengths) != waveforms.shape[0] or not lengths:
        raise ValueError(f"got {len(lengths)} lengths for a batch of {waveforms.shape[0]} waveforms; pass one per row.")
    if any(n < window or n > waveforms.shape[1] for n in lengths):
        raise ValueError(f"every length must lie in [{window}, {waveforms.shape[1]}] (at least one frame, at most the "
                         f"row); got {lengths}.")  # fmt: skip
    frames = [1 + (n - window) // shift for n in lengths]
    out_frames = max(frames) if num_output_frames is None else int(num_output_frames)
    if out_frames < 1:
        raise ValueError(f"num_output_frames must be at least 1, got {num_output_frames!r}.")
    mean, std = normalize if normalize is not None else (0.0, 1.0)
    spec = CATFeatureExtractor(
        feature_size=num_mel_bins, num_mel_bins=num_mel_bins, sampling_rate=sample_rate,
        frame_length_ms=frame_length_ms, frame_shift_ms=frame_shift_ms, preemphasis_coefficient=preemphasis_coefficient,
        low_freq=low_freq, high_freq=high_freq, padding_value=padding_value, do_normalize=normalize is not None,
        mean=mean, std=std, subtract_waveform_mean=False,
    )  # fmt: skip
    frames = [min(f, out_frames) for f in frames]
    clips = [waveforms[b, :n].to(torch.float32).contiguous() for b, n in enumerate(lengths)]
    return _fbank(clips, frames, out_frames, spec, int(chunk_frames or sum(frames))), torch.tensor(frames)


# -- the feature extractor --------------------------------------------------------------------------------------------


class CATFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Constructs a CAT feature extractor: waveforms -> normalised Kaldi log-mel filter banks, ``(batch, frames, 128)``.

    The fbank of the original CAT recipe (module docstring), for a whole batch at once, on CPU or GPU (``device=``).
    Frames are padded *before* normalisation (the original order): a padded frame equals ``-mean / (2 * std)``. Each
    call returns new memory, which the extractor never writes again. Precision: ~1e-6 log-mel units from the
    original near each frame's loudest bin, below 1e-4 in bins less than ~50 dB under it; quieter bins hold float32
    FFT rounding noise (up to ~1e-3 between any two float32 implementations).

    **Audio**, as in transformers' extractors: a 1-D array, tensor or list of floats is one clip, a 2-D array or
    tensor a batch ``(batch, samples)``, a list of arrays a batch; floats are samples in [-1, 1], int16/int32 PCM is
    scaled; other rates are resampled (soxr, or torchaudio when asked and importable). Channels (``channels=``):

    - ``None`` (default): mono clips; a 2-D array is a batch. One with at most 8 columns, which would be a batch of
      clips shorter than one frame, is refused as what it most likely is, a ``(samples, channels)`` clip (earlier
      cat-hf versions read any 2-D array as one multi-channel clip: pass ``channels="first"`` for that reading). A
      2-D *item of a list* is one multi-channel clip, its channels on the smaller axis.
    - ``"mono"``: mono clips; any 2-D array is a batch, however short its clips.
    - ``"first"`` / ``"last"``: a clip is ``(channels, samples)`` / ``(samples, channels)`` (or 1-D): a 2-D array is
      one clip, a 3-D array a batch. Channels are averaged.

    A clip needs one 25 ms frame (400 samples at 16 kHz). **Padding**: ``"max_length"`` (default, the original) pads
    or truncates to ``max_length`` frames, without attention mask (the original model attends to the padding);
    ``"longest"`` (or ``True``) pads to the longest clip rounded up to ``pad_to_multiple_of`` (16 frames, one time
    patch, also the minimum), with a frame ``attention_mask`` (1 = real); ``truncation=True`` first cuts clips to
    ``max_length``.

    Args:
        feature_size / num_mel_bins (`int`, 128): mel filters (both equal). sampling_rate (`int`, 16000): the
            model's rate. max_length (`int`, 1024): frames for ``"max_length"``. padding_value (`float`, 0.0): value
            of padded frames in the *raw* fbank. do_normalize (`bool`, True), mean (-4.268), std (4.569): the
            normalisation (AudioSet statistics; see `FEATURE_PRESETS`). padding (``"max_length"``): default strategy.
            pad_to_multiple_of (16). frame_length_ms, frame_shift_ms, preemphasis_coefficient, low_freq, high_freq:
            Kaldi options (25.0, 10.0, 0.97, 20.0, 0.0 = Nyquist). subtract_waveform_mean (True): as CAT does.
            resample_backend (``"soxr"`` or ``"torchaudio"``). chunk_frames (1024): frames at a time on CPU.
            return_attention_mask (`None` = per padding strategy).
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self, feature_size: int = 128, sampling_rate: int = 16000, num_mel_bins: int = 128,
        max_length: int = FEATURE_PRESETS["audioset"]["max_length"], padding_value: float = 0.0,
        do_normalize: bool = True, mean: float = FEATURE_PRESETS["audioset"]["mean"],
        std: float = FEATURE_PRESETS["audioset"]["std"], padding: str = "max_length",
        pad_to_multiple_of: int = PATCH_FRAMES, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
        preemphasis_coefficient: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0,
        subtract_waveform_mean: bool = True, resample_backend: str = "soxr",
        chunk_frames: int = DEFAULT_CHUNK_FRAMES, return_attention_mask: bool | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         return_attention_mask=return_attention_mask, **kwargs)  # fmt: skip
        if feature_size != num_mel_bins:
            raise ValueError(f"feature_size ({feature_size}) must equal num_mel_bins ({num_mel_bins}).")
        if not isinstance(num_mel_bins, int) or num_mel_bins <= 3:
            raise ValueError(f"num_mel_bins must be an integer > 3, got {num_mel_bins!r}.")
        if not sampling_rate or sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be positive, got {sampling_rate!r}.")
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}.")
        self._check_max_length(max_length, pad_to_multiple_of)
        if not std or std <= 0:
            raise ValueError(f"std must be positive, got {std!r}; use the log-mel std of the training data.")
        if resample_backend not in _RESAMPLE_BACKENDS:
            raise ValueError(f"resample_backend {resample_backend!r} is unknown; use one of {_RESAMPLE_BACKENDS}.")
        if not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer (default {DEFAULT_CHUNK_FRAMES}), got "
                             f"{chunk_frames!r}.")  # fmt: skip
        self.num_mel_bins, self.max_length, self.do_normalize = num_mel_bins, max_length, do_normalize
        self.mean, self.std, self.padding = mean, std, self._check_padding(padding)
        self.pad_to_multiple_of, self.subtract_waveform_mean = pad_to_multiple_of, subtract_waveform_mean
        self.frame_length_ms, self.frame_shift_ms = frame_length_ms, frame_shift_ms
        self.preemphasis_coefficient, self.low_freq, self.high_freq = preemphasis_coefficient, low_freq, high_freq
        self.resample_backend, self.chunk_frames = resample_backend, chunk_frames
        n_fft = _frame_geometry(sampling_rate, frame_length_ms, frame_shift_ms)[2]  # fails early on bad options
        _kaldi_mel_banks(num_mel_bins, n_fft, float(sampling_rate), float(low_freq), float(high_freq))

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> CATFeatureExtractor:
        """Extractor of a CAT recipe of `FEATURE_PRESETS`: ``"audioset"`` (1024 frames), ``"esc50"`` (512) or
        ``"speechcommands"`` (128); `kwargs` override fields."""
        key = name.lower().replace("-", "").replace("_", "")
        if key not in FEATURE_PRESETS:
            raise ValueError(f"unknown feature preset {name!r}; use one of {sorted(FEATURE_PRESETS)}.")
        return cls(**{**FEATURE_PRESETS[key], **kwargs})

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict[str, Any], **kwargs: Any) -> Any:
        """As in transformers; loaded by a ``from_pretrained`` (this class's or AutoFeatureExtractor's), the extractor
        is refused if its mel bins (or rate, or frames) differ from the model's config.json in the same folder."""
        loaded = super().from_dict(feature_extractor_dict, **kwargs)
        caller = sys._getframe(1).f_locals  # transformers passes only the dict: the folder is its caller's argument
        if sys._getframe(1).f_code.co_name == "from_pretrained" and "pretrained_model_name_or_path" in caller:
            source, hub = caller["pretrained_model_name_or_path"], caller.get("hub_kwargs") or caller
            keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
            try:
                path = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False,
                                   **{k: hub[k] for k in keys if hub.get(k) is not None})  # fmt: skip
                with open(path, encoding="utf-8") as stream:
                    config = json.load(stream)
            except (OSError, TypeError, ValueError):  # no config.json (path None), unreadable, not JSON: no check
                config = {}
            extractor = loaded[0] if isinstance(loaded, tuple) else loaded
            for key in ("num_mel_bins", "sampling_rate", "frame_shift_ms", "frame_length_ms"):
                if config.get(key) is not None and config[key] != getattr(extractor, key):
                    raise ValueError(
                        f"{source}: preprocessor_config.json has {key}={getattr(extractor, key)}, but the model's "
                        f"config.json has {key}={config[key]}: the model would get features it was not trained on. "
                        "Save the model's own feature extractor into the folder (or fix the wrong file)."
                    )
        return loaded

    @property
    def window_samples(self) -> int:
        """Samples per frame (400 at 16 kHz): the shortest clip accepted."""
        return _frame_geometry(self.sampling_rate, self.frame_length_ms, self.frame_shift_ms)[0]

    def num_frames(self, num_samples: int) -> int:
        """Frames of the fbank of a clip of `num_samples` samples (Kaldi snip-edges): 1 + (N - 400) // 160, or 0."""
        window, shift, _ = _frame_geometry(self.sampling_rate, self.frame_length_ms, self.frame_shift_ms)
        return 0 if num_samples < window else 1 + (num_samples - window) // shift

    @property
    def padded_frame_value(self) -> float:
        """Value of a padded frame in the output: the raw `padding_value`, normalised like real frames."""
        if not self.do_normalize:
            return float(self.padding_value)
        return (float(self.padding_value) - self.mean) / (self.std * 2)

    def pad(self, processed_features: Any, padding: bool | str = True, max_length: int | None = None,
            truncation: bool = False, pad_to_multiple_of: int | None = None, return_attention_mask: bool | None = None,
            return_tensors: str | TensorType | None = None) -> BatchFeature:  # fmt: skip
        """[`SequenceFeatureExtractor.pad`] of extracted ``input_values`` (e.g. in a collate function), as
        ``__call__`` pads: `padded_frame_value`, lengths rounded up to `pad_to_multiple_of`, and the attention mask
        unless padding to ``"max_length"``."""
        padder = copy.copy(self)
        padder.padding_value = self.padded_frame_value
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        return SequenceFeatureExtractor.pad(
            padder, processed_features, padding=padding, max_length=max_length, truncation=truncation,
            pad_to_multiple_of=self.pad_to_multiple_of if pad_to_multiple_of is None else pad_to_multiple_of,
            return_attention_mask=padding != "max_length" if return_attention_mask is None else return_attention_mask,
            return_tensors=return_tensors,
        )  # fmt: skip

    @staticmethod
    def _check_max_length(max_length: Any, pad_to_multiple_of: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < pad_to_multiple_of:
            raise ValueError(f"max_length must be an integer of at least {pad_to_multiple_of} frames (one time patch), "
                             f"got {max_length!r}; use e.g. 1024 (AudioSet), 512 (ESC-50) or 128 (Speech Commands).")

    @staticmethod
    def _check_padding(padding: Any) -> str:
        if padding is True or padding in _PADDING_STRATEGIES:
            return "longest" if padding is True else padding
        raise ValueError(f"padding={padding!r} is not supported; use 'max_length' (fixed length, the original recipe) "
                         "or 'longest' / True (pad to the longest clip, rounded up to a multiple of 16 frames).")

    def _split_batch(self, audio: Any, channels: str | None) -> list[Any]:
        """The clips of `audio`, by the input convention of the class docstring."""
        if isinstance(audio, (list, tuple)) and audio:
            if all(isinstance(item, (np.ndarray, torch.Tensor, list, tuple)) for item in audio):
                return list(audio)
            if all(isinstance(item, (int, float, np.number)) and not isinstance(item, bool) for item in audio):
                return [audio]
            raise ValueError("audio list mixes numbers and arrays (or holds unsupported objects such as strings or "
                             "dicts); pass a list of floats for one clip or a list of arrays for a batch.")
        if isinstance(audio, (list, tuple)):
            raise ValueError("no audio given (empty list); pass at least one waveform.")
        if not isinstance(audio, (np.ndarray, torch.Tensor)):
            raise ValueError(f"audio has unsupported type {type(audio).__name__}; pass a numpy array, a torch tensor, "
                             "a list of floats, or a list of those for a batch (decode files first, e.g. with "
                             "soundfile.read).")  # fmt: skip
        clip_dims, shape = (2 if channels in ("first", "last") else 1), tuple(audio.shape)
        if audio.ndim == clip_dims:
            return [audio]
        if audio.ndim != clip_dims + 1:
            raise ValueError(f"audio has {audio.ndim} dimensions (shape {shape}), which channels={channels!r} does not "
                             "read; pass one clip, a batch (batch, samples) or a list of clips, and channels='first' "
                             "/ 'last' for (batch, channels, samples) / (batch, samples, channels).")  # fmt: skip
        if channels is None and shape[0] > 1 and shape[1] <= _MAX_CHANNELS:
            raise ValueError(f"audio of shape {shape} would be a batch of {shape[0]} clips of {shape[1]} samples, each "
                             f"shorter than one frame; if it is one clip of {shape[1]} channels laid out as (samples, "
                             "channels), pass channels='last'.")  # fmt: skip
        return list(audio)

    def _prepare_clip(self, clip: Any, index: int, sampling_rate: float, backend: str,
                      channels: str | None) -> np.ndarray:  # fmt: skip
        what = f"clip {index}"
        samples = _as_float32_samples(clip, what)
        if samples.ndim == 2 and channels != "mono":
            samples = downmix_to_mono(samples, {"first": 0, "last": 1}.get(channels))
        if samples.ndim != 1:
            hint = "declare multi-channel clips with channels='first' or 'last'" if channels == "mono" else "or 2-D"
            raise ValueError(f"{what} has {samples.ndim} dimensions (shape {tuple(samples.shape)}); with channels="
                             f"{channels!r} a clip is 1-D ({hint}).")  # fmt: skip
        if samples.size == 0:
            raise ValueError(f"{what} is empty (0 samples); drop it or pass real audio.")
        given = f"{samples.shape[0]} samples at {sampling_rate:g} Hz"
        if sampling_rate != self.sampling_rate:
            samples = resample_audio(samples, sampling_rate, self.sampling_rate, backend=backend)
            given += f", {samples.shape[0]} after resampling to {self.sampling_rate} Hz"
        if samples.shape[0] < self.window_samples:
            raise ValueError(f"{what} has {given}: shorter than one {self.frame_length_ms:g} ms frame "
                             f"({self.window_samples} samples at {self.sampling_rate} Hz); pad it (e.g. with zeros) "
                             "or drop it.")  # fmt: skip
        return samples

    def _resolve_backend(self, resample_backend: str | None) -> str:
        backend = resample_backend or self.resample_backend
        if backend not in _RESAMPLE_BACKENDS:
            raise ValueError(f"resample_backend {backend!r} is unknown; use one of {_RESAMPLE_BACKENDS}.")
        if backend == "torchaudio":
            try:
                import torchaudio.functional  # noqa: F401
            except Exception:
                logger.warning_once("torchaudio cannot be imported here; resampling with soxr instead.")
                return "soxr"
        return backend

    def __call__(
        self, raw_speech: np.ndarray | torch.Tensor | list[float] | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int | None = None, padding: bool | str | None = None, max_length: int | None = None,
        truncation: bool | None = None, return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None, device: str | torch.device = "cpu",
        resample_backend: str | None = None, channels: str | None = None, **kwargs: Any,
    ) -> BatchFeature:  # fmt: skip
        """
        Featurises one clip or a batch (the class docstring says which audio and `channels` layouts are read).

        Args:
            sampling_rate: rate of `raw_speech`, resampled to ``self.sampling_rate`` if different. Without it, the
                audio is read at ``self.sampling_rate`` with a warning on every call, as transformers' audio
                extractors do: the rate cannot be told from the samples, and an error would break their usual calls.
            padding: ``"max_length"`` or ``"longest"``/``True``; max_length: frames of ``"max_length"`` and the cap
                of ``"longest"`` with ``truncation=True`` (``"max_length"`` always truncates); defaults from ``self``.
            return_attention_mask: the (B, T) int64 frame mask, 1 = real frame (default: for ``"longest"`` only).
            return_tensors: ``"pt"`` (kept on `device`, where the fbank is computed), ``"np"`` or `None` (a list of
                per-clip arrays). resample_backend: overrides ``self.resample_backend``.

        Returns:
            [`BatchFeature`] with ``input_values`` (B, T, num_mel_bins) float32 and optionally ``attention_mask``.
        """
        if kwargs:
            logger.warning_once(f"{self.__class__.__name__} ignores unknown arguments {sorted(kwargs)}.")
        if return_tensors not in (None, "pt", "np"):  # TensorType members equal their strings
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None.")
        padding = self._check_padding(self.padding if padding is None else padding)
        max_length = self.max_length if max_length is None else max_length
        self._check_max_length(max_length, self.pad_to_multiple_of)
        if padding == "max_length" and truncation is False:
            raise ValueError("padding='max_length' always truncates to max_length frames; use padding='longest' to "
                             "keep whole clips.")  # fmt: skip
        if channels not in _CHANNEL_LAYOUTS:
            raise ValueError(f"channels={channels!r} is not supported; use one of {_CHANNEL_LAYOUTS}.")
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        if return_attention_mask is None:
            return_attention_mask = padding == "longest"
        if sampling_rate is None:
            logger.warning(f"No sampling_rate was passed to {self.__class__.__name__}(): the audio is read as "
                           f"{self.sampling_rate} Hz, and audio at another rate gives wrong features. Pass "
                           "sampling_rate=.")  # fmt: skip
            sampling_rate = self.sampling_rate
        elif isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.number)) \
                or not sampling_rate > 0:  # fmt: skip
            raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}.")
        backend = self._resolve_backend(resample_backend) if sampling_rate != self.sampling_rate else "soxr"

        clips = self._split_batch(raw_speech, channels)
        waveforms = [self._prepare_clip(clip, i, sampling_rate, backend, channels) for i, clip in enumerate(clips)]
        frames = [self.num_frames(wave.shape[0]) for wave in waveforms]
        if padding == "max_length" or truncation:
            frames = [min(f, max_length) for f in frames]
        multiple = self.pad_to_multiple_of
        target = max_length if padding == "max_length" else -(-max(frames) // multiple) * multiple
        device = torch.device(device)
        # Read-only or strided arrays are copied (torch.from_numpy wants writeable memory; nothing writes to it).
        tensors = [torch.from_numpy(np.require(wave, np.float32, ["C", "W"])).to(device) for wave in waveforms]
        chunk_frames = self.chunk_frames if device.type == "cpu" else _ACCELERATOR_CHUNK_FRAMES
        data: dict[str, Any] = {"input_values": _fbank(tensors, frames, target, self, chunk_frames)}
        if return_attention_mask:
            lengths = torch.tensor(frames, device=device).unsqueeze(1)
            data["attention_mask"] = (torch.arange(target, device=device).unsqueeze(0) < lengths).to(torch.int64)
        if return_tensors == "pt":
            return BatchFeature(data)
        arrays = {key: value.cpu().numpy() for key, value in data.items()}
        return BatchFeature(arrays if return_tensors == "np" else {k: list(v) for k, v in arrays.items()})
