"""Resemblyzer: the GE2E speaker encoder of Real-Time-Voice-Cloning, as a frozen teacher.

The Resemblyzer 0.1.4 wheel on PyPI ships the weights (`resemblyzer/pretrained.pt`, Apache-2.0, Resemble AI):
a 3-layer LSTM of width 256 over 40 mel bands, a linear layer, ReLU and L2 norm (1.4 M parameters), trained for
speaker verification on LibriSpeech and VoxCeleb 1 and 2. It knows who speaks, and by design little of what is said.
This module is our own implementation of the network and of `VoiceEncoder.embed_utterance`'s front end:

- clips quieter than -30 dBFS raised to that RMS level (louder ones left alone);
- mel power spectrogram: 25 ms periodic Hann frames, 10 ms hop, centred with reflect padding, 40 Slaney-scale bands
  with unit-area triangles (librosa's defaults), no log;
- 1.6 s windows every 1/1.3 s, the clip zero-padded to cover the last window (kept if at least 75 % of it is audio);
- per window the last LSTM layer's final hidden state -> linear -> ReLU -> L2 norm; the clip's embedding is the
  L2-normalised mean over its windows (unit vectors, 256-d).

Left out: the package's voice-activity trimming of long pauses (webrtcvad), which only shortens silences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .frontend import FrozenSpectrogramNetwork, power_spectrogram, slaney_mel_filterbank
from .weights import WheelFile

SAMPLING_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
MEL_BANDS = 40
HIDDEN_SIZE = 256
LAYERS = 3
EMBEDDING_DIM = 256
PARTIAL_FRAMES = 160  # 1.6 s windows ("partial utterances")
PARTIALS_PER_SECOND = 1.3
MIN_COVERAGE = 0.75  # a last, zero-padded window is kept if at least this share of it is audio
TARGET_DBFS = -30.0

WEIGHTS = WheelFile(
    package="Resemblyzer", version="0.1.4", module="resemblyzer", member="resemblyzer/pretrained.pt",
    sha256="39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e",
    license="Apache-2.0 (Resemble AI)",
)


class ResemblyzerEmbedder(FrozenSpectrogramNetwork):
    """16 kHz clips -> (B, 256) unit vectors; all windows of a batch go through the LSTM together."""

    def __init__(self, weights: str | None = None):
        super().__init__(torch.hann_window(FRAME_LENGTH, periodic=True),
                         slaney_mel_filterbank(SAMPLING_RATE, FRAME_LENGTH, MEL_BANDS))
        self.lstm = torch.nn.LSTM(MEL_BANDS, HIDDEN_SIZE, LAYERS, batch_first=True)
        self.linear = torch.nn.Linear(HIDDEN_SIZE, EMBEDDING_DIM)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
            # similarity_weight / similarity_bias only scale the GE2E training loss; they are not part of the encoder
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
        self.freeze()

    def windows(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) samples -> (num_windows, 160, 40) mel power frames of the 1.6 s windows of one clip."""
        rms = waveform.square().mean().sqrt()
        target_rms = 10.0 ** (TARGET_DBFS / 20.0)
        if 0 < rms < target_rms:
            waveform = waveform * (target_rms / rms)
        total_frames = -(-(waveform.numel() + 1) // HOP_LENGTH)
        step = round(SAMPLING_RATE / PARTIALS_PER_SECOND / HOP_LENGTH)
        starts = list(range(0, max(1, total_frames - PARTIAL_FRAMES + step + 1), step))
        covered = (waveform.numel() - starts[-1] * HOP_LENGTH) / (PARTIAL_FRAMES * HOP_LENGTH)
        if covered < MIN_COVERAGE and len(starts) > 1:
            starts.pop()
        padded_length = (starts[-1] + PARTIAL_FRAMES) * HOP_LENGTH
        if padded_length > waveform.numel():
            waveform = torch.nn.functional.pad(waveform, (0, padded_length - waveform.numel()))
        mel = power_spectrogram(waveform, FRAME_LENGTH, HOP_LENGTH, self.window, "reflect") @ self.mel_weights
        return torch.stack([mel[start : start + PARTIAL_FRAMES] for start in starts])

    @torch.no_grad()
    def forward(self, clips: Sequence[np.ndarray] | Sequence[torch.Tensor]) -> torch.Tensor:
        per_clip = [self.windows(waveform) for waveform in self.waveforms(clips)]
        _, (hidden, _) = self.lstm(torch.cat(per_clip))
        partial = torch.nn.functional.normalize(torch.relu(self.linear(hidden[-1])), dim=1)
        counts = [w.shape[0] for w in per_clip]
        return torch.stack([torch.nn.functional.normalize(p.mean(dim=0), dim=0) for p in partial.split(counts)])
