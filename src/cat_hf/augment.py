"""Training-time augmentations of the CAT finetuning recipes, each switchable and driven by one seeded generator.

What the original recipes do (authors' fairseq code, `examples/cat` + EAT's data pipeline), and where it runs here:

- waveform, before the filter bank: **random roll** (circular shift by a uniform offset in [0, clip length)) and
  **random gain** (multiply by Beta(10, 10) + 0.5, i.e. a factor in about [0.7, 1.3]); the original applies both
  together ("roll_aug").
- normalised filter bank (B, T, F): **mixup** (batch mode: a clip is mixed with the clip at the mirrored batch
  position, lambda ~ Beta(alpha, alpha), targets mixed with the same lambda, applied with probability `prob`);
  **SpecAugment** (one frequency mask of width uniform in [0, ratio * F) bins and one time mask of width uniform in
  [0, ratio * T) frames per clip, filled with 0, as torchaudio's iid `FrequencyMasking`/`TimeMasking` with
  `freqm = F * mask_ratio`, `timem = T * mask_ratio`); **noise** (Speech Commands: add uniform noise scaled by a
  random factor in [0, 0.1), then shift the frames circularly by an integer in [-10, 10)).

Every random draw comes from the `torch.Generator` passed in, so a run is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AugmentationConfig:
    """Which augmentations run, with the original recipes' parameters as defaults (0 / False switches one off).

    Args:
        mixup_alpha: Beta(alpha, alpha) parameter of mixup on features + targets (0.8 in the AudioSet and Speech
            Commands recipes; 0 = no mixup).
        mixup_prob: probability that a batch is mixed.
        freq_mask_ratio: largest SpecAugment frequency mask as a share of the mel bins (0.2; 0 = off).
        time_mask_ratio: largest SpecAugment time mask as a share of the frames (0.2; 0 = off).
        roll: circular time shift of the waveform by a random offset.
        gain: random waveform gain Beta(10, 10) + 0.5.
        noise: uniform noise on the features plus a +-10 frame shift (the Speech Commands recipe).
    """

    mixup_alpha: float = 0.0
    mixup_prob: float = 1.0
    freq_mask_ratio: float = 0.0
    time_mask_ratio: float = 0.0
    roll: bool = False
    gain: bool = False
    noise: bool = False

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha}.")
        for name in ("mixup_prob", "freq_mask_ratio", "time_mask_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}.")


# ----------------------------------------------------------------------------------------------------------------
# Random numbers


def sample_beta(alpha: float, beta: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` Beta(alpha, beta) draws reproducible from `generator` (torch has no seeded Beta sampler, so a numpy
    generator is seeded from it)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, beta, size=size)).float()


# ----------------------------------------------------------------------------------------------------------------
# Waveform augmentations: (B, N) float waveforms, `lengths` (B,) valid samples per clip


def random_roll(waveforms: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every clip's valid samples circularly by a uniform random offset (the padding stays at the end)."""
    out = waveforms.clone()
    lengths = lengths.cpu()
    offsets = (torch.rand(len(waveforms), generator=generator) * lengths.float()).long()
    for row, (length, offset) in enumerate(zip(lengths.tolist(), offsets.tolist())):
        if length > 1 and offset > 0:
            out[row, :length] = torch.roll(waveforms[row, :length], offset)
    return out


