"""cat_hf.embeddings on a tiny random CAT: batches, the time grid, long audio in overlapping passes (whose fbank
frames are the whole clip's), finer hops, layers and frequency modes, resampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATModel
from cat_hf.embeddings import CATEmbedder, TimeGrid, clip_embeddings, frame_embeddings
from cat_hf.feature_extraction_cat import resample_audio

RATE = 16000


def tiny_config(**overrides) -> CATConfig:
    """Smaller than cat-tiny: long clips (10 minutes) stay fast."""
    return CATConfig.from_preset(
        "cat-tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, stem_channels=[8, 16], **overrides
    )


@pytest.fixture(scope="module")
def tiny():
    """A model whose passes are at most 128 patches (20.5 s), so that long clips take many passes cheaply."""
    torch.manual_seed(0)
    model = CATModel(tiny_config(max_time_patches=128)).eval()
    return model, CATFeatureExtractor()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved classifier folder (its encoder is what the embedder loads)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-cat")
    CATForAudioClassification(tiny_config(num_labels=3)).save_pretrained(folder)
    CATFeatureExtractor().save_pretrained(folder)
    return folder


def noise(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float32) / np.float32(rate)
    tone = np.sin(np.float32(2 * np.pi * (300 + 200 * seed)) * t) * (np.float32(0.2) + np.sin(np.float32(4.4) * t) / 5)
    return tone + np.float32(0.05) * rng.standard_normal(n, dtype=np.float32) + np.float32(0.01)  # with a DC offset


def reference_frames(embedder: CATEmbedder, wave: np.ndarray, which: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, frame embeddings) built by hand from the WHOLE clip's fbank (one extractor call on the whole clip):
    each pass of `embedder.plan_frames` (those selected by `which`) is cut out of it (padding frames outside the
    clip), run alone, and its kept patches are placed at their interleaved rows."""
    model, extractor, grid = embedder.model, embedder.feature_extractor, embedder.grid
    whole = extractor(wave, sampling_rate=RATE, padding="longest", return_tensors="pt")["input_values"][0]
    frames = extractor.num_frames(len(wave))
    rows, values = [], []
    for step in embedder.plan_frames(frames, embedder.num_frame_embeddings(len(wave)))[which]:
        length = step.num_patches * grid.patch_frames
        index = torch.arange(step.first_frame, step.first_frame + length)
        inside = (index >= 0) & (index < frames)
        x = torch.full((1, length, whole.shape[-1]), extractor.padded_frame_value)
        x[0, inside] = whole[index[inside]]
        mask = (index < frames).long()[None]
        with torch.no_grad():
            hidden = model(x, attention_mask=mask).last_hidden_state[0, 1:]
        patches = hidden.reshape(step.num_patches, model.config.frequency_patches, -1).mean(1)
        lo, hi = step.keep
        rows.append(torch.arange(lo, hi) * embedder.substeps + step.offset)
        values.append(patches[lo - step.first_patch : hi - step.first_patch])
    return torch.cat(rows), torch.cat(values)


def test_time_grid_is_derived_from_config_and_extractor(tiny):
    model, extractor = tiny
    grid = TimeGrid.of(tiny_config(), extractor)  # CAT's 768-patch positional table
    assert (grid.frame_shift, grid.frame_length, grid.patch_frames, grid.max_patches) == (160, 400, 16, 768)
    assert (grid.hop_ms, grid.centre_offset_ms, grid.max_pass_frames) == (160.0, 7.5, 12288)
    assert grid.max_pass_seconds == pytest.approx(122.895)
    assert CATEmbedder(model, extractor).max_pass_seconds == pytest.approx((128 * 16 - 1) * 0.01 + 0.025)
    embedder = CATEmbedder(model, extractor, hop_ms=40)
    assert (embedder.hop_ms, embedder.substeps, embedder.centre_offset_ms) == (40.0, 4, 7.5)
    # another patch size and frame shift move the grid with them
    other = TimeGrid.of(tiny_config(patch_size=8, stem_strides=[2, 2, 2], max_time_patches=100),
                        CATFeatureExtractor(frame_shift_ms=20.0))
    assert (other.hop_ms, other.max_pass_frames) == (160.0, 800)
    with pytest.raises(ValueError, match="hop_ms=50 .*160.*80.*40"):
        CATEmbedder(model, extractor, hop_ms=50)


