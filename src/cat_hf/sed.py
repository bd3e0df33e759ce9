"""Sound event detection with CAT: strong labels in, events with onsets and offsets out.

    cat-hf finetune --task events --data train.csv --validation-data val.csv --test-data test.csv \\
        --model cat-tiny-pretrained --output-dir cat-sed

Each CSV lists events as `path,onset,offset,label` (seconds; paths relative to the CSV's folder); a clip without
events is listed once with empty onset, offset and label. `CATForAudioFrameClassification` learns, per label frame
(one 160 ms time patch, or `--set frame_label_hop_ms=40`-style finer grids from the config), which labels are
active: multi-label binary cross-entropy on windows of `max_length` frames cut at random patch-aligned offsets.
Validation picks the step with the best segment-based F1. Scoring runs each clip in consecutive windows of
`max_length` frames, thresholds the per-frame probabilities at 0.5 and turns runs of active frames into events.

Metrics follow DCASE's definitions (Mesaros et al., 2016, as `sed_eval` computes them, micro-averaged over classes):
segment-based F1 on 1-s segments (a class is active in a segment if any of its events overlaps it), and event-based
F1 where a predicted event matches an unmatched reference event of its class if its onset is within 200 ms and its
offset within max(200 ms, 20 % of the reference's length). PSDS is not computed (no maintained package runs it
offline here).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio import load_audio
from .files import atomic_write_json, atomic_write_text
from .training import samples_for_frames

STRONG_COLUMNS = ("path", "onset", "offset", "label")
THRESHOLD = 0.5
SEGMENT_SECONDS = 1.0
ONSET_COLLAR_SECONDS = 0.2
OFFSET_COLLAR_FRACTION = 0.2


@dataclass(frozen=True)
class Event:
    onset: float  # seconds
    offset: float
    label: str


def read_strong_labels(path: str | Path) -> dict[Path, list[Event]]:
    """`path,onset,offset,label` rows -> {audio file: its events (maybe none)}, in file order."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in STRONG_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}; strong labels are a CSV with the header "
                             f"{','.join(STRONG_COLUMNS)} (one row per event; a clip without events: path,,,).")
        clips: dict[Path, list[Event]] = {}
        for line, row in enumerate(reader, start=2):
            audio = (path.parent / row["path"]).resolve()
            events = clips.setdefault(audio, [])
            if not (row["onset"] or row["offset"] or row["label"]):
                continue
            try:
                onset, offset = float(row["onset"]), float(row["offset"])
            except ValueError:
                raise ValueError(f"{path}, line {line}: onset {row['onset']!r} and offset {row['offset']!r} must be "
                                 "seconds (numbers).") from None
            if not (0 <= onset < offset and row["label"]):
                raise ValueError(f"{path}, line {line}: an event needs 0 <= onset < offset and a label, got "
                                 f"{onset}, {offset}, {row['label']!r}.")
            events.append(Event(onset, offset, row["label"]))
    if not clips:
        raise ValueError(f"{path} lists no clips.")
    return clips


def frame_targets(events: Sequence[Event], num_frames: int, config: Any, label2id: Mapping[str, int]) -> np.ndarray:
    """(num_frames, num_labels) 0/1: label frame k is active for a label when its centre
    (`config.frame_label_centre_ms(k)`) falls inside one of the label's events."""
    centres = config.frame_label_centre_ms(np.arange(num_frames, dtype=np.float64)) / 1000
    targets = np.zeros((num_frames, len(label2id)), dtype=np.float32)
    for event in events:
        if event.label in label2id:
            targets[(centres >= event.onset) & (centres < event.offset), label2id[event.label]] = 1.0
    return targets


