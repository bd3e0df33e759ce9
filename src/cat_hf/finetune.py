"""Finetune CAT on labelled audio: full finetuning, a frozen-encoder linear probe, or LoRA.

Entry points: `cat-hf finetune --config RECIPE [--flag value ...] [--set key=value ...]`, `accelerate launch -m
cat_hf.finetune ...`, and `finetune(config) -> dict` from Python. A recipe is a YAML file of `FinetuneConfig` fields
(the packaged ones: `tiny`, `as20k`, `as2m`, `esc50`, `spcv2`, i.e. `cat_hf/recipes/finetune_<name>.yaml`);
command-line flags and `--set` override it (`cat_hf.training_config`).

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
3. **Optimiser** (`cat_hf.optimization`) - AdamW, betas (0.9, 0.95), weight decay 0.05 except for biases and 1-D
   parameters (norms); layer-wise learning-rate decay (`layer_decay`, default 0.65 for full finetuning and 1.0 for
   LoRA and the linear probe; `layer_decay_stem` for the BEiT rule); linear warm-up from `min_learning_rate`, then
   cosine down to it (fairseq's cosine schedule).
4. **Loop** - waveform augmentations (roll, gain), Kaldi features on the training device, targets (one-hot with
   label smoothing, or multi-hot), feature augmentations (noise, mixup, SpecAugment) from `cat_hf.augment`, the
   loss (soft-target cross-entropy or BCE), Accelerate for devices / mixed precision / gradient accumulation.
   Every `eval_steps` the validation set is scored (accuracy or mAP via `cat_hf.metrics`) and the best model is
   saved to `<output_dir>/checkpoint-best`. The whole training state is checkpointed (`cat_hf.checkpoints`) every
   `save_every` steps, at the end of a session and on SIGTERM / SIGINT; `--resume` continues exactly (the same
   weights, validation history and best checkpoint as an uninterrupted run).
5. **Export** - the best checkpoint becomes `output_dir`: model (or LoRA adapter) + feature extractor +
   `training_summary.json`, then `cat_hf.evaluation.evaluate_model` writes `eval_results.json` (whole clips with
   sliding windows). A full-finetuning folder is served by `pipeline("audio-classification", model=output_dir)`;
   multi-label models carry `problem_type="multi_label_classification"`, which makes the pipeline apply sigmoid.
   With `--lora --merge`, `<output_dir>/merged` is the pipeline-ready folder.
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
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .audio import DEFAULT_SAMPLING_RATE, is_audio_file
from .augment import AugmentationConfig, Augmenter
from .checkpoints import (
    LOGS_DIR,
    SUMMARY_FILE,
    CheckpointWriteError,
    Checkpoints,
    TrainState,
    check_resume_settings,
    find_resume_checkpoint,
)
from .data import (
    LABELS_COLUMN,
    MULTI_LABEL,
    SINGLE_LABEL,
    SPLIT_FOLDER_NAMES,
    AudioClipDataset,
    CorpusError,
    _row_ids,
    build_label_maps,
    collate_skip_bad,
    load_audio_corpus,
    split_corpus,
    validate_corpus,
)
from .feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor
from .files import atomic_write_json, write_folder_atomically
from .lora import (
    DEFAULT_MODULES_TO_SAVE,
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    add_lora,
    count_parameters,
    describe_trainable,
    load_lora_model,
    merge_lora,
    save_lora_adapter,
)
from .optimization import adamw, build_param_groups, warmup_cosine, warmup_cosine_schedule  # noqa: F401 (tests)
from . import training
from .training_config import ConfigError, RecipeConfig, add_config_arguments, parse_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "finetune_config.yaml"
BEST_CHECKPOINT_DIR = "checkpoint-best"
MERGED_DIR = "merged"
PROBLEM_TYPES = ("auto", SINGLE_LABEL, MULTI_LABEL)
TASKS = ("clips", "events")
LOSSES = ("auto", "ce", "bce")
METRICS = ("auto", "accuracy", "mAP")
PADDINGS = ("longest", "max_length")
#: `validation_group_by: folder:K` groups clips by the K-th folder above the file.
FOLDER_GROUP_PREFIX = "folder:"
#: Layer decay when `layer_decay` is not set: the paper's value for full finetuning, none for LoRA / linear probe.
DEFAULT_LAYER_DECAY = 0.65
#: What an evaluation writes beside a model (`cat_hf.evaluation`): it describes that model, so a run that replaces the
#: model with --overwrite-output-dir removes it rather than leave results of the old model beside the new one.
EVALUATION_FILE_PATTERNS = ("eval_results.json", "per_class_scores*.csv", "predictions*.csv", "confusion_matrix*.png")


class FinetuneConfigError(ConfigError):
    """A finetuning setting is invalid; the message names the setting and the fix."""


# ================================================================================================================
# Configuration


@dataclass
class FinetuneConfig(RecipeConfig):
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
    Checkpoints: save_every (the whole training state every N steps; 0: only at the end of a session and on a
        signal), keep_checkpoints; resume (None, "latest", "auto" or a checkpoint folder; the settings that shape
        the state must be those of the run that wrote it, except those in resume_allow_changed); stop_at_step (end
        this session there with a checkpoint, although the schedule runs to max_steps).
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
    task: str = "clips"
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
    # checkpoints
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_allow_changed: list[str] = field(default_factory=list)
    stop_at_step: int | None = None

    recipe_prefix = "finetune_"
    setting_noun = "finetuning setting"
    error = FinetuneConfigError
    config_file = CONFIG_FILE
    resume_free_settings = frozenset({
        "output_dir", "overwrite_output_dir", "resume", "resume_allow_changed", "stop_at_step", "save_every",
        "keep_checkpoints", "num_workers", "threads", "logging_steps", "report_to", "activation_checkpointing",
        "check_audio", "baseline", "merge", "test_data", "test_split", "eval_batch_size",
    })
    path_settings = frozenset({"data", "validation_data", "test_data", "model"})


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
        if self.task not in TASKS:
            fail(f"task={self.task!r} is not one of {TASKS}: 'clips' learns clip labels, 'events' learns sound events "
                 "from strong labels (path,onset,offset,label CSVs).")
        if self.problem_type not in PROBLEM_TYPES:
            fail(f"problem_type={self.problem_type!r} is not one of {PROBLEM_TYPES}.")
        if self.loss not in LOSSES:
            fail(f"loss={self.loss!r} is not one of {LOSSES}.")
        if self.metric not in METRICS:
            fail(f"metric={self.metric!r} is not one of {METRICS}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            fail(f"mixed_precision={self.mixed_precision!r} is not one of ('no', 'fp16', 'bf16').")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_steps", "logging_steps",
                     "keep_checkpoints"):
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
        if self.save_every < 0 or (self.stop_at_step is not None and self.stop_at_step < 1):
            fail(f"save_every must be >= 0 and stop_at_step >= 1 (or null), got {self.save_every} and "
                 f"{self.stop_at_step}.")
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



#: A YAML path, or the name of a packaged recipe (`esc50` -> recipes/finetune_esc50.yaml).
resolve_recipe = FinetuneConfig.recipe_path


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

def task_loss_and_metric(config: FinetuneConfig, data: PreparedData) -> tuple[str, str]:
    """The loss ("ce" / "bce") and the best-checkpoint metric ("accuracy" / "mAP") of `auto` for the data's task."""
    loss = config.loss if config.loss != "auto" else ("bce" if data.problem_type == MULTI_LABEL else "ce")
    if loss == "ce" and data.problem_type == MULTI_LABEL:
        raise FinetuneConfigError("loss='ce' needs single-label data; multi-label tagging uses loss='bce' (or 'auto').")
    metric = config.metric if config.metric != "auto" else ("mAP" if data.problem_type == MULTI_LABEL else "accuracy")
    if metric == "accuracy" and data.problem_type == MULTI_LABEL:
        raise FinetuneConfigError("metric='accuracy' needs single-label data; use metric='mAP' (or 'auto').")
    return loss, metric


