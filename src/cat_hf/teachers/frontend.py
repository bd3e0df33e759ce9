"""What the teachers share: a frozen network behind its own spectrogram front end, and the mel filterbanks.

Each teacher must see its input exactly as its network was trained on it (window, mel scale, log, scaling), which
is never CAT's Kaldi fbank; so every teacher module computes its own front end in torch, and these are its parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


class FrozenSpectrogramNetwork(torch.nn.Module):
    """A frozen network with its analysis window and mel weights as buffers (so `.to(device)` moves them): eval mode,
    no gradients, and `waveforms(clips)` turning a batch of clips into 1-D float32 tensors on its device."""

    def __init__(self, window: torch.Tensor, mel_weights: np.ndarray | None = None):
        super().__init__()
        self.register_buffer("window", window, persistent=False)
        if mel_weights is not None:
            self.register_buffer("mel_weights", torch.from_numpy(mel_weights), persistent=False)

    def freeze(self) -> None:
        """Eval mode, no gradients; call at the end of a subclass's `__init__`, once its network exists."""
        self.eval()
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.window.device

    def waveforms(self, clips: Sequence[np.ndarray] | Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Each clip as a 1-D float32 tensor on the network's device; a clear error for anything else."""
        if isinstance(clips, torch.Tensor) and clips.ndim == 1:
            raise ValueError(f"{type(self).__name__} takes a batch of clips; wrap a single clip in a list.")
        tensors = []
        for clip in clips:
            waveform = torch.as_tensor(clip if isinstance(clip, torch.Tensor) else np.asarray(clip, dtype=np.float32),
                                       dtype=torch.float32)
            if waveform.ndim != 1 or waveform.numel() == 0:
                raise ValueError(f"Each clip must be a non-empty 1-D waveform, got shape {tuple(waveform.shape)}.")
            tensors.append(waveform.to(self.device))
        return tensors


def htk_mel(frequency: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(frequency, dtype=np.float64) / 700.0)


def htk_mel_filterbank(sampling_rate: int, frame_length: int, num_bands: int, f_min: float, f_max: float) -> np.ndarray:
    """(frame_length // 2 + 1, num_bands): triangles linear on the HTK mel scale, each band summing to one
    (essentia's "warping" weighting with "unit_sum" normalisation)."""
    bins = np.arange(frame_length // 2 + 1) * sampling_rate / frame_length
    bin_mels = htk_mel(bins)
    edges = np.linspace(htk_mel(f_min), htk_mel(f_max), num_bands + 2)
    rising = (bin_mels[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None, :]
    falling = (edges[None, 2:] - bin_mels[:, None]) / (edges[2:] - edges[1:-1])[None, :]
    weights = np.clip(np.minimum(rising, falling), 0.0, None)
    sums = weights.sum(axis=0)
    if np.any(sums <= 0):
        raise ValueError(f"{int(np.sum(sums <= 0))} mel bands contain no FFT bin; use fewer bands or longer frames.")
    return (weights / sums).astype(np.float32)


def slaney_mel_filterbank(sampling_rate: int, n_fft: int, num_bands: int) -> np.ndarray:
    """(n_fft // 2 + 1, num_bands): triangles on the Slaney mel scale (linear below 1 kHz, logarithmic above), each
    scaled to unit area, from 0 Hz to Nyquist: librosa's `melspectrogram` defaults."""
    f_sp, break_hz = 200.0 / 3.0, 1000.0  # mels per Hz below the break; the break between the two parts
    break_mel, log_step = break_hz / f_sp, math.log(6.4) / 27.0

    def to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz < break_hz, hz / f_sp, break_mel + np.log(np.maximum(hz, 1e-10) / break_hz) / log_step)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel < break_mel, mel * f_sp, break_hz * np.exp(log_step * (mel - break_mel)))

    edges = to_hz(np.linspace(0.0, float(to_mel(sampling_rate / 2.0)), num_bands + 2))
    bins = np.linspace(0.0, sampling_rate / 2.0, n_fft // 2 + 1)
    rising = (bins[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - bins[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


def power_spectrogram(waveform: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """(frames, n_fft // 2 + 1) power of centred STFT frames."""
    spectrum = torch.stft(waveform, n_fft=n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                          pad_mode=pad_mode, return_complex=True)
    return (spectrum.real.square() + spectrum.imag.square()).transpose(0, 1)


__all__ = [
    "FrozenSpectrogramNetwork",
    "htk_mel",
    "htk_mel_filterbank",
    "power_spectrogram",
    "slaney_mel_filterbank",
]
