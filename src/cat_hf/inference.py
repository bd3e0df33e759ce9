"""Classify audio of any length with a fixed-length audio classifier, and the `cat-hf predict` command.

Audio classifiers are trained on clips of a fixed number of frames (the feature extractor's `max_length`:
1024 frames = 10.24 s for AudioSet recipes). Longer audio is scored with sliding windows:

1. the waveform (at the feature extractor's sampling rate) is cut into windows of `window_frames` feature frames
   (default: `feature_extractor.max_length`) every `hop_frames` frames (default: half a window); the last window
   is moved back to end at the clip's last whole frame, so no window is mostly padding (`window_starts`, the rule
   `CATForAudioClassification` applies to long inputs, so that `pipeline` gives the same scores); a clip no longer than one
   window is a single window (padded by the feature extractor as in training; a clip shorter than one 25 ms
   frame is first zero-padded to one frame);
2. each window gets class probabilities: sigmoid of the logits for multi-label models
   (`config.problem_type == "multi_label_classification"`), softmax for single-label models;
3. the windows are aggregated per class: **max** for multi-label tags (a tag is present if it is present
   anywhere in the clip), **mean** for single-label classes (the clip-level class distribution).

Everything goes through `AutoModelForAudioClassification` / `AutoFeatureExtractor`, so it works for any
transformers audio classifier (CAT, AST, ...) whose feature extractor pads/truncates to `max_length` frames.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio import AudioDecodeError, check_sampling_rate, is_audio_file, load_audio
from .modeling_cat import window_starts

logger = logging.getLogger(__name__)

MULTI_LABEL_PROBLEM_TYPE = "multi_label_classification"
AGGREGATIONS = ("mean", "max")

# Kaldi-style filterbank framing of CAT's and AST's feature extractors, used when an extractor does not say.
_DEFAULT_FRAME_LENGTH_MS = 25.0
_DEFAULT_FRAME_SHIFT_MS = 10.0


class WindowingError(ValueError):
    """Invalid sliding-window settings (window/hop lengths or aggregation)."""


def is_multi_label(config: Any) -> bool:
    """Whether a model config describes a multi-label tagger (sigmoid per class) rather than a classifier."""
    return getattr(config, "problem_type", None) == MULTI_LABEL_PROBLEM_TYPE


def default_aggregation(config: Any) -> str:
    """The documented rule: max over windows for multi-label tags, mean for single-label classes."""
    return "max" if is_multi_label(config) else "mean"


def _frame_geometry(feature_extractor: Any) -> tuple[int, int]:
    """(frame length, frame shift) in samples, from the extractor's `frame_length_ms`/`frame_shift_ms` (CAT's
    attributes) or the Kaldi 25 ms / 10 ms that AST's extractor hard-codes."""
    rate = float(feature_extractor.sampling_rate)
    length_ms = float(getattr(feature_extractor, "frame_length_ms", _DEFAULT_FRAME_LENGTH_MS))
    shift_ms = float(getattr(feature_extractor, "frame_shift_ms", _DEFAULT_FRAME_SHIFT_MS))
    return int(rate * length_ms * 0.001), int(rate * shift_ms * 0.001)


