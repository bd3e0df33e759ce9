# Copyright 2025 The cat-hf developers. Licensed under the Apache License, Version 2.0.
"""Feature extractor for CAT (Convolutional Audio Transformer).

Turns waveforms into the model input of the original CAT data pipeline: subtract the clip's mean, compute the
Kaldi log-mel filter bank (``torchaudio.compliance.kaldi.fbank`` with ``htk_compat=True``, Hann window, 128 mel
bins, 25 ms frames, 10 ms shift, dither 0), zero-pad or truncate to ``max_length`` frames, then normalise as
``(x - mean) / (2 * std)``.

Unlike a per-clip implementation, a whole batch is processed at once, in PyTorch on CPU or GPU: cache-sized chunks
of frames are read straight from the clips, then go through a few fused in-place ops, one batched ``rfft`` and
banded mel matmuls (on CPU, 64 ten-second clips take 36-73 ms on 2 cores, 21-34x less than transformers' numpy
AST extractor, median ~27x; see benchmarks/bench_feature_extraction.py).

This file is deliberately self-contained (stdlib, numpy, torch and transformers only; soxr and torchaudio are
imported lazily) so that it can be shipped as Hugging Face remote code next to a checkpoint.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.utils import TensorType, logging

logger = logging.get_logger(__name__)

__all__ = [
    "FEATURE_PRESETS",
    "CATFeatureExtractor",
    "downmix_to_mono",
    "frames_row_length",
    "kaldi_fbank_batch",
    "resample_audio",
]

#: Normalisation statistics and input lengths of the original CAT recipes (the single source of truth).
#: ``max_length`` is the target length in 10 ms frames; ``mean``/``std`` are the dataset's log-mel statistics.
FEATURE_PRESETS: dict[str, dict[str, float | int]] = {
    "audioset": {"max_length": 1024, "mean": -4.268, "std": 4.569},
    "esc50": {"max_length": 512, "mean": -6.627, "std": 5.359},
    "speechcommands": {"max_length": 128, "mean": -6.846, "std": 5.565},
}

#: Frames per time patch of the model: inputs padded with ``padding="longest"`` are rounded up to a multiple of it.
PATCH_FRAMES = 16

#: Frames per CPU chunk: one 10 s clip (998 frames), whose ~7 MB of intermediates stay in the shared CPU cache.
#: Measured on a 2-core AMD EPYC (64 ten-second clips): 512 is 1.06-1.16x slower, 2048 1.1-1.5x, 256 1.25-1.4x.
DEFAULT_CHUNK_FRAMES = 1024

#: Largest CPU chunk whose work buffers (~7 KB per frame) are kept for the next call of the same thread.
_MAX_KEPT_CHUNK_FRAMES = 4096

#: Frames per step on GPUs, where bigger is faster and only memory bounds it (~0.5 GB of intermediates).
_ACCELERATOR_CHUNK_FRAMES = 1 << 16

#: Kaldi's floor for the mel energies before the log (``std::numeric_limits<float>::epsilon()``).
_LOG_FLOOR = float(torch.finfo(torch.float32).eps)

#: More channels than this in a 2-D clip suggests a batch passed as one array: it is still downmixed, with a warning.
_MAX_EXPECTED_CHANNELS = 8

_PADDING_STRATEGIES = ("max_length", "longest")
_RESAMPLE_BACKENDS = ("soxr", "torchaudio")


# ----------------------------------------------------------------------------------------------------------------
# Waveform helpers (importable by other modules)
# ----------------------------------------------------------------------------------------------------------------


def _as_float32_samples(array: Any, what: str = "audio") -> np.ndarray:
    """Returns `array` as a float32 numpy array; PCM integers are scaled to [-1, 1)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(array, (list, tuple)):
        try:
            array = np.asarray(array)
        except ValueError as err:  # ragged nested lists
            raise ValueError(
                f"{what} is a ragged nested list and cannot be read as samples; pass a 1-D array per clip "
                "(a list of 1-D arrays for a batch)."
            ) from err
    elif not isinstance(array, np.ndarray):
        raise ValueError(
            f"{what} has unsupported type {type(array).__name__}; pass a numpy array, a torch tensor or a list of "
            "floats (decode files first, e.g. with soundfile.read)."
        )

    dtype = array.dtype
    if dtype == np.float32:
        return array
    if np.issubdtype(dtype, np.floating):
        return array.astype(np.float32)
    if dtype == np.int16:
        return array.astype(np.float32) * np.float32(1.0 / 32768.0)
    if dtype == np.int32:
        return (array.astype(np.float64) * (1.0 / 2147483648.0)).astype(np.float32)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        raise ValueError(
            f"{what} has integer dtype {dtype}, which is ambiguous (only int16 and int32 PCM are scaled "
            "automatically); pass float samples in [-1, 1] or int16 PCM."
        )
    raise ValueError(f"{what} has unsupported dtype {dtype}; pass real float samples in [-1, 1] or int16 PCM.")


def downmix_to_mono(array: Any) -> np.ndarray:
    """Returns a float32 1-D mono waveform.

    Accepts a 1-D array or a 2-D multi-channel array (numpy or torch; float, or int16/int32 PCM which is scaled
    to [-1, 1)). The channel axis of a 2-D array is its *smaller* axis, so both ``(channels, samples)`` (torch
    convention) and ``(samples, channels)`` (soundfile convention) work; channels are averaged.
    """
    samples = _as_float32_samples(array)
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2:
        channel_axis = 0 if samples.shape[0] <= samples.shape[1] else 1
        return samples.mean(axis=channel_axis, dtype=np.float32)
    raise ValueError(
        f"audio has {samples.ndim} dimensions (shape {tuple(samples.shape)}); pass a 1-D mono waveform or a 2-D "
        "(channels, samples) array per clip, and a list of such arrays for a batch."
    )


