"""Audio corpora for pretraining, finetuning, embedding and evaluation.

One loader (`load_audio_corpus`) turns every supported source - a Hub dataset, an `audiofolder` layout, a
plain folder, a `path,tags` CSV/JSONL file, a `save_to_disk` folder - into the same shape: a `datasets`
dataset whose `"audio"` column is `datasets.Audio(decode=False)` (paths or bytes, never decoded by `datasets`,
so torchcodec is never needed) and, when the corpus has labels, a `"labels"` column holding a list of tag
strings per clip. Decoding happens in our own `AudioClipDataset`, which resamples with `load_audio`, crops
deterministically and skips unreadable files instead of crashing a long run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import get_worker_info

from .audio import (
    AUDIO_EXTENSIONS,
    DEFAULT_SAMPLING_RATE,
    AudioDecodeError,
    describe_audio_source,
    is_audio_file,
    load_audio,
)
from .files import atomic_write_text

logger = logging.getLogger(__name__)

#: Normalised column names every corpus ends up with.
AUDIO_COLUMN = "audio"
LABELS_COLUMN = "labels"

#: transformers' `problem_type` values.
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"

#: Column names tried, in order, when the audio / label column is not given.
AUDIO_COLUMN_CANDIDATES = ("audio", "path", "file", "file_name", "filename", "filepath", "file_path",
                           "audio_path", "audio_file", "audio_filepath", "wav", "clip")  # fmt: skip
LABEL_COLUMN_CANDIDATES = ("labels", "label", "tags", "tag", "category", "class", "class_name")

#: Folder names recognised as split folders in `<root>/<split>/<label>/<clip>` layouts.
SPLIT_FOLDER_NAMES = ("train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval")

_METADATA_FILE_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.tsv")
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".jsonl", ".json")

SPLIT_FILE_NAME = "splits.json"

CorpusSource = Union[str, os.PathLike, datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict,
                     datasets.IterableDatasetDict]  # fmt: skip
AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]


class CorpusError(ValueError):
    """A corpus cannot be loaded or is unfit for training; the message names the offending rows and the fix."""

    def __init__(self, message: str, rows: Sequence[int] = ()):
        self.rows = list(rows)
        super().__init__(message)


# ================================================================================================================
# loading


def load_audio_corpus(
    source: CorpusSource,
    *,
    split: str | None = "train",
    audio_column: str | None = None,
    label_column: str | bool | None = None,
    streaming: bool = False,
    tags_separator: str = ",",
    labels_from_folders: bool | None = None,
    **load_kwargs: Any,
) -> AnyDataset:
    """Load any supported corpus as a dataset with an undecoded `"audio"` column and optional `"labels"`.

    `source` may be:

    - a Hub dataset name (`datasets.load_dataset(source, split=split, streaming=streaming, **load_kwargs)`);
      a local folder of parquet/arrow/json files (a cloned Hub repo) goes the same way;
    - a folder saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
    - an `audiofolder` layout `<root>/<label>/<clip>.wav` (label = the top-level folder name), optionally
      with split folders `<root>/<split>/<label>/...` or a `metadata.csv`/`metadata.jsonl` next to the clips;
    - a plain folder of audio files, scanned recursively (no labels);
    - a CSV/TSV or JSONL file with a path column and a tags column (`path,tags`; tags separated by
      `tags_separator`, or a JSON list in JSONL); relative paths are resolved against the file's folder;
    - an already loaded `Dataset`/`IterableDataset`/`DatasetDict`, which is only normalised.

    Args:
        split: split to return for Hub / `save_to_disk` / split-folder sources (ignored for flat sources).
        audio_column: column with the audio; default: the column typed `datasets.Audio`, else the first of
            `AUDIO_COLUMN_CANDIDATES`. Renamed to `"audio"`.
        label_column: column with labels; default: the first of `LABEL_COLUMN_CANDIDATES` present. `False`
            loads no labels. Converted to `"labels"` = list of tag strings (ClassLabel ids become names).
            Label strings from datasets are single tags; only text files (CSV/JSONL) split on `tags_separator`.
        streaming: return an `IterableDataset` (Hub datasets stream from the Hub; local sources stream from
            their file list).
        labels_from_folders: for folders, `True`/`False` forces labelling by top-level folder name; `None`
            labels when no audio file sits directly in the root and there are at least two top-level folders.
        **load_kwargs: passed to `datasets.load_dataset` / `datasets.load_from_disk` (revision, token, ...).

    Raises:
        CorpusError: missing path, empty folder, no audio column (the message lists the columns), bad tags file.
    """
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        dataset: AnyDataset = _pick_split(source, split, "the given DatasetDict")
        return _finish(_normalise(dataset, audio_column, label_column), streaming)
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return _finish(_normalise(source, audio_column, label_column), streaming)
    if not isinstance(source, (str, os.PathLike)):
        raise CorpusError(
            f"Unsupported corpus source of type {type(source).__name__}; pass a path, a Hub dataset name or a "
            "datasets.Dataset."
        )

    text = os.fspath(source)
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.is_dir():
        dataset, built_here = _load_directory(
            path, split, audio_column, label_column, tags_separator, labels_from_folders, streaming, load_kwargs
        )
        if built_here:  # already has the normalised columns
            return _finish(dataset, streaming)
    elif path.is_file():
        if path.suffix.lower() not in _TABLE_SUFFIXES:
            raise CorpusError(
                f"'{path}' is a file but not a tags table; pass a .csv/.tsv/.jsonl file with columns path,tags, "
                "or the folder holding the audio files."
            )
        return _finish(_load_table(path, audio_column, label_column, tags_separator), streaming)
    elif _looks_like_local_path(text):
        raise CorpusError(f"Corpus path '{text}' does not exist; check the path (relative to {os.getcwd()}).")
    else:
        dataset = _load_hub(text, split, streaming, load_kwargs)
    return _finish(_normalise(dataset, audio_column, label_column), streaming)


def _looks_like_local_path(text: str) -> bool:
    """Hub names look like `name` or `org/name`; anything else that does not exist is a mistyped path."""
    return (
        text.startswith((".", "~"))
        or os.path.isabs(text)
        or text.count("/") > 1
        or "\\" in text
        or Path(text).suffix.lower() in _TABLE_SUFFIXES + AUDIO_EXTENSIONS
    )


def _finish(dataset: AnyDataset, streaming: bool) -> AnyDataset:
    if streaming and isinstance(dataset, datasets.Dataset):
        # Several shards so DataLoader workers each get part of the stream.
        return dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 16)))
    return dataset


def _pick_split(dataset_dict: Mapping[str, AnyDataset], split: str | None, origin: str) -> AnyDataset:
    if split is not None and split in dataset_dict:
        return dataset_dict[split]
    if split is None and len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise CorpusError(
        f"Split {split!r} not found in {origin}; available splits: {sorted(dataset_dict)}. Pass split=NAME."
    )


def _load_hub(name: str, split: str | None, streaming: bool, load_kwargs: dict[str, Any]) -> AnyDataset:
    try:
        loaded = datasets.load_dataset(name, split=split, streaming=streaming, **load_kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with both interpretations of the name
        if os.path.isdir(name):
            raise CorpusError(
                f"Could not load the data files in folder '{name}' with datasets.load_dataset "
                f"({type(err).__name__}: {err}). Check the files and the split name."
            ) from err
        raise CorpusError(
            f"Could not load corpus '{name}': it is not an existing local path, and loading it as a Hugging Face "
            f"Hub dataset failed ({type(err).__name__}: {err}). Check the path, or the dataset name/split, network "
            "access and HF_TOKEN for gated datasets."
        ) from err
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = _pick_split(loaded, split, f"Hub dataset '{name}'")
    return loaded


def _load_directory(
    root: Path,
    split: str | None,
    audio_column: str | None,
    label_column: str | bool | None,
    tags_separator: str,
    labels_from_folders: bool | None,
    streaming: bool,
    load_kwargs: dict[str, Any],
) -> tuple[AnyDataset, bool]:
    """Load a folder; the flag says whether the result was built here (already normalised)."""
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root), **load_kwargs)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, f"saved dataset '{root}'")
        return loaded, False

    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if split and subfolders and all(p.name.lower() in SPLIT_FOLDER_NAMES for p in subfolders):
        if not (root / split).is_dir():
            raise CorpusError(
                f"'{root}' holds split folders {sorted(p.name for p in subfolders)} but no '{split}'; pass split=NAME."
            )
        root = root / split

    for metadata_name in _METADATA_FILE_NAMES:
        if (root / metadata_name).is_file():
            return _load_table(root / metadata_name, audio_column, label_column, tags_separator), True

    files = _scan_audio_files(root)
    if not files:
        if any(p.suffix.lower() in _DATA_FILE_SUFFIXES for p in root.rglob("*") if p.is_file()):
            return _load_hub(str(root), split, streaming, load_kwargs), False  # a cloned Hub repo of parquet files
        raise CorpusError(
            f"No audio files found under '{root}' (looked recursively for {', '.join(AUDIO_EXTENSIONS)}). "
            "Point to the folder holding the clips, or to a path,tags CSV."
        )

    relative = [f.relative_to(root) for f in files]
    at_root = any(len(r.parts) == 1 for r in relative)
    top_level = {r.parts[0] for r in relative if len(r.parts) > 1}
    use_labels = labels_from_folders if labels_from_folders is not None else (not at_root and len(top_level) >= 2)
    if label_column is False:
        use_labels = False
    columns: dict[str, list[Any]] = {AUDIO_COLUMN: [str(f) for f in files]}
    if use_labels:
        unlabelled = [str(f) for f, r in zip(files, relative) if len(r.parts) == 1]
        if unlabelled:
            raise CorpusError(
                f"labels_from_folders=True but {len(unlabelled)} file(s) sit directly in '{root}' without a label "
                f"folder, e.g. {unlabelled[:3]}. Move them into <root>/<label>/ or pass labels_from_folders=False."
            )
        columns[LABELS_COLUMN] = [[r.parts[0]] for r in relative]
    return _dataset_from_columns(columns), True


def _scan_audio_files(root: Path) -> list[Path]:
    """All audio files under `root`, recursively, sorted for a stable order; hidden entries skipped.

    Linked folders are followed, once: a link to a folder that is listed anyway (a loop back to the root or an
    ancestor, a second name for a folder of the tree, or a folder another link already led to) is skipped with a
    warning. Its files would otherwise be listed again, under the link's folder names, which become labels."""
    found: list[Path] = []
    visited = {os.path.realpath(d) for d, _, _ in os.walk(root)}  # the tree itself, reached without any link
    for directory, subdirs, names in os.walk(root, followlinks=True):
        visited.add(os.path.realpath(directory))
        kept = []
        for name in sorted(d for d in subdirs if not d.startswith(".")):
            path = os.path.join(directory, name)
            if os.path.islink(path):
                real = os.path.realpath(path)
                inside = real.rstrip(os.sep) + os.sep
                if real in visited or any(folder.startswith(inside) for folder in visited):  # listed, or holds one
                    logger.warning("Skipping the linked folder %s: it leads to %s, whose files are listed already (a "
                                   "link loop, or a second name for a folder of the corpus).", path, real)
                    continue
                visited.add(real)
            kept.append(name)
        subdirs[:] = kept
        found.extend(Path(directory) / n for n in names if not n.startswith(".") and is_audio_file(n))
    return sorted(Path(os.path.abspath(p)) for p in found)