@dataclass(frozen=True)
class WindowPlan:
    """Where the sliding windows of a clip start, in samples.

    `window_samples` is the shortest waveform that gives exactly `window_frames` frames; windows advance by
    `hop_frames` frame shifts.
    """

    window_frames: int
    hop_frames: int
    window_samples: int
    hop_samples: int
    frame_samples: int

    @classmethod
    def for_feature_extractor(
        cls, feature_extractor: Any, window_frames: int | None = None, hop_frames: int | None = None
    ) -> WindowPlan:
        if window_frames is None:
            window_frames = getattr(feature_extractor, "max_length", None)
            if window_frames is None:
                raise WindowingError(
                    f"{type(feature_extractor).__name__} has no `max_length`; pass `window_frames` explicitly."
                )
        window_frames = int(window_frames)
        if window_frames < 1:
            raise WindowingError(f"window_frames must be a positive number of frames, got {window_frames}.")
        hop_frames = max(1, window_frames // 2) if hop_frames is None else int(hop_frames)
        if not 1 <= hop_frames <= window_frames:
            raise WindowingError(
                f"hop_frames must be between 1 and window_frames ({window_frames}), got {hop_frames}; a larger hop "
                "would skip audio between windows."
            )
        frame_length, frame_shift = _frame_geometry(feature_extractor)
        return cls(
            window_frames=window_frames,
            hop_frames=hop_frames,
            window_samples=frame_length + (window_frames - 1) * frame_shift,
            hop_samples=hop_frames * frame_shift,
            frame_samples=frame_length,
        )

    def starts(self, num_samples: int) -> list[int]:
        """Window start offsets in samples for a clip of `num_samples` samples: `window_starts` over its frames (one
        window when it fits in one; the last ends at the clip's last whole frame), so that each window's fbank is
        the whole clip's fbank rows that `CATForAudioClassification` windows over."""
        frame_shift = self.hop_samples // self.hop_frames
        num_frames = 1 + max(num_samples - self.frame_samples, 0) // frame_shift
        return [start * frame_shift for start in window_starts(num_frames, self.window_frames, self.hop_frames)]


@dataclass
class ClipPrediction:
    """Scores of one clip: aggregated class probabilities plus the per-window ones they came from."""

    probabilities: np.ndarray  # (num_labels,)
    window_probabilities: np.ndarray  # (num_windows, num_labels)
    window_starts: np.ndarray  # (num_windows,) in seconds
    aggregation: str
    duration: float  # seconds

    @property
    def num_windows(self) -> int:
        return int(self.window_probabilities.shape[0])

    def top_k(self, id2label: dict[int, str], k: int = 5) -> list[tuple[str, float]]:
        """The k best (label, probability) pairs, best first (ties: lower class id first)."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(str(id2label.get(int(i), i)), float(self.probabilities[i])) for i in order]


@dataclass
class _PendingClip:
    key: Any
    num_samples: int
    starts: list[int]
    window_probabilities: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0


def _window_feature_extractor(feature_extractor: Any, plan: WindowPlan) -> Any:
    """The extractor padding/truncating to exactly `plan.window_frames` frames (a copy when that differs)."""
    if getattr(feature_extractor, "max_length", None) == plan.window_frames:
        return feature_extractor
    windowed = copy.deepcopy(feature_extractor)
    windowed.max_length = plan.window_frames
    return windowed


@torch.inference_mode()
def _window_probabilities(
    model: Any, feature_extractor: Any, windows: list[np.ndarray], multi_label: bool
) -> np.ndarray:
    inputs = feature_extractor(windows, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = {
        name: (value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device))
        for name, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }
    logits = model(**batch).logits.float()
    probabilities = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    return probabilities.cpu().numpy().astype(np.float64)


def predict_clips(
    model: Any,
    feature_extractor: Any,
    clips: Iterable[tuple[Any, np.ndarray]],
    *,
    window_frames: int | None = None,
    hop_frames: int | None = None,
    aggregation: str | None = None,
    batch_size: int = 8,
) -> Iterator[tuple[Any, ClipPrediction]]:
    """Score `(key, waveform)` pairs of any length, batching windows across clips; yields in input order.

    Waveforms are mono float arrays at `feature_extractor.sampling_rate`. See the module docstring for the rule.
    """
    if getattr(model.config, "problem_type", None) == "regression":
        raise ValueError(
            "This model is a regressor (config.problem_type 'regression'), not a classifier; sliding-window class "
            "probabilities need a single- or multi-label audio classification model."
        )
    aggregation = aggregation or default_aggregation(model.config)
    if aggregation not in AGGREGATIONS:
        raise WindowingError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    if batch_size < 1:
        raise WindowingError(f"batch_size must be >= 1, got {batch_size}.")
    plan = WindowPlan.for_feature_extractor(feature_extractor, window_frames, hop_frames)
    extractor = _window_feature_extractor(feature_extractor, plan)
    multi_label = is_multi_label(model.config)
    reduce = np.max if aggregation == "max" else np.mean
    rate = float(feature_extractor.sampling_rate)
    model.eval()

    clips_in_flight: deque[_PendingClip] = deque()
    queue: list[tuple[_PendingClip, int, np.ndarray]] = []  # (clip, window index, samples)

    def run(count: int) -> None:
        batch, queue[:] = queue[:count], queue[count:]
        scores = _window_probabilities(model, extractor, [samples for _, _, samples in batch], multi_label)
        for (clip, index, _), row in zip(batch, scores):
            clip.window_probabilities[index] = row
            clip.remaining -= 1

    def finished() -> Iterator[tuple[Any, ClipPrediction]]:
        while clips_in_flight and clips_in_flight[0].remaining == 0:
            clip = clips_in_flight.popleft()
            windows = np.stack(clip.window_probabilities)
            yield (
                clip.key,
                ClipPrediction(
                    probabilities=reduce(windows, axis=0),
                    window_probabilities=windows,
                    window_starts=np.asarray(clip.starts, dtype=np.float64) / rate,
                    aggregation=aggregation,
                    duration=clip.num_samples / rate,
                ),
            )

    for key, waveform in clips:
        waveform = np.asarray(waveform, dtype=np.float32)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError(
                f"Clip {key!r}: expected a non-empty mono waveform (1-D array), got shape {waveform.shape}; "
                "decode with cat_hf.audio.load_audio (it down-mixes and resamples)."
            )
        num_samples = int(waveform.size)
        if num_samples < plan.frame_samples:  # shorter than one 25 ms frame: zero-pad to one frame
            waveform = np.pad(waveform, (0, plan.frame_samples - num_samples))
        starts = plan.starts(waveform.size)
        clip = _PendingClip(key, num_samples, starts, [None] * len(starts), len(starts))
        clips_in_flight.append(clip)
        queue.extend((clip, i, waveform[s : s + plan.window_samples]) for i, s in enumerate(starts))
        while len(queue) >= batch_size:
            run(batch_size)
            yield from finished()
    while queue:
        run(batch_size)
        yield from finished()
    yield from finished()


def predict_long(
    model: Any,
    feature_extractor: Any,
    waveform: np.ndarray,
    *,
    sampling_rate: int | None = None,
    window_frames: int | None = None,
    hop_frames: int | None = None,
    aggregation: str | None = None,
    batch_size: int = 8,
) -> ClipPrediction:
    """Class probabilities of one clip of any length by sliding windows (rule in the module docstring).

    Args:
        waveform: mono samples; resampled from `sampling_rate` (default: the extractor's rate) when that differs.
        window_frames: frames per window (default `feature_extractor.max_length`).
        hop_frames: frames between window starts (default half a window).
        aggregation: "max" or "mean" (default: max for multi-label models, mean for single-label ones).
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    target_rate = int(feature_extractor.sampling_rate)
    if sampling_rate is not None:
        check_sampling_rate(float(sampling_rate), "the waveform")
    if sampling_rate is not None and int(sampling_rate) != target_rate:
        waveform = load_audio({"array": waveform, "sampling_rate": int(sampling_rate)}, target_rate)
    ((_, prediction),) = predict_clips(
        model,
        feature_extractor,
        [(None, waveform)],
        window_frames=window_frames,
        hop_frames=hop_frames,
        aggregation=aggregation,
        batch_size=batch_size,
    )
    return prediction


def check_model_reference(model_name_or_path: str | os.PathLike) -> None:
    """FileNotFoundError for a local folder that is not there (instead of transformers' message about Hub repo ids).
    Hub ids ("name" or "namespace/name") pass: only loading can tell whether they exist."""
    name = os.fspath(model_name_or_path)
    path = Path(name).expanduser()
    is_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) is not None
    if not path.exists() and not is_hub_id:
        raise FileNotFoundError(f"no model folder at {name} ({path.resolve()}); check the path.")


def load_classifier(model_name_or_path: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """Load `(model, feature_extractor)` with the Auto classes (CAT is registered by `import cat_hf`). A LoRA adapter
    folder (`cat-hf finetune --lora`) is loaded onto its base encoder and merged."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    import cat_hf  # noqa: F401 - registers CATConfig/CATForAudioClassification with the Auto classes

    from .lora import ADAPTER_CONFIG_NAME, load_lora_model

    name = os.fspath(model_name_or_path)
    check_model_reference(name)
    if Path(name, ADAPTER_CONFIG_NAME).is_file():
        model = load_lora_model(name).merge_and_unload()
    else:
        model, info = AutoModelForAudioClassification.from_pretrained(name, output_loading_info=True)
        if any(key.startswith("classifier.") for key in info["missing_keys"]):
            raise ValueError(
                f"{name} is an encoder without a trained classification head (its weights have no classifier); "
                f"finetune it on labelled audio first (cat-hf finetune --model {name} ...), or use AutoModel for "
                "embeddings."
            )
    feature_extractor = AutoFeatureExtractor.from_pretrained(name)
    model.to(resolve_device(device)).eval()
    return model, feature_extractor


def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def find_audio_files(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively, audio extensions only, sorted) into files; missing paths -> errors."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_audio_file(p))
            if not found:
                errors.append((str(path), "folder contains no audio files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)  # named explicitly: try it whatever its extension
        else:
            errors.append((str(path), "no such file or folder"))
    return files, errors


# ----------------------------------------------------------------------------------------------------------------
# `cat-hf predict`


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """The sliding-window options shared by `cat-hf predict` and `cat-hf evaluate`."""
    parser.add_argument("--window-frames", type=int, default=None,
                        help="frames per sliding window for long clips (default: the feature extractor's max_length)")
    parser.add_argument("--hop-frames", type=int, default=None, help="frames between windows (default: half a window)")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default=None,
                        help="window aggregation (default: max for multi-label models, mean for single-label)")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="FILES_OR_FOLDERS",
        help="audio files, or folders searched recursively (wav, flac, ogg, mp3, ...; any sampling rate)",
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id of an audio classifier")
    parser.add_argument("--top-k", type=int, default=5, help="labels to show per file (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    add_window_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")  # fmt: skip


def _decoded_clips(
    files: list[Path], sampling_rate: int, errors: list[tuple[str, str]]
) -> Iterator[tuple[str, np.ndarray]]:
    """Decode files one by one; unreadable ones (and ones whose rate is not an audio rate) are recorded in `errors`
    and skipped."""
    for path in files:
        try:
            yield str(path), load_audio(path, sampling_rate)
        except AudioDecodeError as err:
            errors.append((str(path), err.reason))
            print(f"cat-hf predict: skipping {path}: {err.reason}", file=sys.stderr)


def run_cli(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}.")
    files, errors = find_audio_files(args.inputs)
    for name, reason in errors:
        print(f"cat-hf predict: skipping {name}: {reason}", file=sys.stderr)
    if not files:
        print("cat-hf predict: no audio files to classify.", file=sys.stderr)
        return 1
    model, feature_extractor = load_classifier(args.model, args.device)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    results = []
    if not args.json:
        print(f"file\tduration\twindows\ttop-{args.top_k} ({'sigmoid' if is_multi_label(model.config) else 'softmax'})")
    predictions = predict_clips(
        model,
        feature_extractor,
        _decoded_clips(files, int(feature_extractor.sampling_rate), errors),
        window_frames=args.window_frames,
        hop_frames=args.hop_frames,
        aggregation=args.aggregation,
        batch_size=args.batch_size,
    )
    for name, prediction in predictions:
        results.append(
            {
                "file": name,
                "duration_s": round(prediction.duration, 3),
                "num_windows": prediction.num_windows,
                "top": [{"label": label, "score": score} for label, score in prediction.top_k(id2label, args.top_k)],
            }
        )
        if not args.json:
            tags = "  ".join(f"{label} {score:.3f}" for label, score in prediction.top_k(id2label, args.top_k))
            print(f"{name}\t{prediction.duration:.2f}s\t{prediction.num_windows}w\t{tags}", flush=True)
    if args.json:
        document = {
            "model": str(args.model),
            "problem_type": MULTI_LABEL_PROBLEM_TYPE if is_multi_label(model.config) else "single_label_classification",
            "aggregation": args.aggregation or default_aggregation(model.config),
            "results": results,
            "errors": [{"file": name, "error": reason} for name, reason in errors],
        }
        print(json.dumps(document, indent=2, allow_nan=False, default=_json_number))
    elif errors:
        print(f"cat-hf predict: {len(results)} file(s) classified, {len(errors)} skipped.", file=sys.stderr)
    return 0 if results else 1


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "AGGREGATIONS",
    "MULTI_LABEL_PROBLEM_TYPE",
    "ClipPrediction",
    "WindowPlan",
    "WindowingError",
    "default_aggregation",
    "find_audio_files",
    "is_multi_label",
    "load_classifier",
    "predict_clips",
    "predict_long",
    "resolve_device",
]
