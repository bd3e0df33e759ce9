"""Genuinely pretrained, frozen external encoders for Representation Regularization (RR), usable offline: aisfx
(sound effects, below) and Resemblyzer (speakers, further down; `ResemblyzerEncoder`).

`aisfx` 0.1.2 (PyPI; Ma & Lerch, ISMIR 2022) ships the weights of a 9-layer VGG-style CNN trained on nine
sound-effect libraries (`aisfx/models/checkpoint.pth`, 4.7 M parameters in the embedding network plus 1.5 M in
the dataset heads we drop). It maps a block of 100 log-mel frames x 96 mel bands (about 2.3 s at 44.1 kHz) to
a 512-d embedding. Nothing in it was trained on this project's corpora or probe labels, which is what an RR
teacher should be.

The package's own front end needs essentia or librosa (neither installed here); we compute the same features
in torch, after the package's defaults (the "essentia" spectrogram of the paper):

- audio at 44.1 kHz mono, peak-normalised per clip (as the package's librosa front end does; its essentia front
  end applies a unit gain, which suits the near-full-scale library files it was trained on, but our corpora are
  quieter: on `instruments` peak normalisation raised a linear probe from 0.77 to 0.85, see benchmarks/README.md);
- frames of 2048 samples, hop 1024, symmetric Hann window, centred frames with zero padding;
- power spectrum -> 96 triangular mel bands between 0 Hz and 22.05 kHz on the HTK mel scale, triangles linear
  in mel ("warping" weighting), each band's weights summing to one ("unit_sum");
- log10(1 + 10^4 * power), then min-max scaled with the paper's corpus-wide constants (0, 9.4578);
- blocks of 100 frames with a hop of 50 (the package's default 0.5 block hop), partial blocks dropped unless the
  clip is shorter than one block, which is zero-padded (zero = silence after scaling);
- the network's 512-d outputs of all blocks of a clip are averaged: one embedding per clip.

Use it through the project's Python-callable interface:

    from benchmarks.rr_encoders import aisfx_encoder          # or build_external_encoder(SPEC)
    encoder = aisfx_encoder(device="cpu")                     # an ExternalEncoder (CallableEncoder subclass)
    targets = encoder([clip_16k, ...])                        # (B, 512) float32, no gradient

    spec: "python:benchmarks/rr_encoders.py:AisfxEncoder"    (set rr_embedding_dim: 512 in the CAT config)

Install (never touches torch):  pip install --no-deps aisfx==0.1.2   (it imports only torch, numpy, tqdm here)

Self-check on the corpora of benchmarks/corpora.py:  python benchmarks/rr_encoders.py check --root /work/corpora
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cat_hf.external_encoders import CallableEncoder

#: The aisfx front end and block constants (aisfx/inference.py and preprocessing.py of version 0.1.2).
AISFX_VERSION = "0.1.2"
AISFX_SAMPLING_RATE = 44100
AISFX_FRAME_LENGTH = 2048
AISFX_HOP_LENGTH = 1024
AISFX_MEL_BANDS = 96
AISFX_F_MIN, AISFX_F_MAX = 0.0, 22050.0
AISFX_LOG_SCALE = 1e4  # log10(1 + 1e4 * power), essentia's "shift_scale_log"
AISFX_NORM_MIN, AISFX_NORM_MAX = 0.0, 9.457798957824707  # 'original' normalisation of the paper
AISFX_BLOCK_FRAMES = 100
AISFX_BLOCK_HOP = 50
AISFX_EMBEDDING_DIM = 512
#: The embedding network's constructor arguments in aisfx.inference.load_bestModel: max pooling, 3x3 kernels,
#: stride 1, 64 channels in the first block (512 in the last).
AISFX_NETWORK_ARGS = ("max", 3, 1, 64)


class AisfxNotInstalledError(ImportError):
    """The aisfx package (weights and network definition) is missing."""


def _aisfx_folder() -> Path:
    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise AisfxNotInstalledError(
            f"The aisfx package is not installed; install it without touching torch: "
            f"pip install --no-deps aisfx=={AISFX_VERSION}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def aisfx_checkpoint_path() -> Path:
    """The weights file shipped inside the aisfx wheel."""
    path = _aisfx_folder() / "models" / "checkpoint.pth"
    if not path.is_file():
        raise AisfxNotInstalledError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall "
                                     f"aisfx=={AISFX_VERSION}")  # fmt: skip
    return path


def load_aisfx_state_dict(checkpoint: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The embedding network's weights, loaded with `weights_only=True`.

    The checkpoint is a pickled `(state_dict, dataset_dict)` whose dataset indices are numpy int64 scalars saved
    under numpy 1's module names; only those few numpy types are allowlisted, no arbitrary code runs.
    """
    path = Path(checkpoint) if checkpoint is not None else aisfx_checkpoint_path()
    numpy_core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [(numpy_core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, name) for name in ("Int64DType", "Int32DType") if hasattr(np, "dtypes")]
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
    prefix = "embedding_net."
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path} holds no '{prefix}*' weights; is it the aisfx 0.1.2 checkpoint?")
    return weights


