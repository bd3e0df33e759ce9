"""`pipeline("audio-classification")` on CAT folders: arrays, dicts, file paths (ffmpeg), batches, softmax/sigmoid."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, pipeline

import cat_hf  # noqa: F401


def tone(freq: float, seconds: float = 1.5, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def direct_scores(folder, audio: np.ndarray, multi_label: bool) -> dict[str, float]:
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**extractor(audio, sampling_rate=16000, return_tensors="pt")).logits[0]
    probs = logits.sigmoid() if multi_label else logits.softmax(-1)
    return {model.config.id2label[i]: p.item() for i, p in enumerate(probs)}


def as_dict(result: list[dict]) -> dict[str, float]:
    return {r["label"]: r["score"] for r in result}


@pytest.fixture(scope="module")
def classifier(tiny_classifier_dir):
    return pipeline("audio-classification", model=str(tiny_classifier_dir))


def test_numpy_array_softmax_scores(classifier, tiny_classifier_dir):
    audio = tone(440)
    result = classifier(audio, top_k=3)
    assert {r["label"] for r in result} == {"dog", "rain", "siren"}
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    expected = direct_scores(tiny_classifier_dir, audio, multi_label=False)
    for label, score in as_dict(result).items():
        assert score == pytest.approx(expected[label], abs=1e-5)


@pytest.mark.parametrize("key", ["array", "raw"])
def test_dict_inputs(classifier, key):
    audio = tone(880)
    from_dict = as_dict(classifier({key: audio, "sampling_rate": 16000}, top_k=3))
    from_array = as_dict(classifier(audio, top_k=3))
    assert from_dict.keys() == from_array.keys()
    for label in from_dict:
        assert from_dict[label] == pytest.approx(from_array[label], abs=1e-6)


def test_file_path_through_ffmpeg(classifier, tmp_path):
    assert shutil.which("ffmpeg"), "the audio-classification pipeline reads file paths with the ffmpeg binary: " \
                                   "install it (Debian: apt-get install ffmpeg)"
    audio = tone(330)
    path = tmp_path / "clip.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    from_file = as_dict(classifier(str(path), top_k=3))
    from_array = as_dict(classifier(audio, top_k=3))
    for label in from_file:
        assert from_file[label] == pytest.approx(from_array[label], abs=2e-3)  # PCM16 quantisation


def test_batches(classifier):
    clips = [tone(f, seconds=s) for f, s in ((220, 1.0), (660, 2.5), (990, 0.7))]
    batched = classifier(clips, batch_size=2, top_k=2)
    assert len(batched) == 3 and all(len(r) == 2 for r in batched)
    for clip, result in zip(clips, batched):
        single = as_dict(classifier(clip, top_k=2))
        for label, score in as_dict(result).items():
            assert score == pytest.approx(single[label], abs=1e-5)


def test_multi_label_models_score_with_sigmoid(tmp_path):
    from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification

    torch.manual_seed(1)
    tags = ["speech", "music", "engine", "bird"]
    config = CATConfig.from_preset("cat-tiny", num_hidden_layers=1, id2label=dict(enumerate(tags)),
                                   label2id={t: i for i, t in enumerate(tags)},
                                   problem_type="multi_label_classification")
    CATForAudioClassification(config).save_pretrained(tmp_path)
    CATFeatureExtractor(max_length=256).save_pretrained(tmp_path)
    tagger = pipeline("audio-classification", model=str(tmp_path))
    audio = tone(500)
    result = as_dict(tagger(audio, top_k=4))
    expected = direct_scores(tmp_path, audio, multi_label=True)
    assert result.keys() == set(tags)
    for label in tags:
        assert result[label] == pytest.approx(expected[label], abs=1e-5)
    assert abs(sum(result.values()) - 1.0) > 1e-3  # independent probabilities, not a distribution


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
def test_long_clips_get_the_windowed_scores_of_evaluate_and_predict(tmp_path, problem_type):
    # A model saved as `cat-hf finetune` saves it: trained on 128-frame windows (config.window_frames), with an
    # extractor that keeps whole clips (padding="longest"). The pipeline then scores a 5-s clip by the same windows,
    # aggregated by the same rule, as cat_hf.inference (what `cat-hf evaluate` and `cat-hf predict` run).
    from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification
    from cat_hf.inference import predict_long

    torch.manual_seed(2)
    tags = ["speech", "music", "engine"]
    config = CATConfig.from_preset("cat-tiny", num_hidden_layers=1, id2label=dict(enumerate(tags)),
                                   label2id={t: i for i, t in enumerate(tags)}, problem_type=problem_type,
                                   window_frames=128)
    CATForAudioClassification(config).save_pretrained(tmp_path)
    CATFeatureExtractor(max_length=128, padding="longest").save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    audio = np.concatenate([tone(300, 2.0), 0.3 * rng.standard_normal(16000).astype(np.float32), tone(2000, 2.03)])
    scores = as_dict(pipeline("audio-classification", model=str(tmp_path))(audio, top_k=3))

    model = AutoModelForAudioClassification.from_pretrained(tmp_path).eval()
    prediction = predict_long(model, AutoFeatureExtractor.from_pretrained(tmp_path), audio)
    assert prediction.num_windows == 7 and np.ptp(prediction.window_probabilities[:, 0]) > 1e-3
    for i, tag in enumerate(tags):
        assert scores[tag] == pytest.approx(prediction.probabilities[i], abs=1e-5)
    # a batch of a long and a short clip: each gets its own windows, the short one its plain forward
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(**extractor([audio, audio[:8000]], sampling_rate=16000, return_tensors="pt")).logits
        alone = model(**extractor(audio[:8000], sampling_rate=16000, return_tensors="pt")).logits
    probabilities = logits.sigmoid() if problem_type.startswith("multi") else logits.softmax(-1)
    short = alone.sigmoid() if problem_type.startswith("multi") else alone.softmax(-1)
    np.testing.assert_allclose(probabilities[0].numpy(), prediction.probabilities, atol=1e-5)
    torch.testing.assert_close(probabilities[1], short[0], atol=1e-5, rtol=1e-4)