def adapt_model(config: FinetuneConfig, model: Any, accelerator: Any) -> Any:
    """LoRA adapters (`cat_hf.lora`) or a frozen encoder (linear probe) when asked; says what trains."""
    if config.lora:
        model = add_lora(model, LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                             target_modules=list(config.lora_target_modules),
                                             modules_to_save=list(config.lora_modules_to_save)), verbose=False)  # fmt: skip
    elif config.linear_probe:
        freeze_encoder(model)
    accelerator.print(describe_trainable(model, config.mode.replace("_", " ")))
    return model


def build_loaders(config: FinetuneConfig, data: PreparedData, feature_extractor: CATFeatureExtractor):
    """(training clips, training loader, its EpochSampler, validation clips, validation loader). Training crops
    `max_length` frames' worth of samples at random (seeded by seed, epoch and clip); validation takes the start."""
    clip_samples = training.samples_for_frames(feature_extractor.max_length, feature_extractor.sampling_rate,
                                      feature_extractor.frame_length_ms, feature_extractor.frame_shift_ms)
    dataset_kwargs = dict(clip_samples=clip_samples, label2id=data.label2id, problem_type=data.problem_type,
                          seed=config.seed, sampling_rate=feature_extractor.sampling_rate)  # fmt: skip
    train_set = AudioClipDataset(data.train, train=True, **dataset_kwargs)
    validation_set = AudioClipDataset(data.validation, train=False, **dataset_kwargs)
    weights = balanced_sample_weights(_tag_lists(data.train)) if config.balanced_sampling else None
    sampler = training.EpochSampler(len(train_set), config.seed, weights,
                                    config.samples_per_epoch if weights is not None else None)
    loader_kwargs = dict(collate_fn=collate_skip_bad, num_workers=config.num_workers,
                         persistent_workers=config.num_workers > 0)  # fmt: skip
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, sampler=sampler, drop_last=len(sampler) >= config.batch_size,
        **loader_kwargs,
    )  # fmt: skip
    validation_loader = torch.utils.data.DataLoader(
        validation_set, batch_size=config.eval_batch_size or config.batch_size, shuffle=False, **loader_kwargs
    )
    return train_set, train_loader, sampler, validation_set, validation_loader


