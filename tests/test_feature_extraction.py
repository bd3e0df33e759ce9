"""Tests of CATFeatureExtractor: parity with the original CAT fbank, batching, padding, input kinds, errors, I/O."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor

from cat_hf.feature_extraction_cat import (
    FEATURE_PRESETS,
    CATFeatureExtractor,
    downmix_to_mono,
    kaldi_fbank_batch,
    resample_audio,
)

REFERENCE_DIR = Path(os.environ.get("CAT_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
REFERENCE_FILE = REFERENCE_DIR / "expected.pt"
REFERENCE_FRAMES = [998, 368, 128, 1248]  # README section 5


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    if not REFERENCE_FILE.is_file():
        pytest.skip(f"reference fixture {REFERENCE_FILE} not found (set CAT_REFERENCE_DIR to its folder)")
    return torch.load(REFERENCE_FILE, map_location="cpu", weights_only=True)


def _clip(seconds: float, seed: int, sr: int = 16000) -> np.ndarray:
    """A tone plus noise: loud and quiet bins, like real audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.4 * np.sin(2 * np.pi * (300 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)


def assert_fbank_close(ours: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """Float32-aware fbank comparison.

    The log of a mel bin that is ~50 dB or more below its frame's loudest bin is dominated by float32 rounding
    noise of the FFT (the reference itself is up to 3e-3 away from a float64 computation there, and its value
    changes with the CPU and thread count). So: `atol` on bins within 12 nats of the frame peak, and everywhere
    a linear-energy bound of 1e-4 relative plus 1e-9 of the frame's peak energy (the float32 noise floor; the
    largest excess measured is ~5e-11).
    """
    assert ours.shape == ref.shape
    ours, ref = ours.double(), ref.double()
    frame_peak = ref.max(dim=-1, keepdim=True).values
    resolved = ref > frame_peak - 12.0
    assert resolved.float().mean() > 0.4  # the strict check covers a good part of every clip
    err = (ours - ref).abs()
    assert err[resolved].max() <= atol, f"max error in resolved bins {err[resolved].max():.3g} > {atol}"
    linear_excess = (ours.exp() - ref.exp()).abs() - 1e-4 * ref.exp() - 1e-9 * frame_peak.exp()
    assert linear_excess.max() <= 0, f"energy error above the float32 noise floor: {linear_excess.max():.3g}"


# ------------------------------------------------------------------------------------------------------------
# Parity with the original CAT pipeline
# ------------------------------------------------------------------------------------------------------------


def test_raw_fbank_matches_reference(reference):
    waves = [reference[f"w{i}"].numpy() for i in range(4)]
    extractor = CATFeatureExtractor(do_normalize=False)
    out = extractor(waves, sampling_rate=16000, padding="longest", return_tensors="pt")
    assert out["attention_mask"].sum(dim=1).tolist() == REFERENCE_FRAMES
    assert out["input_values"].shape == (4, 1248, 128)  # 1248 is a multiple of 16
    for i, frames in enumerate(REFERENCE_FRAMES):
        ref = reference[f"fbank_raw_{i}"]
        assert ref.shape == (frames, 128)
        assert_fbank_close(out["input_values"][i, :frames], ref, atol=1e-4)
        assert torch.all(out["input_values"][i, frames:] == 0.0)  # raw padding value


@pytest.mark.parametrize("target_length", [1024, 512])
def test_model_input_matches_reference(reference, target_length):
    waves = [reference[f"w{i}"].numpy() for i in range(4)]
    extractor = CATFeatureExtractor(max_length=target_length)
    out = extractor(waves, sampling_rate=16000, return_tensors="pt")
    assert set(out.keys()) == {"input_values"}  # original behaviour: no mask with max_length padding
    ours = out["input_values"]
    ref = reference[f"input_{target_length}"][:, 0]
    assert ours.shape == ref.shape == (4, target_length, 128)
    assert ours.dtype == torch.float32
    scale = 2 * FEATURE_PRESETS["audioset"]["std"]
    shift = FEATURE_PRESETS["audioset"]["mean"]
    for i, frames in enumerate(REFERENCE_FRAMES):
        real = min(frames, target_length)
        # Padded frames: exactly the reference's value (4.268 / 9.138).
        torch.testing.assert_close(ours[i, real:], ref[i, real:], atol=1e-6, rtol=0)
        # Real frames: 1e-5 in normalised units, checked in fbank units with the float32-aware criterion.
        assert_fbank_close(ours[i, :real] * scale + shift, ref[i, :real] * scale + shift, atol=1e-5 * scale)


@pytest.mark.parametrize(("sample_rate", "n_fft"), [(16000, 512), (32000, 1024), (8000, 256)])
def test_mel_filters_match_kaldi_definition(sample_rate, n_fft):
    """The float32 filters agree with an exact float64 construction of Kaldi's triangles (ulp level)."""
    from cat_hf.feature_extraction_cat import _kaldi_mel_banks

    banks = _kaldi_mel_banks(128, n_fft, float(sample_rate), 20.0, 0.0)
    assert banks.shape == (n_fft // 2 + 1, 128) and banks.dtype == torch.float32
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    low, high = mel(20.0), mel(sample_rate / 2)
    edges = low + np.arange(130) * (high - low) / 129
    fft_mel = mel(np.arange(n_fft // 2) * sample_rate / n_fft)[:, None]
    rising = (fft_mel - edges[None, :-2]) / (edges[None, 1:-1] - edges[None, :-2])
    falling = (edges[None, 2:] - fft_mel) / (edges[None, 2:] - edges[None, 1:-1])
    exact = np.vstack([np.maximum(0.0, np.minimum(rising, falling)), np.zeros((1, 128))])
    np.testing.assert_allclose(banks.numpy(), exact, atol=3e-5, rtol=0)
    assert torch.all(banks[-1] == 0)  # Nyquist bin unused, as in Kaldi


def _kaldi_fbank_float64(wave: np.ndarray, sample_rate: int, num_mel_bins: int = 128) -> np.ndarray:
    """Kaldi's fbank written out frame by frame in float64 (snip edges, per-frame DC removal, pre-emphasis 0.97 with
    x[-1] := x[0], symmetric Hann window, power spectrum, mel triangles from 20 Hz to Nyquist, log)."""
    from cat_hf.feature_extraction_cat import _kaldi_mel_banks

    window, shift = sample_rate * 25 // 1000, sample_rate * 10 // 1000
    n_fft = 1 << (window - 1).bit_length()
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / (window - 1))
    banks = _kaldi_mel_banks(num_mel_bins, n_fft, float(sample_rate), 20.0, 0.0).double().numpy()
    rows = []
    for start in range(0, len(wave) - window + 1, shift):
        frame = wave[start:start + window].astype(np.float64)
        frame = frame - frame.mean()
        frame = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
        power = np.abs(np.fft.rfft(frame * hann, n_fft)) ** 2
        rows.append(np.log(np.maximum(power @ banks, np.finfo(np.float32).eps)))
    return np.stack(rows)


@pytest.mark.parametrize("sample_rate", [32000, 8000])
def test_fbank_at_other_native_rates_matches_a_direct_computation(sample_rate):
    """For models trained on fbanks at another rate (the original's downsr_16hz=false recipe: the files' own rate)."""
    wave = _clip(0.6, 3, sr=sample_rate)
    ours, frames = kaldi_fbank_batch(torch.from_numpy(wave)[None], [len(wave)], sample_rate=sample_rate)
    expected = torch.from_numpy(_kaldi_fbank_float64(wave, sample_rate))
    assert int(frames[0]) == expected.shape[0] == 1 + (len(wave) - sample_rate // 40) // (sample_rate // 100)
    assert_fbank_close(ours[0, : expected.shape[0]], expected, atol=1e-4)
    extractor = CATFeatureExtractor(sampling_rate=sample_rate, max_length=64)
    values = extractor(wave, sampling_rate=sample_rate, return_tensors="pt")["input_values"][0]
    mean, std = extractor.mean, extractor.std
    assert_fbank_close(values[: expected.shape[0]] * (2 * std) + mean, expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Batching and padding
# ------------------------------------------------------------------------------------------------------------


def test_batched_equals_per_clip():
    clips = [_clip(2.0, 1), _clip(0.73, 2), _clip(1.31, 3)]
    extractor = CATFeatureExtractor(chunk_frames=64)  # several chunks, chunk borders inside clips
    batched = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt")
    frames = [1 + (len(c) - 400) // 160 for c in clips]
    assert batched["attention_mask"].sum(dim=1).tolist() == frames
    pad = -FEATURE_PRESETS["audioset"]["mean"] / (2 * FEATURE_PRESETS["audioset"]["std"])
    for i, clip in enumerate(clips):
        alone = extractor(clip, sampling_rate=16000, padding="longest", return_tensors="pt")["input_values"][0]
        torch.testing.assert_close(batched["input_values"][i, : frames[i]], alone[: frames[i]], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            batched["input_values"][i, frames[i] :], torch.full_like(batched["input_values"][i, frames[i] :], pad)
        )
    # The same with the whole batch in one chunk.
    one_chunk = CATFeatureExtractor(chunk_frames=100_000)(
        clips, sampling_rate=16000, padding="longest", return_tensors="pt"
    )
    torch.testing.assert_close(one_chunk["input_values"], batched["input_values"], atol=1e-5, rtol=0)


def test_chunk_plan_covers_every_frame_once():
    """Chunks tile the real frames exactly once, in order, and stay within the size limit."""
    from cat_hf.feature_extraction_cat import _chunks

    frames = [98, 1, 112, 111, 110, 40, 112, 3]  # short, one frame, full (truncated) and nearly full clips
    for chunk_frames in (1, 7, 98, 112, 250, 10_000):
        chunks = list(_chunks(frames, chunk_frames))
        covered = []
        for pieces in chunks:
            assert 0 < sum(stop - first for _, first, stop in pieces) <= max(chunk_frames, 1)
            for clip, first, stop in pieces:
                covered += [(clip, f) for f in range(first, stop)]
        assert covered == [(clip, f) for clip, n in enumerate(frames) for f in range(n)]
    # Short clips share chunks; clips longer than a chunk get equal pieces.
    assert len(list(_chunks([98] * 9, 1024))) == 1
    assert [[stop - first for _, first, stop in c] for c in _chunks([998], 400)] == [[333], [333], [332]]


def test_chunk_sizes_and_functional_api_agree():
    """Every chunking gives the same features (packed short clips, split long ones, truncation, a 1-frame clip)."""
    clips = [_clip(0.4, 1), _clip(1.3, 2), np.zeros(400, dtype=np.float32) + _clip(0.025, 3), _clip(0.05, 4)]
    reference = CATFeatureExtractor(max_length=64)(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert reference.shape == (4, 64, 128)
    for chunk_frames in (1, 5, 64, 100, 100_000):
        extractor = CATFeatureExtractor(max_length=64, chunk_frames=chunk_frames)
        out = extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    # The functional kernel on a padded batch is the extractor without clip-mean subtraction and normalisation.
    raw = CATFeatureExtractor(max_length=64, do_normalize=False, subtract_waveform_mean=False)
    expected = raw(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(c) for c in clips], batch_first=True)
    fbank, num_frames = kaldi_fbank_batch(padded, [len(c) for c in clips], num_output_frames=64)
    assert num_frames.tolist() == [38, 64, 1, 3]
    assert torch.equal(fbank, expected)
    assert torch.all(fbank[2, 1:] == 0.0)  # raw padding value


def test_calls_threads_and_nested_calls_share_no_state():
    """What one call computes never reaches the next, whatever lengths came before (long, packed short clips, one
    frame); concurrent threads and calls nested in a signal handler (re-entrant) get their own work buffers."""
    import signal
    import threading

    long_clips = [_clip(1.6, 5), _clip(1.2, 6)]  # split into pieces
    short_clips = [_clip(0.3, 7), _clip(0.1, 8), np.zeros(400, dtype=np.float32) + 0.5, _clip(0.2, 9)]  # packed

    def features(clips: list[np.ndarray], chunk_frames: int = 96) -> torch.Tensor:
        extractor = CATFeatureExtractor(max_length=160, chunk_frames=chunk_frames)
        return extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]

    first_long, first_short = features(long_clips), features(short_clips)
    assert torch.equal(features(long_clips), first_long)
    assert torch.equal(features(short_clips), first_short)
    assert torch.equal(features(short_clips[::-1]), first_short.flip(0))
    for chunk_frames in (40, 400, 41, 42, 43, 96):  # other chunk sizes in between
        torch.testing.assert_close(features(long_clips, chunk_frames), first_long, atol=1e-5, rtol=0)
    assert torch.equal(features(long_clips), first_long)

    results: dict[int, list[torch.Tensor]] = {}

    def worker(index: int) -> None:
        results[index] = [features(long_clips if (index + k) % 2 else short_clips) for k in range(6)]

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, outputs in results.items():
        for k, out in enumerate(outputs):
            expected = first_long if (index + k) % 2 else first_short
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)  # other threads may use other thread counts
    assert len(results) == 3

    # A signal handler featurising other clips in the middle of a call (between the chunks of the Python loop).
    nested: list[torch.Tensor] = []
    interrupted: set[str] = set()

    def handler(signum: int, frame: Any) -> None:
        interrupted.add(frame.f_code.co_name)
        nested.append(features(short_clips, chunk_frames=8))

    previous = signal.signal(signal.SIGALRM, handler)
    outer = []
    try:
        while len(outer) < 30 and not ("_fbank" in interrupted and len(nested) >= 3):
            signal.setitimer(signal.ITIMER_REAL, 0.001 * (1 + len(outer) % 5))  # one shot, at varying times
            outer.append(features(long_clips, chunk_frames=8))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert "_fbank" in interrupted, f"no signal arrived inside the kernel ({interrupted})"
    for out in outer:
        torch.testing.assert_close(out, first_long, atol=1e-5, rtol=0)
    for out in nested:
        torch.testing.assert_close(out, first_short, atol=1e-5, rtol=0)


def test_outputs_of_different_calls_never_share_memory():
    """Each call returns new memory that no later call writes: mutating one output leaves the others alone, and a
    numpy view taken before `share_memory_()` or a trip through a torch.multiprocessing queue (which moves the
    tensor's data) keeps its own data, as do outputs made in DataLoader workers."""
    import torch.multiprocessing as mp

    extractor = CATFeatureExtractor(max_length=160)
    clips_a, clips_b = [_clip(1.0, 1), _clip(0.5, 2)], [_clip(0.7, 3), _clip(1.1, 4)]

    def features(clips):
        return extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]

    expected_a, expected_b = features(clips_a).clone(), features(clips_b).clone()
    first, second = features(clips_a), features(clips_b)  # same shape: a reuse of memory would be possible
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    first.fill_(7.0)
    assert torch.equal(second, expected_b)
    second.zero_()
    assert torch.all(first == 7.0)
    as_numpy = extractor(clips_a, sampling_rate=16000, return_tensors="np")["input_values"]
    assert torch.equal(features(clips_b), expected_b) and np.array_equal(as_numpy, expected_a.numpy())
    dropped = features(clips_a)
    view, as_numpy = dropped[1, 3:9], dropped.numpy()
    del dropped  # the views still hold the output: later calls of the same size write elsewhere
    later = [features(clips_b) for _ in range(3)]
    assert torch.equal(view, expected_a[1, 3:9]) and np.array_equal(as_numpy, expected_a.numpy())

    # The .numpy() view of an output, taken before share_memory_(), then new calls of the same size.
    shared = features(clips_a)
    view = shared.numpy()
    shared.share_memory_()
    assert shared.is_shared()
    later = [features(clips_b) for _ in range(3)]
    assert np.array_equal(view, expected_a.numpy()) and torch.equal(shared, expected_a)
    assert all(torch.equal(out, expected_b) for out in later)

    # A trip through a torch.multiprocessing queue (it moves the data to shared memory, as DataLoader workers do).
    sent = features(clips_a)
    view = sent.numpy()
    queue = mp.Queue()
    queue.put(sent)
    received = queue.get(timeout=60)
    later = [features(clips_b) for _ in range(3)]
    assert torch.equal(received, expected_a) and np.array_equal(view, expected_a.numpy())
    received.add_(1.0)  # the receiver's copy is its own
    assert np.array_equal(view, expected_a.numpy())

    class Clips(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, index: int) -> torch.Tensor:
            clips = clips_a if index % 2 == 0 else clips_b
            return extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]

    loader = torch.utils.data.DataLoader(Clips(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    for index, batch in enumerate(loader):
        assert torch.equal(batch, expected_a if index % 2 == 0 else expected_b), index


def test_huge_finite_samples_are_accepted():
    """A float32 clip sum can overflow without any NaN/Inf sample: the mean is then taken in float64."""
    extractor = CATFeatureExtractor(max_length=16)
    huge = np.full(4000, 1e35, dtype=np.float32)  # sum 4e38 > float32 max; minus its mean it is silence
    out = extractor([huge, np.zeros(4000, dtype=np.float32)], sampling_rate=16000, return_tensors="pt")
    assert torch.isfinite(out["input_values"]).all()
    assert torch.equal(out["input_values"][0], out["input_values"][1])


def test_longest_padding_rounds_to_patches_and_masks():
    extractor = CATFeatureExtractor()
    clips = [_clip(1.0, 1), np.zeros(400, dtype=np.float32) + _clip(0.025, 2)]  # 98 frames and 1 frame
    out = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt")
    assert out["input_values"].shape == (2, 112, 128)  # 98 rounded up to 7 patches of 16
    mask = out["attention_mask"]
    assert mask.dtype == torch.int64 and mask.shape == (2, 112)
    assert mask[0].tolist() == [1] * 98 + [0] * 14
    assert mask[1].tolist() == [1] + [0] * 111
    # A single one-frame clip is padded to one patch.
    short = extractor(clips[1], sampling_rate=16000, padding=True, return_tensors="pt")
    assert short["input_values"].shape == (1, 16, 128)
    # truncation=True caps "longest" at max_length.
    capped = extractor(
        clips, sampling_rate=16000, padding="longest", truncation=True, max_length=40, return_tensors="pt"
    )
    assert capped["input_values"].shape == (2, 48, 128)
    assert capped["attention_mask"].sum(dim=1).tolist() == [40, 1]
    torch.testing.assert_close(capped["input_values"][0, :40], out["input_values"][0, :40])


def test_max_length_padding_and_optional_mask():
    extractor = CATFeatureExtractor.from_preset("speechcommands")  # 128 frames
    clips = [_clip(0.5, 1), _clip(3.0, 2)]  # 48 and 298 frames
    out = extractor(clips, sampling_rate=16000, return_tensors="pt")
    assert out["input_values"].shape == (2, 128, 128) and "attention_mask" not in out
    with_mask = extractor(clips, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    assert with_mask["attention_mask"].sum(dim=1).tolist() == [48, 128]
    torch.testing.assert_close(with_mask["input_values"], out["input_values"])
    preset = FEATURE_PRESETS["speechcommands"]
    expected_pad = (0.0 - preset["mean"]) / (2 * preset["std"])
    torch.testing.assert_close(out["input_values"][0, 48:], torch.full((80, 128), expected_pad))
    # Truncated clips keep their first frames.
    longer = extractor(clips[1], sampling_rate=16000, max_length=256, return_tensors="pt")["input_values"]
    torch.testing.assert_close(out["input_values"][1], longer[0, :128], atol=1e-5, rtol=0)
    # A config default of "longest" is honoured and overridable per call.
    longest_default = CATFeatureExtractor(padding="longest")
    assert longest_default(clips, sampling_rate=16000, return_tensors="pt")["input_values"].shape[1] == 304
    assert (
        longest_default(clips, sampling_rate=16000, padding="max_length", return_tensors="pt")["input_values"].shape[1]
        == 1024
    )


def test_pad_collates_per_example_features_like_call():
    """`pad` (a collate function) gives what one batched __call__ gives: same padded value, 16-frame rounding."""
    extractor = CATFeatureExtractor()
    clips = [_clip(0.5, 1), _clip(1.0, 2)]
    examples = [extractor(c, sampling_rate=16000, padding="longest", return_tensors="np") for c in clips]
    frames = [extractor.num_frames(len(clip)) for clip in clips]
    features = [{"input_values": e["input_values"][0][:n]} for e, n in zip(examples, frames, strict=True)]
    padded = extractor.pad(features, return_tensors="pt")
    batched = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt")
    assert padded["input_values"].shape == batched["input_values"].shape == (2, 112, 128)
    torch.testing.assert_close(padded["input_values"], batched["input_values"], atol=1e-5, rtol=0)
    assert padded["attention_mask"].tolist() == batched["attention_mask"].tolist()


def test_return_tensor_kinds():
    extractor = CATFeatureExtractor(max_length=64)
    clips = [_clip(0.3, 1), _clip(0.5, 2)]
    as_pt = extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
    as_np = extractor(clips, sampling_rate=16000, return_tensors="np")["input_values"]
    as_list = extractor(clips, sampling_rate=16000)["input_values"]
    assert isinstance(as_pt, torch.Tensor) and isinstance(as_np, np.ndarray) and isinstance(as_list, list)
    assert as_np.dtype == np.float32 and as_np.shape == (2, 64, 128)
    assert len(as_list) == 2 and as_list[0].shape == (64, 128)
    np.testing.assert_array_equal(as_np, as_pt.numpy())
    np.testing.assert_array_equal(as_list[1], as_np[1])


# ------------------------------------------------------------------------------------------------------------
# Input kinds
# ------------------------------------------------------------------------------------------------------------


def test_input_containers_give_the_same_features():
    extractor = CATFeatureExtractor(max_length=64)
    wave = _clip(0.5, 4)
    ref = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
    for variant in (
        torch.from_numpy(wave),
        wave.tolist(),
        wave.astype(np.float64),
        [wave],
        (wave,),
        [torch.from_numpy(wave)],
    ):
        out = extractor(variant, sampling_rate=16000, return_tensors="pt")["input_values"]
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    half = extractor(torch.from_numpy(wave).half(), sampling_rate=16000, return_tensors="pt")["input_values"]
    assert half.shape == ref.shape and torch.isfinite(half).all()


def test_int16_pcm_is_scaled():
    extractor = CATFeatureExtractor(max_length=64)
    pcm = (_clip(0.5, 5) * 32767).astype(np.int16)
    from_pcm = extractor(pcm, sampling_rate=16000, return_tensors="pt")["input_values"]
    from_float = extractor(pcm.astype(np.float32) / 32768.0, sampling_rate=16000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(from_pcm, from_float, atol=1e-6, rtol=0)
    from_tensor = extractor(torch.from_numpy(pcm), sampling_rate=16000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(from_tensor, from_float, atol=1e-6, rtol=0)
    # Not scaled would be ~log(32768^2) = 20.8 higher.
    unscaled = extractor(pcm.astype(np.float32), sampling_rate=16000, return_tensors="pt")["input_values"]
    assert (unscaled - from_pcm).mean() > 1.0


def test_2d_arrays_and_tensors_are_batches():
    """(B, T) numpy arrays and torch tensors are batches of B clips, each row what the clip gives alone."""
    extractor = CATFeatureExtractor(max_length=64)
    clips = np.stack([_clip(0.5, seed) for seed in range(12)])
    alone = torch.cat([extractor(clip, sampling_rate=16000, return_tensors="pt")["input_values"] for clip in clips])
    for batch in (clips, torch.from_numpy(clips)):
        out = extractor(batch, sampling_rate=16000, return_tensors="pt")["input_values"]
        assert out.shape == (12, 64, 128)
        torch.testing.assert_close(out, alone, atol=1e-6, rtol=0)
        for rows in (1, 2, 3, 8):  # any batch size, with or without channels="mono"
            for channels in (None, "mono"):
                few = extractor(batch[:rows], sampling_rate=16000, channels=channels, return_tensors="pt")
                torch.testing.assert_close(few["input_values"], alone[:rows], atol=1e-6, rtol=0)
    one_row = extractor(clips[:1], sampling_rate=16000, return_tensors="pt")["input_values"]  # either reading agrees
    torch.testing.assert_close(one_row, alone[:1], atol=1e-6, rtol=0)
    longest = extractor(torch.from_numpy(clips[:3]), sampling_rate=16000, channels="mono", padding="longest")
    assert np.asarray(longest["attention_mask"]).shape == (3, 48)
    with pytest.raises(ValueError, match=r"clip\(s\) \[2\] contain NaN"):  # a bad row is named by its index
        extractor(np.where(np.arange(12)[:, None] == 2, np.nan, clips), sampling_rate=16000)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_ambiguous_shapes_raise_naming_both_readings(as_tensor):
    """Earlier versions read every 2-D array as one multi-channel clip. A (samples, channels) array, which as a batch
    would hold clips shorter than one frame, is an error that names both readings and the argument that chooses one,
    not a silent change; so are shapes no reading fits."""
    extractor = CATFeatureExtractor(max_length=64)
    stereo = np.stack([_clip(0.5, 1), _clip(0.5, 2)])

    def call(audio: np.ndarray) -> Any:
        return extractor(torch.from_numpy(audio) if as_tensor else audio, sampling_rate=16000)

    assert len(call(stereo)["input_values"]) == 2  # (2, samples) is a batch of two clips
    with pytest.raises(ValueError, match=r"shape \(8000, 2\) would be a batch of 8000 clips of 2 samples.*"
                                         r"channels='last'"):  # fmt: skip
        call(np.ascontiguousarray(stereo.T))
    with pytest.raises(ValueError, match="3 dimensions.*channels='first'"):
        call(stereo[None])
    with pytest.raises(ValueError, match="channels='both' is not supported"):
        extractor(stereo, sampling_rate=16000, channels="both")


def test_multichannel_audio_is_declared_and_downmixed():
    extractor = CATFeatureExtractor(max_length=64)
    left, right = _clip(0.5, 6), _clip(0.5, 7)
    mono = ((left + right) / 2).astype(np.float32)
    ref = extractor(mono, sampling_rate=16000, return_tensors="pt")["input_values"]
    channels_first, channels_last = np.stack([left, right]), np.stack([left, right], axis=1)
    for audio, channels in (
        (channels_first, "first"),
        (channels_last, "last"),
        (torch.from_numpy(channels_first), "first"),
        ([channels_last], "last"),
        ([channels_first], None),  # a 2-D item of a list is one clip; its smaller axis holds the channels
        ([channels_last], None),
    ):
        out = extractor(audio, sampling_rate=16000, channels=channels, return_tensors="pt")["input_values"]
        assert out.shape == (1, 64, 128)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Batches of multi-channel clips: 3-D arrays, or lists mixing mono and multi-channel clips.
    three_d = extractor(np.stack([channels_first] * 3), sampling_rate=16000, channels="first", return_tensors="pt")
    torch.testing.assert_close(three_d["input_values"], ref.expand(3, -1, -1), atol=1e-5, rtol=0)
    mixed = extractor([channels_last, mono], sampling_rate=16000, channels="last", return_tensors="pt")
    torch.testing.assert_close(mixed["input_values"][0], mixed["input_values"][1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="clip 1 has 2 dimensions.*channels='mono'.*'first' or 'last'"):
        extractor([mono, channels_first], sampling_rate=16000, channels="mono")
    np.testing.assert_allclose(downmix_to_mono(channels_last), mono, atol=1e-7)
    np.testing.assert_allclose(downmix_to_mono(channels_first, channel_axis=0), mono, atol=1e-7)
    out = downmix_to_mono((channels_first * 32767).astype(np.int16))
    assert out.dtype == np.float32 and out.shape == (8000,) and np.abs(out - mono).max() < 1e-4


def test_resampling_matches_native_rate():
    extractor = CATFeatureExtractor(do_normalize=False)
    native = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    cd_rate = (0.5 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)).astype(np.float32)
    a = extractor(native, sampling_rate=16000, padding="longest", return_tensors="pt")
    b = extractor(cd_rate, sampling_rate=44100, padding="longest", return_tensors="pt")
    assert a["attention_mask"].sum() == b["attention_mask"].sum() == 98
    fa, fb = a["input_values"][0, :98], b["input_values"][0, :98]
    loud = fa > fa.max(dim=1, keepdim=True).values - 10.0
    assert (fa - fb)[loud].abs().max() < 1e-3
    assert fa.argmax(dim=1).eq(fb.argmax(dim=1)).all()
    # Without resampling the tone lands in the wrong mel bins.
    wrong = extractor(cd_rate, sampling_rate=16000, padding="longest", return_tensors="pt")["input_values"][0, :98]
    assert not wrong.argmax(dim=1).eq(fa.argmax(dim=1)).any()
    resampled = resample_audio(cd_rate, 44100, 16000)
    assert resampled.dtype == np.float32 and resampled.shape == (16000,)
    stereo = resample_audio(np.stack([cd_rate, cd_rate]), 44100, 16000)
    assert stereo.shape == (2, 16000)
    np.testing.assert_allclose(stereo[0], resampled, atol=1e-6)


def test_torchaudio_resampling_backend():
    wave = _clip(0.5, 8, sr=22050)
    try:
        import torchaudio.functional  # noqa: F401

        available = True
    except Exception:
        available = False
    if available:
        out = resample_audio(wave, 22050, 16000, backend="torchaudio")
        assert out.shape[0] == 8000
        np.testing.assert_allclose(out[100:-100], resample_audio(wave, 22050, 16000)[100:-100], atol=5e-2)
    else:
        with pytest.raises(ImportError, match="backend='soxr'"):
            resample_audio(wave, 22050, 16000, backend="torchaudio")
        # The extractor falls back to soxr (a saved config must still work on a machine without torchaudio).
        extractor = CATFeatureExtractor(resample_backend="torchaudio", max_length=64)
        out = extractor(wave, sampling_rate=22050, return_tensors="pt")["input_values"]
        ref = CATFeatureExtractor(max_length=64)(wave, sampling_rate=22050, return_tensors="pt")["input_values"]
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="backend"):
        resample_audio(wave, 22050, 16000, backend="librosa")
    with pytest.raises(ValueError, match="orig_sr"):
        resample_audio(wave, 0, 16000)


def test_missing_sampling_rate_warns_on_every_call(caplog):
    """Without sampling_rate the audio is read at the extractor's rate, with a warning on every call (as
    transformers' audio extractors do), so a second file at another rate is not silently wrong."""
    extractor = CATFeatureExtractor(max_length=16)
    logging.getLogger("cat_hf.feature_extraction_cat").propagate = True
    cd_rate = _clip(0.2, 3, sr=44100)
    with caplog.at_level(logging.WARNING, logger="cat_hf.feature_extraction_cat"):
        unlabelled = [extractor(clip, return_tensors="pt")["input_values"] for clip in (_clip(0.2, 1), cd_rate, cd_rate)]
        labelled = extractor(cd_rate, sampling_rate=44100, return_tensors="pt")["input_values"]
    messages = [r.getMessage() for r in caplog.records if "sampling_rate" in r.getMessage()]
    assert len(messages) == 3 and "read as 16000 Hz" in messages[0]
    assert not torch.allclose(unlabelled[2], labelled, atol=1e-2)  # what the warning is about


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("audio", "match"),
    [
        ([], "empty list"),
        (np.zeros(0, dtype=np.float32), "empty"),
        ([_clip(0.1, 1), np.zeros(0, dtype=np.float32)], r"clip 1 is empty"),
        (np.full(1600, np.nan, dtype=np.float32), "NaN or Inf"),
        ([_clip(0.1, 1), np.where(np.arange(1600) == 7, np.inf, 0.0).astype(np.float32)], r"\[1\].*NaN or Inf"),
        (np.zeros((2, 2, 1600), dtype=np.float32), "3 dimensions"),
        ([np.zeros((2, 2, 1600), dtype=np.float32)], "3 dimensions"),
        (np.zeros(399, dtype=np.float32), "399 samples.*shorter than one 25 ms frame"),
        ("speech.wav", "unsupported type str.*soundfile"),
        ({"array": np.zeros(1600)}, "unsupported type dict"),
        ([{"array": np.zeros(1600)}], "unsupported objects"),
        ([1, 2, 3] * 200, "integer dtype int64"),
        (np.zeros(1600, dtype=np.uint8), "integer dtype uint8"),
        (np.zeros(1600, dtype=np.complex64), "unsupported dtype complex64"),
        (np.zeros(1600, dtype=bool), "integer dtype bool"),
        (np.float32(0.5), "unsupported type"),
    ],
)
def test_bad_audio_raises(audio, match):
    with pytest.raises(ValueError, match=match):
        CATFeatureExtractor()(audio, sampling_rate=16000)


def test_bad_arguments_raise():
    extractor = CATFeatureExtractor()
    wave = _clip(0.2, 1)
    with pytest.raises(ValueError, match="padding='do_not_pad' is not supported.*'longest'"):
        extractor(wave, sampling_rate=16000, padding="do_not_pad")
    with pytest.raises(ValueError, match="always truncates"):
        extractor(wave, sampling_rate=16000, truncation=False)
    with pytest.raises(ValueError, match="return_tensors='tf'"):
        extractor(wave, sampling_rate=16000, return_tensors="tf")
    with pytest.raises(ValueError, match="sampling_rate must be a positive"):
        extractor(wave, sampling_rate=-1)
    with pytest.raises(ValueError, match="unknown feature preset 'librispeech'"):
        CATFeatureExtractor.from_preset("librispeech")
    with pytest.raises(ValueError, match="max_length must be an integer of at least 16"):
        CATFeatureExtractor(max_length=8)
    with pytest.raises(ValueError, match="max_length must be an integer of at least 16 frames.*got 8"):
        extractor(wave, sampling_rate=16000, max_length=8)  # the same rule per call
    with pytest.raises(ValueError, match=r"500 samples at 44100 Hz, 181 after resampling to 16000 Hz: shorter"):
        extractor(np.zeros(500, dtype=np.float32) + 0.1, sampling_rate=44100)
    with pytest.raises(ValueError, match="feature_size"):
        CATFeatureExtractor(feature_size=80)
    with pytest.raises(ValueError, match="std must be positive"):
        CATFeatureExtractor(std=0.0)
    with pytest.raises(ValueError, match="mel range"):
        CATFeatureExtractor(low_freq=9000.0)
    with pytest.raises(ValueError, match="lengths"):
        kaldi_fbank_batch(torch.zeros(2, 1000), [1000])


# ------------------------------------------------------------------------------------------------------------
# Configuration, presets, save / load
# ------------------------------------------------------------------------------------------------------------


def test_presets():
    for name, values in FEATURE_PRESETS.items():
        extractor = CATFeatureExtractor.from_preset(name)
        assert (extractor.max_length, extractor.mean, extractor.std) == (
            values["max_length"],
            values["mean"],
            values["std"],
        )
    assert FEATURE_PRESETS["audioset"] == {"max_length": 1024, "mean": -4.268, "std": 4.569}
    assert FEATURE_PRESETS["esc50"] == {"max_length": 512, "mean": -6.627, "std": 5.359}
    assert FEATURE_PRESETS["speechcommands"] == {"max_length": 128, "mean": -6.846, "std": 5.565}
    assert CATFeatureExtractor.from_preset("ESC-50", padding="longest").padding == "longest"
    default = CATFeatureExtractor()
    assert (default.max_length, default.mean, default.std) == (1024, -4.268, 4.569)
    assert CATFeatureExtractor.model_input_names == ["input_values", "attention_mask"]


def test_save_and_load_round_trip(tmp_path):
    extractor = CATFeatureExtractor.from_preset("esc50", padding="longest")
    extractor.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "preprocessor_config.json" in names
    assert not [name for name in names if name.startswith(".tmp")]  # nothing left over
    (tmp_path / "fresh").write_text("")  # the mode any new file gets here (umask), not a private 0600
    assert (tmp_path / "preprocessor_config.json").stat().st_mode == (tmp_path / "fresh").stat().st_mode
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["feature_extractor_type"] == "CATFeatureExtractor"
    for key, value in {
        "feature_size": 128,
        "sampling_rate": 16000,
        "num_mel_bins": 128,
        "max_length": 512,
        "mean": -6.627,
        "std": 5.359,
        "padding_value": 0.0,
        "do_normalize": True,
        "padding": "longest",
    }.items():
        assert config[key] == value, key
    loaded = CATFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == extractor.to_dict()
    clips = [_clip(0.4, 1), _clip(0.9, 2)]
    a = extractor(clips, sampling_rate=16000, return_tensors="pt")
    b = loaded(clips, sampling_rate=16000, return_tensors="pt")
    assert torch.equal(a["input_values"], b["input_values"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])


def test_preprocessor_config_disagreeing_with_the_model_is_refused(tmp_path):
    """A preprocessor_config.json whose mel bins (rate, frames) differ from the config.json beside it is refused on load,
    through this class and through AutoFeatureExtractor, naming both numbers."""
    from cat_hf import CATConfig

    folder = tmp_path / "model"
    CATConfig.from_preset("cat-tiny").save_pretrained(folder)  # 128 mel bins
    CATFeatureExtractor(feature_size=64, num_mel_bins=64).save_pretrained(folder)
    for load in (CATFeatureExtractor.from_pretrained, AutoFeatureExtractor.from_pretrained):
        with pytest.raises(ValueError, match="preprocessor_config.json has num_mel_bins=64, but the model's "
                                             "config.json has num_mel_bins=128"):  # fmt: skip
            load(folder)
    CATFeatureExtractor().save_pretrained(folder)
    assert AutoFeatureExtractor.from_pretrained(folder).num_mel_bins == 128
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sampling_rate": 32000}))
    with pytest.raises(ValueError, match="sampling_rate=16000, but the model's config.json has sampling_rate=32000"):
        CATFeatureExtractor.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    CATFeatureExtractor(frame_shift_ms=20.0).save_pretrained(folder)
    if "frame_shift_ms" in config:  # the config's frame geometry, where it records one
        with pytest.raises(ValueError, match="frame_shift_ms=20.0, but the model's config.json has frame_shift_ms=10"):
            AutoFeatureExtractor.from_pretrained(folder)
    # Without a config.json (an extractor saved alone) there is nothing to compare with.
    CATFeatureExtractor(feature_size=64, num_mel_bins=64).save_pretrained(tmp_path / "alone")
    assert CATFeatureExtractor.from_pretrained(tmp_path / "alone").num_mel_bins == 64


def test_loads_as_self_contained_remote_code(tmp_path, monkeypatch):
    """The saved source file imports on its own (as trust_remote_code=True loads it) and gives the same features."""
    import transformers.dynamic_module_utils as dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    previous = CATFeatureExtractor._auto_class
    try:
        CATFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
        extractor = CATFeatureExtractor(max_length=64)
        extractor.save_pretrained(tmp_path / "model")
    finally:
        CATFeatureExtractor._auto_class = previous
    assert (tmp_path / "model" / "feature_extraction_cat.py").is_file()
    config = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoFeatureExtractor"] == "feature_extraction_cat.CATFeatureExtractor"

    remote_class = dynamic_module_utils.get_class_from_dynamic_module(
        config["auto_map"]["AutoFeatureExtractor"], tmp_path / "model"
    )
    assert remote_class.__name__ == "CATFeatureExtractor"
    assert remote_class.__module__ != CATFeatureExtractor.__module__  # really the copied file
    remote = remote_class.from_pretrained(tmp_path / "model")
    wave = _clip(0.5, 3)
    expected = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(remote(wave, sampling_rate=16000, return_tensors="pt")["input_values"], expected)

    # With cat_hf imported (it registers the class), the Auto class resolves the folder too.
    auto = AutoFeatureExtractor.from_pretrained(tmp_path / "model")
    assert type(auto).__name__ == "CATFeatureExtractor" and auto.max_length == 64
    torch.testing.assert_close(auto(wave, sampling_rate=16000, return_tensors="pt")["input_values"], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    clips = [_clip(2.0, 1), _clip(0.7, 2)]
    extractor = CATFeatureExtractor()
    cpu = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt")
    gpu = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt", device="cuda")
    assert gpu["input_values"].device.type == "cuda"
    assert torch.equal(gpu["attention_mask"].cpu(), cpu["attention_mask"])
    scale = 2 * extractor.std
    for i, frames in enumerate(cpu["attention_mask"].sum(dim=1).tolist()):
        assert_fbank_close(
            gpu["input_values"][i, :frames].cpu() * scale + extractor.mean,
            cpu["input_values"][i, :frames] * scale + extractor.mean,
            atol=1e-4,
        )