def htk_mel(frequency: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(frequency, dtype=np.float64) / 700.0)


def htk_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sampling_rate: int = AISFX_SAMPLING_RATE,
    frame_length: int = AISFX_FRAME_LENGTH,
    num_bands: int = AISFX_MEL_BANDS,
    f_min: float = AISFX_F_MIN,
    f_max: float = AISFX_F_MAX,
) -> np.ndarray:
    """(num_bins, num_bands) weights: HTK-mel triangles, linear in mel, each band summing to one."""
    bins = np.arange(frame_length // 2 + 1) * sampling_rate / frame_length
    bin_mels = htk_mel(bins)
    edges = np.linspace(htk_mel(f_min), htk_mel(f_max), num_bands + 2)
    weights = np.zeros((len(bins), num_bands), dtype=np.float64)
    for band in range(num_bands):
        low, centre, high = edges[band], edges[band + 1], edges[band + 2]
        rising = (bin_mels - low) / (centre - low)
        falling = (high - bin_mels) / (high - centre)
        weights[:, band] = np.clip(np.minimum(rising, falling), 0.0, None)
    sums = weights.sum(axis=0)
    if np.any(sums <= 0):
        # Only happens when bands are narrower than the bin spacing (far more bands than this front end uses).
        raise ValueError(f"{int(np.sum(sums <= 0))} mel bands contain no FFT bin; use fewer bands or longer frames.")
    return (weights / sums).astype(np.float32)


class FrozenSpectrogramNetwork(torch.nn.Module):
    """A frozen network behind its own STFT front end: holds the analysis window and the mel weights (as buffers, so
    `.to(device)` moves them), stays in eval mode without gradients, and turns a batch of clips into 1-D tensors."""

    def __init__(self, window: torch.Tensor, mel_weights: np.ndarray):
        super().__init__()
        self.register_buffer("window", window, persistent=False)
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
            waveform = torch.as_tensor(np.asarray(clip, dtype=np.float32) if not isinstance(clip, torch.Tensor)
                                       else clip, dtype=torch.float32)  # fmt: skip
            if waveform.ndim != 1 or waveform.numel() == 0:
                raise ValueError(f"Each clip must be a non-empty 1-D waveform, got shape {tuple(waveform.shape)}.")
            tensors.append(waveform.to(self.device))
        return tensors


class AisfxEmbedder(FrozenSpectrogramNetwork):
    """aisfx's pretrained embedding network behind our own mel front end: clips at 44.1 kHz -> (B, 512).

    Call it with a list of 1-D float arrays (or a (B, N) tensor of equal-length clips) sampled at 44.1 kHz;
    each clip's 512-d embedding is the mean over its 100-frame blocks. Deterministic and batch-independent
    (eval-mode batch norm), so a clip always gets the same embedding.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        max_blocks_per_batch: int = 64,
        pretrained: bool = True,
        peak_normalize: bool = True,
    ):
        _aisfx_folder()  # a clear error before importing the package
        super().__init__(torch.hann_window(AISFX_FRAME_LENGTH, periodic=False), mel_filterbank())
        # the package's own network definition (it imports only torch)
        from aisfx.models.cnn2d import EmbeddingNet

        self.network = EmbeddingNet(*AISFX_NETWORK_ARGS)
        if pretrained:
            self.network.load_state_dict(load_aisfx_state_dict(checkpoint))
        self.max_blocks_per_batch = int(max_blocks_per_batch)
        self.peak_normalize = bool(peak_normalize)
        self.freeze()

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) 44.1 kHz samples -> (frames, 96) scaled log-mel frames, as the network was trained on."""
        spectrum = torch.stft(
            waveform, n_fft=AISFX_FRAME_LENGTH, hop_length=AISFX_HOP_LENGTH, win_length=AISFX_FRAME_LENGTH,
            window=self.window, center=True, pad_mode="constant", return_complex=True,
        )  # fmt: skip
        power = spectrum.real.square() + spectrum.imag.square()  # (bins, frames)
        mel = power.transpose(0, 1) @ self.mel_weights  # (frames, bands)
        log_mel = torch.log10(1.0 + AISFX_LOG_SCALE * mel)
        return (log_mel - AISFX_NORM_MIN) / (AISFX_NORM_MAX - AISFX_NORM_MIN)

    def blocks(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) samples -> (num_blocks, 100, 96): full blocks at hop 50, or one zero-padded block for short clips."""
        if self.peak_normalize:
            peak = waveform.abs().max()
            if peak > 0:
                waveform = waveform / peak
        frames = self.log_mel(waveform)
        if frames.shape[0] < AISFX_BLOCK_FRAMES:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, AISFX_BLOCK_FRAMES - frames.shape[0]))
        return frames.unfold(0, AISFX_BLOCK_FRAMES, AISFX_BLOCK_HOP).transpose(1, 2).contiguous()

    @torch.no_grad()
    def forward(self, clips: Sequence[np.ndarray] | Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        per_clip = [self.blocks(waveform) for waveform in self.waveforms(clips)]
        counts = [b.shape[0] for b in per_clip]
        blocks = torch.cat(per_clip)
        outputs = [self.network(chunk) for chunk in blocks.split(self.max_blocks_per_batch)]
        embeddings = torch.cat(outputs)  # (total_blocks, 512)
        return torch.stack([part.mean(dim=0) for part in embeddings.split(counts)])


class AisfxEncoder(CallableEncoder):
    """The aisfx embedding network as a frozen RR teacher: 16 kHz clips -> (B, 512) (resampled to 44.1 kHz).

    Spec form: `python:benchmarks/rr_encoders.py:AisfxEncoder` (options `?checkpoint=PATH`, `?pretrained=false`
    for the randomly initialised control, `?peak_normalize=false`; the spec's `device` is applied by
    `build_external_encoder`).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        pretrained: bool = True,
        peak_normalize: bool = True,
        max_blocks_per_batch: int = 64,
    ):
        name = f"aisfx-{AISFX_VERSION}" if pretrained else f"aisfx-{AISFX_VERSION}-random-init"
        super().__init__(
            AisfxEmbedder(checkpoint, max_blocks_per_batch=max_blocks_per_batch, pretrained=pretrained,
                          peak_normalize=peak_normalize),
            AISFX_EMBEDDING_DIM, AISFX_SAMPLING_RATE, name=name, input_format="list",
        )  # fmt: skip