# ================================================================================================================
# 3. Training step pieces and validation


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
            features, mask = training.featurize(feature_extractor, batch["waveform"], batch["length"],
                                                accelerator.device, self.padding)
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


def save_checkpoint(model, feature_extractor: CATFeatureExtractor, folder: Path, lora: bool) -> None:
    """The model (or the LoRA adapter alone) + feature extractor, every file written atomically."""
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


# ================================================================================================================
# 4. The run


@dataclass
class FinetuneState(TrainState):
    """Where a finetuning run is (saved per process with every checkpoint, restored by --resume)."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one record per validation
    best_step: int | None = None
    best_metric: float | None = None
    running_loss: float = 0.0  # summed micro-batch losses since the last log line
    running_count: int = 0


@dataclass
class FinetuneRun:
    """What the loop works with, built by `start_run`."""

    config: FinetuneConfig
    accelerator: Any
    output_dir: Path
    data: PreparedData
    feature_extractor: CATFeatureExtractor
    loss_kind: str
    metric: str
    model: Any  # as prepared by Accelerate
    optimizer: Any
    scheduler: Any
    batches: Iterator[dict]
    train_set: AudioClipDataset
    validation_set: AudioClipDataset
    validation_loader: Any
    augmentation: AugmentationConfig
    validator: Validator
    checkpoints: Checkpoints
    state: FinetuneState
    trainable_parameters: tuple[int, int]  # (trainable, total)


def finetune(config: FinetuneConfig | Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) a finetuning job end to end (see the module docstring). A finished run returns its training
    summary, with the final evaluation under "eval_results" and the written folders under "output_dir" /
    "merged_dir"; a run stopped by a signal or at stop_at_step returns where its state is ("checkpoint") and
    why it stopped ("interrupted": the signal's name, or None). Other processes than the main one return {}."""
    config = FinetuneConfig.from_any(config)
    config.validate()
    if config.task == "events":
        from .sed import finetune_events

        return finetune_events(config, build_feature_extractor(config), check_run_folder(config)[0])
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir, resume_from = check_run_folder(config)
    accelerator = training.make_accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_dir=output_dir, logging_dir=output_dir / LOGS_DIR, log_with=list(config.report_to) or None,
    )
    try:
        run = start_run(config, accelerator, output_dir, resume_from)
        interrupted, checkpoint = train(run)
        if run.state.step < config.max_steps or interrupted:
            return _unfinished(run, interrupted, checkpoint)
        return export(run)
    finally:
        training.release_accelerator(accelerator)


