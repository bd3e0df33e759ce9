"""The pretrained RR teachers of benchmarks/rr_encoders.py: Resemblyzer's front end and windowing, on a randomly
initialised network (the weights ship in a wheel that CI does not install; `check` covers the pretrained one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def encoders():
    return load_benchmark("rr_encoders")


def test_slaney_filterbank_has_unit_area_triangles_up_to_nyquist(encoders):
    weights = encoders.slaney_mel_filterbank()  # (201 bins of 40 Hz, 40 bands)
    assert weights.shape == (201, 40) and weights.min() >= 0.0
    areas = weights.sum(axis=0) * 40.0  # Riemann sum over the 40 Hz bins of each triangle
    np.testing.assert_allclose(areas[10:], 1.0, rtol=0.05)  # bands wider than a few bins: unit area
    peaks = weights.argmax(axis=0)
    assert np.all(np.diff(peaks) >= 0) and peaks[-1] > 150  # ordered centres that reach the top of the spectrum
    # linear below 1 kHz: the first bands are equally spaced (the 40 bands span 0-8 kHz, ~15 below 1 kHz)
    lower_centres = peaks[:8] * 40.0
    assert np.ptp(np.diff(lower_centres)) <= 40.0


def test_resemblyzer_windows_cover_the_clip_like_embed_utterance(encoders):
    torch.manual_seed(0)
    embedder = encoders.ResemblyzerEmbedder(pretrained=False)
    rng = np.random.default_rng(0)
    # 3 s: windows start at frames 0, 77, 154; the last covers 91 % of its 1.6 s with audio and is kept
    assert embedder.windows(torch.from_numpy(rng.standard_normal(48000).astype(np.float32))).shape == (3, 160, 40)
    # 0.5 s: one zero-padded window, whatever its coverage
    assert embedder.windows(torch.from_numpy(rng.standard_normal(8000).astype(np.float32))).shape == (1, 160, 40)


def test_resemblyzer_embeddings_are_unit_vectors_independent_of_the_batch(encoders):
    torch.manual_seed(0)
    teacher = encoders.ResemblyzerEncoder(pretrained=False)
    rng = np.random.default_rng(1)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (8000, 48000, 80000)]
    batch = teacher(clips)
    assert batch.shape == (3, 256) and teacher.embedding_dim == 256 and teacher.sampling_rate == 16000
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(teacher(clips[1:2])[0], batch[1], atol=1e-6, rtol=1e-5)
    # clips quieter than -30 dBFS are raised to it (the RMS of clips[1] is 0.1, -20 dBFS: left as it is)
    quiet, quieter = teacher([clips[1] * 0.1, clips[1] * 0.01])
    torch.testing.assert_close(quiet, quieter, atol=1e-5, rtol=1e-4)
    assert (quiet - batch[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="non-empty 1-D"):
        teacher.fn([np.zeros((2, 100), np.float32)])


def test_the_convergence_experiment_takes_its_teachers_from_rr_encoders(encoders):
    convergence = load_benchmark("convergence_rr")
    teachers = convergence.rr_teachers()
    assert set(teachers) == set(encoders.ENCODERS) == {"aisfx", "resemblyzer"}
    for name, (factory, dim, description) in teachers.items():
        expected_factory, expected_dim, expected_description = encoders.ENCODERS[name]
        assert (factory.__name__, dim, description) == (expected_factory.__name__, expected_dim, expected_description)
        assert convergence.teacher_spec(name).endswith(f"rr_encoders.py:{factory.__name__}")
    assert teachers["resemblyzer"][1] == 256 and teachers["aisfx"][1] == 512