def decode_events(probabilities: np.ndarray, config: Any, id2label: Mapping[int, str], duration: float,
                  threshold: float = THRESHOLD) -> list[Event]:
    """Runs of frames above `threshold` -> events; a frame spans its centre +- half a label hop (clipped to the
    clip)."""
    half = config.time_patch_hop_ms / config.frame_label_repeats / 2000
    centres = config.frame_label_centre_ms(np.arange(len(probabilities), dtype=np.float64)) / 1000
    events = []
    for index, label in sorted(id2label.items()):
        active = np.concatenate([[False], probabilities[:, index] >= threshold, [False]])
        starts = np.flatnonzero(active[1:] & ~active[:-1])
        ends = np.flatnonzero(~active[1:] & active[:-1]) - 1
        for first, last in zip(starts, ends):
            onset, offset = max(centres[first] - half, 0.0), min(centres[last] + half, duration)
            if offset > onset:
                events.append(Event(round(onset, 3), round(offset, 3), label))
    return sorted(events, key=lambda e: (e.onset, e.label))


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> dict[str, float]:
    precision = true_positives / max(true_positives + false_positives, 1)
    recall = true_positives / max(true_positives + false_negatives, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def segment_f1(reference: Mapping[Any, Sequence[Event]], predicted: Mapping[Any, Sequence[Event]],
               durations: Mapping[Any, float], labels: Sequence[str], segment: float = SEGMENT_SECONDS) -> dict:
    """Segment-based micro F1: per clip, segment and label, active if an event of the label overlaps the segment."""
    counts = np.zeros(3, dtype=np.int64)  # TP, FP, FN
    for clip, duration in durations.items():
        bounds = np.arange(0.0, duration, segment)

        def activity(events: Sequence[Event]) -> np.ndarray:
            table = np.zeros((len(bounds), len(labels)), dtype=bool)
            for event in events:
                if event.label in labels:
                    table[(bounds < event.offset) & (bounds + segment > event.onset), labels.index(event.label)] = True
            return table

        truth, guess = activity(reference.get(clip, [])), activity(predicted.get(clip, []))
        counts += [(truth & guess).sum(), (~truth & guess).sum(), (truth & ~guess).sum()]
    return _f1(*counts.tolist())


def event_f1(reference: Mapping[Any, Sequence[Event]], predicted: Mapping[Any, Sequence[Event]],
             onset_collar: float = ONSET_COLLAR_SECONDS, offset_fraction: float = OFFSET_COLLAR_FRACTION) -> dict:
    """Event-based micro F1: a predicted event matches an unmatched reference event of its label when its onset is
    within `onset_collar` s and its offset within max(`onset_collar`, `offset_fraction` x the reference's length)."""
    matched = false_positives = false_negatives = 0
    for clip in set(reference) | set(predicted):
        truth, unused = list(reference.get(clip, [])), [True] * len(reference.get(clip, []))
        for guess in predicted.get(clip, []):
            for i, event in enumerate(truth):
                offset_collar = max(onset_collar, offset_fraction * (event.offset - event.onset))
                if unused[i] and event.label == guess.label and abs(event.onset - guess.onset) <= onset_collar \
                        and abs(event.offset - guess.offset) <= offset_collar:  # fmt: skip
                    unused[i] = False
                    matched += 1
                    break
            else:
                false_positives += 1
        false_negatives += sum(unused)
    return _f1(matched, false_positives, false_negatives)


@torch.inference_mode()
def frame_probabilities(model: Any, feature_extractor: Any, waveform: np.ndarray) -> np.ndarray:
    """(label frames, num_labels) sigmoid probabilities of a clip of any length, in consecutive windows of the
    extractor's `max_length` frames (patch-aligned, so the label grid runs on across windows)."""
    config = model.config
    window = feature_extractor.max_length - feature_extractor.max_length % config.patch_size
    features = feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate, padding="longest",
                                 return_attention_mask=True, return_tensors="pt")
    values, mask = features["input_values"], features["attention_mask"]
    rows = []
    for start in range(0, values.shape[1], window):
        output = model(input_values=values[:, start:start + window], attention_mask=mask[:, start:start + window])
        rows.append(output.logits[0][output.frame_mask[0]].float().sigmoid())
    return torch.cat(rows).cpu().numpy()


def predict_events(model: Any, feature_extractor: Any, waveform: np.ndarray, threshold: float = THRESHOLD
                   ) -> list[Event]:
    """Events (onset, offset in seconds, label) of a mono waveform at the extractor's rate."""
    probabilities = frame_probabilities(model, feature_extractor, waveform)
    return decode_events(probabilities, model.config, model.config.id2label, len(waveform) / feature_extractor.sampling_rate,
                         threshold)


def score(model: Any, feature_extractor: Any, clips: Mapping[Path, list[Event]], labels: Sequence[str],
          waves: Mapping[Path, np.ndarray]) -> tuple[dict[str, Any], dict[Path, list[Event]]]:
    """Segment- and event-based F1 of the model on labelled clips, and its predicted events."""
    model.eval()
    rate = feature_extractor.sampling_rate
    predicted = {clip: predict_events(model, feature_extractor, waves[clip]) for clip in clips}
    durations = {clip: len(waves[clip]) / rate for clip in clips}
    return {"segment_based": segment_f1(clips, predicted, durations, labels),
            "event_based": event_f1(clips, predicted)}, predicted