def _load_table(
    path: Path, audio_column: str | None, label_column: str | bool | None, tags_separator: str
) -> datasets.Dataset:
    """Read a path,tags CSV/TSV/JSONL file into a dataset with absolute paths and tag lists."""
    rows = _read_table_rows(path)
    if not rows:
        raise CorpusError(f"Tags file '{path}' has no rows; add lines like 'clips/dog1.wav,dog'.")
    names = list(dict.fromkeys(key for row in rows for key in row))
    path_key = _choose_column(names, audio_column, AUDIO_COLUMN_CANDIDATES)
    if path_key is None:
        raise CorpusError(
            f"Tags file '{path}' has no path column; its columns are {names}. Name the column with the audio file "
            f"paths one of {list(AUDIO_COLUMN_CANDIDATES[:3])} (e.g. a header line 'path,tags'), or pass "
            "audio_column=NAME."
        )
    label_key = (
        None
        if label_column is False
        else _choose_column(
            [n for n in names if n != path_key],
            label_column if isinstance(label_column, str) else None,
            LABEL_COLUMN_CANDIDATES,
        )
    )
    if isinstance(label_column, str) and label_key is None:
        raise CorpusError(f"label_column={label_column!r} is not a column of '{path}'; its columns are {names}.")

    base = path.parent
    columns: dict[str, list[Any]] = {AUDIO_COLUMN: [_resolve_path(row.get(path_key), base) for row in rows]}
    if label_key is not None:
        columns[LABELS_COLUMN] = [_split_tags(row.get(label_key), tags_separator) for row in rows]
    for name in names:
        if name not in (path_key, label_key, AUDIO_COLUMN, LABELS_COLUMN):
            columns[name] = [row.get(name) for row in rows]
    return _dataset_from_columns(columns)


