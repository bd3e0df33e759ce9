"""Evaluate an audio classifier on a labelled set, and the `cat-hf evaluate` command.

Single-label models are scored with top-1/top-k accuracy and per-class precision/recall/F1 (plus a confusion
matrix); multi-label models (`config.problem_type == "multi_label_classification"`) with mAP, mAUC and d-prime
and per-class AP/AUC, the AudioSet protocol. Metrics come from the `evaluate` modules shipped in
`cat_hf.metrics`. Clips longer than the model's input are scored with sliding windows (`cat_hf.inference`).

Every label of the evaluation set is checked against the model's `label2id` before any audio is decoded, so a
mismatched set fails in seconds with the offending rows listed, not after an hour of inference.

Outputs (in `output_dir`): `eval_results.json` (read by the model-card code), `per_class_scores.csv`,
`predictions.csv`, and `confusion_matrix.png` for single-label models. `eval_results.json` keeps one result per
(dataset, split): evaluating the same folder on other data adds a result (the file becomes a list) whose files carry
the data's name, and only a result on the same dataset and split is replaced.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audio import AudioDecodeError, load_audio
from .files import atomic_write_bytes, folder_lock, json_safe
from .inference import (
    add_window_arguments,
    MULTI_LABEL_PROBLEM_TYPE,
    default_aggregation,
    is_multi_label,
    load_classifier,
    predict_clips,
)
from .metrics import load_metric

logger = logging.getLogger(__name__)

TASK = "audio-classification"
EVAL_RESULTS_FILE = "eval_results.json"
PER_CLASS_FILE = "per_class_scores.csv"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
SINGLE_LABEL_PROBLEM_TYPE = "single_label_classification"

_MAX_LISTED = 20


class UnknownLabelError(ValueError):
    """The evaluation set uses labels the model does not have (or a row has the wrong number of labels)."""


@dataclass
class EvalExample:
    """One labelled clip: `key` names it in messages and outputs (its path, or its row)."""

    key: str
    audio: Any  # anything cat_hf.audio.load_audio accepts
    labels: list[str]


@dataclass
class EvalSet:
    name: str
    split: str
    examples: list[EvalExample]


# ----------------------------------------------------------------------------------------------------------------
# Loading the evaluation set (through cat_hf.data, the one corpus loader of the project)


def load_eval_set(data: Any, split: str | None = None, name: str | None = None) -> EvalSet:
    """Read a labelled evaluation set with `cat_hf.data.load_audio_corpus`.

    `data`: an audiofolder (`<root>/<label>/<clip>.wav`, or `<root>/<split>/<label>/...`), a CSV/JSONL file with
    `path,tags` columns (relative paths resolved against the file's folder), a `save_to_disk` folder, a Hub
    dataset name, or a loaded `datasets` dataset. `split` defaults to "test" (used where the source has splits).
    """
    import datasets

    from .data import AUDIO_COLUMN, LABELS_COLUMN, load_audio_corpus

    split = split or "test"
    dataset = load_audio_corpus(data, split=split, labels_from_folders=True)
    if LABELS_COLUMN not in dataset.column_names:
        raise ValueError(
            f"The evaluation set {data!r} has no label column (columns: {dataset.column_names}); evaluation needs "
            "labels: an audiofolder <root>/<label>/<clip>.wav, or a path,tags CSV/JSONL."
        )
    if name is None:
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            name = (path.stem if path.is_file() else path.resolve().name) if path.exists() else os.fspath(data)
        else:
            name = getattr(getattr(data, "info", None), "dataset_name", None) or "dataset"
    if isinstance(dataset, datasets.Dataset):
        pairs: Iterable[tuple[Any, Any]] = zip(dataset[AUDIO_COLUMN], dataset[LABELS_COLUMN])
    else:  # IterableDataset (streaming): one pass over the rows
        pairs = ((row[AUDIO_COLUMN], row[LABELS_COLUMN]) for row in dataset)
    examples = []
    for index, (audio, labels) in enumerate(pairs):
        key = audio.get("path") if isinstance(audio, dict) else None
        examples.append(EvalExample(str(key) if key else f"row {index}", audio, list(labels or [])))
    return EvalSet(str(name), split, examples)


# ----------------------------------------------------------------------------------------------------------------
# Labels


def encode_targets(examples: Sequence[EvalExample], label2id: dict[str, int], multi_label: bool) -> np.ndarray:
    """Class ids (single-label) or a multi-hot matrix (multi-label); raises UnknownLabelError listing bad rows."""
    unknown = [(i, ex) for i, ex in enumerate(examples) if any(label not in label2id for label in ex.labels)]
    if unknown:
        bad_labels = sorted({label for _, ex in unknown for label in ex.labels if label not in label2id})
        rows = "\n".join(
            f"  row {i}: {ex.key}: {[label for label in ex.labels if label not in label2id]}"
            for i, ex in unknown[:_MAX_LISTED]
        )
        more = f"\n  ... and {len(unknown) - _MAX_LISTED} more rows" if len(unknown) > _MAX_LISTED else ""
        known = sorted(label2id)
        raise UnknownLabelError(
            f"{len(unknown)} evaluation row(s) use {len(bad_labels)} label(s) the model does not know: {bad_labels}\n"
            f"{rows}{more}\nThe model's {len(known)} labels are: {known[:50]}{' ...' if len(known) > 50 else ''}\n"
            "Fix: rename or drop those rows so every label is one of the model's labels, or evaluate a model "
            "fine-tuned with these labels."
        )
    if multi_label:
        targets = np.zeros((len(examples), len(label2id)), dtype=np.int8)
        for i, ex in enumerate(examples):
            targets[i, [label2id[label] for label in ex.labels]] = 1
        return targets
    wrong = [(i, ex) for i, ex in enumerate(examples) if len(ex.labels) != 1]
    if wrong:
        rows = "\n".join(f"  row {i}: {ex.key}: {ex.labels}" for i, ex in wrong[:_MAX_LISTED])
        raise UnknownLabelError(
            f"{len(wrong)} row(s) do not have exactly one label, but the model is single-label "
            f"(problem_type {SINGLE_LABEL_PROBLEM_TYPE!r}):\n{rows}\n"
            "Fix: give each clip one label, or evaluate a multi-label model (problem_type "
            f"{MULTI_LABEL_PROBLEM_TYPE!r})."
        )
    return np.array([label2id[ex.labels[0]] for ex in examples], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_model(
    model_or_path: Any,
    dataset_or_path: Any,
    *,
    feature_extractor: Any = None,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    split: str | None = None,
    window_frames: int | None = None,
    hop_frames: int | None = None,
    aggregation: str | None = None,
    top_k: int = 5,
    device: str | None = None,
    dataset_name: str | None = None,
    baseline: Any = None,
) -> dict[str, Any]:
    """Score a classifier on a labelled set; returns the `eval_results.json` content (plus per-class scores).

    Args:
        model_or_path: a model folder / Hub id, or a loaded audio-classification model.
        dataset_or_path: see `load_eval_set`.
        feature_extractor: needed with a loaded model whose `name_or_path` has no feature extractor saved.
        output_dir: where to write the result files (nothing is written when None).
        window_frames, hop_frames, aggregation: sliding-window settings for clips longer than a window
            (see `cat_hf.inference`).
        top_k: the k of the top-k accuracy reported next to top-1 (single-label models with more than k classes).
        baseline: a labelled training corpus (any source `load_eval_set` reads, its "train" split) on which a logistic
            regression on the clips' log-mel statistics (`cat_hf.probe.log_mel_baseline`) is fitted and scored on
            the same clips as the model, under "baseline"; `RECORDED_TRAINING_DATA` takes the training data the
            model folder's training_summary.json records.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_extractor = load_classifier(model_or_path, device)
        feature_extractor = feature_extractor or loaded_extractor
        model_name = os.fspath(model_or_path)
    else:
        model = model_or_path
        model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        if feature_extractor is None:
            from transformers import AutoFeatureExtractor

            feature_extractor = AutoFeatureExtractor.from_pretrained(model.name_or_path)
    multi_label = is_multi_label(model.config)
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    label2id = {label: index for index, label in id2label.items()}

    eval_set = load_eval_set(dataset_or_path, split, dataset_name)
    targets = encode_targets(eval_set.examples, label2id, multi_label)  # fails here, before any audio is decoded

    sampling_rate = int(feature_extractor.sampling_rate)
    skipped: list[dict[str, str]] = []

    def clips() -> Iterator[tuple[int, np.ndarray]]:
        for index, example in enumerate(eval_set.examples):
            try:
                yield index, load_audio(example.audio, sampling_rate)
            except AudioDecodeError as err:
                logger.warning("skipping %s: %s", example.key, err.reason)
                skipped.append({"key": example.key, "error": err.reason})

    scores = np.zeros((len(eval_set.examples), len(id2label)), dtype=np.float64)
    num_windows = np.zeros(len(eval_set.examples), dtype=np.int64)
    scored = np.zeros(len(eval_set.examples), dtype=bool)
    aggregation = aggregation or default_aggregation(model.config)
    for index, prediction in predict_clips(
        model,
        feature_extractor,
        clips(),
        window_frames=window_frames,
        hop_frames=hop_frames,
        aggregation=aggregation,
        batch_size=batch_size,
    ):
        scores[index] = prediction.probabilities
        num_windows[index] = prediction.num_windows
        scored[index] = True
    if not scored.any():
        raise ValueError(f"None of the {len(eval_set.examples)} clips could be decoded (first error: {skipped[0]}).")

    if multi_label:
        computed = load_metric("multilabel_tagging").compute(predictions=scores[scored], references=targets[scored])
        metrics = {"mAP": computed["mAP"], "mAUC": computed["mAUC"], "d_prime": computed["d_prime"]}
        excluded = {
            "without_positives": [id2label[c] for c in computed["classes_without_positives"]],
            "without_negatives": [id2label[c] for c in computed["classes_without_negatives"]],
        }
    else:
        ks = [top_k] if top_k < len(id2label) else []
        computed = load_metric("topk_accuracy").compute(
            predictions=scores[scored], references=targets[scored], top_k=ks
        )
        metrics = {"accuracy": computed["accuracy"]}
        metrics.update({f"top_{k}_accuracy": computed[f"top_{k}_accuracy"] for k in ks})
        metrics.update({key: computed[key] for key in ("macro_precision", "macro_recall", "macro_f1")})
        excluded = {"without_examples": [id2label[c] for c, n in enumerate(computed["per_class"]["support"]) if n == 0]}

    plan_window = window_frames or getattr(feature_extractor, "max_length", None)
    results: dict[str, Any] = {
        "task": TASK,
        "problem_type": MULTI_LABEL_PROBLEM_TYPE if multi_label else SINGLE_LABEL_PROBLEM_TYPE,
        "model": model_name,
        "dataset": eval_set.name,
        "split": eval_set.split,
        "metrics": metrics,
        "num_examples": int(scored.sum()),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_classes": len(id2label),
        "excluded_classes": excluded,
        "window": {
            "window_frames": plan_window,
            "hop_frames": hop_frames or (max(1, plan_window // 2) if plan_window else None),
            "aggregation": aggregation,
            "num_windowed_clips": int((num_windows > 1).sum()),
        },
        "per_class": _per_class_rows(computed, id2label, multi_label),
    }
    if baseline is not None:
        results["baseline"] = _fit_baseline(baseline, model_or_path, eval_set, scored, targets, label2id, multi_label,
                                            feature_extractor)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with folder_lock(output_dir):  # evaluations run side by side into one folder each keep their result
            results["files"] = _write_outputs(
                output_dir, results, computed, eval_set, targets, scores, scored, num_windows, id2label, multi_label
            )
    return results


#: `evaluate_model(baseline=RECORDED_TRAINING_DATA)`: the training corpus named in the model's training_summary.json.
RECORDED_TRAINING_DATA = "recorded"


def recorded_training_data(model_path: Any) -> tuple[Any, str]:
    """(corpus, split) a cat-hf model folder was finetuned on, from its training_summary.json."""
    summary_path = Path(model_path) / "training_summary.json" if isinstance(model_path, (str, os.PathLike)) else None
    config = json.loads(summary_path.read_text(encoding="utf-8")).get("config", {}) \
        if summary_path is not None and summary_path.is_file() else {}
    if not config.get("data"):
        raise ValueError(
            f"{model_path} records no training data (no training_summary.json from cat-hf finetune); name the corpus "
            "to fit the baseline on: --baseline TRAIN_DATA."
        )
    return config["data"], config.get("train_split") or "train"


def _fit_baseline(source: Any, model_path: Any, eval_set: EvalSet, scored: np.ndarray, targets: np.ndarray,
                  label2id: dict[str, int], multi_label: bool, feature_extractor: Any) -> dict[str, Any]:
    """The log-mel-statistics logistic regression, fitted on `source` and scored on the clips the model scored."""
    from .probe import log_mel_baseline

    data, split = recorded_training_data(model_path) if source == RECORDED_TRAINING_DATA else (source, "train")
    train_set = load_eval_set(data, split)
    train_targets = encode_targets(train_set.examples, label2id, multi_label)
    rate = int(feature_extractor.sampling_rate)

    def decoded(examples: Sequence[EvalExample], wanted: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        waves, kept = [], []
        for index, example in enumerate(examples):
            if wanted[index]:
                try:
                    waves.append(load_audio(example.audio, rate))
                    kept.append(index)
                except AudioDecodeError:
                    continue
        return waves, np.asarray(kept, dtype=np.int64)

    train_waves, train_kept = decoded(train_set.examples, np.ones(len(train_set.examples), dtype=bool))
    eval_waves, eval_kept = decoded(eval_set.examples, scored)
    result = log_mel_baseline((train_waves, train_targets[train_kept]), (eval_waves, targets[eval_kept]),
                              multi_label=multi_label, num_classes=len(label2id), feature_extractor=feature_extractor)
    return {**result, "train_data": str(data), "train_split": split}


def _per_class_rows(computed: dict, id2label: dict[int, str], multi_label: bool) -> list[dict[str, Any]]:
    per_class = computed["per_class"]
    columns = (
        ("num_positives", "average_precision", "roc_auc")
        if multi_label
        else ("support", "predicted", "precision", "recall", "f1", "accuracy")
    )
    return [
        {"label_id": c, "label": id2label[c], **{column: per_class[column][c] for column in columns}}
        for c in range(len(id2label))
    ]


# ----------------------------------------------------------------------------------------------------------------
# Output files (each written to a temporary name in the folder, then renamed: never half-written)


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in row])
    return text.getvalue().encode("utf-8")


def _write_outputs(
    output_dir: Path,
    results: dict[str, Any],
    computed: dict,
    eval_set: EvalSet,
    targets: np.ndarray,
    scores: np.ndarray,
    scored: np.ndarray,
    num_windows: np.ndarray,
    id2label: dict[int, str],
    multi_label: bool,
) -> dict[str, str]:
    # eval_results.json keeps one result per (dataset, split): a new one is added beside the others, and replaces
    # only an earlier result of the same data. The first result's files have the plain names, the others' files
    # carry their data's name (per_class_scores.<dataset>-<split>.csv, ...); each result lists its own files.
    earlier = _earlier_results(output_dir / EVAL_RESULTS_FILE)
    key = (results["dataset"], results["split"])
    others = [entry for entry in earlier if (entry.get("dataset"), entry.get("split")) != key]
    if len(others) < len(earlier):
        logger.info("%s: replacing the earlier result on %s (split %s)", output_dir / EVAL_RESULTS_FILE, *key)
    taken = {name for entry in others if isinstance(entry.get("files"), dict) for name in entry["files"].values()}
    suffix = "" if PER_CLASS_FILE not in taken else "." + "-".join(
        re.sub(r"[^A-Za-z0-9_.]+", "-", str(part)).strip("-.") or "data" for part in key)

    def named(file_name: str) -> Path:
        stem, dot, extension = file_name.rpartition(".")
        return output_dir / (f"{stem}{suffix}{dot}{extension}" if suffix else file_name)

    files = {
        "eval_results": output_dir / EVAL_RESULTS_FILE,
        "per_class": named(PER_CLASS_FILE),
        "predictions": named(PREDICTIONS_FILE),
    }
    per_class = results["per_class"]
    header = list(per_class[0])
    atomic_write_bytes(files["per_class"], _csv_bytes(header, [[row[c] for c in header] for row in per_class]))

    rows = []
    for i in np.flatnonzero(scored):
        example = eval_set.examples[i]
        top = np.argsort(-scores[i], kind="stable")[:5]
        top_text = ";".join(f"{id2label[int(c)]}:{scores[i, c]:.4f}" for c in top)
        if multi_label:
            rows.append([example.key, ",".join(example.labels), top_text, int(num_windows[i])])
        else:
            predicted = int(top[0])
            rows.append([example.key, example.labels[0], id2label[predicted], float(scores[i, predicted]),
                         int(predicted == targets[i]), top_text, int(num_windows[i])])  # fmt: skip
    header = (
        ["key", "labels", "top5", "num_windows"]
        if multi_label
        else ["key", "label", "predicted", "score", "correct", "top5", "num_windows"]
    )
    atomic_write_bytes(files["predictions"], _csv_bytes(header, rows))

    if not multi_label and importlib.util.find_spec("matplotlib") is None:
        logger.info("confusion_matrix.png is not drawn: it needs matplotlib (pip install 'cat-hf[plots]').")
    elif not multi_label:
        files["confusion_matrix"] = named(CONFUSION_MATRIX_FILE)
        atomic_write_bytes(
            files["confusion_matrix"],
            confusion_matrix_png(np.asarray(computed["confusion_matrix"]), [id2label[c] for c in range(len(id2label))],
                                 title=f"{Path(results['model']).name} on {results['dataset']} ({results['split']}): "
                                       f"accuracy {results['metrics']['accuracy']:.3f}"),
        )  # fmt: skip
    paths = {kind: str(path) for kind, path in files.items()}
    document = {k: v for k, v in results.items() if k != "per_class"}
    document["files"] = {kind: Path(path).name for kind, path in paths.items()}
    kept = [*others, document]
    payload = kept[0] if len(kept) == 1 else kept  # one result: the object itself, as before
    atomic_write_bytes(files["eval_results"], (json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n").encode())
    return paths


def _earlier_results(path: Path) -> list[dict[str, Any]]:
    """The results an existing eval_results.json holds (an object or a list of them); refuses a file that is not
    one, rather than replacing what it cannot read."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} exists but is not readable JSON ({error}); evaluation results are added to that file, so move "
            "it away or pass another --output-dir."
        ) from None
    entries = data if isinstance(data, list) else [data]
    if not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path} holds neither an object nor a list of objects; move it away or pass another "
                         "--output-dir.")
    return entries


def confusion_matrix_png(confusion: np.ndarray, labels: Sequence[str], title: str = "") -> bytes:
    """PNG bytes of a confusion matrix: colour = row-normalised rate (recall on the diagonal), text = counts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    num_classes = len(labels)
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape, dtype=np.float64), where=support > 0)
    size = float(min(24.0, max(5.0, 0.45 * num_classes + 2.5)))
    figure = Figure(figsize=(size + 1.0, size), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num_classes <= 60:
        axes.set_xticks(range(num_classes), labels=list(labels), rotation=90, fontsize=8)
        axes.set_yticks(range(num_classes), labels=list(labels), fontsize=8)
    if num_classes <= 25:
        for (row, column), count in np.ndenumerate(confusion):
            if count:
                colour = "white" if rates[row, column] > 0.5 else "black"
                axes.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# `cat-hf evaluate`


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder or Hub id of an audio classifier")
    parser.add_argument("data", metavar="DATA",
                        help="audiofolder (<root>/<label>/<clip>.wav), CSV/JSONL with path,tags columns, a "
                             "save_to_disk folder, or a Hub dataset name")  # fmt: skip
    parser.add_argument("--output-dir", default=None,
                        help="where to write eval_results.json, per_class_scores.csv, predictions.csv and "
                             "confusion_matrix.png (default: MODEL itself when it is a local folder, so the "
                             "model card finds the results; else ./eval-<model name>)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument(
        "--split",
        default=None,
        help="split to evaluate where DATA has splits (split folders, saved DatasetDict, Hub; default test)",
    )
    parser.add_argument("--dataset-name", default=None, help="name recorded in eval_results.json (default: from DATA)")
    parser.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (single-label; default 5)")
    parser.add_argument("--baseline", nargs="?", const=RECORDED_TRAINING_DATA, default=None, metavar="TRAIN_DATA",
                        help="also fit a logistic regression on log-mel statistics on TRAIN_DATA (default: the "
                             "training data the model folder records) and score it on the same clips")
    add_window_arguments(parser)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")  # fmt: skip


def default_output_dir(model: str) -> Path:
    """MODEL when it is a local folder (the model card reads eval_results.json there), else ./eval-<name>."""
    path = Path(model)
    return path if path.is_dir() else Path(f"eval-{model.rstrip('/').split('/')[-1]}")


def _format(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def run_cli(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model)
    try:
        results = evaluate_model(
            args.model,
            args.data,
            batch_size=args.batch_size,
            output_dir=output_dir,
            split=args.split,
            window_frames=args.window_frames,
            hop_frames=args.hop_frames,
            aggregation=args.aggregation,
            top_k=args.top_k,
            device=args.device,
            dataset_name=args.dataset_name,
            baseline=args.baseline,
        )
    except UnknownLabelError as err:
        print(f"cat-hf evaluate: {err}", file=sys.stderr)
        return 2
    metrics = results["metrics"]
    window = results["window"]
    print(f"model:    {results['model']}")
    print(f"data:     {results['dataset']} (split {results['split']}): {results['num_examples']} clips scored, "
          f"{results['num_skipped']} skipped, {window['num_windowed_clips']} scored with sliding windows "
          f"({window['window_frames']} frames, hop {window['hop_frames']}, {window['aggregation']})")  # fmt: skip
    for item in results["skipped"][:_MAX_LISTED]:
        print(f"skipped:  {item['key']}: {item['error']}")
    if results["problem_type"] == MULTI_LABEL_PROBLEM_TYPE:
        print(f"mAP:      {_format(metrics['mAP'])}")
        print(f"mAUC:     {_format(metrics['mAUC'])}")
        d_prime = metrics["d_prime"]
        print(f"d-prime:  {'inf' if d_prime == math.inf else _format(d_prime)}")
        without = results["excluded_classes"]["without_positives"]
        if without:
            print(f"note:     {len(without)} of {results['num_classes']} classes have no positive clip and are "
                  f"excluded from mAP/mAUC: {without[:10]}{' ...' if len(without) > 10 else ''}")  # fmt: skip
    else:
        print(f"top-1 accuracy: {_format(metrics['accuracy'])}")
        for key, value in metrics.items():
            if key.startswith("top_"):
                print(f"top-{key.split('_')[1]} accuracy: {_format(value)}")
        if f"top_{args.top_k}_accuracy" not in metrics:
            print(f"top-{args.top_k} accuracy: n/a (the model has only {results['num_classes']} classes)")
        print(f"macro F1:       {_format(metrics['macro_f1'])}")
    if "baseline" in results:
        base = results["baseline"]
        model_score = metrics["mAP"] if base["metric"] == "mAP" else metrics["accuracy"]
        print(f"baseline: log-mel statistics + logistic regression, fitted on {base['train_data']} "
              f"({base['num_train']} clips): {base['metric']} {_format(base['score'])} (the model: "
              f"{_format(model_score)})")
    for path in results["files"].values():
        print(f"wrote:    {path}")
    return 0


__all__ = [
    "TASK",
    "EvalExample",
    "EvalSet",
    "UnknownLabelError",
    "confusion_matrix_png",
    "encode_targets",
    "evaluate_model",
    "load_eval_set",
]
