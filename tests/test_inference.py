"""Sliding-window inference, `cat-hf predict` and `cat-hf evaluate` on tiny real models and real audio files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import average_precision_score

from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATModel
from cat_hf.audio import load_audio
from cat_hf.cli import main
from cat_hf.evaluation import UnknownLabelError, evaluate_model
from cat_hf.inference import WindowingError, WindowPlan, load_classifier, predict_clips, predict_long

RATE = 16000
MAX_FRAMES = 128  # 1.28 s windows: long clips of a few seconds already need several
WINDOW_SAMPLES = 400 + (MAX_FRAMES - 1) * 160
SINGLE_LABELS = ["a", "b", "c"]
TAGS = ["dog", "cat", "bird", "car"]


def _save_cat(folder: Path, labels: list[str], problem_type: str | None) -> str:
    """A tiny CAT classifier whose head is fitted (ridge regression on the head's inputs for a few tones), so its
    predictions depend clearly on the input; a random head gives nearly the same scores for every clip."""
    torch.manual_seed(0)
    config = CATConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, stem_channels=[8, 16], stem_depths=[1, 1],
        pooling="mean", num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)}, problem_type=problem_type,
    )  # fmt: skip
    model = CATForAudioClassification(config).eval()
    feature_extractor = CATFeatureExtractor(max_length=MAX_FRAMES)
    tones = [_tone_noise(1.3, RATE, seed) for seed in range(12)]
    captured = []
    hook = model.classifier.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    with torch.no_grad():
        model(**feature_extractor(tones, sampling_rate=RATE, return_tensors="pt"))
    hook.remove()
    inputs = captured[0].double()
    mean = inputs.mean(0)
    targets = torch.nn.functional.one_hot(torch.arange(12) % len(labels), len(labels)).double()
    centred = inputs - mean
    weight = torch.linalg.solve(
        centred.T @ centred + 1e-3 * torch.eye(32, dtype=torch.double), centred.T @ (targets - targets.mean(0))
    )
    with torch.no_grad():
        model.classifier.weight.copy_(4 * weight.T)
        model.classifier.bias.copy_(-4 * weight.T @ mean)
    model.save_pretrained(folder)
    feature_extractor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def single_label_model(tmp_path_factory) -> str:
    return _save_cat(tmp_path_factory.mktemp("cat_single"), SINGLE_LABELS, "single_label_classification")


@pytest.fixture(scope="module")
def multi_label_model(tmp_path_factory) -> str:
    return _save_cat(tmp_path_factory.mktemp("cat_multi"), TAGS, "multi_label_classification")


def _tone_noise(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freq = 200.0 + 150.0 * seed
    mono = 0.3 * np.sin(2 * np.pi * freq * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t)) + 0.05 * rng.standard_normal(
        t.size
    )
    return np.stack([mono, 0.5 * mono], axis=1).astype(np.float32) if channels == 2 else mono.astype(np.float32)


def _direct_window_probabilities(model, feature_extractor, windows: list[np.ndarray], multi_label: bool) -> np.ndarray:
    """Reference: each window through the extractor and the model on its own."""
    rows = []
    with torch.no_grad():
        for window in windows:
            inputs = feature_extractor(window, sampling_rate=RATE, return_tensors="pt")
            logits = model(**inputs).logits[0]
            rows.append((torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)).numpy())
    return np.stack(rows).astype(np.float64)


def test_window_plan_positions():
    plan = WindowPlan.for_feature_extractor(CATFeatureExtractor(max_length=MAX_FRAMES))
    assert (plan.window_frames, plan.hop_frames, plan.window_samples, plan.hop_samples) == (
        128,
        64,
        WINDOW_SAMPLES,
        10240,
    )
    assert plan.starts(1000) == [0] and plan.starts(WINDOW_SAMPLES) == [0]
    # Regular hops, then one window ending on the clip's last whole frame (498 frames in 5 s: it starts at frame 370).
    assert plan.starts(5 * RATE) == [0, 10240, 20480, 30720, 40960, 51200, 370 * 160]
    assert plan.starts(WINDOW_SAMPLES + 10240) == [0, 10240]  # ends exactly on a hop: no extra window
    with pytest.raises(WindowingError, match="hop_frames"):
        WindowPlan.for_feature_extractor(CATFeatureExtractor(max_length=MAX_FRAMES), hop_frames=129)


def test_predict_long_single_label_is_mean_of_softmax_windows(single_label_model):
    model, feature_extractor = load_classifier(single_label_model)
    waveform = _tone_noise(5.0, RATE, seed=1)
    prediction = predict_long(model, feature_extractor, waveform, batch_size=3)
    starts = [0, 10240, 20480, 30720, 40960, 51200, 370 * 160]
    np.testing.assert_allclose(prediction.window_starts, np.array(starts) / RATE)
    reference = _direct_window_probabilities(
        model, feature_extractor, [waveform[s : s + WINDOW_SAMPLES] for s in starts], multi_label=False
    )
    np.testing.assert_allclose(prediction.window_probabilities, reference, atol=1e-5)
    np.testing.assert_allclose(prediction.probabilities, reference.mean(axis=0), atol=1e-5)
    assert prediction.probabilities.sum() == pytest.approx(1.0, abs=1e-6) and prediction.aggregation == "mean"
    assert np.ptp(reference[:, 0]) > 1e-3  # windows really differ, so the aggregation is being tested

    # Another rate: resampled with soxr first, same answer as giving the 16 kHz version (up to resampling).
    at_8k = predict_long(model, feature_extractor, waveform[::2], sampling_rate=8000)
    assert at_8k.num_windows == prediction.num_windows
    # Explicit max aggregation overrides the single-label default.
    as_max = predict_long(model, feature_extractor, waveform, aggregation="max")
    np.testing.assert_allclose(as_max.probabilities, reference.max(axis=0), atol=1e-5)
    with pytest.raises(WindowingError, match="aggregation"):
        predict_long(model, feature_extractor, waveform, aggregation="median")


def test_predict_long_multi_label_is_max_of_sigmoid_windows(multi_label_model):
    model, feature_extractor = load_classifier(multi_label_model)
    waveform = _tone_noise(3.0, RATE, seed=2)
    prediction = predict_long(model, feature_extractor, waveform, hop_frames=100)
    starts = [0, 16000, 170 * 160]  # 298 frames in 3 s: the last window starts at frame 170
    np.testing.assert_allclose(prediction.window_starts * RATE, starts)
    reference = _direct_window_probabilities(
        model, feature_extractor, [waveform[s : s + WINDOW_SAMPLES] for s in starts], multi_label=True
    )
    np.testing.assert_allclose(prediction.probabilities, reference.max(axis=0), atol=1e-5)
    assert prediction.aggregation == "max" and not np.allclose(reference.max(axis=0), reference.mean(axis=0))


def test_short_clips_are_one_window_and_batching_does_not_change_scores(single_label_model):
    model, feature_extractor = load_classifier(single_label_model)
    clips = [
        ("short", _tone_noise(0.5, RATE, 3)),
        ("tiny", _tone_noise(0.01, RATE, 4)),
        ("long", _tone_noise(3.0, RATE, 5)),
    ]
    short = predict_long(model, feature_extractor, clips[0][1])
    assert short.num_windows == 1
    np.testing.assert_allclose(
        short.probabilities, _direct_window_probabilities(model, feature_extractor, [clips[0][1]], False)[0], atol=1e-5
    )
    by_batch = {}
    for batch_size in (1, 2, 64):
        results = list(predict_clips(model, feature_extractor, clips, batch_size=batch_size))
        assert [key for key, _ in results] == ["short", "tiny", "long"]  # input order
        by_batch[batch_size] = np.stack([p.probabilities for _, p in results])
        assert [p.num_windows for _, p in results] == [1, 1, 4]
        assert results[1][1].duration == pytest.approx(0.01)  # 160 samples, padded to one frame internally
    np.testing.assert_allclose(by_batch[1], by_batch[2], atol=1e-5)
    np.testing.assert_allclose(by_batch[1], by_batch[64], atol=1e-5)


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")  # transformers' own AST filters
def test_model_agnostic_with_a_tiny_ast(tmp_path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(0)
    config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       max_length=MAX_FRAMES, num_labels=2, id2label={0: "x", 1: "y"}, label2id={"x": 0, "y": 1})  # fmt: skip
    ASTForAudioClassification(config).save_pretrained(tmp_path)
    ASTFeatureExtractor(max_length=MAX_FRAMES).save_pretrained(tmp_path)
    model, feature_extractor = load_classifier(tmp_path)
    assert type(model).__name__ == "ASTForAudioClassification"
    waveform = _tone_noise(2.0, RATE, seed=6)
    prediction = predict_long(model, feature_extractor, waveform)
    starts = [0, 10240, 70 * 160]  # 198 frames in 2 s: the last window starts at frame 70
    reference = _direct_window_probabilities(
        model, feature_extractor, [waveform[s : s + WINDOW_SAMPLES] for s in starts], multi_label=False
    )
    np.testing.assert_allclose(prediction.probabilities, reference.mean(axis=0), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# cat-hf predict


def _write_audio_folder(root: Path) -> dict[str, float]:
    """Real files in several formats and rates; returns name -> duration."""
    (root / "sub").mkdir(parents=True)
    sf.write(root / "sub" / "speech_8k.wav", _tone_noise(2.0, 8000, 1), 8000, subtype="PCM_16")
    sf.write(root / "music_44k.flac", _tone_noise(3.0, 44100, 2, channels=2), 44100)
    sf.write(root / "bell.ogg", _tone_noise(1.0, 22050, 3), 22050, format="OGG", subtype="VORBIS")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (root / "notes.txt").write_text("not audio, skipped when scanning folders")
    return {"speech_8k.wav": 2.0, "music_44k.flac": 3.0, "bell.ogg": 1.0}


def test_cli_predict_folder_json(single_label_model, tmp_path, capsys):
    durations = _write_audio_folder(tmp_path / "clips")
    assert main(["predict", str(tmp_path / "clips"), "--model", single_label_model, "--json", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    results = {Path(r["file"]).name: r for r in document["results"]}
    assert set(results) == set(durations)
    assert [Path(e["file"]).name for e in document["errors"]] == ["broken.wav"]
    assert "broken.wav" in captured.err
    model, feature_extractor = load_classifier(single_label_model)
    for name, result in results.items():
        assert result["duration_s"] == pytest.approx(durations[name], abs=0.01)
        scores = [t["score"] for t in result["top"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        # Same numbers as the Python API on the decoded (resampled) file.
        expected = predict_long(model, feature_extractor, load_audio(result["file"], RATE))
        assert result["num_windows"] == expected.num_windows
        assert result["top"][0]["label"] == SINGLE_LABELS[int(expected.probabilities.argmax())]
        assert scores[0] == pytest.approx(float(expected.probabilities.max()), abs=1e-5)
    assert results["music_44k.flac"]["num_windows"] == 4 and results["bell.ogg"]["num_windows"] == 1


def test_cli_predict_table_and_failures(multi_label_model, tmp_path, capsys):
    _write_audio_folder(tmp_path / "clips")
    clip = tmp_path / "clips" / "music_44k.flac"
    assert (
        main(["predict", str(clip), str(tmp_path / "missing.wav"), "--model", multi_label_model, "--top-k", "3"]) == 0
    )
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("file") and "sigmoid" in lines[0]
    assert len(lines) == 2 and lines[1].startswith(str(clip)) and "3.00s" in lines[1]
    assert sum(tag in lines[1] for tag in TAGS) == 3
    assert "missing.wav" in captured.err
    # Every input unreadable: non-zero exit.
    assert main(["predict", str(tmp_path / "clips" / "broken.wav"), "--model", multi_label_model]) == 1
    assert main(["predict", str(tmp_path / "clips" / "notes.txt"), "--model", multi_label_model]) == 1


def test_models_that_cannot_classify_get_clear_errors_not_tracebacks(tmp_path, capsys):
    """An encoder without a trained head would print confident-looking scores from random weights; a mistyped local
    folder would get transformers' message about Hub repo ids. Both are refused, and the CLI prints one line."""
    encoder = tmp_path / "encoder"
    CATModel(CATConfig.from_preset("cat-tiny", num_hidden_layers=1)).save_pretrained(encoder)
    CATFeatureExtractor().save_pretrained(encoder)
    with pytest.raises(ValueError, match="encoder without a trained classification head.*cat-hf finetune"):
        load_classifier(encoder)
    with pytest.raises(FileNotFoundError, match=r"no model folder at \./nowhere"):
        load_classifier("./nowhere")
    clip = tmp_path / "tone.wav"
    sf.write(clip, _tone_noise(1.0, 16000, seed=0), 16000)
    assert main(["predict", str(clip), "--model", str(encoder)]) == 2
    err = capsys.readouterr().err
    assert "cat-hf predict: error:" in err and "classification head" in err and "Traceback" not in err
    assert main(["predict", str(clip), "--model", "./nowhere", "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err


def test_cli_help_for_predict_and_evaluate(capsys):
    for command, option in (("predict", "--top-k"), ("evaluate", "--output-dir")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and option in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# cat-hf evaluate


def _write_audiofolder(root: Path, labels: list[str]) -> list[tuple[Path, str]]:
    """Per label a short clip of the tone the head was fitted to for that label and a long clip of the next label's
    tone, so a working classifier is right on some clips and wrong on others."""
    clips = []
    for index, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        short, long = root / label / f"{label}_short.wav", root / label / f"{label}_long.flac"
        sf.write(short, _tone_noise(0.8, 8000, index), 8000)
        sf.write(long, _tone_noise(3.0, 44100, index + 1), 44100)
        clips += [(short, label), (long, label)]
    return clips


def test_cli_evaluate_audiofolder_single_label(single_label_model, tmp_path, capsys):
    clips = _write_audiofolder(tmp_path / "testset", SINGLE_LABELS)
    out = tmp_path / "out"
    assert (
        main(["evaluate", single_label_model, str(tmp_path / "testset"), "--output-dir", str(out), "--batch-size", "3"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "top-1 accuracy" in printed and "top-5 accuracy: n/a" in printed

    model, feature_extractor = load_classifier(single_label_model)
    predicted = {
        str(path): SINGLE_LABELS[
            int(predict_long(model, feature_extractor, load_audio(path, RATE)).probabilities.argmax())
        ]
        for path, _ in clips
    }
    expected_accuracy = np.mean([predicted[str(path)] == label for path, label in clips])
    assert 0 < expected_accuracy < 1  # a random model that is sometimes right: the check below can fail

    results = json.loads((out / "eval_results.json").read_text())
    assert results["task"] == "audio-classification" and results["problem_type"] == "single_label_classification"
    assert results["dataset"] == "testset" and results["split"] == "test" and results["num_examples"] == 6
    assert results["metrics"]["accuracy"] == pytest.approx(expected_accuracy)
    assert results["window"]["num_windowed_clips"] == 3 and results["window"]["aggregation"] == "mean"
    assert f"{expected_accuracy:.4f}" in printed

    with (out / "per_class_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == SINGLE_LABELS and all(r["support"] == "2" for r in rows)
    assert {"precision", "recall", "f1", "accuracy"} <= set(rows[0])
    for row in rows:
        correct = sum(predicted[str(p)] == l == row["label"] for p, l in clips)
        assert float(row["recall"]) == pytest.approx(correct / 2, abs=1e-6)
    with (out / "predictions.csv").open() as handle:
        prediction_rows = list(csv.DictReader(handle))
    assert {r["key"]: r["predicted"] for r in prediction_rows} == predicted

    png = (out / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out / "confusion_matrix.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary files


def test_evaluate_csv_multi_label(multi_label_model, tmp_path):
    data = tmp_path / "tagset"
    (data / "clips").mkdir(parents=True)
    rows = [("clips/one.wav", "dog,cat"), ("clips/two.wav", "bird"), ("clips/three.flac", "dog"),
            ("clips/four.wav", "cat, bird"), ("clips/five.wav", "")]  # fmt: skip
    for index, (relative, _) in enumerate(rows):
        sf.write(data / relative, _tone_noise(0.6 + 0.7 * index, 16000, 30 + index), 16000)
    with (data / "tags.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "tags"])
        writer.writerows(rows)

    results = evaluate_model(multi_label_model, data / "tags.csv", output_dir=tmp_path / "out")

    model, feature_extractor = load_classifier(multi_label_model)
    scores = np.stack(
        [predict_long(model, feature_extractor, load_audio(data / r, RATE)).probabilities for r, _ in rows]
    )
    targets = np.array([[int(tag in [t.strip() for t in tags.split(",")]) for tag in TAGS] for _, tags in rows])
    scored = targets.sum(axis=0) > 0  # "car" has no positive clip
    assert results["problem_type"] == "multi_label_classification" and results["dataset"] == "tags"
    assert results["metrics"]["mAP"] == pytest.approx(average_precision_score(targets[:, scored], scores[:, scored]))
    assert results["excluded_classes"]["without_positives"] == ["car"]
    # clips of more than one window's frames (the 1.3-s clip has exactly 128 whole frames: one window)
    long_clips = sum((load_audio(data / r, RATE).size - 400) // 160 + 1 > MAX_FRAMES for r, _ in rows)
    assert long_clips == 3 and results["window"]["aggregation"] == "max"
    assert results["window"]["num_windowed_clips"] == long_clips
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert set(saved["metrics"]) == {"mAP", "mAUC", "d_prime"} and saved["metrics"]["mAP"] == results["metrics"]["mAP"]
    with (tmp_path / "out" / "per_class_scores.csv").open() as handle:
        per_class = list(csv.DictReader(handle))
    assert [r["label"] for r in per_class] == TAGS and per_class[3]["average_precision"] == ""
    assert not (tmp_path / "out" / "confusion_matrix.png").exists()


def test_evaluate_saved_dataset_matches_audiofolder(single_label_model, tmp_path):
    import datasets

    clips = _write_audiofolder(tmp_path / "testset", SINGLE_LABELS)
    # Audio column built from paths (encoding through datasets.Audio() would need torchcodec), label a ClassLabel.
    features = datasets.Features({"audio": datasets.Value("string"), "label": datasets.ClassLabel(names=SINGLE_LABELS)})
    saved = datasets.Dataset.from_dict(
        {"audio": [str(p) for p, _ in clips], "label": [SINGLE_LABELS.index(l) for _, l in clips]}, features=features
    ).cast_column("audio", datasets.Audio(decode=False))
    saved.save_to_disk(str(tmp_path / "saved"))
    from_disk = evaluate_model(single_label_model, tmp_path / "saved", batch_size=4)
    from_folder = evaluate_model(single_label_model, tmp_path / "testset", batch_size=4)
    assert from_disk["num_examples"] == from_folder["num_examples"] == 6
    assert from_disk["metrics"] == pytest.approx(from_folder["metrics"])


def test_unknown_labels_fail_before_any_audio_is_read(single_label_model, tmp_path, capsys):
    root = tmp_path / "mixed"
    _write_audiofolder(root, ["a", "zebra"])
    (root / "zebra" / "unreadable.wav").write_bytes(b"garbage")  # would be skipped with a warning if decoding began
    with pytest.raises(UnknownLabelError) as error:
        evaluate_model(single_label_model, root, output_dir=tmp_path / "out")
    message = str(error.value)
    assert "['zebra']" in message and "3 evaluation row(s)" in message
    assert "zebra_short.wav" in message and "unreadable.wav" in message and "Fix:" in message
    assert not (tmp_path / "out").exists()

    assert main(["evaluate", single_label_model, str(root), "--output-dir", str(tmp_path / "out")]) == 2
    assert "zebra" in capsys.readouterr().err

    # A single-label model cannot score a clip with two tags.
    (tmp_path / "two.csv").write_text(f'path,tags\n{root / "a" / "a_short.wav"},"a,b"\n')
    with pytest.raises(UnknownLabelError, match="exactly one label"):
        evaluate_model(single_label_model, tmp_path / "two.csv")
