"""The RR convergence benchmark's probes (benchmarks/convergence_rr.py): the cross-validated linear probe that judges
the experiment scores every clip once, keeps classes balanced across folds, and measures what it should."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def convergence():
    return load_benchmark("convergence_rr")


def test_folds_cover_every_clip_once_and_balance_the_classes(convergence):
    labels = np.repeat(np.arange(4), [10, 7, 13, 5])
    folds = convergence.stratified_folds(labels, 5, seed=3)
    assert folds.shape == labels.shape and set(folds.tolist()) == set(range(5))
    for label in range(4):
        counts = np.bincount(folds[labels == label], minlength=5)
        assert counts.max() - counts.min() <= 1  # each class spread evenly
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1  # and the folds equal in size
    assert np.array_equal(folds, convergence.stratified_folds(labels, 5, seed=3))  # seeded


def test_cross_validated_probe_separates_signal_from_noise(convergence):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    centres = rng.normal(size=(3, 8)) * 3.0
    separable = (centres[labels] + rng.normal(size=(120, 8))).astype(np.float32)
    result = convergence.cross_validated_probe(separable, labels, 3)
    assert result["cv_accuracy"] > 0.9 and result["cv_clips"] == 120 and result["cv_folds"] == 5
    assert result["cv_weight_decay"] in convergence.PROBE_WEIGHT_DECAYS

    noise = rng.normal(size=(120, 8)).astype(np.float32)  # no relation to the labels: near chance (1/3)
    assert convergence.cross_validated_probe(noise, labels, 3)["cv_accuracy"] < 0.55


def test_stored_settings_take_more_probe_corpora_but_refuse_other_changes(convergence, tmp_path):
    corpora = tmp_path / "corpora"
    for name in ("pretrain-mix", "instruments", "spoken-language"):
        (corpora / name).mkdir(parents=True)
        (corpora / name / "corpus.json").write_text("{}")
    given = {field.name: None for field in dataclasses.fields(convergence.Settings)}
    first = convergence.resolve_settings(tmp_path / "exp", {**given, "corpora_root": str(corpora), "steps": 10,
                                                            "warmup_steps": 1, "checkpoints": [5, 10],
                                                            "probe_corpora": ["instruments"]})
    assert first.probe_corpora == ["instruments"]
    # Probing another corpus adds results without touching what was computed: the stored list grows.
    more = convergence.resolve_settings(tmp_path / "exp", {**given, "probe_corpora": ["spoken-language", "instruments"]})
    assert more.probe_corpora == ["instruments", "spoken-language"]
    assert convergence.resolve_settings(tmp_path / "exp", given).probe_corpora == ["instruments", "spoken-language"]
    # Dropping a corpus or changing what the pretraining depends on is refused.
    for change in ({"probe_corpora": ["instruments"]}, {"steps": 20}):
        with pytest.raises(convergence.ExperimentError, match="other settings"):
            convergence.resolve_settings(tmp_path / "exp", {**given, **change})