def resample_audio(array: Any, orig_sr: float, target_sr: float, backend: str = "soxr") -> np.ndarray:
    """Resamples a 1-D waveform (or 2-D multi-channel array, time = larger axis) from `orig_sr` to `target_sr`.

    ``backend="soxr"`` (default, high quality, no torch needed) or ``"torchaudio"`` (its windowed-sinc
    ``functional.resample``; raises ImportError when torchaudio is not importable). Returns float32 numpy.
    """
    if backend not in _RESAMPLE_BACKENDS:
        raise ValueError(f"resample backend {backend!r} is unknown; use one of {_RESAMPLE_BACKENDS}.")
    for name, rate in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0:
            raise ValueError(f"{name} must be a positive number of samples per second, got {rate!r}.")
    samples = _as_float32_samples(array)
    if samples.ndim not in (1, 2):
        raise ValueError(
            f"cannot resample an array with {samples.ndim} dimensions; pass a 1-D waveform or a 2-D multi-channel "
            "array."
        )
    if orig_sr == target_sr:
        return samples
    # Time runs along the larger axis (same rule as downmix_to_mono); both backends get it in their own layout.
    time_first = samples.ndim == 1 or samples.shape[0] >= samples.shape[1]
    if backend == "soxr":
        try:
            import soxr
        except ImportError as err:
            raise ImportError("resampling needs the soxr package: pip install soxr") from err
        data = samples if time_first else samples.T
        out = soxr.resample(np.ascontiguousarray(data), float(orig_sr), float(target_sr))
        out = np.asarray(out, dtype=np.float32)
        return out if time_first else np.ascontiguousarray(out.T)
    try:
        import torchaudio.functional as ta_functional
    except Exception as err:  # ImportError, or an OSError/RuntimeError from a torchaudio that does not match torch
        raise ImportError(
            "resample backend 'torchaudio' was asked for but torchaudio cannot be imported; install a torchaudio "
            "matching your torch, or use backend='soxr'."
        ) from err
    if float(orig_sr).is_integer() and float(target_sr).is_integer():
        orig, target = int(orig_sr), int(target_sr)
    else:
        raise ValueError("the torchaudio backend needs integer sampling rates; use backend='soxr'.")
    data = torch.from_numpy(np.ascontiguousarray(samples if samples.ndim == 1 or not time_first else samples.T))
    out = ta_functional.resample(data, orig, target).numpy().astype(np.float32, copy=False)
    return out if samples.ndim == 1 or not time_first else np.ascontiguousarray(out.T)


# ----------------------------------------------------------------------------------------------------------------
# Batched Kaldi filter bank
# ----------------------------------------------------------------------------------------------------------------