def random_gain(waveforms: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multiply every clip by its own factor Beta(10, 10) + 0.5 (the original's magnitude augmentation)."""
    factors = sample_beta(10.0, 10.0, len(waveforms), generator) + 0.5
    return waveforms * factors.to(waveforms.device, waveforms.dtype)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Feature augmentations: (B, T, F) normalised log-mel features


def _band_masks(batch: int, size: int, max_width: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, size) bool, True inside one band per row of width uniform in [0, max_width) at a uniform start."""
    widths = torch.rand(batch, generator=generator) * max_width
    starts = torch.rand(batch, generator=generator) * (size - widths)
    index = torch.arange(size, dtype=torch.float32)[None, :]
    return (index >= starts.floor()[:, None]) & (index < (starts + widths).floor()[:, None])


def spec_augment(
    features: torch.Tensor, freq_mask_ratio: float, time_mask_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """One frequency band and one time band per clip set to 0; the widths are at most ratio * bins / frames."""
    batch, frames, bins = features.shape
    masked = features
    if freq_mask_ratio > 0:
        band = _band_masks(batch, bins, freq_mask_ratio * bins, generator).to(features.device)
        masked = masked.masked_fill(band[:, None, :], 0.0)
    if time_mask_ratio > 0:
        band = _band_masks(batch, frames, time_mask_ratio * frames, generator).to(features.device)
        masked = masked.masked_fill(band[:, :, None], 0.0)
    return masked


def mixup(
    features: torch.Tensor, targets: torch.Tensor, alpha: float, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Batch mixup: x = lam x + (1 - lam) x.flip(0), same for the (B, C) float targets. Returns (x, y, lam);
    lam is 1.0 when the batch was not mixed (probability 1 - prob, or alpha 0)."""
    if alpha <= 0 or float(torch.rand(1, generator=generator)) >= prob:
        return features, targets, 1.0
    lam = float(sample_beta(alpha, alpha, 1, generator)[0])
    mixed = features * lam + features.flip(0) * (1.0 - lam)
    mixed_targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed, mixed_targets, lam


def feature_noise(features: torch.Tensor, generator: torch.Generator, max_shift: int = 10) -> torch.Tensor:
    """Speech Commands recipe: + U(0, 1) noise * U(0, 0.1) per clip, then a circular shift by [-10, 10) frames."""
    batch, frames, bins = features.shape
    noise = torch.rand(batch, frames, bins, generator=generator) * (torch.rand(batch, 1, 1, generator=generator) / 10)
    noisy = features + noise.to(features.device, features.dtype)
    shifts = torch.randint(-max_shift, max_shift, (batch,), generator=generator).tolist()
    return torch.stack([torch.roll(clip, shift, dims=0) for clip, shift in zip(noisy, shifts)])


# ----------------------------------------------------------------------------------------------------------------
# All together


class Augmenter:
    """Applies the switched-on augmentations of an `AugmentationConfig` with one generator seeded by `seed`."""

    def __init__(self, config: AugmentationConfig, seed: int = 0):
        self.config = config
        self.generator = torch.Generator().manual_seed(int(seed))

    def waveforms(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Roll then gain (both on the raw waveform, before the filter bank)."""
        if self.config.roll:
            waveforms = random_roll(waveforms, lengths, self.generator)
        if self.config.gain:
            waveforms = random_gain(waveforms, self.generator)
        return waveforms

    def features(self, features: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noise, then mixup, then SpecAugment: the original's order (noise in its data loader on single clips,
        mixup and masks in the model's forward on the batch). A mixed clip's frames are real where either of its
        two clips has real frames, so the (B, T) `attention_mask` of a padded batch is returned updated."""
        c = self.config
        if c.noise:
            features = feature_noise(features, self.generator)
        if c.mixup_alpha > 0:
            features, targets, lam = mixup(features, targets, c.mixup_alpha, c.mixup_prob, self.generator)
            if lam < 1.0 and attention_mask is not None:
                attention_mask = torch.maximum(attention_mask, attention_mask.flip(0))
        if c.freq_mask_ratio > 0 or c.time_mask_ratio > 0:
            features = spec_augment(features, c.freq_mask_ratio, c.time_mask_ratio, self.generator)
        return features, targets, attention_mask


__all__ = [
    "AugmentationConfig",
    "Augmenter",
    "feature_noise",
    "mixup",
    "random_gain",
    "random_roll",
    "sample_beta",
    "spec_augment",
]