def aisfx_encoder(device: str | torch.device = "cpu", **kwargs: Any) -> AisfxEncoder:
    """The pretrained aisfx encoder on `device`, ready to give RR targets (512-d)."""
    return AisfxEncoder(**kwargs).to(device)


# ================================================================================================================
# Resemblyzer: a pretrained speaker encoder
# ================================================================================================================

#: Resemblyzer 0.1.4 (PyPI; the GE2E speaker encoder of Real-Time-Voice-Cloning, trained on LibriSpeech, VoxCeleb
#: 1 and 2): its hyper-parameters (resemblyzer/hparams.py) and the defaults of `VoiceEncoder.embed_utterance`.
RESEMBLYZER_VERSION = "0.1.4"
RESEMBLYZER_SAMPLING_RATE = 16000
RESEMBLYZER_FRAME_LENGTH = 400  # 25 ms
RESEMBLYZER_HOP_LENGTH = 160  # 10 ms
RESEMBLYZER_MEL_BANDS = 40
RESEMBLYZER_HIDDEN_SIZE = 256
RESEMBLYZER_LAYERS = 3
RESEMBLYZER_EMBEDDING_DIM = 256
RESEMBLYZER_PARTIAL_FRAMES = 160  # 1.6 s windows ("partial utterances")
RESEMBLYZER_PARTIALS_PER_SECOND = 1.3
RESEMBLYZER_MIN_COVERAGE = 0.75  # a last, zero-padded window is kept if at least this share of it is audio
RESEMBLYZER_TARGET_DBFS = -30.0  # quiet clips are raised to this RMS level (louder ones are left alone)