def _mel_scale(freq: Any) -> Any:
    """Kaldi's mel scale, 1127 ln(1 + f / 700); float32 tensors get a correctly rounded float32 log."""
    if isinstance(freq, torch.Tensor):
        # torch's vectorised float32 log differs by an ulp between CPU kinds, and an ulp here moves filter weights
        # by ~1e-5 (loud mel bins by ~5e-5); the float64 log rounded to float32 is the same on every machine.
        return 1127.0 * (1.0 + freq / 700.0).double().log().to(freq.dtype)
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=8)
def _kaldi_mel_banks(
    num_mel_bins: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Kaldi triangular mel filters, (n_fft // 2 + 1, num_mel_bins) float32 on CPU (Nyquist row is zero).

    Built in float32 with the same operation order as torchaudio's ``get_mel_banks``: the weights are differences
    of mel values near 2000 divided by ~20 mel, so float32 rounding of the mel values is visible in the features.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(
            f"mel range low_freq={low_freq} / high_freq={high_freq} is invalid for Nyquist {nyquist}; "
            "use 0 <= low_freq < high_freq <= sampling_rate / 2 (high_freq <= 0 counts back from Nyquist)."
        )
    mel_low = _mel_scale(low_freq)
    mel_delta = (_mel_scale(high_freq) - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)
    left = mel_low + index * mel_delta
    center = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    fft_mel = _mel_scale((sample_rate / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32)).unsqueeze(0)
    rising = (fft_mel - left) / (center - left)
    falling = (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (num_mel_bins, n_fft // 2)
    banks = torch.nn.functional.pad(banks, (0, 1))  # Nyquist bin gets weight 0, as in Kaldi
    return banks.t().contiguous()


def _frame_geometry(sample_rate: float, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int, int]:
    """(window, shift, n_fft) in samples, computed like Kaldi: truncated to integers, FFT size the next power of 2."""
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if window < 2 or shift < 1:
        raise ValueError(
            f"frame_length_ms={frame_length_ms} / frame_shift_ms={frame_shift_ms} give {window} / {shift} samples "
            "per frame / hop; use the Kaldi defaults 25.0 / 10.0."
        )
    return window, shift, 1 << (window - 1).bit_length()


MelBlock = tuple[int, int, int, int, torch.Tensor]


@lru_cache(maxsize=8)
def _mel_blocks(
    num_mel_bins: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float
) -> tuple[MelBlock, ...]:
    """The mel filters as dense blocks ``(row_lo, row_hi, col_lo, col_hi, weights)`` of a banded matrix.

    Rows are the squared ``(re, im)`` pairs of the spectrum (every filter row repeated), so that
    ``power @ filters == (re**2 + im**2) @ filters`` is computed on the in-place squared ``view_as_real`` spectrum
    without the slow complex ``abs``. Each filter covers a short range of FFT bins, so groups of 16 neighbouring
    filters only need their own rows: eight small matmuls do 13 % of the work of one dense matmul.
    """
    banks = _kaldi_mel_banks(num_mel_bins, n_fft, sample_rate, low_freq, high_freq).repeat_interleave(2, dim=0)
    blocks = []
    for columns in torch.arange(num_mel_bins).split(16):
        used_rows = banks[:, columns].ne(0).any(dim=1).nonzero().flatten()
        row_lo, row_hi = (int(used_rows.min()), int(used_rows.max()) + 1) if used_rows.numel() else (0, 1)
        col_lo, col_hi = int(columns[0]), int(columns[-1]) + 1
        blocks.append((row_lo, row_hi, col_lo, col_hi, banks[row_lo:row_hi, col_lo:col_hi].contiguous()))
    return tuple(blocks)


_DEVICE_BLOCKS: dict[tuple[Any, ...], tuple[MelBlock, ...]] = {}


def _mel_blocks_on(device: torch.device, *key: Any) -> tuple[MelBlock, ...]:
    """The filter blocks on `device`, cached so that GPU calls do not upload them every time."""
    cache_key = (str(device), *key)
    if cache_key not in _DEVICE_BLOCKS:
        _DEVICE_BLOCKS[cache_key] = tuple((*block[:4], block[4].to(device)) for block in _mel_blocks(*key))
    return _DEVICE_BLOCKS[cache_key]


_DEVICE_WINDOWS: dict[tuple[str, int], torch.Tensor] = {}


def _hann_window_on(device: torch.device, window: int) -> torch.Tensor:
    """Kaldi's symmetric Hann window on `device`, cached. Its first sample is exactly 0 (the kernel relies on it)."""
    key = (str(device), window)
    if key not in _DEVICE_WINDOWS:
        hann = torch.hann_window(window, periodic=False, dtype=torch.float32)
        if hann[0] != 0.0:  # 0.5 - 0.5 * cos(0); cannot happen, but the kernel would silently be wrong
            raise RuntimeError("torch.hann_window(periodic=False) no longer starts with 0.")
        _DEVICE_WINDOWS[key] = hann.to(device)
    return _DEVICE_WINDOWS[key]


def frames_row_length(num_frames: int, window: int = 400, shift: int = 160) -> int:
    """Samples that `num_frames` frames span, rounded up to whole hops (a convenient padded-batch row length)."""
    return -(-(window + (num_frames - 1) * shift) // shift) * shift


#: A chunk: rows ``[start, stop)`` of the output flattened to ``(clips * rows_per_clip, num_mel_bins)``, and the
#: ``(clip, first_frame, stop_frame)`` pieces of clips it holds, in row order.
_Chunk = tuple[int, int, list[tuple[int, int, int]]]


def _plan_chunks(frames: Sequence[int], rows_per_clip: int, chunk_frames: int, window: int, shift: int) -> list[_Chunk]:
    """Splits the frames of all clips into chunks of at most `chunk_frames` contiguous output rows.

    Frame ``f`` of clip ``b`` is output row ``b * rows_per_clip + f``. Whole clips are packed into one chunk while
    they fit, so that short clips do not cost a chunk each (the padding rows between them are computed as well and
    overwritten at the end); a clip longer than a chunk gets equal pieces of its own. The chunk's samples are laid
    out like its rows, so a clip may only follow one whose last frame ends before the next clip's first sample.
    """
    chunks: list[_Chunk] = []
    open_chunk = False  # whether chunks[-1] holds whole clips and may take the next one
    for clip, count in enumerate(frames):
        base = clip * rows_per_clip
        if count > chunk_frames:
            pieces = -(-count // chunk_frames)
            size = -(-count // pieces)
            for first in range(0, count, size):
                stop = min(first + size, count)
                chunks.append((base + first, base + stop, [(clip, first, stop)]))
            open_chunk = False
            continue
        if open_chunk:
            start, _, pieces_so_far = chunks[-1]
            previous_frames = pieces_so_far[-1][2]
            clear_of_previous = (previous_frames - 1) * shift + window <= rows_per_clip * shift
            if clear_of_previous and base + count - start <= chunk_frames:
                pieces_so_far.append((clip, 0, count))
                chunks[-1] = (start, base + count, pieces_so_far)
                continue
        chunks.append((base, base + count, [(clip, 0, count)]))
        open_chunk = True
    return chunks


class _ChunkViews(NamedTuple):
    """The views of `_ChunkBuffers` that one chunk length needs, made once per length."""

    samples: torch.Tensor  # (samples,) the chunk's samples, laid out like its rows
    sample_blocks: torch.Tensor  # (samples // block, block) the same, in gcd-sized blocks
    block_sums: torch.Tensor  # (samples // block,)
    sample_frames: torch.Tensor  # (count, window) overlapping frames of `samples`
    block_sum_frames: torch.Tensor  # (count, window // block) overlapping frames of `block_sums`
    frame_means: torch.Tensor  # (count, 1)
    centered: torch.Tensor  # (count, window)
    centered_current: torch.Tensor  # (count, window - 1) columns 1..window-1 of `centered`
    centered_previous: torch.Tensor  # (count, window - 1) columns 0..window-2
    emphasized: torch.Tensor  # (count, window - 1) columns 1..window-1 of `frames`
    frames: torch.Tensor  # (count, n_fft), zero beyond `window` and in column 0
    mel: torch.Tensor  # (count, num_mel_bins)
    mel_numpy: np.ndarray | None  # the same memory as numpy array (CPU only)
    mel_blocks: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (row_lo, row_hi, weights, mel columns)


class _ChunkBuffers:
    """Work buffers for chunks of up to `capacity` frames, reused by every chunk of a call (and, on CPU, by later
    calls in the same thread: see `_cpu_chunk_buffers`).

    The views a chunk length needs are made once (`views`): on CPU, the dispatch overhead of each PyTorch call is
    a good part of the run time, so a chunk uses a fixed, small number of calls.
    """

    def __init__(
        self,
        capacity: int,
        window: int,
        shift: int,
        n_fft: int,
        blocks: tuple[MelBlock, ...],
        num_mel_bins: int,
        device: torch.device,
    ) -> None:
        self.window, self.shift, self.blocks = window, shift, blocks
        self.block = math.gcd(window, shift)
        samples = (capacity - 1) * shift + window
        options = {"dtype": torch.float32, "device": device}
        self.samples = torch.zeros(samples, **options)
        self.block_sums = torch.zeros(samples // self.block, **options)
        self.frame_means = torch.empty(capacity, 1, **options)
        self.centered = torch.empty(capacity, window, **options)
        # Column 0 and the columns past `window` are never written: column 0 because the Hann window is 0 there
        # (which also makes Kaldi's x[-1] := x[0] rule moot), the others are the FFT's zero padding.
        self.frames = torch.zeros(capacity, n_fft, **options)
        self.mel = torch.empty(capacity, num_mel_bins, **options)
        self._views: dict[int, _ChunkViews] = {}

    def views(self, count: int) -> _ChunkViews:
        if count not in self._views:
            window, shift, block = self.window, self.shift, self.block
            samples = self.samples[: (count - 1) * shift + window]
            block_sums = self.block_sums[: samples.numel() // block]
            centered = self.centered[:count]
            mel = self.mel[:count]
            self._views[count] = _ChunkViews(
                samples=samples,
                sample_blocks=samples.view(-1, block),
                block_sums=block_sums,
                sample_frames=samples.unfold(0, window, shift),
                block_sum_frames=block_sums.unfold(0, window // block, shift // block),
                frame_means=self.frame_means[:count],
                centered=centered,
                centered_current=centered[:, 1:],
                centered_previous=centered[:, :-1],
                emphasized=self.frames[:count, 1:window],
                frames=self.frames[:count],
                mel=mel,
                mel_numpy=mel.numpy() if mel.device.type == "cpu" else None,
                mel_blocks=[(r0, r1, weights, mel[:, c0:c1]) for r0, r1, c0, c1, weights in self.blocks],
            )
        return self._views[count]


_THREAD_BUFFERS = threading.local()


def _cpu_chunk_buffers(
    capacity: int, window: int, shift: int, n_fft: int, blocks: tuple[MelBlock, ...], num_mel_bins: int
) -> _ChunkBuffers:
    """This thread's CPU work buffers for chunks of up to `capacity` frames, kept between calls.

    Allocating and first touching ~7 MB of fresh buffers costs about 5 % of a call on 64 ten-second clips. One set per
    thread (concurrent calls never share one) and per geometry; the four most recently used sets are kept.
    `blocks` is the cached tuple of `_mel_blocks_on`, so its identity stands for the mel configuration.
    """
    cache: dict[tuple[Any, ...], _ChunkBuffers] = _THREAD_BUFFERS.__dict__.setdefault("by_geometry", {})
    key = (capacity, window, shift, n_fft, id(blocks), num_mel_bins)
    buffers = cache.pop(key, None)
    if buffers is None or buffers.blocks is not blocks:
        buffers = _ChunkBuffers(capacity, window, shift, n_fft, blocks, num_mel_bins, torch.device("cpu"))
    cache[key] = buffers  # (re-)inserted last: the dict is ordered from least to most recently used
    while len(cache) > 4:
        del cache[next(iter(cache))]
    return buffers


#: Largest output (bytes) whose memory a thread keeps for its next call once the caller has dropped it.
_MAX_REUSED_OUTPUT_BYTES = 128 << 20


def _cpu_output(rows: int, num_mel_bins: int) -> np.ndarray:
    """A (rows, num_mel_bins) float32 array for a call's output, in the memory of the thread's previous output once
    nothing made from that one is alive any more, else in new memory (which is then kept for the next call).

    Fresh memory costs the kernel's page zeroing on first touch (2.6 ms of a ~45 ms call on 64 ten-second clips,
    in the single-threaded log). The caller gets a view of the kept memory; every tensor, view or numpy array made
    from it keeps that view alive, so the memory is reused only after the view has been freed (a weak reference
    tells, whatever the interpreter's reference counting). Numpy views of the kept memory itself bypass that check
    (numpy makes them views of `memory`): only the handed-out view may leave the kernel. (A tensor moved to shared
    memory with `share_memory_()` lets go of the view while numpy arrays taken from it before still point here, as
    they would point at freed memory without the reuse: take `.numpy()` after `share_memory_()`.)
    """
    kept = getattr(_THREAD_BUFFERS, "output", None)
    if kept is not None and kept[0].shape == (rows, num_mel_bins) and kept[1]() is None:
        memory = kept[0]
    else:
        _THREAD_BUFFERS.output = kept = None  # freed (if nobody holds it) before the new one is allocated
        # Allocated by numpy: its large arrays get transparent huge pages, so the first writes into the fresh output
        # page-fault ~5x less than into a torch.empty of the same size.
        memory = np.empty((rows, num_mel_bins), dtype=np.float32)
    handed_out = memory.view()
    _THREAD_BUFFERS.output = (memory, weakref.ref(handed_out)) if memory.nbytes <= _MAX_REUSED_OUTPUT_BYTES else None
    return handed_out


def _fbank_of_clips(
    clips: Sequence[torch.Tensor],
    frames: Sequence[int],
    out_frames: int,
    *,
    subtract_clip_means: bool,
    sample_rate: float,
    num_mel_bins: int,
    frame_length_ms: float,
    frame_shift_ms: float,
    preemphasis_coefficient: float,
    low_freq: float,
    high_freq: float,
    padding_value: float,
    normalize: tuple[float, float] | None,
    chunk_frames: int,
    clip_offsets: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of `kaldi_fbank_batch`: clips (1-D float32 tensors on one device) -> (B, out_frames, bins) fbank.

    The first `frames[b]` (at most `out_frames`) frames of clip ``b`` are computed; the other rows get the padding
    value. With `subtract_clip_means`, each clip's (float32) mean is subtracted first; `clip_offsets`, if given, are
    subtracted instead. Also returns the float32 sum of every clip, computed just before its samples are used (so
    they are then read from the cache), for the caller's NaN/Inf check.

    The chunks of `_plan_chunks` are processed one after the other: their samples are copied straight from the clips
    into a buffer laid out like their rows, then come frame means from sums of gcd-sized blocks, DC removal,
    pre-emphasis, window, ``rfft``, the squared ``view_as_real`` spectrum, banded mel matmuls, and the log into the
    output rows, in buffers that fit the CPU cache (on CPU kept for the thread's next call). The arithmetic is the
    Kaldi recipe's, in the same order: it decides the float32 rounding in the quiet bins (a reordering that is exact
    in real numbers, pre-emphasis on the sample stream before the DC removal, moved resolved bins by 1e-4).
    """
    device = clips[0].device
    window, shift, n_fft = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    batch_size, coefficient = len(clips), float(preemphasis_coefficient)
    blocks = _mel_blocks_on(device, num_mel_bins, n_fft, float(sample_rate), float(low_freq), float(high_freq))
    window_tail = _hann_window_on(device, window)[1:]

    if device.type == "cpu":
        fbank_numpy = _cpu_output(batch_size * out_frames, num_mel_bins)
        fbank = torch.from_numpy(fbank_numpy)
    else:
        fbank_numpy, fbank = None, torch.empty(batch_size * out_frames, num_mel_bins, device=device)
    if normalize is not None:
        scale = 1.0 / (2.0 * normalize[1])
        offset = torch.tensor(-normalize[0] * scale, dtype=torch.float32, device=device)

    chunks = _plan_chunks(frames, out_frames, chunk_frames, window, shift)
    if device.type == "cpu" and chunk_frames <= _MAX_KEPT_CHUNK_FRAMES:
        buffers = _cpu_chunk_buffers(chunk_frames, window, shift, n_fft, blocks, num_mel_bins)
    else:  # large chunks (accelerators, chunk_frames=None): their buffers are freed with the call
        capacity = max(stop - start for start, stop, _ in chunks)
        buffers = _ChunkBuffers(capacity, window, shift, n_fft, blocks, num_mel_bins, device)
    block = buffers.block
    sums: list[torch.Tensor | None] = [None] * batch_size
    offsets: list[torch.Tensor | float | None] = [None] * batch_size
    for start, stop, pieces in chunks:
        count = stop - start
        views = buffers.views(count)
        # The chunk's samples (minus the clip offsets) and their block sums; the gaps between clips are zeroed.
        covered = 0
        for clip, first, stop_frame in pieces:
            wave = clips[clip]
            if sums[clip] is None:
                sums[clip] = wave.sum()
                if clip_offsets is not None:
                    offsets[clip] = clip_offsets[clip]
                elif subtract_clip_means:
                    offsets[clip] = sums[clip] / wave.numel()
                else:
                    offsets[clip] = 0.0
            local = (clip * out_frames + first - start) * shift
            length = (stop_frame - first - 1) * shift + window
            source = wave[first * shift : first * shift + length]
            if len(pieces) == 1:
                torch.sub(source, offsets[clip], out=views.samples)
                torch.sum(views.sample_blocks, dim=1, out=views.block_sums)
                continue
            if local > covered:
                buffers.samples[covered:local].zero_()
                buffers.block_sums[covered // block : local // block].zero_()
            target = buffers.samples[local : local + length]
            torch.sub(source, offsets[clip], out=target)
            torch.sum(target.view(-1, block), dim=1, out=buffers.block_sums[local // block : (local + length) // block])
            covered = local + length
        torch.sum(views.block_sum_frames, dim=1, keepdim=True, out=views.frame_means).div_(window)
        torch.sub(views.sample_frames, views.frame_means, out=views.centered)
        torch.sub(views.centered_current, views.centered_previous, alpha=coefficient, out=views.emphasized)
        views.emphasized.mul_(window_tail)
        # rfft's out= variant copies its result, so it allocates. Squaring the (re, im) pairs in place, with every
        # filter row repeated twice, gives the power spectrum's mel energies without a (slow) complex abs.
        squared = torch.view_as_real(torch.fft.rfft(views.frames)).view(count, -1).square_()
        for r0, r1, weights, mel_block in views.mel_blocks:
            torch.mm(squared[:, r0:r1], weights, out=mel_block)
        # Freed now, the spectrum's 2 MB go back to the allocator before the next chunk's rfft asks for the same
        # size. Kept alive until the next spectrum exists, two spectra alternate and glibc keeps returning heap memory
        # to the OS: measured ~2000 page faults per 64 ten-second clips instead of 17, and a 1.2-1.8x slower call.
        del squared
        views.mel.clamp_(min=_LOG_FLOOR)
        rows = fbank[start:stop]
        if fbank_numpy is not None:
            np.log(views.mel_numpy, out=fbank_numpy[start:stop])  # numpy's log is ~3x faster than torch's
        else:
            torch.log(views.mel, out=rows)
        if normalize is not None:
            torch.add(offset, rows, alpha=scale, out=rows)  # (log - mean) / (2 std) in one pass

    fill = float(padding_value)
    if normalize is not None:
        fill = (fill - normalize[0]) / (normalize[1] * 2)
    fbank = fbank.view(batch_size, out_frames, num_mel_bins)
    for clip, count in enumerate(frames):
        if count < out_frames:
            fbank[clip, count:].fill_(fill)
    return fbank, torch.stack(sums)


def kaldi_fbank_batch(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    *,
    sample_rate: float = 16000.0,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis_coefficient: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    num_output_frames: int | None = None,
    padding_value: float = 0.0,
    normalize: tuple[float, float] | None = None,
    chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi log-mel filter banks of a zero-padded batch of waveforms, computed in one batched pass.

    Per frame (25 ms, 10 ms hop, snip edges): remove the frame's DC offset, pre-emphasis (``x[j] - 0.97 x[j-1]``,
    ``x[-1] := x[0]``), symmetric Hann window, zero-pad to the next power of two, power spectrum, Kaldi mel
    filters, ``log(max(energy, float32 eps))``. That is ``torchaudio.compliance.kaldi.fbank(x, htk_compat=True,
    use_energy=False, window_type="hanning", dither=0.0, ...)`` clip by clip (the clip-mean subtraction of the CAT
    recipe cancels against the per-frame DC removal, up to float rounding).

    The frames are processed ``chunk_frames`` at a time (so that the intermediates stay in the CPU cache; ``None`` =
    all at once, best on GPU), each chunk reading its samples straight from the clips.

    Args:
        waveforms: (B, N) float32, clip ``b`` in ``waveforms[b, :lengths[b]]``; the rest is ignored.
        lengths: real samples per clip, each at least one frame (400 samples at 16 kHz).
        num_output_frames: frames T of the output (default: the longest clip's); clips are truncated to it.
        padding_value: value of the output rows beyond a clip's frames (before `normalize`).
        normalize: ``(mean, std)`` to return ``(fbank - mean) / (2 * std)`` instead of the raw fbank.

    Returns:
        ``(fbank, num_frames)``: fbank (B, T, num_mel_bins) float32 on the device of `waveforms`, and the real
        frames per clip ``min(1 + (lengths - window) // shift, T)`` as int64 (B,) on CPU.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}.")
    batch_size = waveforms.shape[0]
    window, shift, _ = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    lengths_list = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lengths_list) != batch_size or batch_size == 0:
        raise ValueError(f"got {len(lengths_list)} lengths for a batch of {batch_size} waveforms; pass one per row.")
    if any(n < window or n > waveforms.shape[1] for n in lengths_list):
        raise ValueError(
            f"every length must lie in [{window}, {waveforms.shape[1]}] (at least one frame, at most the row); "
            f"got {lengths_list}."
        )
    frames = [1 + (n - window) // shift for n in lengths_list]
    out_frames = max(frames) if num_output_frames is None else int(num_output_frames)
    if out_frames < 1:
        raise ValueError(f"num_output_frames must be at least 1, got {num_output_frames!r}.")
    frames = [min(f, out_frames) for f in frames]
    x = waveforms.to(torch.float32)
    clips = [x[b, :n].contiguous() for b, n in enumerate(lengths_list)]
    fbank, _ = _fbank_of_clips(
        clips,
        frames,
        out_frames,
        subtract_clip_means=False,
        sample_rate=sample_rate,
        num_mel_bins=num_mel_bins,
        frame_length_ms=frame_length_ms,
        frame_shift_ms=frame_shift_ms,
        preemphasis_coefficient=preemphasis_coefficient,
        low_freq=low_freq,
        high_freq=high_freq,
        padding_value=padding_value,
        normalize=normalize,
        chunk_frames=int(chunk_frames) if chunk_frames else sum(frames),
    )
    return fbank, torch.tensor(frames, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------------------------


class CATFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Constructs a CAT feature extractor: waveforms -> normalised Kaldi log-mel filter banks, ``(batch, frames, 128)``.

    The fbank is the one of the original CAT recipe (``torchaudio.compliance.kaldi.fbank`` of the mean-subtracted
    waveform with ``htk_compat=True``, Hann window, 25 ms / 10 ms frames, 128 mel bins, dither 0), computed for a
    whole batch at once in float32 PyTorch, on CPU or GPU (``device=`` argument of ``__call__``). Frames are zero
    padded *before* normalisation (the original order), so a padded frame equals ``-mean / (2 * std)``.

    Precision (log-mel units): ~1e-6 from the original's float32 fbank near each frame's loudest bin and below
    1e-4 in every bin less than ~50 dB under it. Quieter bins hold float32 FFT rounding noise, where any two float32
    implementations (or the original on two CPU kinds) differ by up to ~1e-3; float64 is as far off there.

    Accepted audio, per clip: 1-D float arrays/tensors/lists (16 kHz unless ``sampling_rate`` says otherwise),
    int16 (or int32) PCM which is scaled to [-1, 1), and 2-D multi-channel arrays, which are averaged to mono -
    **the channel axis of a 2-D array is its smaller axis**, so ``(channels, samples)`` and ``(samples, channels)``
    both work. A 2-D array is always *one* multi-channel clip; pass a batch as a list of clips.

    Padding (``padding=``):

    - ``"max_length"`` (default, the original behaviour): pad or truncate every clip to ``max_length`` frames. No
      attention mask by default, because the original model attends to the padding and parity needs the same.
    - ``"longest"`` (or ``True``): pad to the longest clip of the batch, rounded up to a multiple of 16 frames (one
      time patch); returns a frame-level ``attention_mask`` (1 = real frame) by default. With ``truncation=True``
      clips are first cut to ``max_length`` frames.

    A clip must hold at least one 25 ms frame (400 samples at 16 kHz). Shorter-than-a-patch clips (1 to 15 frames)
    are accepted: both padding modes pad them to at least 16 frames, the minimum input of the model.

    Args:
        feature_size (`int`, defaults to 128): Feature dimension (= `num_mel_bins`).
        sampling_rate (`int`, defaults to 16000): Sampling rate the model expects; other rates are resampled.
        num_mel_bins (`int`, defaults to 128): Number of Kaldi mel filters.
        max_length (`int`, defaults to 1024): Target length in frames (10.24 s) for ``padding="max_length"``.
        padding_value (`float`, defaults to 0.0): Value of padded frames in the *raw* fbank (before normalising).
        do_normalize (`bool`, defaults to `True`): Apply ``(x - mean) / (2 * std)``.
        mean (`float`, defaults to -4.268): Log-mel mean of the training data (AudioSet).
        std (`float`, defaults to 4.569): Log-mel standard deviation of the training data (AudioSet).
        padding (`str`, defaults to ``"max_length"``): Default padding strategy of ``__call__``.
        pad_to_multiple_of (`int`, defaults to 16): Rounding of ``padding="longest"`` (frames per time patch).
        frame_length_ms, frame_shift_ms, preemphasis_coefficient, low_freq, high_freq: Kaldi fbank options
            (25.0, 10.0, 0.97, 20.0, 0.0 = Nyquist); change them only for a model trained that way.
        subtract_waveform_mean (`bool`, defaults to `True`): Subtract each clip's mean first (as CAT does).
        resample_backend (`str`, defaults to ``"soxr"``): ``"soxr"`` or ``"torchaudio"`` (used only when
            importable; otherwise soxr is used with a warning).
        chunk_frames (`int`, defaults to 1024): Frames processed at a time on CPU (keeps intermediates in cache).
        return_attention_mask (`bool`, *optional*): Default for ``__call__``; `None` = per padding strategy.
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = 16000,
        num_mel_bins: int = 128,
        max_length: int = FEATURE_PRESETS["audioset"]["max_length"],
        padding_value: float = 0.0,
        do_normalize: bool = True,
        mean: float = FEATURE_PRESETS["audioset"]["mean"],
        std: float = FEATURE_PRESETS["audioset"]["std"],
        padding: str = "max_length",
        pad_to_multiple_of: int = PATCH_FRAMES,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        preemphasis_coefficient: float = 0.97,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        subtract_waveform_mean: bool = True,
        resample_backend: str = "soxr",
        chunk_frames: int = DEFAULT_CHUNK_FRAMES,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        if feature_size != num_mel_bins:
            raise ValueError(
                f"feature_size ({feature_size}) must equal num_mel_bins ({num_mel_bins}); set both to the same value."
            )
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
            raise ValueError(
                f"chunk_frames must be a positive integer, got {chunk_frames!r}; "
                f"the default is {DEFAULT_CHUNK_FRAMES}."
            )
        self.num_mel_bins = num_mel_bins
        self.max_length = max_length
        self.do_normalize = do_normalize
        self.mean = mean
        self.std = std
        self.padding = self._check_padding(padding)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.frame_length_ms = frame_length_ms
        self.frame_shift_ms = frame_shift_ms
        self.preemphasis_coefficient = preemphasis_coefficient
        self.low_freq = low_freq
        self.high_freq = high_freq
        self.subtract_waveform_mean = subtract_waveform_mean
        self.resample_backend = resample_backend
        self.chunk_frames = chunk_frames
        # Fails early on a bad frame size or mel range instead of at the first call.
        n_fft = _frame_geometry(sampling_rate, frame_length_ms, frame_shift_ms)[2]
        _kaldi_mel_banks(num_mel_bins, n_fft, float(sampling_rate), float(low_freq), float(high_freq))

    # -- configuration helpers -------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> CATFeatureExtractor:
        """Extractor with the length and statistics of a CAT recipe (a key of `FEATURE_PRESETS`).

        ``"audioset"`` (1024 frames), ``"esc50"`` (512) or ``"speechcommands"`` (128); `kwargs` override fields.
        """
        key = name.lower().replace("-", "").replace("_", "")
        if key not in FEATURE_PRESETS:
            raise ValueError(f"unknown feature preset {name!r}; use one of {sorted(FEATURE_PRESETS)}.")
        return cls(**{**FEATURE_PRESETS[key], **kwargs})

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

    def pad(
        self,
        processed_features: Any,
        padding: bool | str = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
    ) -> BatchFeature:
        """Pads already extracted ``input_values`` (e.g. per-example features in a collate function).

        Same arguments as [`SequenceFeatureExtractor.pad`], but padded frames get `padded_frame_value` (what
        ``__call__`` gives them, not the raw `padding_value`), lengths are rounded up to a multiple of
        `pad_to_multiple_of` (default: 16 frames, one time patch), and the attention mask is returned unless
        padding to ``"max_length"``.
        """
        padder = copy.copy(self)
        padder.padding_value = self.padded_frame_value
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        if return_attention_mask is None:
            return_attention_mask = padding != "max_length"
        return SequenceFeatureExtractor.pad(
            padder,
            processed_features,
            padding=padding,
            max_length=max_length,
            truncation=truncation,
            pad_to_multiple_of=self.pad_to_multiple_of if pad_to_multiple_of is None else pad_to_multiple_of,
            return_attention_mask=return_attention_mask,
            return_tensors=return_tensors,
        )

    @staticmethod
    def _check_max_length(max_length: Any, pad_to_multiple_of: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < pad_to_multiple_of:
            raise ValueError(
                f"max_length must be an integer of at least {pad_to_multiple_of} frames (one time patch), "
                f"got {max_length!r}; use e.g. 1024 (AudioSet), 512 (ESC-50) or 128 (Speech Commands)."
            )

    @staticmethod
    def _check_padding(padding: Any) -> str:
        if padding is True:
            return "longest"
        if padding in _PADDING_STRATEGIES:
            return padding
        raise ValueError(
            f"padding={padding!r} is not supported; use 'max_length' (fixed length, the original recipe) or "
            "'longest' / True (pad to the longest clip, rounded up to a multiple of 16 frames)."
        )

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Writes the config atomically (temporary file + rename), so a crash never leaves half a JSON file."""
        directory = os.path.dirname(os.path.abspath(json_file_path))
        fd, tmp_path = tempfile.mkstemp(prefix=".tmp_preprocessor_", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as writer:
                writer.write(self.to_json_string())
            os.replace(tmp_path, json_file_path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise

    # -- input handling ----------------------------------------------------------------------------------------------

    @staticmethod
    def _split_batch(raw_speech: Any) -> list[Any]:
        """The clips of `raw_speech`: an array or tensor is one clip, a list of array-likes is a batch."""
        if isinstance(raw_speech, (np.ndarray, torch.Tensor)):
            if raw_speech.ndim > 2:
                raise ValueError(
                    f"audio has {raw_speech.ndim} dimensions (shape {tuple(raw_speech.shape)}); pass a 1-D waveform, "
                    "a 2-D (channels, samples) array, or a list of those for a batch."
                )
            return [raw_speech]
        if isinstance(raw_speech, (list, tuple)):
            if len(raw_speech) == 0:
                raise ValueError("no audio given (empty list); pass at least one waveform.")
            array_like = [isinstance(item, (np.ndarray, torch.Tensor, list, tuple)) for item in raw_speech]
            if all(array_like):
                return list(raw_speech)
            scalar = [isinstance(item, (int, float, np.number)) and not isinstance(item, bool) for item in raw_speech]
            if all(scalar):
                return [raw_speech]
            raise ValueError(
                "audio list mixes numbers and arrays (or holds unsupported objects such as strings or dicts); pass a "
                "list of floats for one clip or a list of arrays for a batch (e.g. example['audio']['array'])."
            )
        raise ValueError(
            f"audio has unsupported type {type(raw_speech).__name__}; pass a numpy array, a torch tensor, a list of "
            "floats, or a list of those for a batch (decode files first, e.g. with soundfile.read)."
        )

    def _prepare_clip(self, clip: Any, index: int, sampling_rate: float, backend: str) -> np.ndarray:
        what = f"clip {index}"
        if isinstance(clip, (np.ndarray, torch.Tensor)) and clip.ndim > 2:
            raise ValueError(
                f"{what} has {clip.ndim} dimensions (shape {tuple(clip.shape)}); pass 1-D mono or 2-D "
                "(channels, samples) audio per clip."
            )
        samples = _as_float32_samples(clip, what)
        if samples.ndim == 0:
            raise ValueError(f"{what} is a scalar, not a waveform; pass a 1-D array of samples.")
        if samples.size == 0:
            raise ValueError(f"{what} is empty (0 samples); drop it or pass real audio.")
        if samples.ndim == 2 and min(samples.shape) > _MAX_EXPECTED_CHANNELS:
            logger.warning(
                f"{what} has shape {samples.shape}: read as {min(samples.shape)} channels of one clip, which are "
                "averaged. Other transformers feature extractors read a 2-D array as a batch; for a batch of clips, "
                "pass a list of 1-D arrays."
            )
        mono = downmix_to_mono(samples) if samples.ndim == 2 else samples
        given = f"{mono.shape[0]} samples at {sampling_rate:g} Hz"
        if sampling_rate != self.sampling_rate:
            mono = resample_audio(mono, sampling_rate, self.sampling_rate, backend=backend)
            given += f", {mono.shape[0]} after resampling to {self.sampling_rate} Hz"
        if mono.shape[0] < self.window_samples:
            raise ValueError(
                f"{what} has {given}: shorter than one {self.frame_length_ms:g} ms frame ({self.window_samples} "
                f"samples at {self.sampling_rate} Hz); pad it (e.g. with zeros) or drop it."
            )
        return mono

    @staticmethod
    def _readable_array(wave: np.ndarray) -> np.ndarray:
        """`wave` as a contiguous array that torch.from_numpy accepts silently (read-only arrays are copied)."""
        wave = np.ascontiguousarray(wave)
        return wave if wave.flags.writeable else wave.copy()

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

    # -- main entry point --------------------------------------------------------------------------------------------

    def __call__(
        self,
        raw_speech: np.ndarray | torch.Tensor | list[float] | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int | None = None,
        padding: bool | str | None = None,
        max_length: int | None = None,
        truncation: bool | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
        device: str | torch.device = "cpu",
        resample_backend: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Featurises one clip or a batch of clips.

        Args:
            raw_speech: One clip (1-D array/tensor/list of floats, int16 PCM, or 2-D multi-channel array, whose
                smaller axis is read as channels and averaged) or a list of clips. Unlike other transformers
                feature extractors, a 2-D array is one multi-channel clip, not a batch (a warning says so beyond 8
                channels): pass a batch as a list.
            sampling_rate: Rate of `raw_speech`; resampled to ``self.sampling_rate`` if different. Pass it: a
                wrong rate silently gives wrong features.
            padding: ``"max_length"`` or ``"longest"``/``True``; defaults to ``self.padding``.
            max_length: Frames for ``"max_length"`` (and the cap for ``"longest"`` with ``truncation=True``, after
                which the batch is still rounded up to ``pad_to_multiple_of``, as transformers pads); at least
                ``pad_to_multiple_of``; defaults to ``self.max_length``.
            truncation: Only for ``"longest"``: cut clips to `max_length` frames first. ``"max_length"`` always
                truncates (passing ``False`` is an error).
            return_attention_mask: Return the (B, T) int64 frame mask, 1 = real frame. Default: True for
                ``"longest"``, False for ``"max_length"`` (the original model attends to its padding).
            return_tensors: ``"pt"``, ``"np"`` or `None` (a list of per-clip numpy arrays).
            device: Where the fbank is computed (e.g. ``"cuda"``); ``"pt"`` outputs stay on it.
            resample_backend: Overrides ``self.resample_backend`` for this call.

        Returns:
            [`BatchFeature`] with ``input_values`` (B, T, num_mel_bins) float32 and optionally ``attention_mask``.
        """
        if kwargs:
            logger.warning_once(f"{self.__class__.__name__} ignores unknown arguments {sorted(kwargs)}.")
        output_type = self._check_return_tensors(return_tensors)
        padding = self._check_padding(self.padding if padding is None else padding)
        max_length = self.max_length if max_length is None else max_length
        self._check_max_length(max_length, self.pad_to_multiple_of)
        if padding == "max_length" and truncation is False:
            raise ValueError(
                "padding='max_length' always truncates to max_length frames; use padding='longest' to keep whole "
                "clips."
            )
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        if return_attention_mask is None:
            return_attention_mask = padding == "longest"

        if sampling_rate is None:
            logger.warning_once(
                f"It is strongly recommended to pass the `sampling_rate` argument to `{self.__class__.__name__}()`. "
                "Failing to do so can result in silent errors that might be hard to debug."
            )
            sampling_rate = self.sampling_rate
        elif (
            isinstance(sampling_rate, bool)
            or not isinstance(sampling_rate, (int, float, np.number))
            or sampling_rate <= 0
        ):
            raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}.")
        backend = self._resolve_backend(resample_backend) if sampling_rate != self.sampling_rate else "soxr"

        clips = self._split_batch(raw_speech)
        waveforms = [self._prepare_clip(clip, i, sampling_rate, backend) for i, clip in enumerate(clips)]

        window, shift, _ = _frame_geometry(self.sampling_rate, self.frame_length_ms, self.frame_shift_ms)
        frames = [1 + (wave.shape[0] - window) // shift for wave in waveforms]
        if padding == "max_length" or truncation:
            frames = [min(f, max_length) for f in frames]
        if padding == "max_length":
            target = max_length
        else:
            target = -(-max(frames) // self.pad_to_multiple_of) * self.pad_to_multiple_of

        # The clips go to the kernel as they are (no padded batch is built): it copies each chunk's samples, minus the
        # clip mean, into a small buffer. The clip sums it returns are NaN/Inf iff a sample is (or the samples are
        # huge).
        device = torch.device(device)
        tensors = [torch.from_numpy(self._readable_array(wave)).to(device) for wave in waveforms]
        fbank_options: dict[str, Any] = {
            "sample_rate": float(self.sampling_rate),
            "num_mel_bins": self.num_mel_bins,
            "frame_length_ms": self.frame_length_ms,
            "frame_shift_ms": self.frame_shift_ms,
            "preemphasis_coefficient": self.preemphasis_coefficient,
            "low_freq": self.low_freq,
            "high_freq": self.high_freq,
            "padding_value": self.padding_value,
            "normalize": (self.mean, self.std) if self.do_normalize else None,
            "chunk_frames": self.chunk_frames if device.type == "cpu" else _ACCELERATOR_CHUNK_FRAMES,
        }
        fbank, sums = _fbank_of_clips(
            tensors, frames, target, subtract_clip_means=self.subtract_waveform_mean, **fbank_options
        )
        if not bool(torch.isfinite(sums).all()):
            bad = [row for row, tensor in enumerate(tensors) if not bool(torch.isfinite(tensor).all())]
            if bad:
                raise ValueError(
                    f"clip(s) {bad} contain NaN or Inf samples; clean or drop them (e.g. with np.nan_to_num) before "
                    "feature extraction."
                )
            # Huge but finite samples overflowed a float32 sum: redo with means computed in float64.
            means = [float(tensor.double().mean()) if self.subtract_waveform_mean else 0.0 for tensor in tensors]
            fbank, _ = _fbank_of_clips(
                tensors, frames, target, subtract_clip_means=False, clip_offsets=means, **fbank_options
            )
        num_frames = torch.tensor(frames, dtype=torch.int64)

        data: dict[str, Any] = {"input_values": fbank}
        if return_attention_mask:
            frame_index = torch.arange(target, device=device)
            data["attention_mask"] = (frame_index.unsqueeze(0) < num_frames.to(device).unsqueeze(1)).to(torch.int64)
        return self._to_output(data, output_type)

    @staticmethod
    def _check_return_tensors(return_tensors: str | TensorType | None) -> TensorType | None:
        if return_tensors is None:
            return None
        try:
            tensor_type = TensorType(return_tensors)
        except ValueError:
            tensor_type = None
        if tensor_type not in (TensorType.PYTORCH, TensorType.NUMPY):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None.")
        return tensor_type

    @staticmethod
    def _to_output(data: dict[str, torch.Tensor], tensor_type: TensorType | None) -> BatchFeature:
        """'pt' keeps the tensors (and their device); 'np' gives arrays; None a list of per-clip arrays."""
        if tensor_type == TensorType.PYTORCH:
            return BatchFeature(data)
        arrays = {key: value.cpu().numpy() for key, value in data.items()}
        if tensor_type == TensorType.NUMPY:
            return BatchFeature(arrays)
        return BatchFeature({key: list(value) for key, value in arrays.items()})
