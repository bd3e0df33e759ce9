"""Sound event detection: `cat-hf finetune --task events` on a synthetic corpus with known event times, and the
metrics against hand-counted cases."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from cat_hf import CATConfig, CATFeatureExtractor, CATModel
from cat_hf.finetune import FinetuneConfig, finetune
from cat_hf.sed import Event, decode_events, event_f1, frame_targets, predict_events, read_strong_labels, segment_f1

SR = 16000
LABELS = ("beep", "buzz")


def _clip(rng: np.random.Generator, seconds: float = 4.0) -> tuple[np.ndarray, list[Event]]:
    """Quiet noise with one or two events: a 1 kHz tone ("beep") and a 150 Hz square wave ("buzz")."""
    n = int(seconds * SR)
    wave = 0.003 * rng.standard_normal(n)
    events = []
    for label in rng.permutation(LABELS)[: rng.integers(1, 3)]:
        length = rng.uniform(0.6, 1.4)
        onset = rng.uniform(0.0, seconds - length)
        t = np.arange(int(onset * SR), int((onset + length) * SR)) / SR
        sound = np.sin(2 * np.pi * 1000 * t) if label == "beep" else np.sign(np.sin(2 * np.pi * 150 * t))
        wave[int(onset * SR):int(onset * SR) + len(t)] += 0.3 * sound
        events.append(Event(round(onset, 3), round(onset + length, 3), str(label)))
    return wave.astype(np.float32), events


def _write_split(folder, name: str, count: int, rng) -> dict:
    (folder / name).mkdir(parents=True, exist_ok=True)
    truth = {}
    with (folder / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "onset", "offset", "label"])
        for i in range(count):
            wave, events = _clip(rng)
            relative = f"{name}/{i:02d}.wav"
            sf.write(folder / relative, wave, SR)
            writer.writerows([relative, e.onset, e.offset, e.label] for e in events)
            truth[(folder / relative).resolve()] = events
    return truth


def test_metrics_count_as_dcase_defines_them():
    truth = {"a": [Event(0.5, 1.5, "beep"), Event(2.0, 3.0, "buzz")]}
    assert event_f1(truth, truth)["f1"] == 1.0
    shifted = {"a": [Event(0.65, 1.6, "beep"), Event(2.5, 3.0, "buzz")]}  # beep within collars, buzz onset 0.5 s off
    assert event_f1(truth, shifted) == pytest.approx({"f1": 0.5, "precision": 0.5, "recall": 0.5})
    # 1-s segments of a 4-s clip: beep active in [0,1) and [1,2); guess only in [1,2) plus a false buzz in [3,4)
    guess = {"a": [Event(1.2, 1.4, "beep"), Event(2.1, 2.9, "buzz"), Event(3.5, 3.8, "buzz")]}
    result = segment_f1(truth, guess, {"a": 4.0}, list(LABELS))
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)


def test_targets_and_decoding_follow_the_time_grid(tmp_path):
    config = CATConfig.from_preset("cat-tiny", frame_label_hop_ms=40)
    events = [Event(1.0, 2.0, "beep")]
    targets = frame_targets(events, 100, config, {"beep": 0, "buzz": 1})
    centres = config.frame_label_centre_ms(np.arange(100)) / 1000
    assert targets[:, 1].sum() == 0 and np.all((targets[:, 0] == 1) == ((centres >= 1.0) & (centres < 2.0)))
    decoded = decode_events(targets, config, {0: "beep", 1: "buzz"}, duration=4.0)
    assert len(decoded) == 1 and abs(decoded[0].onset - 1.0) <= 0.04 and abs(decoded[0].offset - 2.0) <= 0.04
    path = tmp_path / "labels.csv"
    path.write_text("path,onset,offset,label\na.wav,2.0,1.0,beep\n")
    with pytest.raises(ValueError, match="onset < offset"):
        read_strong_labels(path)
    path.write_text("path,label\na.wav,beep\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['onset', 'offset'\]"):
        read_strong_labels(path)
    path.write_text("path,onset,offset,label\na.wav,,,\nb.wav,0.5,1,beep\n")
    clips = read_strong_labels(path)
    assert list(clips.values()) == [[], [Event(0.5, 1.0, "beep")]]


def test_finetune_events_finds_the_synthetic_events(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    _write_split(data, "train", 32, rng)
    _write_split(data, "validation", 6, rng)
    test_truth = _write_split(data, "test", 8, rng)
    encoder = tmp_path / "encoder"
    torch.manual_seed(0)
    CATModel(CATConfig.from_preset("cat-tiny", hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                                   stem_channels=[16, 32])).save_pretrained(encoder)
    CATFeatureExtractor(max_length=256, padding="longest").save_pretrained(encoder)

    out = tmp_path / "sed"
    summary = finetune(FinetuneConfig.from_dict(dict(
        task="events", model=str(encoder), data=str(data / "train.csv"), validation_data=str(data / "validation.csv"),
        test_data=str(data / "test.csv"), output_dir=str(out), max_steps=150, warmup_steps=10, learning_rate=2e-3,
        batch_size=8, eval_steps=50, logging_steps=50, threads=1)))
    metrics = json.loads((out / "eval_results.json").read_text())["metrics"]
    assert summary["labels"] == list(LABELS)
    # chance: about half the 1-s segments hold an event of a given label; a model that learned nothing scores ~0.5 or 0
    assert metrics["segment_based"]["f1"] > 0.85, metrics
    assert metrics["event_based"]["f1"] > 0.5, metrics
    print("synthetic SED test metrics:", json.dumps(metrics))

    from transformers import AutoModelForAudioFrameClassification

    model = AutoModelForAudioFrameClassification.from_pretrained(out).eval()
    extractor = CATFeatureExtractor.from_pretrained(out)
    clip, events = next(iter(test_truth.items()))
    wave, _ = sf.read(clip, dtype="float32")
    predicted = predict_events(model, extractor, wave)
    hop = model.config.time_patch_hop_ms / 1000
    for event in events:  # each known event is found with its onset within one 160-ms hop
        assert any(p.label == event.label and abs(p.onset - event.onset) <= hop for p in predicted), (events, predicted)
    rows = list(csv.DictReader((out / "test_events.csv").open()))
    assert rows and set(rows[0]) == {"path", "onset", "offset", "label"}