def resemblyzer_checkpoint_path() -> Path:
    """The weights file shipped inside the Resemblyzer wheel (the package itself is not imported: it needs librosa)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The Resemblyzer package is not installed; install it without touching torch: "
                          f"pip install --no-deps Resemblyzer=={RESEMBLYZER_VERSION}")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall "
                          f"Resemblyzer=={RESEMBLYZER_VERSION}")  # fmt: skip
    return path


def slaney_mel_filterbank(
    num_bands: int = RESEMBLYZER_MEL_BANDS,
    n_fft: int = RESEMBLYZER_FRAME_LENGTH,
    sampling_rate: int = RESEMBLYZER_SAMPLING_RATE,
) -> np.ndarray:
    """(n_fft // 2 + 1, num_bands) triangles on the Slaney mel scale (linear below 1 kHz, logarithmic above), each
    scaled to unit area ("slaney" norm) between 0 Hz and Nyquist: the filters librosa's `melspectrogram` uses by
    default, which is what Resemblyzer's network was trained on."""
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


class ResemblyzerEmbedder(FrozenSpectrogramNetwork):
    """Resemblyzer's pretrained speaker network behind our own front end: 16 kHz clips -> (B, 256) unit vectors.

    Per clip, as `VoiceEncoder.embed_utterance` does: raise quiet clips to -30 dBFS, mel power spectrogram
    (25 ms Hann frames, 10 ms hop, centred with reflect padding, 40 Slaney mel bands, no log), 1.6 s windows
    every 1/1.3 s (the clip zero-padded to cover the last one), the 3-layer LSTM's last hidden state -> linear ->
    ReLU -> L2 norm per window, and the L2-normalised mean over windows. Not done: the package's voice-activity
    trimming of long silences (it needs webrtcvad and only shortens pauses; our clips are short prompts and
    sounds). All windows of a batch run through the LSTM together.
    """

    def __init__(self, checkpoint: str | Path | None = None, pretrained: bool = True):
        super().__init__(torch.hann_window(RESEMBLYZER_FRAME_LENGTH, periodic=True), slaney_mel_filterbank())
        self.lstm = torch.nn.LSTM(RESEMBLYZER_MEL_BANDS, RESEMBLYZER_HIDDEN_SIZE, RESEMBLYZER_LAYERS,
                                  batch_first=True)  # fmt: skip
        self.linear = torch.nn.Linear(RESEMBLYZER_HIDDEN_SIZE, RESEMBLYZER_EMBEDDING_DIM)
        if pretrained:
            path = Path(checkpoint) if checkpoint is not None else resemblyzer_checkpoint_path()
            state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
            # similarity_weight / similarity_bias only scale the training loss (GE2E); they are not part of the encoder
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
        self.freeze()

    def windows(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) samples -> (num_windows, 160, 40) mel power frames of the 1.6 s windows of one clip."""
        rms = waveform.square().mean().sqrt()
        target_rms = 10.0 ** (RESEMBLYZER_TARGET_DBFS / 20.0)
        if 0 < rms < target_rms:
            waveform = waveform * (target_rms / rms)
        hop, frames = RESEMBLYZER_HOP_LENGTH, RESEMBLYZER_PARTIAL_FRAMES
        total_frames = -(-(waveform.numel() + 1) // hop)
        step = round(RESEMBLYZER_SAMPLING_RATE / RESEMBLYZER_PARTIALS_PER_SECOND / hop)
        starts = list(range(0, max(1, total_frames - frames + step + 1), step))
        covered = (waveform.numel() - starts[-1] * hop) / (frames * hop)
        if covered < RESEMBLYZER_MIN_COVERAGE and len(starts) > 1:
            starts.pop()
        padded_length = (starts[-1] + frames) * hop
        if padded_length > waveform.numel():
            waveform = torch.nn.functional.pad(waveform, (0, padded_length - waveform.numel()))
        spectrum = torch.stft(
            waveform, n_fft=RESEMBLYZER_FRAME_LENGTH, hop_length=hop, window=self.window, center=True,
            pad_mode="reflect", return_complex=True,
        )  # fmt: skip
        mel = (spectrum.real.square() + spectrum.imag.square()).transpose(0, 1) @ self.mel_weights  # (frames, 40)
        return torch.stack([mel[start : start + frames] for start in starts])

    @torch.no_grad()
    def forward(self, clips: Sequence[np.ndarray] | Sequence[torch.Tensor]) -> torch.Tensor:
        per_clip = [self.windows(waveform) for waveform in self.waveforms(clips)]
        _, (hidden, _) = self.lstm(torch.cat(per_clip))
        partial = torch.nn.functional.normalize(torch.relu(self.linear(hidden[-1])), dim=1)
        counts = [w.shape[0] for w in per_clip]
        return torch.stack([torch.nn.functional.normalize(p.mean(dim=0), dim=0) for p in partial.split(counts)])


class ResemblyzerEncoder(CallableEncoder):
    """Resemblyzer's speaker encoder as a frozen RR teacher: 16 kHz clips -> (B, 256).

    Spec form: `python:benchmarks/rr_encoders.py:ResemblyzerEncoder` (options `?checkpoint=PATH`,
    `?pretrained=false` for the randomly initialised control).
    """

    def __init__(self, checkpoint: str | None = None, pretrained: bool = True):
        name = f"resemblyzer-{RESEMBLYZER_VERSION}" + ("" if pretrained else "-random-init")
        super().__init__(ResemblyzerEmbedder(checkpoint, pretrained=pretrained), RESEMBLYZER_EMBEDDING_DIM,
                         RESEMBLYZER_SAMPLING_RATE, name=name, input_format="list")  # fmt: skip


#: The pretrained encoders of this module, by the name the scripts use: (factory, embedding size, description).
ENCODERS: dict[str, tuple[type[CallableEncoder], int, str]] = {
    "aisfx": (AisfxEncoder, AISFX_EMBEDDING_DIM, f"aisfx {AISFX_VERSION} (sound-effect CNN)"),
    "resemblyzer": (
        ResemblyzerEncoder, RESEMBLYZER_EMBEDDING_DIM, f"Resemblyzer {RESEMBLYZER_VERSION} (speaker encoder)"
    ),
}


# ================================================================================================================
# self-check
# ================================================================================================================


def _read_split(corpus: Path, split: str) -> list[tuple[Path, str]]:
    path = corpus / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build the corpus first: python benchmarks/corpora.py build "
                                f"{corpus.name} --root {corpus.parent}")  # fmt: skip
    with open(path, encoding="utf-8", newline="") as stream:
        return [(corpus / row["path"], row["label"]) for row in csv.DictReader(stream)]


def similarity_report(embeddings: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
    """Same-class vs different-class cosine similarity, raw and after removing the mean embedding, and
    leave-one-out nearest-neighbour accuracy (cosine, centred) against chance."""
    x = embeddings.double()
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    diff = y[:, None] != y[None, :]
    report: dict[str, float] = {}
    for kind, data in (("raw", x), ("centred", x - x.mean(dim=0, keepdim=True))):
        unit = torch.nn.functional.normalize(data, dim=1)
        cosine = unit @ unit.T
        report[f"{kind}_same_class_cosine"] = float(cosine[same].mean())
        report[f"{kind}_different_class_cosine"] = float(cosine[diff].mean())
        if kind == "centred":
            masked = cosine.clone()
            masked.fill_diagonal_(-math.inf)
            report["nearest_neighbour_accuracy"] = float((y[masked.argmax(dim=1)] == y).double().mean())
    report["chance_accuracy"] = float(max(np.bincount(y.numpy())) / len(y))  # majority class share
    return report


def linear_probe_accuracy(embeddings: torch.Tensor, labels: Sequence[str], folds: int = 5, seed: int = 0) -> float:
    """Stratified k-fold accuracy of a standardised logistic regression on frozen embeddings (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, embeddings.double().numpy(), list(labels), cv=splitter).mean())