def test_batch_tensor_gives_one_row_per_clip_equal_to_single_clips(tiny):
    model, extractor = tiny
    embedder = CATEmbedder(model, extractor, batch_size=3)
    batch = torch.from_numpy(np.stack([noise(2.5, seed) for seed in range(4)]))  # (B, T)
    clips = embedder.clip_embeddings(batch, sampling_rate=RATE)
    frames = embedder.frame_embeddings(batch.numpy(), sampling_rate=RATE)
    assert clips.shape == (4, 64) and clips.dtype == torch.float32
    assert frames.embeddings.shape == (4, 16, 64) and frames.timestamps.shape == (4, 16)
    for b in range(4):
        alone = embedder.frame_embeddings(batch[b], sampling_rate=RATE)
        torch.testing.assert_close(alone.embeddings[0], frames.embeddings[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embedder.clip_embeddings(batch[b], sampling_rate=RATE)[0], clips[b],
                                   atol=1e-5, rtol=1e-5)
    # clips of different lengths padded into one batch (masks) give what they give alone
    ragged = [noise(seconds, seed) for seed, seconds in enumerate((0.5, 3.3, 1.07, 0.026))]
    together = embedder.frame_embeddings(ragged, sampling_rate=RATE)
    together_clips = embedder.clip_embeddings(ragged, sampling_rate=RATE)
    assert together.lengths.tolist() == [embedder.num_frame_embeddings(len(w)) for w in ragged] == [4, 21, 7, 1]
    for b, wave in enumerate(ragged):
        vectors, stamps = together.clip(b)
        alone = embedder.frame_embeddings([wave], sampling_rate=RATE)
        torch.testing.assert_close(alone.embeddings[0], vectors, atol=1e-5, rtol=1e-5)
        assert torch.equal(alone.timestamps[0], stamps)
        assert torch.isnan(together.timestamps[b, len(stamps):]).all()
        assert not together.embeddings[b, len(stamps):].any()
        torch.testing.assert_close(embedder.clip_embeddings(wave, sampling_rate=RATE)[0], together_clips[b],
                                   atol=1e-5, rtol=1e-5)


def test_clip_embeddings_are_the_plain_forward(tiny):
    model, extractor = tiny
    waves = [noise(3.0, 0), noise(1.3, 1)]
    inputs = extractor(waves, sampling_rate=RATE, padding="longest", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(clip_embeddings(model, extractor, waves, RATE), outputs.last_hidden_state[:, 0])
    patches = outputs.last_hidden_state[:, 1:]
    real = (~outputs.token_padding_mask[:, 1:]).float()[..., None]
    expected_mean = (patches * real).sum(1) / real.sum(1)
    torch.testing.assert_close(clip_embeddings(model, extractor, waves, RATE, pooling="mean"), expected_mean,
                               atol=1e-5, rtol=1e-5)
    averaged = (outputs.hidden_states[0] + outputs.hidden_states[1])[:, 0] / 2
    torch.testing.assert_close(clip_embeddings(model, extractor, waves, RATE, layer=[0, 1]), averaged,
                               atol=1e-5, rtol=1e-5)
    both = CATEmbedder(model, extractor).pooled_clip_embeddings(waves, RATE)  # one pass, every pooling
    torch.testing.assert_close(both["cls"], outputs.last_hidden_state[:, 0])
    torch.testing.assert_close(both["mean"], expected_mean, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="poolings"):
        CATEmbedder(model, extractor).pooled_clip_embeddings(waves, RATE, ("max",))


def test_ten_minute_clip_timestamps_and_passes_equal_whole_clip_fbank(tiny):
    model, extractor = tiny
    embedder = CATEmbedder(model, extractor)
    wave = noise(600.0, seed=3)
    result = embedder.frame_embeddings(wave, sampling_rate=RATE)
    vectors, stamps = result.clip(0)
    assert len(stamps) == 3750 and vectors.shape == (3750, 64)
    assert torch.equal(torch.diff(stamps), torch.full((3749,), 160.0, dtype=torch.float64))  # exactly one hop apart
    assert stamps[0] == 7.5 and stamps[-1] <= 600_000.0 and stamps[-1] > 600_000.0 - 160.0
    plan = embedder.plan_frames(extractor.num_frames(len(wave)), len(stamps))
    assert len(plan) == 34 and all(step.num_patches == 128 for step in plan)  # 20.5 s passes, overlapping by 1/8
    assert [step.keep for step in plan][:2] == [(0, 120), (120, 232)] and plan[-1].keep[1] == 3750
    # the passes' fbank frames are the whole clip's: frames equal a model run on slices of the whole fbank (checked
    # for the first passes, two in the middle and the last ones)
    for which in (slice(0, 3), slice(16, 18), slice(-2, None)):
        rows, expected = reference_frames(embedder, wave, which)
        torch.testing.assert_close(vectors[rows], expected, atol=1e-4, rtol=0)


def test_chunked_fine_hop_frames_equal_whole_clip_fbank_reference(tiny):
    model, extractor = tiny
    wave = noise(13.3, seed=4)
    embedder = CATEmbedder(model, extractor, hop_ms=40, chunk_seconds=4.0, chunk_overlap_seconds=1.0, batch_size=5)
    frames = embedder.frame_embeddings(wave, sampling_rate=RATE)
    vectors, stamps = frames.clip(0)
    assert len(stamps) == int((13300 - 7.5) // 40) + 1
    assert torch.equal(torch.diff(stamps), torch.full((len(stamps) - 1,), 40.0, dtype=torch.float64))
    assert stamps[-1] <= 13300.0
    assert len(embedder.plan_frames(extractor.num_frames(len(wave)), len(stamps))) == 4 * 5  # chunked passes
    rows, expected = reference_frames(embedder, wave)
    assert sorted(rows.tolist()) == list(range(len(stamps)))  # every frame from exactly one pass
    torch.testing.assert_close(vectors[rows], expected, atol=1e-4, rtol=0)
    # every 4th frame of the 40 ms grid is the 160 ms grid when the passes are the same
    coarse = CATEmbedder(model, extractor, chunk_seconds=4.0, chunk_overlap_seconds=1.0).frame_embeddings(wave, RATE)
    torch.testing.assert_close(vectors[::4], coarse.clip(0)[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(stamps[::4], coarse.clip(0)[1])
    # long clips: clip embeddings average their passes
    long_clip = CATEmbedder(model, extractor, pooling="mean", chunk_seconds=4.0).clip_embeddings(wave, RATE)
    assert long_clip.shape == (1, 64) and torch.isfinite(long_clip).all()


def test_frequency_concat_and_layers(tiny):
    model, extractor = tiny
    wave = noise(2.0, seed=5)
    concat = CATEmbedder(model, extractor, frequency="concat")
    assert concat.frame_embedding_size == 64 * 8 and concat.clip_embedding_size == 64  # CLS pooling
    vectors = concat.frame_embeddings(wave, RATE).embeddings[0]
    mean = CATEmbedder(model, extractor).frame_embeddings(wave, RATE).embeddings[0]
    torch.testing.assert_close(vectors.reshape(len(vectors), 8, 64).mean(1), mean, atol=1e-6, rtol=1e-5)
    assert CATEmbedder(model, extractor, frequency="concat", pooling="mean").clip_embedding_size == 512
    first = CATEmbedder(model, extractor, layer=0).frame_embeddings(wave, RATE).embeddings[0]
    both = CATEmbedder(model, extractor, layer=[0, -1]).frame_embeddings(wave, RATE).embeddings[0]
    torch.testing.assert_close(both, (first + mean) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, mean)
    with pytest.raises(ValueError, match="layer 3 is not a hidden-state index"):
        CATEmbedder(model, extractor, layer=3)
    with pytest.raises(ValueError, match="frequency='sum'"):
        CATEmbedder(model, extractor, frequency="sum")


def test_other_sampling_rates_are_resampled(tiny, tiny_folder):
    model, extractor = tiny
    embedder = CATEmbedder(model, extractor)
    wave8k = noise(2.02, seed=6, rate=8000)
    frames = embedder.frame_embeddings(wave8k, sampling_rate=8000)
    at16k = embedder.frame_embeddings(resample_audio(wave8k, 8000, RATE), sampling_rate=RATE)
    torch.testing.assert_close(frames.embeddings, at16k.embeddings)
    assert frames.timestamps[0, -1] <= 2020.0
    # a (B, T) int16 PCM batch from a saved folder
    loaded = CATEmbedder.from_pretrained(tiny_folder, pooling="mean")
    pcm = (np.stack([noise(1.0, 7), noise(1.0, 8)]) * 32767).astype(np.int16)
    assert loaded.clip_embeddings(pcm, sampling_rate=RATE).shape == (2, 64)
    assert frame_embeddings(loaded.model, loaded.feature_extractor, pcm, RATE).embeddings.shape == (2, 7, 64)


def test_bad_input_is_named(tiny):
    model, extractor = tiny
    embedder = CATEmbedder(model, extractor)
    with pytest.raises(ValueError, match="shape \\(2, 2, 16000\\)"):
        embedder.clip_embeddings(np.zeros((2, 2, 16000), np.float32), RATE)
    with pytest.raises(ValueError, match="clip 1 has shape \\(2, 16000\\).*downmix"):
        embedder.clip_embeddings([np.zeros(16000, np.float32), np.zeros((2, 16000), np.float32)], RATE)
    with pytest.raises(ValueError, match="clip 0 has 100 samples .*shorter than one 25 ms frame"):
        embedder.frame_embeddings(np.zeros(100, np.float32), RATE)
    bad = noise(1.0)
    bad[10] = np.nan
    with pytest.raises(ValueError, match="clip 0 contains NaN"):
        embedder.clip_embeddings(bad, RATE)
    with pytest.raises(ValueError, match="sampling_rate must be a positive number"):
        embedder.clip_embeddings(bad, sampling_rate=0)
    with pytest.raises(ValueError, match="CAT model"):
        CATEmbedder(torch.nn.Linear(2, 2), extractor)