def _write_events(path: Path, predicted: Mapping[Path, Sequence[Event]], root: Path) -> None:
    lines = [",".join(STRONG_COLUMNS)]
    for clip, events in predicted.items():
        name = clip.relative_to(root) if clip.is_relative_to(root) else clip
        lines += [f"{name},{e.onset:.3f},{e.offset:.3f},{e.label}" for e in events]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _training_window(wave: np.ndarray, targets: np.ndarray, config: Any, extractor: Any, repeats: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random patch-aligned crop of the extractor's `max_length` frames and its label rows."""
    rate, shift_ms, length_ms = extractor.sampling_rate, extractor.frame_shift_ms, extractor.frame_length_ms
    hop = config.patch_size * int(rate * shift_ms / 1000)
    patches = extractor.max_length // config.patch_size
    start = int(rng.integers(0, max(len(targets) // repeats - patches, 0) + 1))
    samples = samples_for_frames(extractor.max_length, rate, length_ms, shift_ms)
    return wave[start * hop:start * hop + samples], targets[start * repeats:(start + patches) * repeats]


def finetune_events(config: Any, extractor: Any, output_dir: Path) -> dict[str, Any]:
    """`cat-hf finetune --task events` (`config`: its FinetuneConfig; `extractor`: the feature extractor it built;
    `output_dir`: the run folder it checked): train, select on validation segment F1, test, save (module docstring)."""
    from accelerate.utils import set_seed

    from .configuration_cat import CATConfig
    from .modeling_cat import CATForAudioFrameClassification
    from .optimization import adamw, build_param_groups, warmup_cosine_schedule

    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)
    splits = {"train": read_strong_labels(config.data)}
    for split, source in (("validation", config.validation_data), ("test", config.test_data)):
        if source:
            splits[split] = read_strong_labels(source)
    labels = sorted({e.label for events in splits["train"].values() for e in events})
    if not labels:
        raise ValueError(f"{config.data} has no events to learn from; list events as path,onset,offset,label.")
    label2id = {label: i for i, label in enumerate(labels)}
    head = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
                problem_type="multi_label_classification")
    if config.model:
        model = CATForAudioFrameClassification.from_pretrained(config.model, ignore_mismatched_sizes=True, **head)
    else:
        model = CATForAudioFrameClassification(CATConfig.from_preset(config.preset, **head))
    waves = {clip: load_audio(clip, extractor.sampling_rate) for split in splits.values() for clip in split}
    repeats = model.config.frame_label_repeats
    targets = {clip: frame_targets(events, math.ceil(extractor.num_frames(len(waves[clip])) / model.config.patch_size)
                                   * repeats, model.config, label2id)
               for clip, events in splits["train"].items()}
    train_clips = list(splits["train"])

    groups = build_param_groups(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    optimizer = adamw(groups, learning_rate=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                      eps=config.adam_epsilon)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                       min_ratio=config.min_learning_rate / config.learning_rate)
    rng = np.random.default_rng(config.seed)
    history, best, best_state, start = [], -1.0, None, time.perf_counter()
    for step in range(1, config.max_steps + 1):
        model.train()
        picks = rng.choice(len(train_clips), size=min(config.batch_size, len(train_clips)), replace=False)
        crops = [_training_window(waves[train_clips[i]], targets[train_clips[i]], model.config, extractor, repeats, rng)
                 for i in picks]
        inputs = extractor([wave for wave, _ in crops], sampling_rate=extractor.sampling_rate, padding="longest",
                           truncation=True, return_attention_mask=True, return_tensors="pt")
        frames = inputs["input_values"].shape[1] // model.config.patch_size * repeats
        labels_batch = torch.zeros(len(crops), frames, len(labels))
        for row, (_, rows) in enumerate(crops):
            rows = rows[:frames]
            labels_batch[row, :len(rows)] = torch.from_numpy(rows)
        loss = model(**inputs, labels=labels_batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if "validation" in splits and (step % config.eval_steps == 0 or step == config.max_steps):
            metrics, _ = score(model, extractor, splits["validation"], labels, waves)
            record["validation_segment_f1"] = metrics["segment_based"]["f1"]
            if record["validation_segment_f1"] > best:
                best, best_state = record["validation_segment_f1"], {k: v.clone() for k, v in model.state_dict().items()}
        history.append(record)
        if step % config.logging_steps == 0 or "validation_segment_f1" in record:
            print(json.dumps(record), flush=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.save_pretrained(output_dir)
    extractor.save_pretrained(output_dir)
    summary = {"task": "events", "labels": labels, "steps": config.max_steps, "best_validation_segment_f1": best,
               "wall_time_s": round(time.perf_counter() - start, 1), "history": history}
    if "test" in splits:
        metrics, predicted = score(model, extractor, splits["test"], labels, waves)
        atomic_write_json(output_dir / "eval_results.json", {"split": "test", "data": str(config.test_data),
                                                             "metrics": metrics})
        _write_events(output_dir / "test_events.csv", predicted, Path(config.test_data).resolve().parent)
        summary["eval_results"] = metrics
    atomic_write_json(output_dir / "training_summary.json", summary)
    return summary


__all__ = ["Event", "read_strong_labels", "frame_targets", "decode_events", "segment_f1", "event_f1",
           "frame_probabilities", "predict_events", "finetune_events"]