def _read_table_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if reader.fieldnames is None:
            return []
        rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
        return [row for row in rows if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    if suffix == ".json":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None  # probably JSON lines with a .json name
        if isinstance(parsed, list):
            return [_require_object(item, path, i + 1) for i, item in enumerate(parsed)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_require_object(json.loads(line), path, number))
        except json.JSONDecodeError as err:
            raise CorpusError(f"Line {number} of '{path}' is not valid JSON ({err.msg}); each line must be one object "
                              'like {"path": "clip.wav", "tags": ["dog"]}.') from err  # fmt: skip
    return rows


def _require_object(item: Any, path: Path, number: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise CorpusError(f"Entry {number} of '{path}' is {type(item).__name__}, not an object with path and tags.")
    return item


def _resolve_path(value: Any, base: Path) -> str:
    text = "" if value is None else str(value).strip()
    if not text or "://" in text:
        return text
    expanded = os.path.expanduser(text)
    return os.path.normpath(expanded if os.path.isabs(expanded) else os.path.join(os.path.abspath(base), expanded))


def _split_tags(value: Any, separator: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = str(value).split(separator) if separator else [str(value)]
    return list(dict.fromkeys(p.strip() for p in parts if p is not None and str(p).strip()))


def _choose_column(names: Sequence[str], wanted: str | None, candidates: Sequence[str]) -> str | None:
    if wanted is not None:
        return wanted if wanted in names else None
    lowered = {n.lower(): n for n in names}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    return None


def _dataset_from_columns(columns: dict[str, list[Any]]) -> datasets.Dataset:
    """Build an in-memory dataset; extra columns arrow cannot type consistently are stored as JSON strings."""
    for name, values in list(columns.items()):
        if name in (AUDIO_COLUMN, LABELS_COLUMN):
            continue
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
    table = pa.table(columns)
    typed = {AUDIO_COLUMN: pa.string(), LABELS_COLUMN: pa.list_(pa.string())}
    table = table.cast(pa.schema([pa.field(f.name, typed.get(f.name, f.type)) for f in table.schema]))
    return datasets.Dataset(table).cast_column(AUDIO_COLUMN, datasets.Audio(decode=False))


# ---------------------------------------------------------------------------------------------------------------
# normalisation


def _features_of(dataset: AnyDataset) -> tuple[AnyDataset, datasets.Features]:
    features = dataset.features
    if features is None and isinstance(dataset, datasets.IterableDataset):
        dataset = dataset._resolve_features()  # peeks at the first example to learn the columns
        features = dataset.features
    if features is None:
        raise CorpusError("The dataset does not declare its columns (features); cannot find the audio column.")
    return dataset, features


def find_audio_column(features: Mapping[str, Any], audio_column: str | None = None) -> str:
    """Name of the audio column: `audio_column` if given, else the `datasets.Audio` column, else a known name."""
    names = list(features)
    if audio_column is not None:
        if audio_column not in features:
            raise CorpusError(f"audio_column={audio_column!r} is not a column; the columns are {names}.")
        return audio_column
    for name, feature in features.items():
        if isinstance(feature, datasets.Audio):
            return name
    found = _choose_column(names, None, AUDIO_COLUMN_CANDIDATES)
    if found is None:
        raise CorpusError(
            f"No audio column found; the columns are {names}. Expected a datasets.Audio column or one named "
            f"{', '.join(AUDIO_COLUMN_CANDIDATES[:6])}, ...; pass audio_column=NAME."
        )
    return found


def _normalise(dataset: AnyDataset, audio_column: str | None, label_column: str | bool | None) -> AnyDataset:
    dataset, features = _features_of(dataset)
    audio_name = find_audio_column(features, audio_column)
    if audio_name != AUDIO_COLUMN and AUDIO_COLUMN in features:
        raise CorpusError(
            f"Both '{audio_name}' (chosen as the audio column) and 'audio' exist; rename or drop 'audio', or pass "
            "audio_column='audio'."
        )
    dataset = _as_undecoded_audio(dataset, audio_name)  # cast before renaming: see _rename_column
    if audio_name != AUDIO_COLUMN:
        dataset = _rename_column(dataset, audio_name, AUDIO_COLUMN)

    if label_column is False:
        return dataset
    dataset, features = _features_of(dataset)
    names = [n for n in features if n != AUDIO_COLUMN]
    if isinstance(label_column, str):
        if label_column not in features:
            raise CorpusError(f"label_column={label_column!r} is not a column; the columns are {list(features)}.")
        label_name = label_column
    else:
        label_name = _choose_column(names, None, LABEL_COLUMN_CANDIDATES)
    if label_name is None:
        return dataset
    return _labels_as_tag_lists(dataset, label_name, features[label_name])


def _rename_column(dataset: AnyDataset, old: str, new: str) -> AnyDataset:
    """Rename without touching the audio: `IterableDataset.rename_column` re-encodes every example, which
    calls torchcodec for Audio columns; a map over just that column passes the undecoded dicts through."""
    if isinstance(dataset, datasets.Dataset):
        return dataset.rename_column(old, new)
    features = datasets.Features({(new if k == old else k): v for k, v in dataset.features.items()})
    return dataset.map(
        lambda column: {new: column}, batched=True, input_columns=[old], remove_columns=[old], features=features
    )


def _as_undecoded_audio(dataset: AnyDataset, column: str = AUDIO_COLUMN) -> AnyDataset:
    """Cast the audio column to `Audio(decode=False)` unless it already holds decoded arrays."""
    dataset, features = _features_of(dataset)
    feature = features[column]
    if isinstance(feature, datasets.Audio):
        return dataset if not feature.decode else dataset.cast_column(column, datasets.Audio(decode=False))
    if isinstance(feature, dict) and "array" in feature:
        return dataset  # decoded {"array", "sampling_rate"} rows; load_audio reads them directly
    castable = isinstance(feature, dict) and ("path" in feature or "bytes" in feature)
    castable = castable or (
        isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")
    )
    if not castable:
        raise CorpusError(
            f"The audio column has type {feature}; expected file paths (strings), encoded bytes, or datasets.Audio. "
            "Pass audio_column=NAME for the right column."
        )
    return dataset.cast_column(column, datasets.Audio(decode=False))


def _labels_as_tag_lists(dataset: AnyDataset, name: str, feature: Any) -> AnyDataset:
    target = datasets.List(datasets.Value("string"))
    if name == LABELS_COLUMN and _is_string_list(feature):
        return dataset
    convert = _label_converter(feature, name)
    if isinstance(dataset, datasets.Dataset):
        # Column-level conversion: no map(), so no cache files are written next to a user's saved dataset.
        values = [convert(v) for v in dataset.with_format(None).select_columns([name])[name]]
        return dataset.remove_columns([name]).add_column(LABELS_COLUMN, values, feature=target)
    features = datasets.Features({k: v for k, v in dataset.features.items() if k != name})
    features[LABELS_COLUMN] = target
    return dataset.map(
        lambda column: {LABELS_COLUMN: [convert(v) for v in column]},
        batched=True,
        input_columns=[name],
        remove_columns=[name],
        features=features,
    )


def _is_string_list(feature: Any) -> bool:
    inner = getattr(feature, "feature", None)
    return (
        isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList))
        and isinstance(inner, datasets.Value)
        and inner.dtype in ("string", "large_string")
    )


def _label_converter(feature: Any, name: str):
    """A function mapping one stored label value to a list of tag strings."""
    inner = (
        getattr(feature, "feature", None)
        if isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList))
        else None
    )

    def name_of(value: Any, class_label: datasets.ClassLabel | None) -> str | None:
        if value is None:
            return None
        if class_label is not None and isinstance(value, (int, np.integer)):
            return None if value < 0 else class_label.int2str(int(value))  # -1 marks a missing label
        text = str(value).strip()
        return text or None

    if isinstance(feature, datasets.ClassLabel) or isinstance(feature, datasets.Value):
        class_label = feature if isinstance(feature, datasets.ClassLabel) else None
        return lambda value: [t] if (t := name_of(value, class_label)) is not None else []
    if inner is not None and isinstance(inner, (datasets.ClassLabel, datasets.Value)):
        class_label = inner if isinstance(inner, datasets.ClassLabel) else None
        return lambda values: list(
            dict.fromkeys(t for v in (values or []) if (t := name_of(v, class_label)) is not None)
        )
    raise CorpusError(
        f"Label column '{name}' has type {feature}; expected a class label, a string, or a list of them. Pass "
        "label_column=NAME for another column, or label_column=False for none."
    )


