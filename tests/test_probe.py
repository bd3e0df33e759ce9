"""cat_hf.probe: effective rank, the linear probe and the log-mel statistics baseline, on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cat_hf.probe import LinearProbe, effective_rank, fit_probe, log_mel_baseline, log_mel_statistics

SR = 16000


def test_effective_rank_counts_the_directions_the_embeddings_span():
    rng = np.random.default_rng(0)
    assert effective_rank(np.ones((50, 8))) == 1.0  # one point
    line = np.outer(rng.standard_normal(200), rng.standard_normal(16))
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    # equal variance in k orthogonal directions: rank k (RankMe of an isotropic k-dimensional cloud, up to sampling)
    for k in (2, 8, 32):
        basis = np.linalg.qr(rng.standard_normal((64, k)))[0]
        cloud = rng.standard_normal((4000, k)) @ basis.T
        assert effective_rank(cloud) == pytest.approx(k, rel=0.05)
    # the mean is subtracted: a shared offset adds no direction
    assert effective_rank(line + 100.0) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        effective_rank(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
        effective_rank(np.ones(5))


def _blobs(n: int, classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.standard_normal((n, dim)), y


def test_linear_probe_separates_classes_and_picks_the_penalty_on_validation():
    train, validation, test = (_blobs(300, 4, 10, 1.0, s) for s in (0, 1, 2))
    # same centres for all splits: regenerate from one generator
    x, y = _blobs(900, 4, 10, 1.0, 0)
    train, validation, test = (x[:300], y[:300]), (x[300:600], y[300:600]), (x[600:], y[600:])
    result = fit_probe(train, validation, test, num_classes=4)
    assert result.metric == "accuracy" and result.test > 0.95 and result.validation > 0.95
    assert set(result.tried) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0}
    # deterministic: the same fit twice gives the same weights
    again = LinearProbe(result.weight_decay, num_classes=4).fit(*train)
    assert torch.equal(again.weight, result.probe.weight)
    # features scaled by 1000 give the same predictions (standardised with the training statistics)
    scaled = LinearProbe(result.weight_decay, num_classes=4).fit(train[0] * 1000, train[1])
    assert (scaled.predict(test[0] * 1000) == result.probe.predict(test[0])).mean() > 0.99
    # noise features: chance
    rng = np.random.default_rng(3)
    noise = fit_probe((rng.standard_normal((300, 10)), y[:300]), (rng.standard_normal((300, 10)), y[300:600]),
                      (rng.standard_normal((300, 10)), y[600:]), num_classes=4)
    assert noise.test < 0.4


def test_multi_label_probe_scores_mean_average_precision():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 6))
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.5, x[:, 3] < -0.5], axis=1).astype(np.float64)
    result = fit_probe((x[:300], y[:300]), (x[300:450], y[300:450]), (x[450:], y[450:]), multi_label=True)
    assert result.metric == "mAP" and result.test > 0.95
    with pytest.raises(ValueError, match="multi-hot"):
        LinearProbe(multi_label=True).fit(x, y[:, 0])


def _tone(freq: float, seconds: float, rng) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def test_log_mel_statistics_are_the_mean_and_std_of_the_real_frames():
    rng = np.random.default_rng(0)
    clips = [_tone(440, 1.0, rng), _tone(3000, 0.3, rng), _tone(440, 0.01, rng)]  # the last is shorter than a frame
    stats = log_mel_statistics(clips)
    assert stats.shape == (3, 256) and np.isfinite(stats).all()
    # a clip's statistics do not depend on the batch it comes in (padding frames are left out)
    alone = log_mel_statistics([clips[1]])
    np.testing.assert_allclose(stats[1], alone[0], atol=1e-5)
    # 440 Hz and 3 kHz tones peak in different mel bins
    assert stats[0, :128].argmax() < stats[1, :128].argmax()


def test_log_mel_baseline_tells_tones_apart():
    rng = np.random.default_rng(1)
    freqs = {0: 300.0, 1: 1200.0, 2: 4000.0}
    def split(n):
        labels = rng.integers(0, 3, n)
        return [_tone(freqs[int(k)] * rng.uniform(0.9, 1.1), rng.uniform(0.2, 1.0), rng) for k in labels], labels
    result = log_mel_baseline(split(60), split(30), validation=split(30))
    assert result["metric"] == "accuracy" and result["score"] > 0.9
    assert result["num_train"] == 60 and result["num_evaluated"] == 30
    without_validation = log_mel_baseline(split(60), split(30))  # the penalty chosen on a fifth of train
    assert without_validation["score"] > 0.9
