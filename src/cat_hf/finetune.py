"""Finetune CAT on labelled audio: full finetuning, a frozen-encoder linear probe, or LoRA.

Entry points: `cat-hf finetune --config RECIPE [--flag value ...]`, `accelerate launch -m cat_hf.finetune ...`, and
`finetune(config) -> dict` from Python. A recipe is a YAML file of `FinetuneConfig` fields (the packaged ones:
`tiny`, `as20k`, `as2m`, `esc50`, `spcv2`, i.e. `cat_hf/recipes/finetune_<name>.yaml`); command-line flags override it.

The run, top to bottom (`finetune`):

1. **Data** (`prepare_data`) - the training corpus (Hub name, audiofolder, folder + `path,tags` CSV/JSONL, saved
   dataset) through `cat_hf.data.load_audio_corpus`; a validation set from `validation_data`, a `validation_split`
   of `data`, or `validation_size` clips held out of the training corpus (stratified for single-label data).
   Everything is checked before a model is built: missing files, clips without tags, empty classes, validation
   tags unknown to training - each error lists the offending rows and says how to fix them. The task is
   multi-label iff some clip has more than one tag (`problem_type` overrides).
2. **Model** - `CATForAudioClassification.from_pretrained(model, num_labels=..., id2label=..., label2id=...,
   problem_type=..., ignore_mismatched_sizes=True)` (a converted or pretrained CAT folder), or a `preset` from
   scratch; the head is re-initialised unless the folder's labels are exactly ours. Then LoRA (`cat_hf.lora`) or
   the linear probe (only `fc_norm` + `classifier` train, the encoder runs in eval mode) when asked.
3. **Optimiser** - AdamW (decoupled weight decay, as fairseq's Adam), betas (0.9, 0.95), weight decay 0.05 except
   for biases and 1-D parameters (norms); layer-wise learning-rate decay; linear warm-up from `min_learning_rate`
   then cosine down to it (fairseq's cosine schedule).
4. **Loop** - waveform augmentations (roll, gain), Kaldi features on the training device, targets (one-hot with
   label smoothing, or multi-hot), feature augmentations (noise, mixup, SpecAugment) from `cat_hf.augment`, the
   loss (soft-target cross-entropy or BCE), Accelerate for devices / mixed precision / gradient accumulation.
   Every `eval_steps` the validation set is scored (accuracy or mAP via `cat_hf.metrics`) and the best model is
   saved to `<output_dir>/checkpoint-best`.
5. **Export** - the best checkpoint becomes `output_dir`: model (or LoRA adapter) + feature extractor +
   `training_summary.json`, then `cat_hf.evaluation.evaluate_model` writes `eval_results.json` (whole clips with
   sliding windows). A full-finetuning folder is served by `pipeline("audio-classification", model=output_dir)`;
   multi-label models carry `problem_type="multi_label_classification"`, which makes the pipeline apply sigmoid.
   With `--lora --merge`, `<output_dir>/merged` is the pipeline-ready folder.

Layer-wise learning-rate decay, as the authors' code assigns it (data2vec 2.0 "multi" branch of
`EAT_audio_classification.py`): with L transformer blocks, block i (0-based) gets `lr * decay ** (L - i)`, i.e.
`decay ** (L + 1 - (i + 1))` - the top block already 0.65x, the first 0.65**L. Everything outside the blocks - the
convolutional stem, the CLS token, the (fixed) positions, the context LayerNorm, `fc_norm` and the classifier -
keeps the full learning rate: the original only sets `lr_scale` on block parameters. `layer_decay_stem=True` gives
the BEiT rule instead (stem, CLS token and context norm at `decay ** (L + 1)`). `layer_decay` defaults to 0.65 for
full finetuning and 1.0 (no decay) for LoRA and the linear probe.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .audio import DEFAULT_SAMPLING_RATE, is_audio_file
from .augment import AugmentationConfig, Augmenter
from .data import (
    LABELS_COLUMN,
    MULTI_LABEL,
    SINGLE_LABEL,
    SPLIT_FOLDER_NAMES,
    AudioClipDataset,
    CorpusError,
    build_label_maps,
    collate_skip_bad,
    _row_ids,
    load_audio_corpus,
    split_corpus,
    validate_corpus,
)
from .feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor
from .files import atomic_write_json, write_folder_atomically
from .lora import DEFAULT_MODULES_TO_SAVE, DEFAULT_TARGET_MODULES
from .pretrain import LOGS_DIR, describe_hardware

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SUMMARY_FILE = "training_summary.json"
BEST_CHECKPOINT_DIR = "checkpoint-best"
MERGED_DIR = "merged"
PROBLEM_TYPES = ("auto", SINGLE_LABEL, MULTI_LABEL)
LOSSES = ("auto", "ce", "bce")
METRICS = ("auto", "accuracy", "mAP")
PADDINGS = ("longest", "max_length")
#: `validation_group_by: folder:K` groups clips by the K-th folder above the file.
FOLDER_GROUP_PREFIX = "folder:"
#: Layer decay when `layer_decay` is not set: the paper's value for full finetuning, none for LoRA / linear probe.
DEFAULT_LAYER_DECAY = 0.65


class FinetuneConfigError(ValueError):
    """A finetuning setting is invalid; the message names the setting and the fix."""


# ================================================================================================================
# Configuration


@dataclass
class FinetuneConfig:
    """Every setting of a finetuning run; a recipe YAML holds a subset of these fields.

    Data:
        data: training corpus: Hub dataset name, audiofolder `<root>/<label>/<clip>`, `path,tags` CSV/JSONL, or a
            `save_to_disk` folder.
        train_split: split of `data` to train on (Hub datasets, split folders).
        validation_data: a separate validation corpus (any source `data` accepts).
        validation_split: a split of `data` (or of `validation_data`) to validate on.
        validation_size: fraction (or number) of training clips held out for validation when neither of the above
            is given.
        validation_group_by: keep the clips of one group together when holding them out (so the validation set,
            which picks the best checkpoint, has unseen speakers or sources, like a fair test set): a column of the
            corpus (e.g. `speaker`), or `folder:K`, the name of the K-th folder above each file (1 = the folder
            holding it).
        test_data / test_split: optional final test set for `eval_results.json` (default: the validation set).
        audio_column / label_column / tags_separator: passed to `load_audio_corpus`.
        labels: fixed label list (order = class ids); default: the sorted tags of the training corpus.
        problem_type: "auto" (multi-label iff a clip has more than one tag), "single_label_classification" or
            "multi_label_classification".
        check_audio: decode every file before training, as training will (slow on big corpora; unreadable files are skipped
            during training anyway).
    Model:
        model: pretrained CAT folder or Hub id; None trains `preset` from scratch.
        preset: architecture for from-scratch training (`cat-tiny`, `cat-small`, `cat-base`, `cat-large`).
        feature_preset: feature statistics and length of a CAT recipe ("audioset", "esc50", "speechcommands");
            default: the model folder's feature extractor, else "audioset".
        max_length: input frames (overrides the feature extractor's); longer clips are cropped to it in training
            and scored with sliding windows in evaluation.
        padding: "longest" (default): each batch is padded to its longest clip with an attention mask, so a 0.2 s
            clip is scored on its own frames, not in a sea of padding; "max_length": every clip padded to
            `max_length` frames with the padding visible to the model, as the authors' recipes do (the paper
            recipes keep it).
        drop_path_rate: stochastic depth of the encoder blocks.
    Optimisation: max_steps, warmup_steps (optimiser updates), learning_rate, lora_learning_rate (the rate of a LoRA
        run, which needs a larger one; None: learning_rate), min_learning_rate, weight_decay,
        adam_beta1/adam_beta2/adam_epsilon, layer_decay (None: 0.65 for full finetuning, 1.0 otherwise),
        layer_decay_stem, batch_size (per device), gradient_accumulation_steps, max_grad_norm (None: no clipping),
        mixed_precision ("no", "fp16", "bf16"), activation_checkpointing (recompute each block's activations in the
        backward pass: less memory for larger batches, at the cost of a second forward through the blocks).
    Loss: loss ("auto": cross-entropy for single-label, BCE for multi-label; "bce" on single-label data is the
        Speech Commands recipe), label_smoothing.
    Augmentation (see `cat_hf.augment`): mixup_alpha (0 = off), mixup_prob, freq_mask_ratio, time_mask_ratio,
        roll, gain, noise.
    Sampling: balanced_sampling (clip weight = sum over its tags of 1 / tag count, drawn with replacement),
        samples_per_epoch (clips drawn per epoch with balanced sampling; default: the corpus size).
    Evaluation: eval_steps, eval_batch_size, metric ("auto": accuracy for single-label, mAP for multi-label),
        baseline (also fit a logistic regression on the clips' log-mel statistics, `cat_hf.probe`, on the same
        split and report it beside the model's score).
    Modes: linear_probe; lora with lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_modules_to_save
        (trained in full, saved with the adapter), lora_plus_ratio (LoRA+: the B matrices' lr is that many times
        the A matrices'; 1 = plain LoRA); merge (write a merged copy of the LoRA model to `<output_dir>/merged`).
    Run: output_dir, overwrite_output_dir, seed, num_workers, threads (torch's CPU threads; one per process is
        fastest where several jobs share a machine), logging_steps, report_to (e.g. ["tensorboard"]).
    """

    # data
    data: str | None = None
    train_split: str = "train"
    validation_data: str | None = None
    validation_split: str | None = None
    validation_size: float | int = 0.1
    validation_group_by: str | None = None
    test_data: str | None = None
    test_split: str | None = None
    audio_column: str | None = None
    label_column: str | None = None
    tags_separator: str = ","
    labels: list[str] | None = None
    problem_type: str = "auto"
    check_audio: bool = False
    # model
    model: str | None = None
    preset: str = "cat-base"
    feature_preset: str | None = None
    max_length: int | None = None
    padding: str = "longest"
    drop_path_rate: float = 0.1
    # optimisation
    max_steps: int = 1000
    warmup_steps: int = 100
    learning_rate: float = 5e-5
    lora_learning_rate: float | None = None
    min_learning_rate: float = 1e-6
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    layer_decay: float | None = None
    layer_decay_stem: bool = False
    batch_size: int = 48
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    activation_checkpointing: bool = False
    # loss
    loss: str = "auto"
    label_smoothing: float = 0.0
    # augmentation
    mixup_alpha: float = 0.0
    mixup_prob: float = 1.0
    freq_mask_ratio: float = 0.2
    time_mask_ratio: float = 0.2
    roll: bool = True
    gain: bool = True
    noise: bool = False
    # sampling
    balanced_sampling: bool = False
    samples_per_epoch: int | None = None
    # evaluation
    eval_steps: int = 500
    eval_batch_size: int | None = None
    metric: str = "auto"
    baseline: bool = True
    # modes
    linear_probe: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    lora_modules_to_save: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE))
    lora_plus_ratio: float = 1.0
    merge: bool = False
    # run
    output_dir: str = "cat-finetuned"
    overwrite_output_dir: bool = False
    seed: int = 0
    num_workers: int = 2
    threads: int | None = None
    logging_steps: int = 50
    report_to: list[str] = field(default_factory=list)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: str = "the settings") -> FinetuneConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise FinetuneConfigError(
                f"Unknown finetuning setting(s) {unknown} in {origin}; valid settings are {cls.field_names()}."
            )
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        return cls(**{name: _coerce(name, value, types[name], origin) for name, value in values.items()})

    @classmethod
    def from_yaml(cls, recipe: str | os.PathLike, **overrides: Any) -> FinetuneConfig:
        """Load a recipe (a YAML path, or a packaged name like "esc50") and apply `overrides`."""
        path = resolve_recipe(recipe)
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise FinetuneConfigError(f"Recipe '{path}' must be a mapping of settings (key: value lines).")
        return cls.from_dict({**loaded, **overrides}, origin=f"recipe '{path}'")

    def validate(self) -> None:
        """Raise FinetuneConfigError for settings that cannot work, before anything is loaded."""

        def fail(message: str) -> None:
            raise FinetuneConfigError(message)

        if not self.data:
            fail("No training data: set `data` (--data) to a Hub dataset name, an audiofolder, or a path,tags CSV/JSONL.")
        if self.model:
            from .inference import check_model_reference

            try:
                check_model_reference(self.model)
            except FileNotFoundError as error:
                fail(f"model: {error}")
        if self.problem_type not in PROBLEM_TYPES:
            fail(f"problem_type={self.problem_type!r} is not one of {PROBLEM_TYPES}.")
        if self.loss not in LOSSES:
            fail(f"loss={self.loss!r} is not one of {LOSSES}.")
        if self.metric not in METRICS:
            fail(f"metric={self.metric!r} is not one of {METRICS}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            fail(f"mixed_precision={self.mixed_precision!r} is not one of ('no', 'fp16', 'bf16').")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_steps", "logging_steps"):
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.warmup_steps < self.max_steps:
            fail(f"warmup_steps ({self.warmup_steps}) must be >= 0 and below max_steps ({self.max_steps}); lower "
                 "--warmup-steps (the recipe sets it) or raise --max-steps.")
        if not 0 < self.effective_learning_rate() or not 0 <= self.min_learning_rate <= self.effective_learning_rate():
            fail(f"Need 0 < learning_rate and 0 <= min_learning_rate <= learning_rate; got "
                 f"{self.effective_learning_rate()} and {self.min_learning_rate}.")  # fmt: skip
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            fail(f"layer_decay must be in (0, 1] (1 = no decay), got {self.layer_decay}.")
        if not 0 <= self.label_smoothing < 1:
            fail(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.lora_plus_ratio <= 0:
            fail(f"lora_plus_ratio must be positive (1 = plain LoRA, 16 = the LoRA+ paper's), got {self.lora_plus_ratio}.")
        if self.lora and self.linear_probe:
            fail("Choose either lora or linear_probe, not both.")
        if self.lora and not self.model:
            fail("LoRA adapts a pretrained model: set `model` (--model) to a pretrained CAT folder or Hub id.")
        if self.merge and not self.lora:
            fail("merge folds a LoRA adapter into the weights; it needs lora (--lora).")
        if self.validation_data is None and self.validation_split is None and not self.validation_size:
            fail("No validation set: give validation_data, validation_split, or a validation_size > 0.")
        if self.feature_preset is not None and self.feature_preset not in FEATURE_PRESETS:
            fail(f"feature_preset={self.feature_preset!r} is not one of {sorted(FEATURE_PRESETS)}.")
        if self.padding not in PADDINGS:
            fail(f"padding={self.padding!r} is not one of {PADDINGS}.")
        if self.threads is not None and self.threads < 1:
            fail(f"threads must be >= 1, got {self.threads}.")
        if self.validation_group_by is not None and (self.validation_data is not None or self.validation_split):
            fail("validation_group_by groups the clips held out of the training corpus; it has no effect with "
                 "validation_data or validation_split.")
        if self.max_length is not None and (self.max_length < 16 or self.max_length % 16):
            fail(f"max_length must be a positive multiple of 16 frames (one patch), got {self.max_length}.")
        AugmentationConfig(**self.augmentation_kwargs())  # checks the ranges

    def augmentation_kwargs(self) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(AugmentationConfig)]
        return {name: getattr(self, name) for name in names}

    def effective_learning_rate(self) -> float:
        return float(self.lora_learning_rate) if self.lora and self.lora_learning_rate is not None else self.learning_rate

    def effective_layer_decay(self) -> float:
        if self.layer_decay is not None:
            return float(self.layer_decay)
        return 1.0 if (self.lora or self.linear_probe) else DEFAULT_LAYER_DECAY

    @property
    def mode(self) -> str:
        return "lora" if self.lora else "linear_probe" if self.linear_probe else "full"


def _coerce(name: str, value: Any, annotation: str, origin: str) -> Any:
    """YAML reads `5e-5` as a string (it wants `5.0e-5`): turn numeric-looking strings into numbers."""
    if not isinstance(value, str) or annotation.startswith("str"):
        return value
    try:
        if annotation.startswith("float | int"):
            return _fraction_or_count(value)
        if annotation.startswith("float"):
            return float(value)
        if annotation.startswith("int"):
            return int(value)
    except ValueError:
        raise FinetuneConfigError(f"Setting {name}={value!r} in {origin} is not a number.") from None
    if annotation == "bool" and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    return value


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A YAML path, or the name of a packaged recipe (`esc50` -> recipes/finetune_esc50.yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    text = os.fspath(recipe)
    for candidate in (RECIPES_DIR / f"finetune_{text}.yaml", RECIPES_DIR / f"{text}.yaml", RECIPES_DIR / text):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem.removeprefix("finetune_") for p in RECIPES_DIR.glob("finetune_*.yaml"))
    raise FinetuneConfigError(f"Recipe '{recipe}' is neither a YAML file nor a packaged recipe; packaged: {available}.")


# ================================================================================================================
# 1. Data


@dataclass
class PreparedData:
    """The checked corpora and the label space they define."""

    train: Any
    validation: Any
    test: Any | None
    label2id: dict[str, int]
    id2label: dict[int, str]
    problem_type: str
    summaries: dict[str, dict[str, Any]]


def _load(config: FinetuneConfig, source: str, split: str | None) -> Any:
    return load_audio_corpus(
        source, split=split, audio_column=config.audio_column, label_column=config.label_column,
        tags_separator=config.tags_separator, labels_from_folders=True,
    )  # fmt: skip


def check_empty_class_folders(source: str, split: str | None) -> None:
    """An audiofolder whose class folder holds no audio would silently lose that class: fail instead."""
    root = Path(source)
    if not root.is_dir() or any((root / n).exists() for n in ("dataset_dict.json", "state.json")):
        return
    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if split and subfolders and all(p.name.lower() in SPLIT_FOLDER_NAMES for p in subfolders):
        root = root / split
        if not root.is_dir():
            return  # load_audio_corpus reports the missing split folder
        subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if any((root / n).is_file() for n in ("metadata.csv", "metadata.jsonl", "metadata.tsv")):
        return
    empty = sorted(
        folder.name for folder in subfolders
        if not any(is_audio_file(p) for p in folder.rglob("*") if p.is_file())
    )  # fmt: skip
    if empty:
        raise CorpusError(
            f"{len(empty)} class folder(s) of '{root}' hold no audio files: {empty}. Add clips to them, or remove the "
            "empty folders (a class without examples cannot be learned)."
        )


def _tag_lists(dataset: Any) -> list[list[str]]:
    return [list(tags or []) for tags in dataset.with_format(None)[LABELS_COLUMN]]


def _row_name(dataset: Any, index: int) -> str:
    entry = dataset.with_format(None)[index]["audio"]
    path = entry.get("path") if isinstance(entry, Mapping) else entry
    return str(path) if path else f"row {index}"


def check_known_labels(dataset: Any, label2id: Mapping[str, int], split_name: str, max_listed: int = 10) -> None:
    """Every tag of an evaluation split must be a training label; list the rows that break this."""
    bad = [(i, sorted(set(tags) - set(label2id))) for i, tags in enumerate(_tag_lists(dataset)) if set(tags) - set(label2id)]
    if bad:
        shown = "\n".join(f"    row {i} ({_row_name(dataset, i)}): unknown tag(s) {tags}" for i, tags in bad[:max_listed])
        more = f"\n    ... and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        unknown = sorted({t for _, tags in bad for t in tags})
        raise CorpusError(
            f"{len(bad)} row(s) of the {split_name} set use tags {unknown} that the training set does not have:\n"
            f"{shown}{more}\n  The training labels are {sorted(label2id)}. Fix the tags, drop those rows, or add "
            "training clips for them.",
            rows=[i for i, _ in bad],
        )


def check_single_label(dataset: Any, split_name: str, max_listed: int = 10) -> None:
    bad = [(i, tags) for i, tags in enumerate(_tag_lists(dataset)) if len(tags) != 1]
    if bad:
        shown = "\n".join(f"    row {i} ({_row_name(dataset, i)}): {tags}" for i, tags in bad[:max_listed])
        raise CorpusError(
            f"problem_type is {SINGLE_LABEL!r} but {len(bad)} row(s) of the {split_name} set do not have exactly one "
            f"tag:\n{shown}\n  Give each clip one tag, or use problem_type={MULTI_LABEL!r} (or 'auto').",
            rows=[i for i, _ in bad],
        )


def prepare_data(config: FinetuneConfig, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> PreparedData:
    """Load, split and check all corpora; every failure happens here, before a model is built. `sampling_rate`: the
    rate the model's feature extractor reads (what `check_audio` decodes to)."""
    check_empty_class_folders(config.data, config.train_split)
    full_train = _load(config, config.data, config.train_split)
    validate_corpus(full_train, labels=config.labels, require_labels=True, check_audio=config.check_audio,
                    split_name="training", sampling_rate=sampling_rate)  # fmt: skip
    label2id, id2label, detected = build_label_maps(full_train, labels=config.labels)

    carved = config.validation_data is None and config.validation_split is None
    if carved and config.validation_group_by:
        grouped, column = with_group_column(full_train, config.validation_group_by)
        parts = split_corpus(grouped, test_size=config.validation_size, seed=config.seed, by=column)
        train, validation = (parts[name].remove_columns([column]) if column == GROUP_COLUMN else parts[name]
                             for name in ("train", "test"))
    elif carved:
        single = detected == SINGLE_LABEL
        parts = split_corpus(full_train, test_size=config.validation_size, seed=config.seed, stratify=single)
        train, validation = parts["train"], parts["test"]
    else:
        train = full_train
        source = config.validation_data or config.data
        if config.validation_data is not None:
            check_empty_class_folders(config.validation_data, config.validation_split)
        validation = _load(config, source, config.validation_split or "validation")
        validate_corpus(validation, require_labels=True, check_audio=config.check_audio, split_name="validation",
                        sampling_rate=sampling_rate)
        check_known_labels(validation, label2id, "validation")

    test = None
    if config.test_data is not None or config.test_split is not None:
        test = _load(config, config.test_data or config.data, config.test_split or "test")
        validate_corpus(test, require_labels=True, check_audio=config.check_audio, split_name="test",
                        sampling_rate=sampling_rate)
        check_known_labels(test, label2id, "test")

    counts = Counter(tag for tags in _tag_lists(train) for tag in tags)
    empty = [label for label in label2id if counts.get(label, 0) == 0]
    if empty:
        raise CorpusError(
            f"{len(empty)} label(s) have no training example once the validation clips are held out: {empty}. Add "
            "clips for them, use a smaller validation_size, or give a separate validation_data."
        )

    problem_type = config.problem_type
    if problem_type == "auto":
        splits = [validation] + ([test] if test is not None else [])
        multi = detected == MULTI_LABEL or any(len(t) > 1 for s in splits for t in _tag_lists(s))
        problem_type = MULTI_LABEL if multi else SINGLE_LABEL
    if problem_type == SINGLE_LABEL and len(label2id) < 2:
        raise CorpusError(
            f"the training data has a single class ({', '.join(label2id)}): single-label classification needs at "
            "least 2. Add clips of other classes, or for a detector of this one tag use problem_type="
            "'multi_label_classification' (a sigmoid per tag)."
        )
    if problem_type == SINGLE_LABEL:
        for name, dataset in (("training", full_train), ("validation", validation), ("test", test)):
            if dataset is not None:
                check_single_label(dataset, name)

    def summary(dataset: Any) -> dict[str, Any]:
        tag_counts = Counter(tag for tags in _tag_lists(dataset) for tag in tags)
        return {"num_clips": len(dataset), "label_counts": {label: int(tag_counts.get(label, 0)) for label in label2id}}

    summaries = {"train": summary(train), "validation": summary(validation)}
    summaries["validation"]["source"] = "held out of the training corpus" if carved else (config.validation_data or config.data)
    if carved and config.validation_group_by:
        summaries["validation"]["grouped_by"] = config.validation_group_by
    if test is not None:
        summaries["test"] = summary(test)
    return PreparedData(train, validation, test, label2id, id2label, problem_type, summaries)


#: The column `with_group_column` adds for a `folder:K` grouping (removed again after the split).
GROUP_COLUMN = "_validation_group"


def with_group_column(dataset: Any, group_by: str) -> tuple[Any, str]:
    """(dataset, column) whose values group the clips for a grouped hold-out: an existing column, or for
    `folder:K` a new column holding the name of the K-th folder above each clip's file."""
    if not group_by.startswith(FOLDER_GROUP_PREFIX):
        if group_by not in dataset.column_names:
            raise CorpusError(
                f"validation_group_by={group_by!r} is not a column of the training corpus (columns: "
                f"{dataset.column_names}); name a column such as speaker, or use '{FOLDER_GROUP_PREFIX}K' to group by "
                "the K-th folder above each file."
            )
        return dataset, group_by
    level = group_by[len(FOLDER_GROUP_PREFIX):]
    if not level.isdigit() or int(level) < 1:
        raise FinetuneConfigError(f"validation_group_by={group_by!r}: write '{FOLDER_GROUP_PREFIX}K' with K >= 1 "
                                  "(1 = the folder holding each file).")
    groups = []
    for row, path in enumerate(_row_ids(dataset)):
        parents = Path(path).parents
        if path.startswith("#") or len(parents) <= int(level):
            raise CorpusError(f"validation_group_by={group_by!r}: clip {row} ({path}) has no folder {level} level(s) "
                              "up; choose a smaller K or a column.")
        groups.append(parents[int(level) - 1].name)
    if len(set(groups)) < 2:
        raise CorpusError(f"validation_group_by={group_by!r} puts every clip in one group ({groups[0]!r}); a held-out "
                          "group would leave nothing to train on. Choose another level or column.")
    return dataset.add_column(GROUP_COLUMN, groups), GROUP_COLUMN


def balanced_sample_weights(tag_lists: Sequence[Sequence[str]]) -> torch.Tensor:
    """Clip weight = sum over its tags of 1 / (clips with that tag): rare classes are drawn as often as common ones."""
    counts = Counter(tag for tags in tag_lists for tag in tags)
    return torch.tensor([sum(1.0 / counts[t] for t in tags) if tags else 0.0 for tags in tag_lists], dtype=torch.double)


# ================================================================================================================
# 2. Model


def clip_samples_for(feature_extractor: CATFeatureExtractor) -> int:
    """Waveform samples that give exactly `max_length` frames (25 ms window, 10 ms shift)."""
    window = int(feature_extractor.sampling_rate * feature_extractor.frame_length_ms / 1000)
    shift = int(feature_extractor.sampling_rate * feature_extractor.frame_shift_ms / 1000)
    return window + (feature_extractor.max_length - 1) * shift


def build_feature_extractor(config: FinetuneConfig) -> CATFeatureExtractor:
    """The model folder's extractor (else the AudioSet one), then `feature_preset`, then `max_length` on top."""
    extractor = None
    if config.model and Path(config.model, "preprocessor_config.json").is_file():
        extractor = CATFeatureExtractor.from_pretrained(config.model)
    elif config.model and not Path(config.model).exists():
        try:  # a Hub id
            extractor = CATFeatureExtractor.from_pretrained(config.model)
        except (OSError, ValueError):  # offline, or no feature extractor there: fall back to a preset
            extractor = None
    if extractor is None:
        extractor = CATFeatureExtractor.from_preset(config.feature_preset or "audioset")
    elif config.feature_preset is not None:
        for key, value in FEATURE_PRESETS[config.feature_preset].items():
            setattr(extractor, key, value)
    if config.max_length is not None:
        extractor.max_length = int(config.max_length)
    extractor.padding = config.padding
    return extractor


def build_model(config: FinetuneConfig, data: PreparedData, say: Callable[[str], Any] | None = None):
    """A CATForAudioClassification for our labels: from a pretrained folder, or a preset from scratch.

    `say` gets one line on what was taken from the folder (default: the log), in place of transformers' LOAD REPORT
    table, which calls the expected new head "missing"; problems in the encoder's weights become warnings.
    """
    from .configuration_cat import CATConfig
    from .modeling_cat import CATForAudioClassification

    label_kwargs = dict(num_labels=len(data.label2id), id2label=data.id2label, label2id=data.label2id,
                        problem_type=data.problem_type)  # fmt: skip
    if config.model:
        source_labels = _source_id2label(config.model)
        load = functools.partial(
            CATForAudioClassification.from_pretrained, config.model, ignore_mismatched_sizes=True,
            drop_path_rate=config.drop_path_rate, output_loading_info=True, **label_kwargs,
        )
        try:
            with _load_report_hidden():
                model, loading = load()
        except RuntimeError:  # transformers raises after its report ("look at the report above"): show it
            model, loading = load()
        if source_labels != dict(data.id2label):
            # Same shape but other (or unknown) classes, or another order: the old head would silently mislabel.
            with torch.no_grad():
                torch.nn.init.trunc_normal_(model.classifier.weight, std=model.config.initializer_range)
                torch.nn.init.zeros_(model.classifier.bias)
        note = describe_loading(config.model, loading, len(data.label2id), source_labels, dict(data.id2label))
    else:
        logger.warning("No pretrained model given: training preset %s from scratch.", config.preset)
        model = CATForAudioClassification(
            CATConfig.from_preset(config.preset, drop_path_rate=config.drop_path_rate, **label_kwargs)
        )
        note = f"model: {config.preset} from scratch (random weights)"
    (say or logger.info)(note)
    if config.activation_checkpointing:  # before any LoRA wrapping, so that PEFT hooks the stem for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


_HEAD_PREFIXES = ("fc_norm.", "classifier.")


class _HideLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT table (`describe_loading` says what matters in it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _load_report_hidden():
    # A filter, not a log level: transformers checks that logger's level to decide on other warnings.
    report_logger, hide = logging.getLogger("transformers.modeling_utils"), _HideLoadReport()
    report_logger.addFilter(hide)
    try:
        yield
    finally:
        report_logger.removeFilter(hide)


def _listed(keys: Sequence[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def describe_loading(
    source: str,
    loading: Mapping[str, Any],
    num_labels: int,
    source_labels: Mapping[int, str] | None,
    labels: Mapping[int, str],
) -> str:
    """One line on what `from_pretrained(source, output_loading_info=True)` took; warnings for encoder weights it
    did not find or found with another shape (those start from random values).

    An encoder folder has no head (fc_norm + classifier): a new one is the expected case, not worth a table.
    """
    missing = set(loading["missing_keys"])
    resized = {key: (tuple(old), tuple(new)) for key, old, new in loading["mismatched_keys"]}
    missing_encoder = sorted(key for key in missing if not key.startswith(_HEAD_PREFIXES))
    if missing_encoder:
        logger.warning(
            "%d encoder weights are not in %s and start from random values: %s. Is it a CAT model folder?",
            len(missing_encoder), source, _listed(missing_encoder),
        )
    resized_encoder = sorted(key for key in resized if not key.startswith(_HEAD_PREFIXES))
    if resized_encoder:
        logger.warning(
            "%d encoder weights of %s have another shape than its config.json asks for and start from random "
            "values: %s. Was config.json edited?", len(resized_encoder), source,
            _listed([f"{key} {resized[key][0]} -> {resized[key][1]}" for key in resized_encoder]),
        )
    if any(key.startswith(_HEAD_PREFIXES) for key in missing):
        reason = "it has none"
    elif any(key.startswith(_HEAD_PREFIXES) for key in resized):
        reason = "its head has another size"
    elif source_labels is None:
        reason = "its head's classes are not recorded"
    elif source_labels != labels:
        reason = "its head has other classes or another order"
    else:
        reason = None
    head = f"new classification head for {num_labels} labels ({reason})" if reason else "its head kept (same classes)"
    return f"model: encoder from {source}, {head}"


def _source_id2label(model: str) -> dict[int, str] | None:
    """The label map in the config of a model folder or Hub id (None when it has none or cannot be read)."""
    from .configuration_cat import CATConfig

    try:
        raw, _ = CATConfig.get_config_dict(model)
    except (OSError, ValueError):
        return None
    id2label = raw.get("id2label")
    return {int(k): str(v) for k, v in id2label.items()} if isinstance(id2label, dict) else None


def freeze_encoder(model: torch.nn.Module) -> None:
    """Linear probe: only the head (fc_norm + classifier) trains."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("fc_norm.", "classifier."))


def set_train_mode(model: torch.nn.Module, accelerator: Any, linear_probe: bool) -> None:
    """model.train(), except that a frozen encoder stays in eval mode (no dropout / drop path on fixed features)."""
    model.train()
    if linear_probe:
        accelerator.unwrap_model(model).cat.eval()


# ================================================================================================================
# 3. Optimiser


_BLOCK_PATTERN = re.compile(r"(?:^|\.)cat\.layers\.(\d+)\.")
_STEM_PATTERN = re.compile(r"(?:^|\.)cat\.embeddings\.")


def layer_lr_scale(name: str, num_layers: int, layer_decay: float, decay_stem: bool = False) -> float:
    """Learning-rate multiplier of a parameter (the rule is in the module docstring)."""
    block = _BLOCK_PATTERN.search(name)
    if block is not None:
        return layer_decay ** (num_layers - int(block.group(1)))
    if decay_stem and _STEM_PATTERN.search(name):
        return layer_decay ** (num_layers + 1)
    return 1.0


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """No weight decay on biases and 1-D parameters (LayerNorm weights), as the original."""
    return parameter.ndim > 1 and not name.endswith(".bias")


def build_param_groups(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    decay_stem: bool = False,
    lora_plus_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    """One AdamW group per (lr scale, weight decay on/off) over the trainable parameters. `lora_plus_ratio` is
    LoRA+'s lambda (Hayou et al., 2024): the LoRA B matrices learn that many times faster than the A matrices."""
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = layer_lr_scale(name, num_layers, layer_decay, decay_stem)
        if ".lora_B." in name:
            scale *= lora_plus_ratio
        decay = uses_weight_decay(name, parameter)
        group = groups.setdefault((scale, decay), {
            "params": [], "names": [], "lr": learning_rate * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0,
        })  # fmt: skip
        group["params"].append(parameter)
        group["names"].append(name)
    if not groups:
        raise FinetuneConfigError("The model has no trainable parameters; check the lora / linear_probe settings.")
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear from `min_ratio` to 1 over the warm-up, then cosine back down to `min_ratio`."""
    if step < warmup_steps:
        return min_ratio + (1.0 - min_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ================================================================================================================
# 4. Training step pieces


def featurize(
    feature_extractor: CATFeatureExtractor, waveforms: torch.Tensor, lengths: torch.Tensor, device: torch.device,
    padding: str = "max_length",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N) zero-padded waveforms -> (features (B, T, 128), attention mask (B, T) or None). Each clip is cut to
    its real length first. "max_length": every clip padded to max_length frames in the filter-bank domain, as the
    original does, without a mask; "longest": the batch padded to its longest clip (whole patches, at most
    max_length frames) with the mask of the real frames."""
    window = int(feature_extractor.sampling_rate * feature_extractor.frame_length_ms / 1000)
    clips = [wave[: max(int(n), window)] for wave, n in zip(waveforms.float().cpu(), lengths.tolist())]
    masked = padding == "longest"
    inputs = feature_extractor(clips, sampling_rate=feature_extractor.sampling_rate, padding=padding,
                               truncation=True if masked else None, return_attention_mask=masked,
                               return_tensors="pt", device=device)  # fmt: skip
    return inputs["input_values"], inputs.get("attention_mask")


def make_targets(labels: torch.Tensor, num_labels: int, problem_type: str, label_smoothing: float) -> torch.Tensor:
    """(B, C) float targets: one-hot (single-label) or multi-hot, smoothed as y (1 - eps) + eps / C."""
    if problem_type == SINGLE_LABEL:
        targets = F.one_hot(labels.long(), num_labels).float()
    else:
        targets = labels.float()
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_labels
    return targets


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Soft-target cross-entropy ("ce", = cross_entropy with label smoothing when unmixed) or mean BCE ("bce")."""
    logits = logits.float()
    if loss == "ce":
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.binary_cross_entropy_with_logits(logits, targets)


# ================================================================================================================
# Validation


class Validator:
    """Scores the validation loader with the run's metric (accuracy via topk_accuracy, mAP via multilabel_tagging)."""

    def __init__(self, metric: str, problem_type: str, num_labels: int, padding: str = "max_length"):
        from .metrics import load_metric

        self.padding = padding
        self.metric = metric
        self.problem_type = problem_type
        self.num_labels = num_labels
        self.module = load_metric("multilabel_tagging" if metric == "mAP" else "topk_accuracy")

    @torch.no_grad()
    def __call__(self, model, loader, feature_extractor, accelerator) -> dict[str, float]:
        model.eval()
        scores, references = [], []
        for batch in loader:
            if batch is None:
                continue
            features, mask = featurize(feature_extractor, batch["waveform"], batch["length"], accelerator.device,
                                       self.padding)
            logits = model(input_values=features, attention_mask=mask).logits.float()
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            probabilities = torch.sigmoid(logits) if self.problem_type == MULTI_LABEL else torch.softmax(logits, -1)
            scores.append(probabilities.cpu().numpy())
            references.append(labels.cpu().numpy())
        if not scores:
            return {self.metric: float("nan"), "num_examples": 0}
        predictions = np.concatenate(scores).astype(np.float64)
        targets = np.concatenate(references)
        if self.metric == "mAP":
            if self.problem_type == SINGLE_LABEL:
                targets = np.eye(self.num_labels, dtype=np.int64)[targets]
            result = self.module.compute(predictions=predictions, references=targets.astype(np.int64))
            return {"mAP": float(result["mAP"]), "mAUC": float(result["mAUC"]), "num_examples": len(predictions)}
        result = self.module.compute(predictions=predictions, references=targets.astype(np.int64), top_k=[1])
        return {"accuracy": float(result["accuracy"]), "num_examples": len(predictions)}


# ================================================================================================================
# 5. Saving and export


def save_checkpoint(model, feature_extractor: CATFeatureExtractor, folder: Path, lora: bool) -> None:
    """The model (or the LoRA adapter alone) + feature extractor, every file written atomically."""
    from .lora import save_lora_adapter

    if lora:
        save_lora_adapter(model, folder, feature_extractor)
        return

    def write(temporary: Path) -> None:
        model.save_pretrained(temporary)
        feature_extractor.save_pretrained(temporary)

    write_folder_atomically(folder, write)


def fit_baseline(data: PreparedData, feature_extractor: CATFeatureExtractor, seed: int) -> dict[str, Any]:
    """The log-mel-statistics logistic regression (`cat_hf.probe.log_mel_baseline`) on the run's own split: fitted on
    the training clips, its penalty chosen on the validation clips, scored on the test set (else validation)."""
    from .probe import log_mel_baseline

    def decoded(dataset: Any) -> tuple[list[np.ndarray], np.ndarray]:
        clips = AudioClipDataset(dataset, clip_samples=None, label2id=data.label2id, problem_type=data.problem_type,
                                 train=False, sampling_rate=feature_extractor.sampling_rate, max_warnings=0)
        items = [item for item in (clips[i] for i in range(len(clips))) if item is not None]
        return [item["waveform"].numpy() for item in items], torch.stack([item["labels"] for item in items]).numpy()

    evaluation = data.test if data.test is not None else data.validation
    result = log_mel_baseline(decoded(data.train), decoded(evaluation), validation=decoded(data.validation),
                              multi_label=data.problem_type == MULTI_LABEL, num_classes=len(data.label2id),
                              feature_extractor=feature_extractor, seed=seed)
    return {**result, "split": "test" if data.test is not None else "validation"}


#: What an evaluation writes beside a model (`cat_hf.evaluation`): it describes that model, so a run that replaces the
#: model with --overwrite-output-dir removes it rather than leave results of the old model beside the new one.
EVALUATION_FILE_PATTERNS = ("eval_results.json", "per_class_scores*.csv", "predictions*.csv", "confusion_matrix*.png")


def _prepare_output_dir(config: FinetuneConfig) -> Path:
    output_dir = Path(config.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not config.overwrite_output_dir:
            raise FinetuneConfigError(
                f"output_dir '{output_dir}' exists and is not empty; choose another output_dir or pass "
                "overwrite_output_dir (--overwrite-output-dir) to write into it."
            )
        for pattern in EVALUATION_FILE_PATTERNS:
            for stale in output_dir.glob(pattern):
                logger.warning("--overwrite-output-dir: removing %s, an evaluation of the model being replaced.", stale)
                stale.unlink()
    return output_dir


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    from . import __version__

    return {"cat_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__}  # fmt: skip


# ================================================================================================================
# The run


def finetune(config: FinetuneConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run a finetuning job end to end (see the module docstring); returns the training summary, with the final
    evaluation under "eval_results" and the written folders under "output_dir" / "merged_dir"."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .lora import (
        LoraSettings,
        add_lora,
        count_parameters,
        describe_trainable,
        load_lora_model,
        merge_lora,
    )

    if not isinstance(config, FinetuneConfig):
        config = FinetuneConfig.from_dict(config)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = _prepare_output_dir(config)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=list(config.report_to) or None,
        project_dir=str(output_dir / LOGS_DIR),
    )
    set_seed(config.seed)
    started = time.time()

    # 1. Data --------------------------------------------------------------------------------------------------
    feature_extractor = build_feature_extractor(config)
    data = prepare_data(config, feature_extractor.sampling_rate)
    num_labels = len(data.label2id)
    loss_kind = config.loss if config.loss != "auto" else ("bce" if data.problem_type == MULTI_LABEL else "ce")
    if loss_kind == "ce" and data.problem_type == MULTI_LABEL:
        raise FinetuneConfigError("loss='ce' needs single-label data; multi-label tagging uses loss='bce' (or 'auto').")
    metric = config.metric if config.metric != "auto" else ("mAP" if data.problem_type == MULTI_LABEL else "accuracy")
    if metric == "accuracy" and data.problem_type == MULTI_LABEL:
        raise FinetuneConfigError("metric='accuracy' needs single-label data; use metric='mAP' (or 'auto').")
    accelerator.print(
        f"data: {data.summaries['train']['num_clips']} training / {data.summaries['validation']['num_clips']} validation "
        f"clips, {num_labels} labels, {data.problem_type}, loss {loss_kind}, metric {metric}"
    )

    # 2. Model -------------------------------------------------------------------------------------------------
    model = build_model(config, data, say=accelerator.print)
    num_layers = model.config.num_hidden_layers
    if config.lora:
        model = add_lora(model, LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                             target_modules=list(config.lora_target_modules),
                                             modules_to_save=list(config.lora_modules_to_save)), verbose=False)  # fmt: skip
    elif config.linear_probe:
        freeze_encoder(model)
    accelerator.print(describe_trainable(model, config.mode.replace("_", " ")))
    trainable, total = count_parameters(model)

    # 3. Optimiser ---------------------------------------------------------------------------------------------
    layer_decay = config.effective_layer_decay()
    learning_rate = config.effective_learning_rate()
    groups = build_param_groups(model, learning_rate=learning_rate, weight_decay=config.weight_decay,
                                layer_decay=layer_decay, num_layers=num_layers, decay_stem=config.layer_decay_stem,
                                lora_plus_ratio=config.lora_plus_ratio)  # fmt: skip
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
    )  # fmt: skip
    min_ratio = config.min_learning_rate / learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                              min_ratio=min_ratio),
    )  # fmt: skip

    # 4. Loaders -----------------------------------------------------------------------------------------------
    clip_samples = clip_samples_for(feature_extractor)
    dataset_kwargs = dict(clip_samples=clip_samples, label2id=data.label2id, problem_type=data.problem_type,
                          seed=config.seed, sampling_rate=feature_extractor.sampling_rate)  # fmt: skip
    train_set = AudioClipDataset(data.train, train=True, **dataset_kwargs)
    validation_set = AudioClipDataset(data.validation, train=False, **dataset_kwargs)
    sampler_generator = torch.Generator().manual_seed(config.seed)
    if config.balanced_sampling:
        sampler = torch.utils.data.WeightedRandomSampler(
            balanced_sample_weights(_tag_lists(data.train)), num_samples=config.samples_per_epoch or len(train_set),
            replacement=True, generator=sampler_generator,
        )  # fmt: skip
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=sampler_generator)
    loader_kwargs = dict(collate_fn=collate_skip_bad, num_workers=config.num_workers,
                         persistent_workers=config.num_workers > 0)  # fmt: skip
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, sampler=sampler, drop_last=len(sampler) >= config.batch_size,
        **loader_kwargs,
    )  # fmt: skip
    validation_loader = torch.utils.data.DataLoader(
        validation_set, batch_size=config.eval_batch_size or config.batch_size, shuffle=False, **loader_kwargs
    )
    model, optimizer, train_loader, validation_loader = accelerator.prepare(
        model, optimizer, train_loader, validation_loader
    )
    # The scheduler is stepped by hand once per optimiser update (not per process, as a prepared one would be).
    augmenter = Augmenter(AugmentationConfig(**config.augmentation_kwargs()), seed=config.seed + accelerator.process_index)
    validator = Validator(metric, data.problem_type, num_labels, config.padding)
    if config.report_to:
        accelerator.init_trackers("finetune", config={k: v for k, v in dataclasses.asdict(config).items()
                                                      if isinstance(v, (int, float, str, bool))})  # fmt: skip

    # 5. Loop --------------------------------------------------------------------------------------------------
    best_dir = output_dir / BEST_CHECKPOINT_DIR
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"step": None, metric: None}
    step, epoch, running_loss, running_count = 0, 0, 0.0, 0
    trainable_parameters = [p for p in model.parameters() if p.requires_grad]
    set_train_mode(model, accelerator, config.linear_probe)
    accelerator.print(f"training {config.max_steps} steps, batch {config.batch_size} x {config.gradient_accumulation_steps} "
                      f"accumulation x {accelerator.num_processes} process(es), layer decay {layer_decay}"
                      + (", activation checkpointing" if config.activation_checkpointing else ""))  # fmt: skip
    while step < config.max_steps:
        train_set.set_epoch(epoch)
        steps_before = step
        for batch in train_loader:
            if batch is None:  # every clip of the batch was unreadable
                continue
            waveforms = augmenter.waveforms(batch["waveform"], batch["length"])
            features, mask = featurize(feature_extractor, waveforms, batch["length"], accelerator.device,
                                       config.padding)
            targets = make_targets(batch["labels"], num_labels, data.problem_type, config.label_smoothing)
            features, targets, mask = augmenter.features(features, targets.to(features.device), mask)
            with accelerator.accumulate(model):
                logits = model(input_values=features, attention_mask=mask).logits
                loss = compute_loss(logits, targets, loss_kind)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable_parameters, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += float(loss.detach())
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if step % config.logging_steps == 0 or step == config.max_steps:
                lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]  # the base rate
                accelerator.print(f"step {step}/{config.max_steps}  loss {running_loss / running_count:.4f}  "
                                  f"lr {lr:.3g}  ({time.time() - started:.0f} s)")  # fmt: skip
                accelerator.log({"train/loss": running_loss / running_count, "train/lr": lr}, step=step)
                running_loss, running_count = 0.0, 0
            if step % config.eval_steps == 0 or step == config.max_steps:
                scores = validator(model, validation_loader, feature_extractor, accelerator)
                set_train_mode(model, accelerator, config.linear_probe)
                value = scores[metric]
                improved = not math.isnan(value) and (best[metric] is None or value > best[metric])
                history.append({"step": step, "epoch": epoch, **scores, "best": improved})
                accelerator.print(f"step {step}: validation {metric} {value:.4f}" + ("  (best so far)" if improved else ""))
                accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=step)
                if improved:
                    best = {"step": step, metric: value}
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        save_checkpoint(accelerator.unwrap_model(model), feature_extractor, best_dir, config.lora)
            if step >= config.max_steps:
                break
        if step == steps_before:
            raise CorpusError(
                f"A whole pass over the {len(train_set)} training clips gave no usable batch ({train_set.num_skipped} "
                "clips could not be decoded); check the audio files (check_audio / --check-audio lists them)."
            )
        epoch += 1
    skipped = train_set.num_skipped + validation_set.num_skipped
    accelerator.wait_for_everyone()
    if config.report_to:
        accelerator.end_training()

    # 6. Export ------------------------------------------------------------------------------------------------
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        if best["step"] is None:  # the metric was never defined (e.g. no positive validation tag): keep the last model
            logger.warning("Validation %s was never defined; exporting the last model.", metric)
            save_checkpoint(accelerator.unwrap_model(model), feature_extractor, best_dir, config.lora)
        for path in sorted(best_dir.iterdir()):
            os.replace(path, output_dir / path.name)
        shutil.rmtree(best_dir, ignore_errors=True)
        summary = {
            "format": "cat-hf-finetune/1",
            "mode": config.mode,
            "base_model": config.model,
            "preset": None if config.model else config.preset,
            "problem_type": data.problem_type,
            "num_labels": num_labels,
            "labels": [data.id2label[i] for i in range(num_labels)],
            "loss": loss_kind,
            "metric": metric,
            "best_step": best["step"],
            "best_metric": best[metric],
            "steps": step,
            # passes over the training clips, as the pretraining summary counts them (not the loader restarts)
            "epochs": round(step * config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
                            / len(data.train), 3),
            "train_runtime_s": round(time.time() - started, 1),
            "hardware": describe_hardware(accelerator),
            "layer_decay": layer_decay,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_share": trainable / total,
            "input_frames": feature_extractor.max_length,
            "skipped_clips": skipped,
            "data": data.summaries,
            "history": history,
            "config": dataclasses.asdict(config),
            "versions": _versions(),
        }
        atomic_write_json(output_dir / SUMMARY_FILE, summary)

        # Final scores on whole clips (sliding windows), with the exported files: a real round trip.
        from .evaluation import evaluate_model

        evaluation_set, split_name = (data.test, "test") if data.test is not None else (data.validation, "validation")
        dataset_name = (config.test_data if data.test is not None else config.validation_data) or config.data
        if config.lora:
            evaluated = load_lora_model(output_dir)
            extractor = CATFeatureExtractor.from_pretrained(output_dir)
        else:
            evaluated, extractor = str(output_dir), None
        eval_results = evaluate_model(
            evaluated, evaluation_set, feature_extractor=extractor, output_dir=output_dir, split=split_name,
            batch_size=config.eval_batch_size or config.batch_size, dataset_name=str(dataset_name),
        )  # fmt: skip
        if config.baseline:
            baseline = fit_baseline(data, feature_extractor, config.seed)
            summary["baseline"] = baseline
            atomic_write_json(output_dir / SUMMARY_FILE, summary)
            accelerator.print(f"log-mel statistics baseline on the same split ({baseline['seconds']} s): "
                              f"{baseline['metric']} {baseline['score']:.4f}")
        result = {**summary, "output_dir": str(output_dir), "eval_results": eval_results["metrics"]}
        if config.merge:
            result["merged_dir"] = str(merge_lora(output_dir, output_dir / MERGED_DIR))
        where = (f"adapter in {output_dir}, merged model (for pipeline) in {result['merged_dir']}" if config.merge
                 else f"model in {output_dir}")
        accelerator.print(f"best validation {metric} {best[metric]} at step {best['step']}; final {split_name} "
                          f"{eval_results['metrics']}; {where}")  # fmt: skip
    accelerator.wait_for_everyone()
    return result