# ================================================================================================================
# validation and label maps


@dataclass
class CorpusSummary:
    """What `validate_corpus` found: sizes and label statistics, for logs and run metadata."""

    num_clips: int
    num_labels: int
    label_counts: dict[str, int]
    multi_label: bool
    problem_type: str | None
    num_missing: int = 0
    num_unreadable: int = 0
    unreadable: list[str] = field(default_factory=list)
    partial: bool = False

    @property
    def labels(self) -> list[str]:
        return list(self.label_counts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kind = "unlabelled" if self.problem_type is None else ("multi-label" if self.multi_label else "single-label")
        text = f"{self.num_clips} clips, {self.num_labels} labels ({kind})"
        if self.num_unreadable:
            text += f", {self.num_unreadable} unreadable (will be skipped)"
        return text + (" [first rows only]" if self.partial else "")


_EMBEDDED = "_embedded"  # marks a lightweight audio reference whose bytes/array stay in the dataset


def _audio_refs(dataset: datasets.Dataset) -> list[dict[str, Any]]:
    """`{"path", "bytes": None, _EMBEDDED}` per row, read from Arrow in batches without loading embedded bytes
    (a Hub corpus can hold hundreds of GB of audio; validation and splitting only need paths)."""
    refs: list[dict[str, Any]] = []
    for batch in dataset.select_columns([AUDIO_COLUMN]).with_format("arrow").iter(batch_size=8192):
        column = batch.column(AUDIO_COLUMN).combine_chunks()
        valid = column.is_valid().to_pylist()
        if pa.types.is_struct(column.type):
            names = {column.type.field(k).name for k in range(column.type.num_fields)}
            paths = column.field("path").to_pylist() if "path" in names else [None] * len(column)
            data_field = "bytes" if "bytes" in names else "array" if "array" in names else None
            embedded = column.field(data_field).is_valid().to_pylist() if data_field else [False] * len(column)
        else:
            paths, embedded = column.to_pylist(), [False] * len(column)
            if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                paths, embedded = [None] * len(column), valid
        refs.extend(
            {"path": p if ok else None, "bytes": None, _EMBEDDED: bool(e and ok)}
            for p, e, ok in zip(paths, embedded, valid)
        )
    return refs


def _rows(dataset: AnyDataset, columns: list[str], max_rows: int | None) -> tuple[dict[str, list[Any]], bool]:
    """Column values as Python lists, audio as undecoded entries; for streams only the first `max_rows` rows."""
    if isinstance(dataset, datasets.Dataset):
        partial = max_rows is not None and len(dataset) > max_rows
        if partial:
            dataset = dataset.select(range(max_rows))
        others = [c for c in columns if c != AUDIO_COLUMN]
        data = (
            dataset.select_columns(others).with_format(None)[:] if others and len(dataset) else {c: [] for c in others}
        )
        collected = {c: list(data[c]) for c in others}
        if AUDIO_COLUMN in columns:
            collected[AUDIO_COLUMN] = _audio_refs(dataset)
        return collected, partial
    collected = {c: [] for c in columns}
    limit = 1000 if max_rows is None else max_rows
    partial = False
    for i, row in enumerate(dataset.select_columns(columns)):
        if i >= limit:
            partial = True
            break
        for c in columns:
            collected[c].append(row[c])
    return collected, partial


def _local_path(entry: Any) -> str | None:
    """The local file a row points to, or None when it carries bytes/arrays or a remote URL."""
    if isinstance(entry, Mapping):
        if entry.get(_EMBEDDED) or entry.get("bytes") is not None or entry.get("array") is not None:
            return None
        entry = entry.get("path")
    if isinstance(entry, (bytes, bytearray)):
        return None
    if entry is None:
        return ""
    text = str(entry)
    return None if "://" in text else text


def _describe(entry: Any) -> str:
    if isinstance(entry, Mapping) and entry.get(_EMBEDDED) and not entry.get("path"):
        return "<audio embedded in the dataset>"
    return describe_audio_source(entry)


def _format_rows(problems: list[tuple[int, str]], limit: int) -> str:
    shown = "\n".join(f"    row {i}: {what}" for i, what in problems[:limit])
    more = f"\n    ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return shown + more


def validate_corpus(
    dataset: AnyDataset,
    *,
    labels: Sequence[str] | Mapping[str, int] | None = None,
    require_labels: bool = False,
    check_files: bool = True,
    check_audio: bool = False,
    max_rows: int | None = None,
    max_listed: int = 10,
    split_name: str = "training",
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
) -> CorpusSummary:
    """Check a loaded corpus before training starts; raise one `CorpusError` listing every problem found.

    Errors (with the offending row numbers): no audio column; no rows; rows naming files that do not exist
    (typically a tags file with wrong relative paths); rows with an empty tag list; tags not in `labels`;
    labels of `labels` with no example in this split; no usable file at all. With `check_audio`, every clip is
    decoded in full at `sampling_rate`, exactly as the training datasets decode it (a header check would miss
    damaged data, NaN samples, or clips empty after resampling), so `num_unreadable` is the number of distinct clips
    training will skip; this reads the whole corpus once. Unreadable clips are only counted and logged (training
    skips them) unless none is usable.

    Args:
        labels: the label list (or label2id) training will use; enables the unknown/empty-class checks.
        require_labels: fail when the corpus has no `"labels"` column (finetuning needs one).
        max_rows: look at the first rows only (streams default to 1000; the summary is then `partial`).
        split_name: how the split is named in messages.

    Returns:
        CorpusSummary: clips, labels, per-label counts, and multi-label iff any clip has more than one tag.
    """
    dataset, features = _features_of(dataset)
    if AUDIO_COLUMN not in features:
        raise CorpusError(
            f"The {split_name} corpus has no '{AUDIO_COLUMN}' column; its columns are {list(features)}. Load it with "
            "load_audio_corpus(..., audio_column=NAME) to pick and normalise the audio column."
        )
    dataset = _as_undecoded_audio(dataset)
    has_labels = LABELS_COLUMN in features
    if require_labels and not has_labels:
        raise CorpusError(
            f"The {split_name} corpus has no labels; its columns are {list(features)}. Use an audiofolder layout "
            "<root>/<label>/<clip>.wav, a path,tags CSV, or pass label_column=NAME to load_audio_corpus."
        )
    columns = [AUDIO_COLUMN] + ([LABELS_COLUMN] if has_labels else [])
    data, partial = _rows(dataset, columns, max_rows)
    audio = data[AUDIO_COLUMN]
    if not audio:
        raise CorpusError(f"No usable files at all: the {split_name} corpus has no rows. Check the source path/split.")

    sections: list[str] = []
    missing: list[tuple[int, str]] = []
    if check_files:
        for i, entry in enumerate(audio):
            local = _local_path(entry)
            if local is not None and not os.path.isfile(local):
                missing.append((i, f"'{local}' does not exist" if local else "no audio path or bytes"))
    unreadable: list[tuple[int, str]] = []
    if check_audio:
        for i, entry in enumerate(audio):
            local = _local_path(entry)
            if local is not None and not os.path.isfile(local):
                continue
            try:
                if isinstance(entry, Mapping) and entry.get(_EMBEDDED):
                    entry = dataset[i][AUDIO_COLUMN]  # fetch this row's bytes only now
                load_audio(entry, sampling_rate)  # decoded as training decodes it: the same clips fail
            except AudioDecodeError as err:
                unreadable.append((i, f"{err.source}: {err.reason}"))
            except OSError as err:
                unreadable.append((i, f"{_describe(entry)}: {err}"))
    if len(missing) + len(unreadable) >= len(audio):
        raise CorpusError(
            f"No usable files at all: none of the {len(audio)} clips of the {split_name} corpus can be read.\n"
            + _format_rows(sorted(missing + unreadable), max_listed)
            + "\nPaths in a tags file are resolved relative to the file's own folder; check that folder and the "
            "file names.",
            rows=[i for i, _ in missing + unreadable],
        )
    if missing:
        sections.append(
            f"{len(missing)} row(s) name audio files that do not exist:\n{_format_rows(missing, max_listed)}\n"
            "  Fix the paths (relative paths in a tags file are resolved against the file's folder) or drop the rows."
        )

    label_counts: Counter[str] = Counter()
    multi_label = False
    empty_rows: list[tuple[int, str]] = []
    unknown_rows: list[tuple[int, str]] = []
    if has_labels:
        tag_lists = [list(t or []) for t in data[LABELS_COLUMN]]
        empty_rows = [(i, _describe(audio[i])) for i, tags in enumerate(tag_lists) if not tags]
        if empty_rows:
            sections.append(
                f"{len(empty_rows)} row(s) have an empty tag list:\n{_format_rows(empty_rows, max_listed)}\n"
                "  Give every clip at least one tag, or remove those rows."
            )
        for tags in tag_lists:
            label_counts.update(tags)
            multi_label = multi_label or len(tags) > 1
        if labels is not None:
            known = list(labels)
            unknown_rows = [(i, f"unknown tag(s) {sorted(set(tags) - set(known))}") for i, tags in enumerate(tag_lists)
                            if set(tags) - set(known)]  # fmt: skip
            if unknown_rows:
                sections.append(
                    f"{len(unknown_rows)} row(s) use tags outside the label list:\n"
                    f"{_format_rows(unknown_rows, max_listed)}\n  Add those tags to the label list or fix the rows."
                )
            empty_classes = [label for label in known if label_counts.get(label, 0) == 0]
            if empty_classes and not partial:
                sections.append(
                    f"{len(empty_classes)} label(s) have no example in the {split_name} split: {empty_classes}. "
                    "Add clips for them, or remove them from the label list."
                )
    elif labels is not None:
        sections.append(f"A label list was given but the {split_name} corpus has no '{LABELS_COLUMN}' column.")

    if sections:
        rows = sorted({i for i, _ in missing + empty_rows + unknown_rows})
        raise CorpusError(f"The {split_name} corpus is not usable:\n- " + "\n- ".join(sections), rows=rows)

    if unreadable:
        logger.warning(
            "%d of %d clips in the %s corpus are unreadable and will be skipped:\n%s",
            len(unreadable), len(audio), split_name, _format_rows(unreadable, max_listed),
        )  # fmt: skip
    ordered = list(labels) if labels is not None else sorted(label_counts)
    counts = {label: int(label_counts.get(label, 0)) for label in ordered}
    return CorpusSummary(
        num_clips=len(audio),
        num_labels=len(counts),
        label_counts=counts,
        multi_label=multi_label,
        problem_type=(MULTI_LABEL if multi_label else SINGLE_LABEL) if has_labels else None,
        num_missing=len(missing),
        num_unreadable=len(unreadable),
        unreadable=[what for _, what in unreadable],
        partial=partial,
    )


def build_label_maps(
    dataset: AnyDataset, *, labels: Sequence[str] | None = None, max_rows: int | None = None
) -> tuple[dict[str, int], dict[int, str], str]:
    """`(label2id, id2label, problem_type)` for a labelled corpus, as transformers configs want them.

    Labels are sorted (so the same corpus always gives the same ids) unless `labels` fixes the order.
    `problem_type` is `"multi_label_classification"` iff some clip has more than one tag.
    """
    dataset, features = _features_of(dataset)
    if LABELS_COLUMN not in features:
        raise CorpusError(
            f"The corpus has no '{LABELS_COLUMN}' column (columns: {list(features)}); load it with load_audio_corpus "
            "and a label column, or an audiofolder layout."
        )
    data, _ = _rows(dataset, [LABELS_COLUMN], max_rows)
    seen: set[str] = set()
    multi_label = False
    for tags in data[LABELS_COLUMN]:
        tags = tags or []
        seen.update(tags)
        multi_label = multi_label or len(tags) > 1
    if labels is not None:
        unknown = sorted(seen - set(labels))
        if unknown:
            raise CorpusError(f"The corpus uses tags {unknown} that are not in the given label list; add them to it.")
        ordered = list(dict.fromkeys(labels))
    else:
        ordered = sorted(seen)
    if not ordered:
        raise CorpusError("The corpus has a labels column but no tags at all; every clip needs at least one tag.")
    label2id = {label: i for i, label in enumerate(ordered)}
    id2label = {i: label for label, i in label2id.items()}
    return label2id, id2label, MULTI_LABEL if multi_label else SINGLE_LABEL


# ================================================================================================================
# training-time datasets


class _SharedCounters:
    """Skip counter and epoch in shared memory, seen by DataLoader workers (fork or spawn, persistent or not).

    Each process counts into its own slot (main process 0, worker `k` slot `k + 1`), so no lock is needed;
    the total is the sum. An ordinary pickle copies the values instead of sharing them.
    """

    _SLOTS = 256

    def __init__(self) -> None:
        self.skipped = torch.zeros(self._SLOTS, dtype=torch.int64).share_memory_()
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def add_skip(self) -> int:
        worker = get_worker_info()
        slot = 0 if worker is None else (worker.id + 1) % self._SLOTS
        self.skipped[slot] += 1
        return int(self.skipped.sum())


class _ClipMixin:
    """Construction, decoding, cropping, labelling and skip accounting shared by the map-style and iterable datasets
    (each checks and converts its corpus in `_prepare`)."""

    clip_samples: int | None
    label2id: dict[str, int] | None
    problem_type: str | None
    train: bool
    seed: int
    sampling_rate: int
    max_warnings: int
    _counters: _SharedCounters

    def __init__(
        self,
        corpus: Any,
        *,
        clip_samples: int | None,
        label2id: Mapping[str, int] | None = None,
        problem_type: str | None = None,
        train: bool = True,
        seed: int = 0,
        sampling_rate: int = DEFAULT_SAMPLING_RATE,
        max_warnings: int = 10,
    ):
        self.corpus, problem_type = self._prepare(corpus, label2id, problem_type)
        if clip_samples is not None and clip_samples <= 0:
            raise ValueError(f"clip_samples must be a positive number of samples or None, got {clip_samples}.")
        if problem_type not in (None, SINGLE_LABEL, MULTI_LABEL):
            raise ValueError(f"problem_type must be {SINGLE_LABEL!r} or {MULTI_LABEL!r}, got {problem_type!r}.")
        self.clip_samples = clip_samples
        self.label2id = dict(label2id) if label2id is not None else None
        self.problem_type = problem_type
        self.train = train
        self.seed = int(seed)
        self.sampling_rate = int(sampling_rate)
        self.max_warnings = max_warnings
        self._counters = _SharedCounters()

    @staticmethod
    def _prepare(corpus: Any, label2id: Mapping[str, int] | None, problem_type: str | None) -> tuple[Any, str | None]:
        """(the corpus as this dataset reads it, the problem type); subclasses check and convert."""
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """How many clips were skipped as unreadable/empty so far (all worker processes together)."""
        return int(self._counters.skipped.sum())

    def reset_skipped(self) -> None:
        self._counters.skipped.zero_()

    @property
    def epoch(self) -> int:
        return int(self._counters.epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of `epoch`; visible to running (persistent) DataLoader workers too."""
        self._counters.epoch[0] = int(epoch)

    def _record_skip(self, position: int, source: Any, err: Exception) -> None:
        count = self._counters.add_skip()
        if count <= self.max_warnings or count & (count - 1) == 0:  # first few, then at powers of two
            reason = err.reason if isinstance(err, AudioDecodeError) else f"{type(err).__name__}: {err}"
            logger.warning(
                "Skipping clip %d (%s): %s. %d skip(s) so far (an unreadable file counts each time it comes up).",
                position, describe_audio_source(source), reason, count,
            )  # fmt: skip

    def _crop(self, waveform: np.ndarray, key: Sequence[int]) -> tuple[np.ndarray, int]:
        """Random crop (train, seeded by `key`) or the start (eval), zero-padded to `clip_samples`."""
        if self.clip_samples is None:
            return waveform, int(waveform.shape[0])
        length = int(waveform.shape[0])
        if length > self.clip_samples:
            offset = 0
            if self.train:
                generator = np.random.default_rng([self.seed % 2**63, *(int(k) % 2**63 for k in key)])
                offset = int(generator.integers(0, length - self.clip_samples + 1))
            return waveform[offset : offset + self.clip_samples], self.clip_samples
        if length < self.clip_samples:
            padded = np.zeros(self.clip_samples, dtype=np.float32)
            padded[:length] = waveform
            return padded, length
        return waveform, length

    def _encode_labels(self, tags: Sequence[str] | None, position: int) -> torch.Tensor:
        assert self.label2id is not None
        tags = list(tags or [])
        unknown = [t for t in tags if t not in self.label2id]
        if unknown:
            raise ValueError(
                f"Clip {position} has tags {unknown} that are not in label2id; run validate_corpus(..., labels=...) "
                "before training, or add them to the label list."
            )
        if self.problem_type == MULTI_LABEL:
            target = torch.zeros(len(self.label2id), dtype=torch.float32)
            target[[self.label2id[t] for t in tags]] = 1.0
            return target
        if len(tags) != 1:
            raise ValueError(
                f"Clip {position} has {len(tags)} tags {tags} but the task is single-label; use "
                f"problem_type={MULTI_LABEL!r} or give it exactly one tag."
            )
        return torch.tensor(self.label2id[tags[0]], dtype=torch.long)

    def _make_item(self, row: Mapping[str, Any], position: int, key: Sequence[int]) -> dict[str, Any] | None:
        source = row[AUDIO_COLUMN]
        try:
            waveform = load_audio(source, self.sampling_rate)
        except (AudioDecodeError, OSError) as err:
            self._record_skip(position, source, err)
            return None
        waveform, length = self._crop(waveform, key)
        item: dict[str, Any] = {"waveform": torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)),
                                "index": position, "length": length}  # fmt: skip
        if self.label2id is not None:
            item["labels"] = self._encode_labels(row.get(LABELS_COLUMN), position)
        return item


def _resolve_problem_type(corpus: Any, label2id: Mapping[str, int] | None, problem_type: str | None) -> str | None:
    if label2id is None or problem_type is not None:
        return problem_type
    if isinstance(corpus, (datasets.Dataset, datasets.IterableDataset)):
        return build_label_maps(corpus, labels=list(label2id))[2]
    raise ValueError("Pass problem_type when label2id is given with a corpus that is not a datasets.Dataset.")


class AudioClipDataset(_ClipMixin, torch.utils.data.Dataset):
    """Map-style training/evaluation dataset: decoded 16 kHz clips of a fixed length, with labels.

    Item `i` is `{"waveform": float32 (clip_samples,), "labels": long scalar | float32 multi-hot, "index": i,
    "length": valid samples before zero-padding}` (no `"labels"` when `label2id` is None). A clip that cannot
    be decoded yields `None` - drop those with `collate_skip_bad` - and is counted in `num_skipped`.

    Crops are random in training and the start of the clip in evaluation. The random offset is drawn from a
    generator seeded with `(seed, epoch, index)`, so a resumed run sees exactly the same crops; call
    `set_epoch(epoch)` at the start of every epoch.
    """

    @staticmethod
    def _prepare(corpus: datasets.Dataset | Sequence[Mapping[str, Any]], label2id: Mapping[str, int] | None,
                 problem_type: str | None) -> tuple[Any, str | None]:
        if isinstance(corpus, datasets.Dataset):
            if AUDIO_COLUMN not in corpus.column_names:
                raise CorpusError(
                    f"The corpus has no '{AUDIO_COLUMN}' column ({corpus.column_names}); load it with "
                    "load_audio_corpus."
                )
            wanted = [c for c in (AUDIO_COLUMN, LABELS_COLUMN) if c in corpus.column_names]
            corpus = _as_undecoded_audio(corpus.select_columns(wanted)).with_format(None)
        return corpus, _resolve_problem_type(corpus, label2id, problem_type)

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        return self._make_item(self.corpus[index], index, (self.epoch, index))


class IterableAudioClipDataset(_ClipMixin, torch.utils.data.IterableDataset):
    """Streaming counterpart of `AudioClipDataset` over a `datasets.IterableDataset` (or any iterable of rows).

    Unreadable clips are left out of the stream (and counted). `index` is the row's position in this worker's
    part of the stream; crops are seeded by `(seed, epoch, worker id, position)`, so they repeat exactly for
    the same number of DataLoader workers. HF iterable datasets are sharded across workers by `datasets`
    itself; other iterables are dealt out round-robin.
    """

    @staticmethod
    def _prepare(corpus: datasets.IterableDataset | Iterable[Mapping[str, Any]], label2id: Mapping[str, int] | None,
                 problem_type: str | None) -> tuple[Any, str | None]:
        if label2id is not None and problem_type is None:
            raise ValueError(
                "Pass problem_type with label2id for a streaming corpus (build_label_maps on a streamed corpus would "
                "read it all)."
            )
        if isinstance(corpus, (datasets.Dataset, datasets.IterableDataset)):
            corpus = _as_undecoded_audio(corpus)
        return corpus, problem_type

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.corpus, "set_epoch"):
            self.corpus.set_epoch(epoch)  # reshuffles a shuffled HF stream per epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        self_sharded = isinstance(self.corpus, datasets.IterableDataset)
        epoch = self.epoch
        position = 0
        for count, row in enumerate(self.corpus):
            if not self_sharded and num_workers > 1 and count % num_workers != worker_id:
                continue
            item = self._make_item(row, position, (epoch, worker_id, position))
            position += 1
            if item is not None:
                yield item


def collate_skip_bad(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Collate clip dicts, dropping the `None`s that stand for skipped clips.

    Waveforms of different lengths (`clip_samples=None`) are zero-padded to the longest. The batch carries
    `"num_skipped"`, the number of clips dropped from it. Returns `None` when every clip was bad, so a training
    loop does `if batch is None: continue`.
    """
    good = [item for item in batch if item is not None]
    if not good:
        return None
    out: dict[str, Any] = {}
    for key in good[0]:
        values = [item[key] for item in good]
        if key == "waveform":
            longest = max(v.shape[-1] for v in values)
            out[key] = torch.stack([torch.nn.functional.pad(v, (0, longest - v.shape[-1])) for v in values])
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            out[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            out[key] = values
    out["num_skipped"] = len(batch) - len(good)
    return out


# ================================================================================================================
# fixed splits


def _row_ids(dataset: datasets.Dataset) -> list[str]:
    """A stable identity per row: its path, or `#index` for clips stored only as bytes."""
    return [str(ref["path"]) if ref["path"] else f"#{i}" for i, ref in enumerate(_audio_refs(dataset))]


def _fingerprint(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _count(size: float | int, total: int, name: str) -> int:
    """A split size as a number of clips: floats are fractions in (0, 1), ints are counts."""
    if isinstance(size, float) and 0 < size < 1:
        return max(1, int(round(size * total)))
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 1:
        return int(size)
    raise ValueError(f"{name}={size!r} must be a fraction in (0, 1) or a whole number of clips >= 1.")


def _carve(
    pool: np.ndarray, n_target: int, rng: np.random.Generator, groups: list[Any] | None, strata: list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Take about `n_target` rows out of `pool`; returns (taken, rest). Groups stay whole; strata keep their ratio."""
    if strata is not None:
        taken = []
        fraction = n_target / len(pool)
        by_class: dict[str, list[int]] = {}
        for i in pool:
            by_class.setdefault(strata[i], []).append(int(i))
        for label in sorted(by_class):
            members = rng.permutation(by_class[label])
            n = len(members)
            k = 0 if n < 2 else min(n - 1, max(1, int(round(fraction * n))))
            taken.extend(members[:k].tolist())
        taken_set = set(taken)
        return np.array(sorted(taken), dtype=np.int64), np.array(
            [i for i in pool if i not in taken_set], dtype=np.int64
        )
    if groups is not None:
        members: dict[str, list[int]] = {}
        for i in pool:
            members.setdefault(
                json.dumps(groups[i], sort_keys=True, default=str) if groups[i] is not None else f"#{i}", []
            ).append(int(i))
        keys = sorted(members)
        taken = []
        for j in rng.permutation(len(keys)):
            if len(taken) >= n_target:
                break
            taken.extend(members[keys[j]])
        taken_set = set(taken)
        return np.array(sorted(taken), dtype=np.int64), np.array(
            [i for i in pool if i not in taken_set], dtype=np.int64
        )
    order = rng.permutation(pool)
    return np.sort(order[:n_target]), np.sort(order[n_target:])


def split_corpus(
    dataset: datasets.Dataset,
    *,
    test_size: float | int,
    seed: int,
    by: str | None = None,
    validation_size: float | int | None = None,
    stratify: bool = False,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, datasets.Dataset]:
    """Split a corpus reproducibly into `train`/`test` (and `validation`), optionally saving the split lists.

    Args:
        test_size, validation_size: a fraction in (0, 1) or a number of clips.
        seed: the split depends only on the corpus rows and this seed.
        by: a column whose value groups clips that must stay in the same split (speaker, source recording).
        stratify: keep each label's share in every split (single-label corpora; each class with at least two
            clips gets at least one in the carved splits and one in train).
        output_dir: write `splits.json` (row indices, paths, parameters) and `<split>.csv` (path,tags) there. When
            a `splits.json` already exists, it is reused - after checking it was made for this corpus and these
            parameters - so every run evaluates on the same clips.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise CorpusError("split_corpus needs a map-style datasets.Dataset; load the corpus with streaming=False.")
    if by is not None and stratify:
        raise ValueError("Choose either by=COLUMN (group split) or stratify=True, not both.")
    if by is not None and by not in dataset.column_names:
        raise CorpusError(f"by={by!r} is not a column of the corpus; the columns are {dataset.column_names}.")
    total = len(dataset)
    params = {"test_size": test_size, "validation_size": validation_size, "seed": int(seed), "by": by,
              "stratify": bool(stratify)}  # fmt: skip
    ids = _row_ids(dataset)
    split_file = Path(output_dir) / SPLIT_FILE_NAME if output_dir is not None else None
    if split_file is not None and split_file.is_file():
        stored = json.loads(split_file.read_text(encoding="utf-8"))
        if stored.get("parameters") != params:
            raise CorpusError(
                f"'{split_file}' was written with parameters {stored.get('parameters')}, not {params}. Reuse those "
                "parameters, or choose another output_dir (or delete the file) to make a new split."
            )
        return load_splits(dataset, split_file)

    n_test = _count(test_size, total, "test_size")
    n_val = _count(validation_size, total, "validation_size") if validation_size is not None else 0
    if n_test + n_val >= total:
        raise CorpusError(
            f"The corpus has {total} clips; test ({n_test}) + validation ({n_val}) leave none for training. Use "
            "smaller sizes or more data."
        )
    groups = dataset.with_format(None)[by] if by is not None else None
    strata = None
    if stratify:
        if LABELS_COLUMN not in dataset.column_names:
            raise CorpusError("stratify=True needs a labelled corpus (a 'labels' column).")
        tag_lists = dataset.with_format(None)[LABELS_COLUMN]
        if any(len(t or []) != 1 for t in tag_lists):
            raise CorpusError(
                "stratify=True needs exactly one tag per clip; use by=... or a plain random split instead."
            )
        strata = [t[0] for t in tag_lists]

    rng = np.random.default_rng(int(seed))
    pool = np.arange(total, dtype=np.int64)
    indices: dict[str, np.ndarray] = {}
    indices["test"], pool = _carve(pool, n_test, rng, groups, strata)
    if validation_size is not None:
        indices["validation"], pool = _carve(pool, n_val, rng, groups, strata)
    indices["train"] = pool
    for name, chosen in indices.items():
        if len(chosen) == 0:
            raise CorpusError(f"The {name} split came out empty (corpus of {total} clips); use a larger {name} size.")

    result = {
        name: dataset.select(indices[name].tolist()) for name in ("train", "validation", "test") if name in indices
    }
    if split_file is not None:
        _write_splits(split_file, result, indices, ids, params)
    return result


def load_splits(dataset: datasets.Dataset, split_file: str | os.PathLike) -> dict[str, datasets.Dataset]:
    """Re-apply a `splits.json` written by `split_corpus` to the same corpus (checked by its row paths)."""
    split_file = Path(split_file)
    stored = json.loads(split_file.read_text(encoding="utf-8"))
    ids = _row_ids(dataset)
    if stored.get("num_rows") != len(ids) or stored.get("corpus_fingerprint") != _fingerprint(ids):
        raise CorpusError(
            f"'{split_file}' was made for a different corpus ({stored.get('num_rows')} rows, fingerprint "
            f"{str(stored.get('corpus_fingerprint'))[:12]}) than this one ({len(ids)} rows, "
            f"{_fingerprint(ids)[:12]}). Load the same corpus, or delete the file / choose another output_dir to "
            "split again."
        )
    return {name: dataset.select(entry["indices"]) for name, entry in stored["splits"].items()}


def _write_splits(
    split_file: Path,
    result: Mapping[str, datasets.Dataset],
    indices: Mapping[str, np.ndarray],
    ids: Sequence[str],
    params: Mapping[str, Any],
) -> None:
    split_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "cat-hf-splits/1",
        "parameters": dict(params),
        "num_rows": len(ids),
        "corpus_fingerprint": _fingerprint(ids),
        "splits": {
            name: {"indices": [int(i) for i in indices[name]], "paths": [ids[int(i)] for i in indices[name]]}
            for name in result
        },
    }
    atomic_write_text(split_file, json.dumps(payload, indent=1))
    for name, part in result.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        has_labels = LABELS_COLUMN in part.column_names
        writer.writerow(["path", "tags"] if has_labels else ["path"])
        tags = part.with_format(None)[LABELS_COLUMN] if has_labels else None
        for j, i in enumerate(indices[name]):
            writer.writerow([ids[int(i)], ",".join(tags[j] or [])] if tags is not None else [ids[int(i)]])
        atomic_write_text(split_file.parent / f"{name}.csv", buffer.getvalue())