def start_run(config: FinetuneConfig, accelerator: Any, output_dir: Path, resume_from: Path | None) -> FinetuneRun:
    """Data, model, optimiser, schedule and loaders on the accelerator, restored from `resume_from` (if any)."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    feature_extractor = build_feature_extractor(config)
    data = prepare_data(config, feature_extractor.sampling_rate)
    loss_kind, metric = task_loss_and_metric(config, data)
    accelerator.print(
        f"data: {data.summaries['train']['num_clips']} training / {data.summaries['validation']['num_clips']} "
        f"validation clips, {len(data.label2id)} labels, {data.problem_type}, loss {loss_kind}, metric {metric}"
    )
    classifier = build_model(config, data, say=accelerator.print)
    # longer clips are scored by windows of the training length, in `pipeline` as in `cat-hf evaluate` / `predict`
    classifier.config.window_frames = feature_extractor.max_length
    model = adapt_model(config, classifier, accelerator)
    counts = count_parameters(model)
    groups = build_param_groups(model, learning_rate=config.effective_learning_rate(),
                                weight_decay=config.weight_decay, layer_decay=config.effective_layer_decay(),
                                num_layers=model.config.num_hidden_layers, decay_stem=config.layer_decay_stem,
                                lora_plus_ratio=config.lora_plus_ratio)  # fmt: skip
    optimizer = adamw(groups, learning_rate=config.effective_learning_rate(),
                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                       min_ratio=config.min_learning_rate / config.effective_learning_rate())
    train_set, train_loader, sampler, validation_set, validation_loader = build_loaders(config, data,
                                                                                        feature_extractor)
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler
    )
    checkpoints = Checkpoints(accelerator, output_dir, config.keep_checkpoints)
    checkpoints.remove_stale_temporaries()  # of a save that was killed
    state = FinetuneState()
    if resume_from is not None:
        training.load_checkpoint(accelerator, resume_from)
        state = FinetuneState.load(resume_from, accelerator.process_index)
        accelerator.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch})")
        checkpoints.rewind(state.step)
    if config.report_to:
        accelerator.init_trackers("finetune", config=training.tracker_config(config))
    batches = training.iterate_batches(accelerator, train_loader, sampler, train_set, state, lambda: CorpusError(
        f"A whole pass over the {len(train_set)} training clips gave no usable batch ({train_set.num_skipped} clips "
        "could not be decoded); check the audio files (check_audio / --check-audio lists them)."))
    return FinetuneRun(config, accelerator, output_dir, data, feature_extractor, loss_kind, metric, model, optimizer,
                       scheduler, batches, train_set, validation_set, validation_loader,
                       AugmentationConfig(**config.augmentation_kwargs()),
                       Validator(metric, data.problem_type, len(data.label2id), config.padding), checkpoints, state,
                       counts)


def train(run: FinetuneRun) -> tuple[str | None, Path | None]:
    """Steps until max_steps (or stop_at_step, or a signal), validating every eval_steps and keeping the best model
    in checkpoint-best/, with a checkpoint of the whole training state every save_every steps, at the end of the
    session and when a signal arrives. Returns (the signal that stopped the run or None, the last checkpoint)."""
    config, state, accelerator = run.config, run.state, run.accelerator
    stop_at = min(config.max_steps, config.stop_at_step or config.max_steps)
    accelerator.print(f"training steps {state.step + 1}..{stop_at} of {config.max_steps}, batch {config.batch_size} x "
                      f"{config.gradient_accumulation_steps} accumulation x {accelerator.num_processes} process(es), "
                      f"layer decay {config.effective_layer_decay()}"
                      + (", activation checkpointing" if config.activation_checkpointing else ""))  # fmt: skip
    set_train_mode(run.model, accelerator, config.linear_probe)
    interrupted, checkpoint, started = None, None, time.perf_counter()
    skipped_before = state.skipped_files  # the clip datasets count this session's skips
    with training.StopSignals() as signals:
        while state.step < stop_at and not interrupted:
            step_start = time.perf_counter()
            train_step(run)
            if state.step % config.logging_steps == 0 or state.step == config.max_steps:
                _log_progress(run, time.perf_counter() - started)
            if state.step % config.eval_steps == 0 or state.step == config.max_steps:
                validate(run)
            interrupted = signals.agreed(accelerator)
            state.train_seconds += time.perf_counter() - step_start
            periodic = config.save_every and state.step % config.save_every == 0
            if interrupted or periodic or state.step == stop_at:
                state.skipped_files = skipped_before + run.train_set.num_skipped + run.validation_set.num_skipped
                checkpoint = run.checkpoints.save(state, config)
    return interrupted, checkpoint


def train_step(run: FinetuneRun) -> None:
    """One optimiser update over `gradient_accumulation_steps` micro-batches. Every random draw (augmentations,
    dropout, drop path) comes from seeds of (seed, step, micro-batch, process): a resumed run repeats them."""
    config, state, accelerator = run.config, run.state, run.accelerator
    for micro in range(config.gradient_accumulation_steps):
        batch = next(run.batches)
        seed = training.derive_seed(config.seed, state.step, micro, accelerator.process_index)
        torch.manual_seed(training.derive_seed(seed, 0))  # dropout, drop path
        augmenter = Augmenter(run.augmentation, seed=training.derive_seed(seed, 1))
        waveforms = augmenter.waveforms(batch["waveform"], batch["length"])
        features, mask = training.featurize(run.feature_extractor, waveforms, batch["length"], accelerator.device,
                                            config.padding)
        targets = make_targets(batch["labels"], len(run.data.label2id), run.data.problem_type, config.label_smoothing)
        features, targets, mask = augmenter.features(features, targets.to(features.device), mask)
        with accelerator.accumulate(run.model):
            logits = run.model(input_values=features, attention_mask=mask).logits
            loss = compute_loss(logits, targets, run.loss_kind)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                                config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
        state.running_loss += float(loss.detach())
        state.running_count += 1
    run.scheduler.step()
    state.step += 1


def validate(run: FinetuneRun) -> None:
    """Score the validation set; keep the model in checkpoint-best/ when it is the best so far."""
    config, state, accelerator, metric = run.config, run.state, run.accelerator, run.metric
    scores = run.validator(run.model, run.validation_loader, run.feature_extractor, accelerator)
    set_train_mode(run.model, accelerator, config.linear_probe)
    value = scores[metric]
    improved = not math.isnan(value) and (state.best_metric is None or value > state.best_metric)
    state.history.append({"step": state.step, "epoch": state.epoch, **scores, "best": improved})
    accelerator.print(f"step {state.step}: validation {metric} {value:.4f}" + ("  (best so far)" if improved else ""))
    accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=state.step)
    if improved:
        state.best_step, state.best_metric = state.step, value
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(accelerator.unwrap_model(run.model), run.feature_extractor,
                            run.output_dir / BEST_CHECKPOINT_DIR, config.lora)


def _log_progress(run: FinetuneRun, seconds: float) -> None:
    state, optimizer = run.state, run.optimizer
    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]  # the base rate
    loss = state.running_loss / max(state.running_count, 1)
    run.accelerator.print(f"step {state.step}/{run.config.max_steps}  loss {loss:.4f}  lr {lr:.3g}  ({seconds:.0f} s)")
    run.accelerator.log({"train/loss": loss, "train/lr": lr}, step=state.step)
    state.running_loss, state.running_count = 0.0, 0


def _unfinished(run: FinetuneRun, interrupted: str | None, checkpoint: Path | None) -> dict[str, Any]:
    state, accelerator = run.state, run.accelerator
    how = f"Stopped by {interrupted}" if interrupted else "Session ended (stop_at_step)"
    accelerator.print(f"{how} at step {state.step} of {run.config.max_steps}; the training state is saved in "
                      f"{checkpoint}. Continue with the same command plus --resume (or --resume {checkpoint}).")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    return {"output_dir": str(run.output_dir), "finished": False, "interrupted": interrupted, "steps": state.step,
            "checkpoint": str(checkpoint) if checkpoint else None, "best_step": state.best_step,
            "best_metric": state.best_metric, "history": state.history}


# ================================================================================================================
# 5. Export


def export(run: FinetuneRun) -> dict[str, Any]:
    """The best checkpoint becomes `output_dir`, with `training_summary.json`; then the final evaluation on whole
    clips (a real round trip through the exported files), the log-mel baseline, and the merged LoRA model. The
    main process returns the summary with the results; the others {}."""
    run.accelerator.wait_for_everyone()
    result = _export(run) if run.accelerator.is_main_process else {}
    run.accelerator.wait_for_everyone()
    return result


def _export(run: FinetuneRun) -> dict[str, Any]:
    config, state, accelerator, output_dir = run.config, run.state, run.accelerator, run.output_dir
    best_dir = output_dir / BEST_CHECKPOINT_DIR
    if state.best_step is None:  # the metric was never defined (e.g. no positive validation tag): keep the last model
        logger.warning("Validation %s was never defined; exporting the last model.", run.metric)
        save_checkpoint(accelerator.unwrap_model(run.model), run.feature_extractor, best_dir, config.lora)
    for path in sorted(best_dir.iterdir()):
        os.replace(path, output_dir / path.name)
    shutil.rmtree(best_dir, ignore_errors=True)
    summary = training_summary(run)
    atomic_write_json(output_dir / SUMMARY_FILE, summary)
    eval_results, split_name = final_evaluation(run)
    if config.baseline:
        summary["baseline"] = baseline = fit_baseline(run.data, run.feature_extractor, config.seed)
        atomic_write_json(output_dir / SUMMARY_FILE, summary)
        accelerator.print(f"log-mel statistics baseline on the same split ({baseline['seconds']} s): "
                          f"{baseline['metric']} {baseline['score']:.4f}")
    result = {**summary, "output_dir": str(output_dir), "eval_results": eval_results, "finished": True,
              "interrupted": None}
    if config.merge:
        result["merged_dir"] = str(merge_lora(output_dir, output_dir / MERGED_DIR))
    where = (f"adapter in {output_dir}, merged model (for pipeline) in {result['merged_dir']}" if config.merge
             else f"model in {output_dir}")
    accelerator.print(f"best validation {run.metric} {state.best_metric} at step {state.best_step}; final "
                      f"{split_name} {eval_results}; {where}")  # fmt: skip
    return result


def training_summary(run: FinetuneRun) -> dict[str, Any]:
    """`training_summary.json`: what was trained, how, on what, and how well (the model card reads it)."""
    config, state, data = run.config, run.state, run.data
    num_labels = len(data.label2id)
    trainable, total = run.trainable_parameters
    return {
        "format": "cat-hf-finetune/1",
        "mode": config.mode,
        "base_model": config.model,
        "preset": None if config.model else config.preset,
        "problem_type": data.problem_type,
        "num_labels": num_labels,
        "labels": [data.id2label[i] for i in range(num_labels)],
        "loss": run.loss_kind,
        "metric": run.metric,
        "best_step": state.best_step,
        "best_metric": state.best_metric,
        "steps": state.step,
        # passes over the training clips, as the pretraining summary counts them (not the loader restarts)
        "epochs": round(state.step * config.batch_size * config.gradient_accumulation_steps
                        * run.accelerator.num_processes / len(data.train), 3),
        "train_runtime_s": round(state.train_seconds, 1),
        "hardware": training.describe_hardware(run.accelerator),
        "layer_decay": config.effective_layer_decay(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "input_frames": run.feature_extractor.max_length,
        "skipped_clips": state.skipped_files,
        "data": data.summaries,
        "history": state.history,
        "config": config.to_dict(),
        "versions": training.library_versions(),
    }


def final_evaluation(run: FinetuneRun) -> tuple[dict[str, Any], str]:
    """Scores on whole clips (sliding windows) of the test set (else the validation set), from the exported
    files, written to eval_results.json: (metrics, split name)."""
    from .evaluation import evaluate_model
    config, data, output_dir = run.config, run.data, run.output_dir
    evaluation_set, split_name = (data.test, "test") if data.test is not None else (data.validation, "validation")
    dataset_name = (config.test_data if data.test is not None else config.validation_data) or config.data
    if config.lora:
        evaluated, extractor = load_lora_model(output_dir), CATFeatureExtractor.from_pretrained(output_dir)
    else:
        evaluated, extractor = str(output_dir), None
    results = evaluate_model(
        evaluated, evaluation_set, feature_extractor=extractor, output_dir=output_dir, split=split_name,
        batch_size=config.eval_batch_size or config.batch_size, dataset_name=str(dataset_name),
    )  # fmt: skip
    return results["metrics"], split_name


def check_run_folder(config: FinetuneConfig) -> tuple[Path, Path | None]:
    """(output_dir, the checkpoint to resume or None). A fresh run needs an empty output_dir, or
    overwrite_output_dir (then the evaluation files of the model being replaced are removed); --resume needs a
    complete checkpoint written with the same state-shaping settings."""
    output_dir = Path(config.output_dir).expanduser()
    checkpoint = find_resume_checkpoint(config.resume, Checkpoints(None, output_dir, config.keep_checkpoints))
    check_resume_settings(checkpoint, config)
    if checkpoint is None and output_dir.exists() and any(output_dir.iterdir()):
        if not config.overwrite_output_dir:
            raise FinetuneConfigError(
                f"output_dir '{output_dir}' exists and is not empty; choose another output_dir or pass "
                "overwrite_output_dir (--overwrite-output-dir) to write into it."
            )
        for pattern in EVALUATION_FILE_PATTERNS:
            for stale in output_dir.glob(pattern):
                logger.warning("--overwrite-output-dir: removing %s, an evaluation of the model being replaced.", stale)
                stale.unlink()
    return output_dir, checkpoint


# ================================================================================================================
# 6. Command line


#: The flags beside --config, --resume, --allow-changed and --set, by group: field -> help.
CLI_FLAGS = {
    "data": {
        "data": "training corpus: Hub dataset, audiofolder, path,tags CSV/JSONL, saved dataset",
        "train_split": "split of --data to train on (default train)",
        "validation_data": "separate validation corpus",
        "validation_split": "split of --data (or --validation-data) to validate on",
        "validation_size": "fraction or number of training clips held out for validation (default 0.1)",
        "validation_group_by": "hold out whole groups (a column such as speaker, or folder:K, the K-th folder above "
                               "each file) so that validation, which picks the best checkpoint, has unseen speakers "
                               "or sources",
        "test_data": "optional test corpus scored into eval_results.json",
        "test_split": "split of --data (or --test-data) used as test set",
        "audio_column": None,
        "label_column": None,
        "tags_separator": "separator of tags in a CSV tags column (default ',')",
        "labels": "fixed comma-separated label list (class order)",
        "problem_type": "auto: multi-label iff some clip has more than one tag",
        "task": "clips (default): clip labels; events: sound event detection from path,onset,offset,label CSVs "
                "(cat_hf.sed: frame-level head, segment/event F1, test_events.csv)",
        "check_audio": "decode every file before training and list the unreadable ones",
    },
    "model": {
        "model": "pretrained CAT folder or Hub id (omit to train --preset from scratch)",
        "preset": "architecture for from-scratch training (cat-tiny ... cat-large)",
        "feature_preset": "feature statistics and length of a CAT recipe",
        "max_length": "input frames (multiple of 16)",
        "padding": "longest (default): batches padded to their longest clip with an attention mask; max_length: every "
                   "clip padded to --max-length, the paper recipes' way",
        "drop_path_rate": None,
    },
    "optimisation": {
        **dict.fromkeys(("max_steps", "warmup_steps", "learning_rate", "min_learning_rate", "lora_learning_rate",
                         "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "layer_decay", "batch_size",
                         "gradient_accumulation_steps", "max_grad_norm", "label_smoothing", "mixup_alpha",
                         "mixup_prob", "freq_mask_ratio", "time_mask_ratio", "samples_per_epoch", "eval_steps",
                         "eval_batch_size", "seed", "num_workers", "logging_steps", "lora_r", "lora_alpha",
                         "lora_dropout", "lora_plus_ratio")),
        "threads": "torch CPU threads (one per process is fastest on a shared machine)",
        "mixed_precision": None,
        "loss": "auto: ce for single-label, bce for multi-label",
        "metric": "best-checkpoint metric (auto: accuracy / mAP)",
        "layer_decay_stem": "also decay the stem / CLS token (BEiT rule)",
        "roll": "random circular time shift of the waveform",
        "gain": "random waveform gain Beta(10,10)+0.5",
        "noise": "feature noise + frame shift (Speech Commands recipe)",
        "balanced_sampling": "draw clips with inverse-label-frequency weights",
        "baseline": "also fit a log-mel-statistics logistic regression on the same split (default on)",
        "activation_checkpointing": "recompute block activations in the backward pass (less memory)",
        "linear_probe": "freeze the encoder; train fc_norm + classifier only",
        "lora": "train LoRA adapters (see cat_hf.lora) + the head",
        "merge": "with --lora: also write <output-dir>/merged, a plain model folder",
        "lora_target_modules": "comma list (default q_proj,v_proj)",
        "lora_modules_to_save": "modules trained in full and saved with the adapter (default fc_norm,classifier; add "
                                "norm1,norm2 to also tune the blocks' LayerNorms)",
    },
    "run": {
        "output_dir": "where the exported model goes (default ./cat-finetuned)",
        "overwrite_output_dir": "write into an existing non-empty output folder",
        "report_to": "trackers, e.g. tensorboard",
        "save_every": "checkpoint the training state every N steps (0: only at the end and on a signal)",
        "keep_checkpoints": "how many checkpoints to keep",
        "stop_at_step": "end this session at this step with a checkpoint (continue with --resume)",
    },
}
CLI_CHOICES = {"problem_type": PROBLEM_TYPES, "feature_preset": sorted(FEATURE_PRESETS), "padding": PADDINGS,
               "mixed_precision": ("no", "fp16", "bf16"), "loss": LOSSES, "metric": METRICS}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags override the recipe; a flag left out keeps the recipe's (or the default) value."""
    add_config_arguments(parser, FinetuneConfig, CLI_FLAGS, choices=CLI_CHOICES)
    group = parser.add_argument_group("merge an existing adapter (no training)")
    group.add_argument("--merge-adapter", default=None, metavar="ADAPTER_DIR",
                       help="fold the LoRA adapter in ADAPTER_DIR into its base model, write --output-dir, and exit")
    group.add_argument("--base-model", default=None, help="with --merge-adapter: base model to use instead of the "
                                                          "one recorded in the adapter")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return parse_config(FinetuneConfig, args)


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.merge_adapter:
            output_dir = getattr(args, "output_dir", None) or f"{Path(args.merge_adapter).resolve().name}-merged"
            print(f"merged model written to {merge_lora(args.merge_adapter, output_dir, args.base_model)}")
            return 0
        result = finetune(config_from_args(args))
    except CheckpointWriteError as err:  # disk full, ...: the message says what is intact
        print(f"cat-hf finetune: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # bad settings or corpus (CorpusError, FinetuneConfigError): the message names the fix
        print(f"cat-hf finetune: error: {err}", file=sys.stderr)
        return 2
    if result:
        keys = ("output_dir", "best_step", "best_metric", "eval_results", "checkpoint", "interrupted")
        print(json.dumps({k: result[k] for k in keys if result.get(k) is not None}, indent=2, default=str))
    return training.exit_code(result.get("interrupted"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cat_hf.finetune", description="Finetune CAT (fully, linear probe, or LoRA).")
    add_cli_arguments(parser)
    return run_cli(parser.parse_args(argv))


__all__ = [
    "FinetuneConfig",
    "FinetuneConfigError",
    "FinetuneRun",
    "FinetuneState",
    "PreparedData",
    "add_cli_arguments",
    "balanced_sample_weights",
    "build_feature_extractor",
    "build_loaders",
    "build_model",
    "build_param_groups",
    "check_empty_class_folders",
    "check_known_labels",
    "check_run_folder",
    "compute_loss",
    "config_from_args",
    "export",
    "finetune",
    "make_targets",
    "prepare_data",
    "resolve_recipe",
    "run_cli",
    "start_run",
    "train",
    "train_step",
    "validate",
    "warmup_cosine",
]


if __name__ == "__main__":
    sys.exit(main())