# ================================================================================================================
# Command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags override the recipe; a flag left out keeps the recipe's (or the default) value."""
    S = argparse.SUPPRESS
    parser.add_argument("--config", default=None, metavar="RECIPE",
                        help="recipe YAML file or packaged name (tiny, as20k, as2m, esc50, spcv2)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=S, help="training corpus: Hub dataset, audiofolder, path,tags CSV/JSONL, saved dataset")
    group.add_argument("--train-split", default=S, help="split of --data to train on (default train)")
    group.add_argument("--validation-data", default=S, help="separate validation corpus")
    group.add_argument("--validation-split", default=S, help="split of --data (or --validation-data) to validate on")
    group.add_argument("--validation-size", type=_fraction_or_count, default=S,
                       help="fraction or number of training clips held out for validation (default 0.1)")
    group.add_argument("--validation-group-by", default=S, metavar="COLUMN|folder:K",
                       help="hold out whole groups (a column such as speaker, or the K-th folder above each file) so "
                            "that validation, which picks the best checkpoint, has unseen speakers or sources")
    group.add_argument("--test-data", default=S, help="optional test corpus scored into eval_results.json")
    group.add_argument("--test-split", default=S, help="split of --data (or --test-data) used as test set")
    group.add_argument("--audio-column", default=S)
    group.add_argument("--label-column", default=S)
    group.add_argument("--tags-separator", default=S, help="separator of tags in a CSV tags column (default ',')")
    group.add_argument("--labels", type=_comma_list, default=S, help="fixed comma-separated label list (class order)")
    group.add_argument("--problem-type", choices=PROBLEM_TYPES, default=S,
                       help="auto: multi-label iff some clip has more than one tag")
    group.add_argument("--check-audio", action="store_true", default=S, help="decode every file before training and list the unreadable ones")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=S, help="pretrained CAT folder or Hub id (omit to train --preset from scratch)")
    group.add_argument("--preset", default=S, help="architecture for from-scratch training (cat-tiny ... cat-large)")
    group.add_argument("--feature-preset", choices=sorted(FEATURE_PRESETS), default=S,
                       help="feature statistics and length of a CAT recipe")
    group.add_argument("--max-length", type=int, default=S, help="input frames (multiple of 16)")
    group.add_argument("--padding", choices=PADDINGS, default=S,
                       help="longest (default): batches padded to their longest clip with an attention mask; "
                            "max_length: every clip padded to --max-length, the paper recipes' way")
    group.add_argument("--drop-path-rate", type=float, default=S)
    group = parser.add_argument_group("optimisation")
    for flag, kind in (("--max-steps", int), ("--warmup-steps", int), ("--learning-rate", float),
                       ("--min-learning-rate", float), ("--lora-learning-rate", float), ("--weight-decay", float), ("--adam-beta1", float),
                       ("--adam-beta2", float), ("--adam-epsilon", float), ("--layer-decay", float),
                       ("--batch-size", int), ("--gradient-accumulation-steps", int), ("--max-grad-norm", float),
                       ("--label-smoothing", float), ("--mixup-alpha", float), ("--mixup-prob", float),
                       ("--freq-mask-ratio", float), ("--time-mask-ratio", float), ("--samples-per-epoch", int),
                       ("--eval-steps", int), ("--eval-batch-size", int), ("--seed", int), ("--num-workers", int),
                       ("--logging-steps", int), ("--lora-r", int), ("--lora-alpha", int), ("--lora-dropout", float),
                       ("--lora-plus-ratio", float), ("--threads", int)):  # fmt: skip
        group.add_argument(flag, type=kind, default=S)
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=S)
    group.add_argument("--loss", choices=LOSSES, default=S, help="auto: ce for single-label, bce for multi-label")
    group.add_argument("--metric", choices=METRICS, default=S, help="best-checkpoint metric (auto: accuracy / mAP)")
    for name, help_text in (("layer-decay-stem", "also decay the stem / CLS token (BEiT rule)"),
                            ("roll", "random circular time shift of the waveform"),
                            ("gain", "random waveform gain Beta(10,10)+0.5"),
                            ("noise", "feature noise + frame shift (Speech Commands recipe)"),
                            ("balanced-sampling", "draw clips with inverse-label-frequency weights"),
                            ("baseline", "also fit a log-mel-statistics logistic regression on the same split "
                                         "(default on)"),
                            ("activation-checkpointing", "recompute block activations in the backward pass (less memory)"),
                            ("linear-probe", "freeze the encoder; train fc_norm + classifier only"),
                            ("lora", "train LoRA adapters (see cat_hf.lora) + the head"),
                            ("merge", "with --lora: also write <output-dir>/merged, a plain model folder"),
                            ("overwrite-output-dir", "write into an existing non-empty output folder")):  # fmt: skip
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=S, help=help_text)
    group.add_argument("--lora-target-modules", type=_comma_list, default=S, help="comma list (default q_proj,v_proj)")
    group.add_argument("--lora-modules-to-save", type=_comma_list, default=S,
                       help="modules trained in full and saved with the adapter (default fc_norm,classifier; "
                            "add norm1,norm2 to also tune the blocks' LayerNorms)")  # fmt: skip
    group.add_argument("--output-dir", default=S, help="where the exported model goes (default ./cat-finetuned)")
    group.add_argument("--report-to", type=_comma_list, default=S, help="trackers, e.g. tensorboard")
    group = parser.add_argument_group("merge an existing adapter (no training)")
    group.add_argument("--merge-adapter", default=None, metavar="ADAPTER_DIR",
                       help="fold the LoRA adapter in ADAPTER_DIR into its base model, write --output-dir, and exit")
    group.add_argument("--base-model", default=None, help="with --merge-adapter: base model to use instead of the "
                                                          "one recorded in the adapter")  # fmt: skip


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fraction_or_count(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    overrides = {name: getattr(args, name) for name in FinetuneConfig.field_names() if hasattr(args, name)}
    if args.config:
        return FinetuneConfig.from_yaml(args.config, **overrides)
    return FinetuneConfig.from_dict(overrides, origin="the command line")


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.merge_adapter:
            from .lora import merge_lora

            output_dir = getattr(args, "output_dir", None) or f"{Path(args.merge_adapter).resolve().name}-merged"
            print(f"merged model written to {merge_lora(args.merge_adapter, output_dir, args.base_model)}")
            return 0
        result = finetune(config_from_args(args))
    except (CorpusError, FinetuneConfigError) as err:
        print(f"cat-hf finetune: error: {err}", file=sys.stderr)
        return 2
    if result:
        print(json.dumps({k: result[k] for k in ("output_dir", "best_step", "best_metric", "eval_results")
                          if k in result}, indent=2, default=str))  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cat_hf.finetune", description="Finetune CAT (fully, linear probe, or LoRA).")
    add_cli_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FinetuneConfig",
    "FinetuneConfigError",
    "PreparedData",
    "add_cli_arguments",
    "balanced_sample_weights",
    "build_feature_extractor",
    "build_model",
    "build_param_groups",
    "check_empty_class_folders",
    "check_known_labels",
    "compute_loss",
    "featurize",
    "finetune",
    "layer_lr_scale",
    "make_targets",
    "prepare_data",
    "resolve_recipe",
    "run_cli",
    "warmup_cosine",
]