def _check(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    import soundfile as sf

    results: dict[str, Any] = {}
    factory = ENCODERS[args.encoder][0]
    encoders = {"pretrained": factory().to(args.device)}
    if args.random_control:
        torch.manual_seed(0)
        encoders["random-init control"] = factory(pretrained=False).to(args.device)
    pretrained = encoders["pretrained"]
    print(f"{pretrained!r}; network parameters: {sum(p.numel() for p in pretrained.fn.parameters()) / 1e6:.2f} M")
    for corpus_name in args.corpora:
        corpus = Path(args.root) / corpus_name
        rows = [row for split in args.split for row in _read_split(corpus, split)]
        by_label: dict[str, list[Path]] = {}
        for path, label in rows:
            by_label.setdefault(label, []).append(path)
        # A seeded sample per class (file order would favour the first programs / prompts of each class).
        rng = np.random.default_rng(args.seed)
        chosen = [(by_label[label][i], label) for label in sorted(by_label)
                  for i in sorted(rng.permutation(len(by_label[label]))[: args.per_class])]  # fmt: skip
        clips = []
        for path, _ in chosen:
            data, rate = sf.read(str(path), dtype="float32")
            if rate != 16000:
                raise ValueError(f"{path} is {rate} Hz; the corpora are 16 kHz.")
            clips.append(data)
        labels = [label for _, label in chosen]
        seconds = sum(len(c) for c in clips) / 16000
        for kind, encoder in encoders.items():
            encoder(clips[:2])  # warm-up (first-call allocations)
            start = time.perf_counter()
            batches = [clips[i:i + args.batch_size] for i in range(0, len(clips), args.batch_size)]
            embeddings = torch.cat([encoder(batch) for batch in batches])
            elapsed = time.perf_counter() - start
            report = similarity_report(embeddings, labels)
            if min(Counter(labels).values()) >= args.folds:
                report["linear_probe_accuracy"] = linear_probe_accuracy(embeddings, labels, args.folds, args.seed)
            results[(corpus_name, kind)] = report
            print(f"\n[{corpus_name} / {kind}] {len(clips)} clips ({len(by_label)} classes, {seconds:.0f} s of audio) "
                  f"-> embeddings {tuple(embeddings.shape)} {embeddings.dtype}; {1000 * elapsed / len(clips):.1f} ms "
                  f"per clip, {seconds / elapsed:.0f}x real time on {args.threads} thread(s)")  # fmt: skip
            print(f"  cosine same-class {report['raw_same_class_cosine']:.3f} vs different-class "
                  f"{report['raw_different_class_cosine']:.3f} (raw); centred: "
                  f"{report['centred_same_class_cosine']:.3f} vs {report['centred_different_class_cosine']:.3f}")
            probe = (f", {args.folds}-fold linear probe {report['linear_probe_accuracy']:.3f}"
                     if "linear_probe_accuracy" in report else "")  # fmt: skip
            print(f"  leave-one-out 1-NN accuracy {report['nearest_neighbour_accuracy']:.3f}{probe} "
                  f"(chance {report['chance_accuracy']:.3f})")  # fmt: skip
    ok = all(r["centred_same_class_cosine"] > r["centred_different_class_cosine"]
             for (name, kind), r in results.items() if kind == "pretrained")  # fmt: skip
    print("\nself-check", "PASSED: same-class clips are closer" if ok else "FAILED: no class structure")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="External encoders for Representation Regularization.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="embed corpus clips; print shapes, timing and class similarity structure")
    check.add_argument("--encoder", choices=sorted(ENCODERS), default="aisfx", help="which pretrained encoder")
    check.add_argument("--root", default="/work/corpora", help="root given to benchmarks/corpora.py build")
    check.add_argument("--corpora", nargs="+", default=["instruments"], help="built labelled corpora to probe")
    check.add_argument("--split", nargs="+", default=["train", "validation", "test"], help="splits to sample from")
    check.add_argument("--per-class", type=int, default=60, help="clips probed per class (60 = all of instruments)")
    check.add_argument("--folds", type=int, default=5, help="folds of the linear probe (needs that many clips a class)")
    check.add_argument("--batch-size", type=int, default=16)
    check.add_argument("--seed", type=int, default=0, help="which clips of each class are probed")
    check.add_argument("--threads", type=int, default=2)
    check.add_argument("--device", default="cpu")
    check.add_argument("--random-control", action="store_true",
                       help="also probe the same network with random weights (shows what pretraining adds)")
    args = parser.parse_args(argv)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
