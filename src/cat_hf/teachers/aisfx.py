"""aisfx: a CNN trained on sound-effect libraries (Ma & Lerch, ISMIR 2022), as a frozen teacher.

The aisfx 0.1.2 wheel on PyPI ships the weights (`aisfx/models/checkpoint.pth`; CC BY 4.0, A. B. Ma and A. Lerch):
a 4-block VGG-style CNN (the DCASE cross-task baseline's `Cnn_9layers`, 4.7 M parameters; the dataset heads are left
out) that maps blocks of 100 log-mel frames x 96 bands at 44.1 kHz (2.3 s) to 512-d embeddings. This module is our
own implementation of the network and of the package's front end (its defaults, the paper's "essentia" spectrogram):

- 44.1 kHz mono, peak-normalised per clip (the package's librosa front end does so; our corpora are quieter than
  the near-full-scale libraries it was trained on, and on instrument notes this raised a linear probe from 0.77 to
  0.85);
- 2048-sample symmetric Hann frames, hop 1024, centred with zero padding; power spectrum -> 96 HTK-mel bands from
  0 to 22.05 kHz, each summing to one; log10(1 + 1e4 x), min-max scaled with the paper's constants (0, 9.4578);
- blocks of 100 frames at a hop of 50 (a clip shorter than a block is one zero-padded block); per block: two 3x3
  convolutions + batch norm + ReLU per stage, 2x2 max pooling after the first three stages, then the mean over
  frequency and the maximum over time; the clip's embedding is the mean over its blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .frontend import FrozenSpectrogramNetwork, htk_mel_filterbank, power_spectrogram
from .weights import WheelFile

SAMPLING_RATE = 44100
FRAME_LENGTH = 2048
HOP_LENGTH = 1024
MEL_BANDS = 96
LOG_SCALE = 1e4  # log10(1 + 1e4 * power), essentia's "shift_scale_log"
NORM_MAX = 9.457798957824707  # min-max scaling to [0, 1] with the paper's corpus-wide constants (min 0)
BLOCK_FRAMES = 100
BLOCK_HOP = 50
CHANNELS = (64, 128, 256, 512)
EMBEDDING_DIM = CHANNELS[-1]

WEIGHTS = WheelFile(
    package="aisfx", version="0.1.2", module="aisfx", member="aisfx/models/checkpoint.pth",
    sha256="499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5",
    license="CC BY 4.0 (A. B. Ma and A. Lerch)",
)


class _ConvStage(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(out_channels)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, 2) if pool else x


class AisfxNetwork(torch.nn.Module):
    """(blocks, 100 frames, 96 bands) -> (blocks, 512). Parameter names follow the published checkpoint."""

    def __init__(self):
        super().__init__()
        inputs = (1, *CHANNELS[:-1])
        for i, (cin, cout) in enumerate(zip(inputs, CHANNELS), start=1):
            self.add_module(f"conv_block{i}", _ConvStage(cin, cout))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks.unsqueeze(1)
        stages = [self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4]
        for i, stage in enumerate(stages):
            x = stage(x, pool=i < len(stages) - 1)
        return x.mean(dim=3).amax(dim=2)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The embedding network's weights from the checkpoint, a pickled `(state_dict, dataset_dict)` whose dataset
    indices are numpy int64 scalars saved under numpy 1's module names: only those numpy types are allowlisted
    (`weights_only=True`), so no code in the file runs."""
    numpy_core = getattr(np, "_core", None) or np.core
    allowed: list = [(numpy_core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, name) for name in ("Int64DType", "Int32DType") if hasattr(np, "dtypes")]
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
    prefix = "embedding_net."
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path} holds no '{prefix}*' weights; is it the checkpoint of {WEIGHTS.requirement}?")
    return weights


class AisfxEmbedder(FrozenSpectrogramNetwork):
    """44.1 kHz clips -> (B, 512): the mean of the network's block embeddings (batch-independent, eval-mode BN)."""

    def __init__(self, weights: str | None = None, *, peak_normalize: bool = True, max_blocks_per_batch: int = 64):
        super().__init__(torch.hann_window(FRAME_LENGTH, periodic=False),
                         htk_mel_filterbank(SAMPLING_RATE, FRAME_LENGTH, MEL_BANDS, 0.0, SAMPLING_RATE / 2))
        self.network = AisfxNetwork()
        if weights is not None:
            self.network.load_state_dict(load_state_dict(weights))
        self.peak_normalize = bool(peak_normalize)
        self.max_blocks_per_batch = int(max_blocks_per_batch)
        self.freeze()

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) samples -> (frames, 96) scaled log-mel frames."""
        mel = power_spectrogram(waveform, FRAME_LENGTH, HOP_LENGTH, self.window, "constant") @ self.mel_weights
        return torch.log10(1.0 + LOG_SCALE * mel) / NORM_MAX

    def blocks(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) samples -> (num_blocks, 100, 96): full blocks at hop 50, or one zero-padded block for short clips."""
        if self.peak_normalize:
            peak = waveform.abs().max()
            if peak > 0:
                waveform = waveform / peak
        frames = self.log_mel(waveform)
        if frames.shape[0] < BLOCK_FRAMES:
            frames = F.pad(frames, (0, 0, 0, BLOCK_FRAMES - frames.shape[0]))
        return frames.unfold(0, BLOCK_FRAMES, BLOCK_HOP).transpose(1, 2).contiguous()

    @torch.no_grad()
    def forward(self, clips: Sequence[np.ndarray] | Sequence[torch.Tensor]) -> torch.Tensor:
        per_clip = [self.blocks(waveform) for waveform in self.waveforms(clips)]
        blocks = torch.cat(per_clip)
        embeddings = torch.cat([self.network(chunk) for chunk in blocks.split(self.max_blocks_per_batch)])
        return torch.stack([part.mean(dim=0) for part in embeddings.split([b.shape[0] for b in per_clip])])
