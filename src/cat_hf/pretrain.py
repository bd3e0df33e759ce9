"""Pretraining CAT: bootstrap EMA teacher + Representation Regularization, in plain PyTorch + Accelerate.

The file reads top to bottom in the order a run happens:

1. `PretrainConfig`: the whole recipe in one dataclass. Recipes are YAML files (`recipes/pretrain_base.yaml`, the
   authors' AudioSet recipe; `recipes/pretrain_tiny.yaml`, a few CPU minutes), changed with `--set key=value`.
2. Data: any corpus `load_audio_corpus` reads (Hub name, audiofolder, folder of files, CSV, streaming), decoded by
   us (soundfile + soxr), randomly cropped / zero-padded so that the fbank has exactly `target_length` frames.
   An unreadable or empty clip is replaced by the next readable one (batches stay full, which data-parallel
   training needs) and counted.
3. Model (`CATForPreTraining`), AdamW without decay on norms / biases / CLS / positions, cosine schedule with
   linear warm-up.
4. The loop: features computed on the accelerator device, masks drawn from a generator seeded by (seed, step,
   micro-batch, process) so a run is reproducible and resumable, forward, backward, gradient clipping, optimiser
   step, EMA teacher update; metrics to tqdm, TensorBoard and `metrics.jsonl`.
5. Checkpoints: `accelerator.save_state` into `checkpoints/step-XXXXXXX` (written to a temporary folder, then
   renamed; the last K kept), also when SIGTERM / SIGINT arrives. `--resume` continues exactly: the loss sequence
   after resuming equals the one of an uninterrupted run.
6. Export: the student as a folder `AutoModel.from_pretrained` loads (+ feature extractor + `training_summary.json`),
   and the full pretraining model (teacher, decoder, RR projector) under `pretraining/`.
7. Command line: `cat-hf pretrain --config tiny --data DIR --output-dir OUT`, or
   `accelerate launch -m cat_hf.pretrain --config base --data DIR --output-dir cat-base` for several GPUs
   (`torchrun --nproc_per_node N -m cat_hf.pretrain ...` for N CPU processes joined over gloo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .audio import DEFAULT_SAMPLING_RATE as SAMPLING_RATE
from .collapse import CollapseError, CollapseGuard, embedding_ranks, prediction_variances
from .configuration_cat import CATConfig
from .feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor
from .files import apply_default_modes, atomic_write_text, file_sha256, safetensors_damage, zip_damage

logger = logging.getLogger(__name__)

#: `model.rr_embedding_dim: auto` takes the RR encoder's embedding size.
AUTO = "auto"
#: Where a run embeds its corpus with an audio RR encoder (`rr_precompute`), inside the output folder.
RR_CACHE_DIR = "rr-cache"

#: Packaged recipes: `--config tiny` means `recipes/pretrain_tiny.yaml`.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_PREFIX = "pretrain_"

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
PRETRAINING_DIR = "pretraining"  # the full CATForPreTraining (teacher, decoder, projector) of the final export
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "pretrain_config.yaml"
SUMMARY_FILE = "training_summary.json"
TRAINER_STATE_FILE = "trainer_state-rank{rank}.json"
CHECKPOINT_MANIFEST_FILE = "checkpoint_manifest.json"  # size and SHA-256 of every file of a checkpoint, written last
TENSORBOARD_PROJECT = "tensorboard"
#: cat-hf finetune's tracker folder; defined here, beside the other run-output names, so that `hub` (which skips these
#: folders on push) needs no import of the finetuning module and its `datasets` dependency.
LOGS_DIR = "logs"

#: Kaldi frames of CATFeatureExtractor at 16 kHz: 25 ms window, 10 ms shift. A clip needs one whole window;
#: shorter ones are treated as unusable.
MIN_CLIP_SAMPLES = 400
FRAME_SHIFT_SAMPLES = 160
#: Clips decoded at start-up to prove the corpus holds usable audio before any model is built.
PROBE_CLIPS = 256
#: Final losses in the summary are the mean over this many last steps (fewer if the run is shorter).
FINAL_LOSS_WINDOW = 50
#: Loss components in logging order; `rr_loss` only when Representation Regularization is on.
LOSS_NAMES = ("loss", "frame_loss", "utterance_loss", "rr_loss")
#: Per-step collapse statistics (`cat_hf.collapse.prediction_variances`), averaged like the losses.
VARIANCE_NAMES = ("target_var", "pred_var")


# ================================================================================================================
# 1. Configuration
# ================================================================================================================


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on. Field names are the YAML keys and the `--set` keys.

    Model:
        model: `preset` (a `CAT_PRESETS` name: cat-tiny, cat-base, ...) plus `CATConfig` overrides on top of it
            (architecture and the pretraining fields: mask_*, clone_batch, rr_embedding_dim, rr_loss_*, ema_*);
            `--set model.preset=cat-small --set model.clone_batch=8`.
        init_from: start from the weights of a folder (a `pretraining/` export to continue pretraining, or an
            encoder folder whose weights start both student and teacher) instead of a random initialisation.
    Data:
        data: corpus source (Hub dataset name, folder, audiofolder, path,tags CSV/JSONL, `save_to_disk` folder, or
            a `datasets.Dataset` in Python).
        data_split, audio_column, streaming: passed to `load_audio_corpus`.
        target_length: fbank frames per clip (a multiple of 16); or give `clip_seconds` instead (rounded to the
            nearest multiple of 16 frames). Crops are `400 + 160 * (target_length - 1)` samples, exactly that many
            frames; shorter clips are zero-padded in the fbank, as the original pipeline does.
        feature_preset: normalisation statistics of the fbank (`FEATURE_PRESETS`: audioset, esc50, speechcommands).
        num_workers: DataLoader worker processes decoding audio.
    Representation Regularization:
        rr_encoder: external encoder spec (`hf:NAME`, `cache:DIR` from `cat-hf embed`, `column:NAME`,
            `python:module:function?embedding_dim=D`, a dict spec, or an `ExternalEncoder`), a shipped teacher
            (`aisfx`, `resemblyzer`, `aisfx+resemblyzer`: `cat_hf.teachers`), or None / "none" for no RR (the RR
            projector is then left out of the model). Its embedding size must equal `model.rr_embedding_dim`
            (`auto`: taken from the encoder).
        rr_precompute: an encoder that embeds audio embeds every clip once, before training, into
            `output_dir/rr-cache` (resumable), and the run reads the targets from there; false: every crop is
            embedded on the fly (a teacher forward per clip and step).
        rr_standardize: regress standardised targets: every dimension of the precomputed embeddings shifted and
            scaled to mean 0, standard deviation 1 over the corpus (`StandardisedEmbeddings`), so that teachers of
            any scale, and each part of a concatenation of teachers, weigh the same.
    Optimisation (one step = one optimiser update):
        batch_size: clips per device per micro-batch (each is cloned `clone_batch` times with different masks).
        gradient_accumulation_steps: micro-batches per optimiser step.
        max_steps: length of the schedule in optimiser steps.
        learning_rate, adam_betas, adam_epsilon, weight_decay: AdamW (decoupled decay, as fairseq's Adam).
        warmup_steps, min_lr_ratio: linear warm-up from 0, then cosine down to `min_lr_ratio * learning_rate`.
        max_grad_norm: gradient clipping (0 or None: none).
        mixed_precision: "no", "fp16" (needs a GPU) or "bf16". The EMA teacher's weights always stay fp32.
        activation_checkpointing: recompute the student's block activations in the backward pass (less memory for
            larger batches or clone_batch, for a second forward pass through the student's blocks).
        threads: torch's CPU threads (None: torch's default, every core). Where several jobs share a machine, one
            thread per process is fastest (on a shared 2-core machine: 2.5 s a step against 9.7 s).
        seed: seeds the initialisation, the data order, the crops and the masks.
    Output:
        output_dir: receives the exported model, `pretraining/`, `checkpoints/`, `metrics.jsonl`, TensorBoard logs.
        save_every: checkpoint every N steps (0: only at the end / on interruption). keep_checkpoints: how many.
        log_every: steps between metric records (JSONL and TensorBoard). report_to: "tensorboard" or "none".
        progress_bar: tqdm bar on the main process.
    Collapse monitoring (`cat_hf.collapse`):
        monitor_every: steps between measurements of the effective rank of the student's clip embeddings on
            `monitor_clips` fixed clips of the corpus (0: never). `target_var` / `pred_var` are logged every step.
        collapse_guard: "stop" (warn, then stop with a checkpoint and an error naming the cause), "warn" or "off".
        min_target_var, min_pred_var, min_effective_rank: the minima (null: not checked); the rank is that of the
            mean-pooled patch tokens on the monitor clips.
        collapse_patience: steps a value may stay below its minimum before the run stops.
        collapse_check_after: the guard starts counting at this step.
        resume: None, "latest" (newest complete checkpoint in output_dir, error if none), "auto" (newest complete
            one if any), or the path of a checkpoint folder. The settings that shape the training state must be
            those of the run that wrote it (`check_resume_settings`), except the ones listed in
            resume_allow_changed (`--allow-changed batch_size,max_steps`).
        stop_at_step: end this session at this global step with a checkpoint although the schedule runs to
            max_steps (time-sliced cluster jobs); `--resume` continues.
        overwrite_output_dir: let a run write into a folder holding a model that pretraining did not write (or the
            finished model of an earlier run it does not resume); the export replaces that model.
    """

    # model
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "cat-base"})
    init_from: str | None = None
    # data
    data: Any = None
    data_split: str = "train"
    audio_column: str | None = None
    streaming: bool = False
    target_length: int | None = 1024
    clip_seconds: float | None = None
    feature_preset: str = "audioset"
    num_workers: int = 4
    # representation regularization
    rr_encoder: Any = None
    rr_precompute: bool = True
    rr_standardize: bool = False
    # optimisation
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    max_steps: int = 400_000
    learning_rate: float = 5e-4
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 53_333
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 4.0
    mixed_precision: str = "fp16"
    activation_checkpointing: bool = False
    threads: int | None = None
    seed: int = 1
    # output, logging, checkpoints
    output_dir: str = "cat-pretrained"
    save_every: int = 10_000
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: str = "tensorboard"
    progress_bar: bool = True
    resume: str | None = None
    resume_allow_changed: list[str] = field(default_factory=list)
    stop_at_step: int | None = None
    overwrite_output_dir: bool = False
    # collapse monitoring
    monitor_every: int = 100
    monitor_clips: int = 64
    collapse_guard: str = "stop"
    min_target_var: float | None = 0.1
    min_pred_var: float | None = 0.01
    min_effective_rank: float | None = 2.0
    collapse_patience: int = 200
    collapse_check_after: int = 200

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """Build from a mapping (a parsed YAML file); unknown keys are an error naming the valid ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown pretraining config key(s) {unknown}; valid keys are {sorted(known)}.")
        kwargs = {name: _coerce(known[name], value) for name, value in values.items()}
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path_or_recipe: str | os.PathLike) -> PretrainConfig:
        """Load a YAML file, or a packaged recipe by name (`tiny`, `base`)."""
        path = resolve_recipe(path_or_recipe)
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys, found {type(values).__name__}.")
        return cls.from_dict(values)

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> PretrainConfig:
        """A copy with `key=value` overrides applied; `model.<field>=value` sets a CATConfig override."""
        values = self.to_dict(serialisable=False)
        items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
        for key, value in items:
            if key.startswith("model."):
                values["model"] = {**values["model"], key[len("model."):]: value}
            else:
                values[key] = value
        return PretrainConfig.from_dict(values)

    def to_dict(self, serialisable: bool = True) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = dict(self.model)
        if serialisable:
            values["adam_betas"] = list(self.adam_betas)
            for key in ("data", "rr_encoder"):
                value = values[key]
                if value is not None and not isinstance(value, (str, int, float, bool, dict, list)):
                    values[key] = getattr(value, "name", None) or repr(value)
        return values

    # -- derived values --------------------------------------------------------------------------------------------
    @property
    def frames(self) -> int:
        """fbank frames per clip (a multiple of 16)."""
        if self.target_length is not None:
            return int(self.target_length)
        return frames_for_seconds(self.clip_seconds)

    @property
    def clip_samples(self) -> int:
        """Samples whose Kaldi fbank (25 ms window, 10 ms shift, no centre padding) has exactly `frames` frames."""
        return MIN_CLIP_SAMPLES + FRAME_SHIFT_SAMPLES * (self.frames - 1)

    @property
    def uses_rr(self) -> bool:
        return self.rr_encoder is not None and not (isinstance(self.rr_encoder, str) and self.rr_encoder.lower() == "none")

    def validate(self) -> None:
        """Reject inconsistent settings before anything expensive happens; messages name the key to change."""
        if self.data is None:
            raise ValueError("No pretraining data given; pass --data SOURCE (a folder, a Hub dataset, a CSV, ...).")
        if self.target_length is None and self.clip_seconds is None:
            raise ValueError("Set either target_length (fbank frames, a multiple of 16) or clip_seconds.")
        if self.target_length is not None and self.clip_seconds is not None:
            implied = frames_for_seconds(self.clip_seconds)
            if implied != int(self.target_length):
                raise ValueError(
                    f"target_length={self.target_length} and clip_seconds={self.clip_seconds} (= {implied} frames) "
                    "disagree; set only one of them (e.g. --set clip_seconds=null)."
                )
        if self.frames % 16 or self.frames < 16:
            raise ValueError(f"target_length must be a positive multiple of 16 frames, got {self.frames}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.save_every < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("save_every, warmup_steps and num_workers must be >= 0.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError(
                "mixed_precision='fp16' needs a CUDA GPU, and none is visible; use --set mixed_precision=no (or bf16)."
            )
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"report_to must be 'tensorboard' or 'none', got {self.report_to!r}.")
        if self.feature_preset.lower() not in FEATURE_PRESETS:
            raise ValueError(f"feature_preset {self.feature_preset!r} is unknown; use one of {sorted(FEATURE_PRESETS)}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {self.threads}.")
        if self.monitor_every < 0 or self.monitor_clips < 2:
            raise ValueError("monitor_every must be >= 0 and monitor_clips >= 2.")
        if self.collapse_guard not in ("stop", "warn", "off"):
            raise ValueError(f"collapse_guard must be 'stop', 'warn' or 'off', got {self.collapse_guard!r}.")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1 (or null), got {self.stop_at_step}.")
        from .configuration_cat import CAT_PRESETS

        if self.init_from:
            _check_fbank_rate(self.init_from)
        elif self.model.get("preset") not in CAT_PRESETS:
            raise ValueError(
                f"model.preset={self.model.get('preset')!r} is not a CAT preset; use one of {sorted(CAT_PRESETS)} "
                "(or set init_from to a model folder)."
            )
        known = {f.name for f in dataclasses.fields(CATConfig)} | set(CATConfig().to_dict())
        unknown = sorted(set(self.model) - known - {"preset"})
        if unknown:
            raise ValueError(f"Unknown model override(s) {unknown}; use CATConfig fields (e.g. model.clone_batch).")


def frames_for_seconds(seconds: float) -> int:
    """10 ms frames of `seconds` of audio, rounded half up to a multiple of 16 (one time patch), at least 16."""
    return max(16, math.floor(float(seconds) * 100 / 16 + 0.5) * 16)


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """`tiny` / `base` (or `pretrain_tiny`) -> the packaged YAML; anything else must be an existing YAML file."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    stem = text.removesuffix(".yaml").removesuffix(".yml")
    for candidate in (RECIPES_DIR / f"{stem}.yaml", RECIPES_DIR / f"{RECIPE_PREFIX}{stem}.yaml"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"Pretraining config {text!r} is neither a YAML file nor a recipe; recipes: {available_recipes()}.")


def available_recipes() -> list[str]:
    return sorted(p.stem.removeprefix(RECIPE_PREFIX) for p in RECIPES_DIR.glob(f"{RECIPE_PREFIX}*.yaml"))


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"Override {text!r} must look like key=value (e.g. batch_size=8 or model.clone_batch=2).")
    return key.strip(), _parse_value(value.strip())


def _parse_value(text: str) -> Any:
    """YAML scalars (`true`, `null`, `[0.9, 0.95]`), plus numbers YAML 1.1 leaves as strings (`5e-4`)."""
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def _coerce(spec: dataclasses.Field, value: Any) -> Any:
    """Turn YAML / command-line values into the field's type (`5e-4` strings, lists for tuples, ints for floats)."""
    default = spec.default if spec.default is not dataclasses.MISSING else None
    if value is None:
        return None
    if spec.name == "mixed_precision" and value is False:  # YAML reads a bare `no` as false
        return "no"
    if spec.name == "adam_betas":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"adam_betas must be a pair like [0.9, 0.95], got {value!r}.")
        return (float(value[0]), float(value[1]))
    if spec.name == "model":
        if not isinstance(value, Mapping):
            raise ValueError(f"model must be a mapping of CATConfig overrides, got {value!r}.")
        return dict(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{spec.name} must be true or false, got {value!r}.")
            return value.lower() == "true"
        return bool(value)
    try:
        if isinstance(default, float) or spec.name in ("clip_seconds", "max_grad_norm", "min_target_var",
                                                       "min_pred_var", "min_effective_rank"):
            return float(value)
        if isinstance(default, int) or spec.name in ("target_length", "stop_at_step", "threads"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{spec.name} must be a number, got {value!r}.") from None
    return value


# ================================================================================================================
# 2. Data
# ================================================================================================================


class PretrainingClips(Dataset):
    """Fixed-length clips for pretraining: item i is clip i, or the next usable one when clip i is unusable.

    Replacing instead of dropping keeps every batch full, so all processes of a data-parallel run step together.
    Each item lists the rows it had to pass over (`"bad_indices"`), so the training loop counts them, also when
    decoding runs in DataLoader workers. Unusable: undecodable, empty, shorter than one 25 ms frame, or without a
    precomputed RR embedding.
    """

    def __init__(self, clips: Any, excluded: set[int] | None = None):
        self.clips = clips  # an AudioClipDataset
        self.excluded = set(excluded or ())
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)  # the crops are seeded by (seed, epoch, index)

    def load(self, index: int) -> dict[str, Any] | None:
        """Clip `index`, or None when it is unusable."""
        if index in self.excluded:
            return None
        item = self.clips[index]
        if item is None:
            return None
        if item["length"] < MIN_CLIP_SAMPLES:
            if index not in self._warned:
                self._warned.add(index)
                logger.warning("Skipping clip %d: %d samples, shorter than one 25 ms frame.", index, item["length"])
            return None
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        bad = []
        for offset in range(len(self)):
            position = (int(index) + offset) % len(self)
            item = self.load(position)
            if item is not None:
                item["bad_indices"] = bad
                return item
            bad.append(position)
        raise _no_usable_audio(len(self))


class StreamingPretrainingClips(IterableDataset):
    """Streaming counterpart: the stream already leaves unreadable clips out (and counts them); short ones too."""

    def __init__(self, clips: Any):
        self.clips = clips  # an IterableAudioClipDataset

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)

    @property
    def num_skipped(self) -> int:
        return self.clips.num_skipped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in self.clips:
            if item["length"] >= MIN_CLIP_SAMPLES:
                item["bad_indices"] = []
                yield item


def _no_usable_audio(count: int | str, example: str = "") -> ValueError:
    from .data import CorpusError

    return CorpusError(
        f"The pretraining corpus has no usable audio: none of its {count} clips could be decoded into at least "
        f"{MIN_CLIP_SAMPLES} samples{example}. Check the paths and formats (soundfile reads wav/flac/ogg/mp3; other "
        "containers need the ffmpeg binary), or point --data at another corpus."
    )


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch): the data order depends on nothing else, so a run
    resumed at epoch e, batch b sees exactly the batches an uninterrupted run saw."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, 0x5A3))
        return iter(torch.randperm(self.length, generator=generator).tolist())


def load_pretraining_corpus(config: PretrainConfig) -> tuple[Any, Dataset | IterableDataset, Any]:
    """(raw corpus, clip dataset, RR encoder or None).

    Fails here, before a model exists, when the corpus has no audio column, no audio files, no decodable clip, or
    an RR encoder whose embedding size differs from `model.rr_embedding_dim`.
    """
    from .data import AudioClipDataset, IterableAudioClipDataset, load_audio_corpus

    corpus = load_audio_corpus(
        config.data, split=config.data_split, audio_column=config.audio_column, label_column=False,
        streaming=config.streaming,
    )
    encoder, excluded = build_rr_encoder(config, corpus)  # rows of a `cache:` without an embedding are excluded
    if config.streaming:
        clips = IterableAudioClipDataset(corpus, clip_samples=config.clip_samples, seed=config.seed,
                                         sampling_rate=SAMPLING_RATE)
        dataset: Dataset | IterableDataset = StreamingPretrainingClips(clips)
        _probe_stream(dataset)
    else:
        if len(corpus) == 0:
            raise _no_usable_audio(0)
        clips = AudioClipDataset(corpus, clip_samples=config.clip_samples, seed=config.seed,
                                 sampling_rate=SAMPLING_RATE)
        dataset = PretrainingClips(clips, excluded)
        _probe_clips(dataset)
    return corpus, dataset, encoder


def _probe_clips(dataset: PretrainingClips) -> None:
    """Decode clips in order until one is usable; a corpus with none fails now with a clear message."""
    limit = min(len(dataset), PROBE_CLIPS)
    for index in range(limit):
        if dataset.load(index) is not None:
            dataset.clips.reset_skipped()
            return
    if limit == len(dataset):
        raise _no_usable_audio(len(dataset))
    raise _no_usable_audio(f"first {limit} (of {len(dataset)})", "; a corpus this broken is most likely misconfigured")


def _probe_stream(dataset: StreamingPretrainingClips) -> None:
    if next(iter(dataset), None) is None:
        raise _no_usable_audio("streamed")


def build_rr_encoder(config: PretrainConfig, corpus: Any) -> tuple[Any, set[int]]:
    """The frozen external encoder of Representation Regularization, checked against `model.rr_embedding_dim`.

    A `cache:` spec is opened here (it must belong to this corpus); its clips without an embedding are returned so
    that the data pipeline treats them as unusable instead of failing mid-run.
    """
    if not config.uses_rr:
        return None, set()
    from .external_encoders import (
        PrecomputedEmbeddings,
        StandardisedEmbeddings,
        build_external_encoder,
        parse_encoder_spec,
    )

    from .embed import EmbeddingCache, embed_corpus

    spec = config.rr_encoder
    cache_dir = None
    if isinstance(spec, (str, Mapping)) and parse_encoder_spec(spec)["type"] == "cache":
        cache_dir, name = parse_encoder_spec(spec)["path"], parse_encoder_spec(spec).get("name")
    else:
        encoder = build_external_encoder(spec, dataset=corpus)
        if encoder.requires_audio and config.rr_precompute and not config.streaming:
            # Embedding every crop on the fly costs a teacher forward per clip and step; once per clip is enough.
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(
                    f"A run of several processes cannot embed its corpus with {encoder.name!r} itself; precompute the "
                    f"cache first (cat-hf embed DATA --encoder {spec} --output-dir CACHE) and pass --rr-encoder "
                    "cache:CACHE."
                )
            cache_dir, name = Path(config.output_dir).expanduser() / RR_CACHE_DIR, encoder.name
            logger.info("Embedding the corpus once with %s into %s (resumable).", encoder.name, cache_dir)
            embed_corpus(corpus, encoder, cache_dir, progress=config.progress_bar)
    excluded: set[int] = set()
    if cache_dir is not None:
        cache = EmbeddingCache(cache_dir, corpus=corpus)
        encoder = PrecomputedEmbeddings(cache, name=name)
        excluded = set(cache.missing_indices)
    if config.rr_standardize:
        if encoder.requires_audio:
            raise ValueError(
                f"rr_standardize needs the corpus statistics of precomputed targets, but {encoder.name!r} embeds every "
                "crop on the fly; keep rr_precompute: true, or set rr_standardize: false."
            )
        encoder = StandardisedEmbeddings(encoder, [i for i in range(len(corpus)) if i not in excluded])
    if config.streaming and not encoder.requires_audio:
        raise ValueError(
            f"RR encoder {encoder.name!r} looks embeddings up by corpus row, which a streamed corpus does not give; "
            "drop --streaming (or set streaming: false), or use an encoder that embeds the audio (hf:..., python:...)."
        )
    if config.model.get("rr_embedding_dim", AUTO) == AUTO:
        config.model["rr_embedding_dim"] = encoder.embedding_dim  # the projector takes the teacher's size
    encoder.check_embedding_dim(_model_config(config).rr_embedding_dim)
    return encoder, excluded


def _check_fbank_rate(folder: str) -> None:
    """Pretraining computes 16 kHz fbanks; a model converted from the original's downsr_16hz=false recipe (fbanks at
    the files' own rate, `cat-hf convert --sampling-rate`) would get inputs unlike those it was trained on."""
    extractor_file = Path(folder, "preprocessor_config.json")
    if extractor_file.is_file():
        rate = json.loads(extractor_file.read_text(encoding="utf-8")).get("sampling_rate", SAMPLING_RATE)
        if rate != SAMPLING_RATE:
            raise ValueError(
                f"init_from {folder} computes its fbanks at {rate} Hz, but pretraining works at {SAMPLING_RATE} Hz; "
                "continue from a 16 kHz model."
            )


def _model_config(config: PretrainConfig) -> CATConfig:
    """The CATConfig of the run: the preset plus overrides (or the init_from folder's config plus overrides)."""
    overrides = {k: v for k, v in config.model.items() if k != "preset"}
    if not config.uses_rr:
        overrides["rr_embedding_dim"] = None  # no projector: it would get no gradient (and DDP would complain)
    elif overrides.get("rr_embedding_dim") == AUTO:
        raise ValueError("model.rr_embedding_dim is 'auto' but no RR encoder set it; build the encoder first "
                         "(build_rr_encoder) or set --set model.rr_embedding_dim=N.")
    if config.init_from:
        model_config = CATConfig.from_pretrained(config.init_from)
        for key, value in overrides.items():
            setattr(model_config, key, value)
        return model_config
    return CATConfig.from_preset(config.model["preset"], **overrides)


def build_dataloader(config: PretrainConfig, dataset: Dataset | IterableDataset, process_index: int,
                     num_processes: int) -> tuple[DataLoader, EpochSampler | None]:
    """Map-style corpora: an `EpochSampler` DataLoader (sharded across processes by `accelerator.prepare`).
    Streams: each process reads its own shard of the stream (plain DataLoader, see `pretrain`)."""
    from .data import collate_skip_bad

    common = dict(batch_size=config.batch_size, collate_fn=collate_skip_bad, num_workers=config.num_workers,
                  drop_last=True, persistent_workers=False)
    if isinstance(dataset, IterableDataset):
        if num_processes > 1:
            from datasets.distributed import split_dataset_by_node

            dataset.clips.corpus = split_dataset_by_node(dataset.clips.corpus, rank=process_index,
                                                         world_size=num_processes)
        return DataLoader(dataset, **common), None
    per_round = config.batch_size * num_processes
    if len(dataset) < per_round:
        raise ValueError(
            f"The corpus has {len(dataset)} clips, fewer than one batch across all processes "
            f"({config.batch_size} x {num_processes}); lower batch_size or add audio."
        )
    sampler = EpochSampler(len(dataset), config.seed)
    return DataLoader(dataset, sampler=sampler, **common), sampler


@dataclass
class TrainState:
    """Where a run is; saved per process with every checkpoint (JSON), restored by --resume."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches this process has taken from the current epoch
    clips_seen: int = 0  # over all processes
    train_seconds: float = 0.0  # summed over sessions
    skipped_files: int = 0  # distinct unusable clips met so far (per process, summed over processes)
    bad_indices: list[int] = field(default_factory=list)  # this process's distinct unusable rows
    streaming_skipped: int = 0  # skip counter of a streamed corpus at the last step
    collapse_guard: dict[str, Any] = field(default_factory=dict)  # CollapseGuard.state_dict()
    initial_ranks: dict[str, float] = field(default_factory=dict)  # effective ranks of the step-0 student

    def save(self, folder: Path, rank: int) -> None:
        atomic_write_text(folder / TRAINER_STATE_FILE.format(rank=rank), json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, folder: Path, rank: int) -> TrainState:
        path = folder / TRAINER_STATE_FILE.format(rank=rank)
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: the checkpoint was written by a run with fewer processes, or is damaged; "
                "resume with the same number of processes, or from another checkpoint."
            )
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def iterate_batches(accelerator: Any, dataloader: DataLoader, sampler: EpochSampler | None, dataset: Any,
                    state: TrainState) -> Iterator[dict]:
    """Endless batches, epoch after epoch, starting where `state` says (skipping the batches already used).

    `state.epoch` / `state.batches_in_epoch` are updated as batches are handed out, so a checkpoint taken between
    steps records exactly how far the data has gone.
    """
    while True:
        # The order (sampler) and the crops (dataset) of an epoch depend only on (seed, epoch).
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(state.epoch)
        if sampler is not None:
            sampler.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        loader = dataloader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
        for batch in loader:
            state.batches_in_epoch += 1
            if batch is not None:
                yield batch
        if state.batches_in_epoch == 0:
            raise _no_usable_audio("streamed" if isinstance(dataset, IterableDataset) else len(dataset))
        state.epoch += 1
        state.batches_in_epoch = 0


# ================================================================================================================
# 3. Model, optimiser, schedule
# ================================================================================================================


def build_model(config: PretrainConfig) -> Any:
    """CATForPreTraining from the preset + overrides (random init), or from `init_from`."""
    from .modeling_cat import CATForPreTraining

    model_config = _model_config(config)
    if config.init_from:
        model = CATForPreTraining.from_pretrained(config.init_from, config=model_config)
    else:
        model = CATForPreTraining(model_config)
    if config.activation_checkpointing:
        # Non-reentrant: it needs no input that requires grad and restores the RNG state of dropout / drop path,
        # so the run is the same as without checkpointing. The teacher runs without grad and is not recomputed.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices / kernels only: not on biases, norms (1-D), the CLS token or positions
    (the positions are a fixed buffer; named here in case a variant learns them). The frozen teacher is left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or "cls_token" in name or "position" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                                min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then half a cosine down to `min_lr_ratio * peak`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _derive_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from several integers (seed, step, micro-batch, process, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64).dot(np.array([1 << 31, 1], dtype=np.uint64)))


# ================================================================================================================
# 4. Checkpoints, interruption
# ================================================================================================================


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission, ...); the previous one is left as it was."""


class Checkpoints:
    """`output_dir/checkpoints/step-XXXXXXX` folders of `accelerator.save_state`, written atomically, last K kept.

    Each folder ends with `checkpoint_manifest.json` (size and SHA-256 of every file in it), written last: `--resume`
    uses the newest checkpoint whose files all match it, and says which newer ones are damaged."""

    def __init__(self, accelerator: Any, output_dir: Path, keep: int):
        self.accelerator = accelerator
        self.root = output_dir / CHECKPOINTS_DIR
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step:07d}"

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                 and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
        return sorted(found, key=self.step_of)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(path.name[len(CHECKPOINT_PREFIX):])

    def rewind(self, step: int) -> None:
        """Resuming from an earlier checkpoint abandons what came after it: drop the later checkpoints (otherwise
        they would outlive the new ones when old checkpoints are pruned)."""
        if self.accelerator.is_main_process:
            for later in [p for p in self.all() if self.step_of(p) > step]:
                logger.warning("Resuming at step %d: removing the later checkpoint %s of the abandoned run.", step, later)
                shutil.rmtree(later, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, state: TrainState, config: PretrainConfig) -> Path:
        """All processes call this together. Everything goes into a temporary folder that is renamed at the end,
        so a crash mid-save never leaves a half-written checkpoint that --resume would pick up. A save that fails
        (disk full, ...) removes its temporary folder, leaves the earlier checkpoints alone and raises
        CheckpointWriteError saying so."""
        acc = self.accelerator
        final = self.path(state.step)
        tmp = self.root / f".tmp-{final.name}"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            state.save(tmp, acc.process_index)
            if acc.is_main_process:
                atomic_write_text(tmp / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
            acc.wait_for_everyone()
            if acc.is_main_process:
                apply_default_modes(tmp)  # safetensors and mkstemp write 0600 files, mkdir(mkdtemp) 0700
                _write_manifest(tmp)
        except Exception as error:  # noqa: BLE001 - whatever failed, the partial checkpoint must go and be named
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            kept = (f"The previous checkpoint {previous} is intact" if previous is not None
                    else "There is no earlier checkpoint")
            raise CheckpointWriteError(
                f"Could not write the checkpoint of step {state.step} into {self.root} ({type(error).__name__}: "
                f"{error}). {kept}; nothing was removed. Free disk space (or fix the folder's permissions) and "
                "continue with --resume."
            ) from error
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def remove_stale_temporaries(self) -> None:
        if self.accelerator.is_main_process and self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST_FILE)
    manifest = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    atomic_write_text(folder / CHECKPOINT_MANIFEST_FILE, json.dumps({"files": manifest}, indent=1))


def checkpoint_damage(folder: Path) -> str | None:
    """None when a checkpoint folder is complete and undamaged; else what is wrong with it.

    With a manifest: every file it lists is there with its size and SHA-256. Without one (checkpoints of older
    versions): the trainer state is there, every .safetensors file is as long as its header says, every zip
    (torch's .bin/.pt) passes its CRC-32 checks, and every JSON file parses."""
    if not (folder / TRAINER_STATE_FILE.format(rank=0)).is_file():
        return f"{TRAINER_STATE_FILE.format(rank=0)} is missing"
    manifest_path = folder / CHECKPOINT_MANIFEST_FILE
    if manifest_path.is_file():
        try:
            listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"{CHECKPOINT_MANIFEST_FILE} is unreadable ({error})"
        for name, expected in listed.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written (truncated?)"
            if file_sha256(path) != expected["sha256"]:
                return f"{name} does not match the SHA-256 recorded when it was written"
        return None
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            problem = safetensors_damage(path)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
                problem = None
            except (OSError, ValueError) as error:
                problem = f"not valid JSON ({error})"
        else:
            problem = zip_damage(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


_reported_damage: set[str] = set()  # each damaged checkpoint is reported once per process


def find_resume_checkpoint(resume: str | None, checkpoints: Checkpoints) -> Path | None:
    """None / "latest" / "auto" / a folder -> the checkpoint folder to load (or None to start fresh).

    "latest" / "auto" take the newest complete checkpoint: a damaged newer one (truncated or changed files, see
    `checkpoint_damage`) is passed over with a warning, and dropped when the run resumes from the earlier one. A
    folder named explicitly must be complete."""
    if resume is None:
        if checkpoints.latest() is not None:
            raise ValueError(
                f"{checkpoints.root} already holds checkpoints of a previous run; continue it with --resume, or "
                "choose another --output-dir."
            )
        return None
    if resume in ("latest", "auto"):
        found = checkpoints.all()
        if not found and resume == "latest":
            raise ValueError(f"--resume: no checkpoint under {checkpoints.root}; start without --resume.")
        damaged = []
        for candidate in reversed(found):
            problem = checkpoint_damage(candidate)
            if problem is None:
                return candidate
            damaged.append(f"{candidate.name} ({problem})")
            if str(candidate) not in _reported_damage:
                _reported_damage.add(str(candidate))
                logger.warning("Checkpoint %s is damaged (%s): resuming from an earlier one instead; the damaged one "
                               "is removed when training continues.", candidate, problem)
        if found:
            raise ValueError(
                f"--resume: no complete checkpoint under {checkpoints.root}: {'; '.join(damaged)}. Start again "
                "without --resume in another --output-dir."
            )
        return None
    path = Path(resume).expanduser()
    if not (path / TRAINER_STATE_FILE.format(rank=0)).is_file():
        raise ValueError(f"--resume {resume}: not a checkpoint folder (no {TRAINER_STATE_FILE.format(rank=0)}).")
    problem = checkpoint_damage(path)
    if problem:
        earlier = [p.name for p in checkpoints.all() if p.resolve() != path.resolve()]
        raise ValueError(f"--resume {resume}: the checkpoint is damaged ({problem}). Resume from another one"
                         + (f" (in {checkpoints.root}: {', '.join(earlier)})." if earlier else "."))
    return path


#: Settings that may differ between the run that wrote a checkpoint and the run resuming it: they change where
#: things are written, what is logged or how fast, not the training state. Every other setting is compared.
RESUME_FREE_SETTINGS = frozenset({
    "output_dir", "resume", "stop_at_step", "save_every", "keep_checkpoints", "log_every", "report_to",
    "progress_bar", "num_workers", "threads", "activation_checkpointing", "overwrite_output_dir",
    "resume_allow_changed",
    "monitor_every", "monitor_clips", "collapse_guard", "min_target_var", "min_pred_var", "min_effective_rank",
    "collapse_patience", "collapse_check_after",
})


def _comparable_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat {setting: value} of a config dict: `model.*` keys apart, fbank frames instead of the two ways to give
    them, local paths resolved."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in RESUME_FREE_SETTINGS or key in ("target_length", "clip_seconds"):
            continue
        if key == "model" and isinstance(value, Mapping):
            flat.update({f"model.{k}": v for k, v in value.items()})
            continue
        if key in ("data", "init_from") and isinstance(value, str) and Path(value).expanduser().exists():
            value = os.path.realpath(Path(value).expanduser())
        flat[key] = list(value) if isinstance(value, tuple) else value
    target_length, clip_seconds = values.get("target_length"), values.get("clip_seconds")
    flat["frames (target_length / clip_seconds)"] = (int(target_length) if target_length is not None else
                                                     frames_for_seconds(clip_seconds) if clip_seconds is not None
                                                     else None)
    return flat


def check_resume_settings(checkpoint: Path | None, config: PretrainConfig) -> None:
    """ValueError naming every setting that shapes the training state (data, batch, seed, schedule, optimiser,
    architecture, ...) and differs from the run that wrote `checkpoint`, unless listed in
    `config.resume_allow_changed` (`--allow-changed KEY,...`)."""
    if checkpoint is None or not (checkpoint / CONFIG_FILE).is_file():
        return
    try:
        saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"--resume: {checkpoint / CONFIG_FILE} cannot be read ({error}).") from error
    allowed = config.resume_allow_changed
    allowed = {a.strip() for a in (allowed.split(",") if isinstance(allowed, str) else allowed or []) if a.strip()}
    before, now = _comparable_settings(saved), _comparable_settings(config.to_dict())
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new or key in allowed or key.split(" ")[0] in allowed:
            continue
        if key not in before and not key.startswith("model."):  # a setting newer than the run that wrote it
            continue
        if key == "model.rr_embedding_dim" and AUTO in (old, new):  # "auto" is resolved when the run starts
            continue
        if key.startswith("model.") and "model" in allowed:
            continue
        changed.append((key, old, new))
    if changed:
        listing = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
        names = ",".join(dict.fromkeys(key.split(" ")[0] for key, _, _ in changed))
        raise ValueError(
            f"--resume: these settings differ from the run that wrote {checkpoint}: {listing}. Resuming continues "
            "its saved state exactly only with the same settings (they are in "
            f"{checkpoint / CONFIG_FILE}): run with those values, or, to continue that state under the new ones, "
            f"say so with --allow-changed {names} (--set resume_allow_changed=[{names}])."
        )


def check_output_dir(config: PretrainConfig) -> None:
    """ValueError when `output_dir` holds a model that pretraining did not write (a finetuned classifier, an
    adapter, any other model), or, for a run that does not resume, the finished model of an earlier pretraining
    run: the export at the end would replace it. `overwrite_output_dir` (--overwrite-output-dir) allows it."""
    output_dir = Path(config.output_dir).expanduser()
    if config.overwrite_output_dir or not output_dir.is_dir():
        return
    patterns = ("config.json", "adapter_config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")
    model_files = sorted({p.name for pattern in patterns for p in output_dir.glob(pattern) if p.is_file()})
    if not model_files:
        return
    try:
        architectures = json.loads((output_dir / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        architectures = None
    ours = (output_dir / CONFIG_FILE).is_file() and architectures in (None, ["CATModel"]) and \
        not (output_dir / "adapter_config.json").is_file()
    override = "pass --overwrite-output-dir (--set overwrite_output_dir=true) to replace it, or choose another " \
               "--output-dir."
    if not ours:
        what = f" (a {architectures[0]})" if architectures else ""
        raise ValueError(
            f"{output_dir} holds a model that cat-hf pretrain did not write{what}: {', '.join(model_files[:6])}. "
            f"Pretraining would replace it with an encoder; {override}"
        )
    if config.resume is None and (output_dir / "config.json").is_file():
        raise ValueError(
            f"{output_dir} holds the model exported by an earlier pretraining run; a new run would replace it. "
            f"Continue that run with --resume, or {override}"
        )


class StopSignals:
    """SIGTERM / SIGINT set a flag instead of killing the run: the loop finishes its step, saves a checkpoint and
    exits cleanly. A second Ctrl-C aborts at once. Handlers are only installed from the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving a checkpoint after this step, then stopping "
              "(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ================================================================================================================
# 5. The training loop
# ================================================================================================================


def pretrain(config: PretrainConfig | Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) pretraining. Returns {"metrics": per-step records of this session, "state": final
    TrainState, "output_dir", "checkpoint": last checkpoint folder, "interrupted": signal name or None,
    "finished": bool, "model": the unwrapped CATForPreTraining, "process_index", "num_processes"}."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
    )

    if not isinstance(config, PretrainConfig):
        config = PretrainConfig.from_dict(config) if isinstance(config, Mapping) else PretrainConfig.from_yaml(config)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    check_run_folder(config)  # before anything is written into output_dir
    output_dir = Path(config.output_dir).expanduser()

    # -- data first: a corpus that cannot work fails before anything is built ---------------------------------------
    corpus, dataset, rr_encoder = load_pretraining_corpus(config)
    extractor = CATFeatureExtractor.from_preset(config.feature_preset, max_length=config.frames)

    # Several processes but no GPU (e.g. `torchrun --nproc_per_node 2 -m cat_hf.pretrain ...`): Accelerate only
    # joins them into one gloo data-parallel run when told to use the CPU.
    cpu_data_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_data_parallel,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimiser step ourselves
        # The only buffers are the fixed sin-cos position tables (student and teacher, ~19 MB each for cat-base),
        # identical on every process: broadcasting them before every forward would only cost bandwidth.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        log_with="tensorboard" if config.report_to == "tensorboard" else None,
        project_dir=str(output_dir),
    )
    try:
        return _train(config, accelerator, corpus, dataset, rr_encoder, extractor, output_dir)
    finally:
        accelerator.end_training()
        _reset_accelerate_singletons()


def _train(config: PretrainConfig, accelerator: Any, corpus: Any, dataset: Dataset | IterableDataset,
           rr_encoder: Any, extractor: CATFeatureExtractor, output_dir: Path) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    checkpoints = Checkpoints(accelerator, output_dir, config.keep_checkpoints)
    resume_from = find_resume_checkpoint(config.resume, checkpoints)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_stale_temporaries()
        atomic_write_text(output_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()

    # -- model, optimiser, schedule, data loader ----------------------------------------------------------------
    set_seed(config.seed)  # same initialisation on every process
    model = build_model(config)
    model_config = model.config
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.learning_rate, betas=config.adam_betas,
        eps=config.adam_epsilon,
    )
    scheduler = cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    dataloader, sampler = build_dataloader(config, dataset, rank, world)
    if isinstance(dataset, IterableDataset):
        # Each process already reads its own shard of the stream; prepare() would instead decode the whole
        # stream on every process (or broadcast it from the main one).
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        # Batches stay on the CPU: the feature extractor takes the raw waveforms and computes on `device`.
        model, optimizer, dataloader, scheduler = accelerator.prepare(
            model, optimizer, dataloader, scheduler, device_placement=[True, True, False, True]
        )
    student_teacher = accelerator.unwrap_model(model)
    rr_encoder = rr_encoder.to(device) if rr_encoder is not None else None

    state = TrainState()
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainState.load(resume_from, rank)
        logger.info("Resumed from %s at step %d (epoch %d).", resume_from, state.step, state.epoch)
        checkpoints.rewind(state.step)
    metrics_path = output_dir / METRICS_FILE
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, state.step)  # a resumed run rewrites what came after its checkpoint
    if config.report_to == "tensorboard":
        accelerator.init_trackers(TENSORBOARD_PROJECT, config=_hparams(config))

    accelerator.print(
        f"Pretraining {config.model.get('preset') or config.init_from} "
        f"({sum(p.numel() for p in student_teacher.cat.parameters()) / 1e6:.1f} M encoder parameters) on "
        f"{len(dataset) if isinstance(dataset, PretrainingClips) else 'a stream of'} clips of {config.frames} frames: "
        f"{config.batch_size} clips x {config.gradient_accumulation_steps} micro-batches x {world} processes per "
        f"step, {model_config.clone_batch} masked clones each, RR {getattr(rr_encoder, 'name', 'off')}, "
        f"steps {state.step + 1}..{min(config.max_steps, config.stop_at_step or config.max_steps)} of "
        f"{config.max_steps}, on {describe_hardware(accelerator)}"
        + (", activation checkpointing." if config.activation_checkpointing else ".")
    )
    grid = (config.frames // model_config.patch_size, model_config.frequency_patches)
    guard = CollapseGuard(config.min_target_var, config.min_pred_var, config.min_effective_rank,
                          config.collapse_patience, config.collapse_check_after, config.collapse_guard)
    guard.load_state_dict(state.collapse_guard)
    monitor_inputs = monitor_batch(config, corpus, extractor, device) if config.monitor_every else None
    last_ranks: dict[str, float] = {}  # the latest rank measurement, shown in the progress bar between measurements
    if monitor_inputs is not None and state.step == 0:
        state.initial_ranks = embedding_ranks(student_teacher.cat, monitor_inputs)
        ranks = state.initial_ranks
        accelerator.print(f"Effective rank of the initial student's clip embeddings on {len(monitor_inputs)} fixed "
                          f"clips: CLS {ranks['effective_rank_cls']:.1f}, mean {ranks['effective_rank_mean']:.1f} "
                          "(a collapsing run drives it towards 1).")
    batches = iterate_batches(accelerator, dataloader, sampler, dataset, state)
    bad_seen = set(state.bad_indices)
    last_checkpoint = resume_from
    session_metrics: list[dict[str, Any]] = []
    stop_at = min(config.max_steps, config.stop_at_step or config.max_steps)
    clips_per_step = config.batch_size * config.gradient_accumulation_steps * world
    num_losses = len(LOSS_NAMES)
    metric_names = LOSS_NAMES + VARIANCE_NAMES
    num_metrics = len(metric_names)

    bar = tqdm(total=config.max_steps, initial=state.step, desc="pretrain", dynamic_ncols=True,
               disable=not (config.progress_bar and accelerator.is_local_main_process))
    model.train()
    session_start = time.perf_counter()
    with StopSignals() as signals:
        while state.step < stop_at:
            step_start = time.perf_counter()
            # Per process: the mean of every loss and variance over the micro-batches, new unusable clips, stop request.
            totals = torch.zeros(num_metrics + 2, dtype=torch.float64)
            grad_norm = torch.zeros(())
            for micro in range(config.gradient_accumulation_steps):
                batch = next(batches)
                new_bad = _count_new_bad(batch, dataset, state, bad_seen)
                totals[num_metrics] += new_bad
                input_values = _features(extractor, batch, config.frames, device)
                rr_embeddings = _rr_targets(rr_encoder, batch) if rr_encoder is not None else None
                # Masks (and decoder noise) from (seed, step, micro-batch, process): reproducible and resumable.
                seed = _derive_seed(config.seed, state.step, micro, rank)
                mask_generator = torch.Generator().manual_seed(seed)
                noise_generator = mask_generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
                mask = student_teacher.make_mask(input_values.shape[0], grid, generator=mask_generator).to(device)
                with accelerator.accumulate(model):
                    output = model(input_values=input_values, mask=mask, rr_embeddings=rr_embeddings,
                                   generator=noise_generator)
                    accelerator.backward(output.loss)  # divided by the accumulation steps by Accelerate
                    if accelerator.sync_gradients:
                        # (an infinite bound measures the norm without clipping)
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                for i, name in enumerate(LOSS_NAMES):
                    value = getattr(output, name)
                    if value is not None:
                        totals[i] += value.detach().double().cpu() / config.gradient_accumulation_steps
                for i, value in enumerate(prediction_variances(output).values(), start=num_losses):
                    totals[i] += value / config.gradient_accumulation_steps
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
            decay = student_teacher.update_teacher(state.step)  # EMA teacher, after the optimiser step
            state.clips_seen += clips_per_step

            # One collective per step: the mean losses over processes, skipped clips and a stop request from any.
            totals[num_metrics + 1] = 1.0 if signals.received else 0.0
            reduced = accelerator.reduce(totals.to(device), reduction="sum").double().cpu()
            means = (reduced[:num_metrics] / world).tolist()
            state.skipped_files += int(reduced[num_metrics].item())
            stop_requested = reduced[num_metrics + 1].item() > 0
            step_seconds = time.perf_counter() - step_start
            state.train_seconds += step_seconds
            record = {
                "step": state.step,
                "epoch": state.epoch,
                **{name: means[i] for i, name in enumerate(metric_names) if name != "rr_loss" or rr_encoder},
                "lr": lr,
                "ema_decay": decay,
                "grad_norm": float(grad_norm),
                "clips_per_s": clips_per_step / step_seconds,
                "skipped_files": state.skipped_files,
            }
            if monitor_inputs is not None and (state.step % config.monitor_every == 0 or state.step == stop_at):
                # every process measures the same fixed clips with the same weights: the guard agrees everywhere
                last_ranks = embedding_ranks(student_teacher.cat, monitor_inputs)
                record.update(last_ranks)
            warnings, collapse = guard.update(state.step, record)
            state.collapse_guard = guard.state_dict()
            for warning in warnings:
                logger.warning("Possible collapse at %s", warning)
            session_metrics.append(record)
            bar.set_postfix(_postfix({**last_ranks, **record}), refresh=False)  # shown by the update, so the bar shows this step's numbers
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == stop_at:
                _log(accelerator, metrics_path, record)

            interrupted = signals.received or ("signal" if stop_requested else None)
            periodic = config.save_every and state.step % config.save_every == 0
            if interrupted or collapse or periodic or state.step == stop_at:
                state.bad_indices = sorted(bad_seen)
                last_checkpoint = checkpoints.save(state, config)
            if interrupted:
                accelerator.print(
                    f"Stopped by {interrupted} at step {state.step}; the training state is saved in {last_checkpoint}. "
                    f"Continue with the same command plus --resume (or --resume {last_checkpoint})."
                )
                break
            if collapse:
                bar.close()
                raise CollapseError(f"{collapse} The training state at step {state.step} is saved in {last_checkpoint}.")
    bar.close()

    finished = state.step >= config.max_steps
    if finished:
        summary = _summary(config, accelerator, corpus, dataset, rr_encoder, student_teacher, state,
                           session_metrics, output_dir)
        export_pretrained(accelerator, student_teacher, extractor, output_dir, summary)
        accelerator.print(f"Pretraining finished at step {state.step}; model saved to {output_dir} "
                          f"(load it with AutoModel.from_pretrained after `import cat_hf`).")
    elif not signals.received and not stop_requested:
        accelerator.print(f"Session ended at step {state.step} of {config.max_steps} (stop_at_step); "
                          f"checkpoint {last_checkpoint}; continue with --resume.")
    accelerator.wait_for_everyone()
    return {
        "metrics": session_metrics,
        "state": state,
        "output_dir": str(output_dir),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "interrupted": signals.received or ("signal" if stop_requested else None),
        "finished": finished,
        "model": student_teacher,
        "session_seconds": time.perf_counter() - session_start,
        "process_index": rank,
        "num_processes": world,
    }


def _features(extractor: CATFeatureExtractor, batch: Mapping[str, Any], frames: int, device: torch.device) -> torch.Tensor:
    """Normalised log-mel (B, frames, 128) on `device`: the fbank of each clip's real samples, zero-padded to
    `frames` before normalisation, exactly as the original pipeline pads short clips."""
    clips = [wave[:length].numpy() for wave, length in zip(batch["waveform"], batch["length"].tolist())]
    features = extractor(clips, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=frames,
                         return_tensors="pt", device=device)
    return features["input_values"]


def monitor_batch(config: PretrainConfig, corpus: Any, extractor: CATFeatureExtractor,
                  device: torch.device) -> torch.Tensor | None:
    """The fixed clips whose embeddings' effective rank is followed during the run: up to `monitor_clips` usable
    clips at evenly spaced rows of the corpus (the first ones of a stream), each its first `frames` frames,
    zero-padded like the training clips. They are also trained on; the rank of a collapsing student falls on
    any fixed set of real clips."""
    from .data import AudioClipDataset, IterableAudioClipDataset

    waves = []
    if config.streaming:
        stream = IterableAudioClipDataset(corpus, clip_samples=config.clip_samples, train=False,
                                          sampling_rate=SAMPLING_RATE, max_warnings=0)
        for item in stream:
            if item["length"] >= MIN_CLIP_SAMPLES:
                waves.append(item["waveform"][: item["length"]].numpy())
            if len(waves) == config.monitor_clips:
                break
    else:
        clips = AudioClipDataset(corpus, clip_samples=config.clip_samples, train=False, sampling_rate=SAMPLING_RATE,
                                 max_warnings=0)
        for row in np.unique(np.linspace(0, len(clips) - 1, min(len(clips), 4 * config.monitor_clips)).round()):
            item = clips[int(row)]
            if item is not None and item["length"] >= MIN_CLIP_SAMPLES:
                waves.append(item["waveform"][: item["length"]].numpy())
            if len(waves) == config.monitor_clips:
                break
    if len(waves) < 2:
        return None
    features = extractor(waves, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=config.frames,
                         return_tensors="pt", device=device)
    return features["input_values"]


def _rr_targets(encoder: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """One external embedding per clip: looked up by row index (precomputed) or computed from the same crop."""
    if not encoder.requires_audio:
        return encoder(indices=batch["index"])
    clips = [wave[:length].numpy() for wave, length in zip(batch["waveform"], batch["length"].tolist())]
    return encoder(clips, sampling_rate=SAMPLING_RATE)


def _count_new_bad(batch: Mapping[str, Any], dataset: Any, state: TrainState, bad_seen: set[int]) -> int:
    """Unusable clips met for the first time by this process (streams only report a running count)."""
    if isinstance(dataset, StreamingPretrainingClips):
        total = dataset.num_skipped
        new, state.streaming_skipped = max(0, total - state.streaming_skipped), total
        return new
    new = 0
    for bad in batch.get("bad_indices", []):
        for index in bad:
            if index not in bad_seen:
                bad_seen.add(index)
                new += 1
    return new


def _postfix(record: Mapping[str, Any]) -> dict[str, str]:
    short = {"loss": "loss", "frame_loss": "frame", "utterance_loss": "utt", "rr_loss": "rr", "target_var": "tvar",
             "pred_var": "pvar"}
    out = {short[k]: f"{record[k]:.4f}" for k in short if k in record}
    if "effective_rank_mean" in record:
        out["rank"] = f"{record['effective_rank_mean']:.1f}"
    out.update(lr=f"{record['lr']:.2e}", decay=f"{record['ema_decay']:.5f}", clips_s=f"{record['clips_per_s']:.1f}")
    if record["skipped_files"]:
        out["skipped"] = str(record["skipped_files"])
    return out


def _log(accelerator: Any, path: Path, record: Mapping[str, Any]) -> None:
    if accelerator.is_main_process:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("step",)}, step=record["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _hparams(config: PretrainConfig) -> dict[str, Any]:
    """Scalar hyper-parameters for TensorBoard's hparams view."""
    flat = {}
    for key, value in config.to_dict().items():
        if key == "model":
            flat.update({f"model.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            flat[key] = value
        elif value is not None:
            flat[key] = str(value)
    return flat


def _reset_accelerate_singletons() -> None:
    """Let a later `pretrain()` call in the same Python process build a fresh Accelerator (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    GradientState._reset_state()
    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state()


# ================================================================================================================
# 6. Export
# ================================================================================================================


def export_pretrained(accelerator: Any, model: Any, extractor: CATFeatureExtractor, output_dir: Path,
                      summary: Mapping[str, Any]) -> None:
    """The student `CATModel` + feature extractor + `training_summary.json` in `output_dir` (what
    `AutoModel.from_pretrained(output_dir)` loads), and the whole `CATForPreTraining` in `output_dir/pretraining`
    (to continue pretraining with `init_from`). Each is written into a temporary folder, then moved into place."""
    if accelerator.is_main_process:
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
        try:
            model.cat.save_pretrained(staging / "model")
            extractor.save_pretrained(staging / "model")
            atomic_write_text(staging / "model" / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
            model.save_pretrained(staging / PRETRAINING_DIR)
            extractor.save_pretrained(staging / PRETRAINING_DIR)
            apply_default_modes(staging)  # safetensors writes 0600 files, mkdtemp a 0700 folder
            for item in (staging / "model").iterdir():
                os.replace(item, output_dir / item.name)
            target = output_dir / PRETRAINING_DIR
            old = output_dir / f".old-{PRETRAINING_DIR}"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(staging / PRETRAINING_DIR, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()


def _summary(config, accelerator, corpus, dataset, rr_encoder, model, state, session_metrics, output_dir) -> dict:
    """`training_summary.json`: the facts the model card shows (steps, batch, lr, wall time, hardware, losses).

    Final losses are means over the last FINAL_LOSS_WINDOW records of metrics.jsonl, which spans resumed sessions.
    """
    path = output_dir / METRICS_FILE
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else session_metrics
    window = records[-FINAL_LOSS_WINDOW:]
    finals = {}
    for name in LOSS_NAMES + VARIANCE_NAMES:
        values = [m[name] for m in window if name in m]
        if values:
            finals[f"final_{name}"] = round(float(np.mean(values)), 6)
    for name in ("effective_rank", "effective_rank_cls", "effective_rank_mean"):
        values = [m[name] for m in records if name in m]
        if values:
            finals[f"final_{name}"] = round(float(values[-1]), 3)
        if name in state.initial_ranks:
            finals[f"initial_{name}"] = round(float(state.initial_ranks[name]), 3)
    num_examples = len(dataset) if isinstance(dataset, PretrainingClips) else None
    data = config.data if isinstance(config.data, (str, os.PathLike)) else f"{type(config.data).__name__} (in memory)"
    return {
        "mode": "self-supervised pretraining (EMA teacher + Representation Regularization)"
        if rr_encoder is not None else "self-supervised pretraining (EMA teacher)",
        "model_preset": config.model.get("preset") or config.init_from,
        "num_parameters": sum(p.numel() for p in model.cat.parameters()),
        "dataset": str(data),
        "num_train_examples": num_examples,
        "steps": state.step,
        "epochs": round(state.clips_seen / num_examples, 3) if num_examples else None,
        "batch_size": config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
        "per_device_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "clone_batch": model.config.clone_batch,
        "clip_frames": config.frames,
        "learning_rate": config.learning_rate,
        "lr_scheduler": "cosine with linear warm-up",
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "precision": "fp32" if config.mixed_precision == "no" else f"{config.mixed_precision} mixed precision",
        "seed": config.seed,
        "rr_encoder": getattr(rr_encoder, "name", None) or "none",
        "rr_loss_weight": model.config.rr_loss_weight if rr_encoder is not None else 0.0,
        "ema_decay_final": model.teacher_decay(state.step),
        "skipped_files": state.skipped_files,
        "wall_time_s": round(state.train_seconds, 1),
        "hardware": describe_hardware(accelerator),
        "final_loss_window_steps": len(window),
        **finals,
        "config": config.to_dict(),
    }


def describe_hardware(accelerator: Any) -> str:
    """"1 x CPU (x86_64, 2 cores), torch 2.13.0" / "4 x NVIDIA H100 ...": the compute line of summaries and cards."""
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{accelerator.num_processes} x {name}, torch {torch.__version__}"


# ================================================================================================================
# 7. Command line
# ================================================================================================================


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help=f"recipe name ({', '.join(available_recipes())}) or a YAML file")
    parser.add_argument("--data", help="corpus: folder, audiofolder, path,tags CSV/JSONL, Hub dataset, saved dataset")
    parser.add_argument("--output-dir", help="where the model, checkpoints and logs go")
    parser.add_argument("--max-steps", type=int, help="optimiser steps of the schedule")
    parser.add_argument("--batch-size", type=int, help="clips per device per micro-batch")
    parser.add_argument("--threads", type=int, help="torch CPU threads (one per process is fastest on a shared machine)")
    parser.add_argument("--rr-encoder", help="external encoder spec for RR (hf:..., cache:DIR, column:NAME, "
                                             "python:module:fn?embedding_dim=D) or 'none'")
    parser.add_argument("--streaming", action="store_true", default=None, help="stream the corpus")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint in --output-dir (or 'auto': if any; or a path)")
    parser.add_argument("--stop-at-step", type=int, help="end this session at this step with a checkpoint")
    parser.add_argument("--allow-changed", metavar="KEY[,KEY...]",
                        help="with --resume: continue the checkpoint's state although these settings differ from the "
                             "run that wrote it (e.g. max_steps,batch_size)")
    parser.add_argument("--overwrite-output-dir", action="store_true", default=None,
                        help="write into --output-dir although it holds a model pretraining did not write (the "
                             "export replaces it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set learning_rate=1e-4 --set model.clone_batch=8")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    config = PretrainConfig.from_yaml(args.config)
    flags = {"data": args.data, "output_dir": args.output_dir, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "threads": args.threads, "rr_encoder": args.rr_encoder,
             "streaming": args.streaming,
             "resume": args.resume, "stop_at_step": args.stop_at_step,
             "resume_allow_changed": args.allow_changed.split(",") if args.allow_changed else None,
             "overwrite_output_dir": args.overwrite_output_dir}
    config = config.with_overrides({k: v for k, v in flags.items() if v is not None})
    return config.with_overrides(args.overrides)


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = pretrain(config_from_args(args))
    except CheckpointWriteError as err:  # disk full, ...: the message says what is intact
        print(f"cat-hf pretrain: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # bad config / corpus: a message naming the fix, no traceback
        print(f"cat-hf pretrain: error: {err}", file=sys.stderr)
        return 2
    stopped_by = result.get("interrupted")
    if stopped_by:  # checkpoint saved; the shell convention for a job a signal stopped: 128 + its number
        return 128 + signal.Signals[stopped_by] if stopped_by in signal.Signals.__members__ else 1
    return 0  # finished, or a session ended at stop_at_step with a checkpoint to resume from


def check_run_folder(config: PretrainConfig) -> None:
    """What `output_dir` holds may be written over: no model pretraining did not write (`check_output_dir`), and
    with --resume a complete checkpoint written with the same state-shaping settings (`check_resume_settings`)."""
    check_output_dir(config)
    output_dir = Path(config.output_dir).expanduser()
    checkpoint = find_resume_checkpoint(config.resume, Checkpoints(None, output_dir, config.keep_checkpoints))
    check_resume_settings(checkpoint, config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m cat_hf.pretrain` / `accelerate launch -m cat_hf.pretrain`."""
    parser = argparse.ArgumentParser(prog="cat_hf.pretrain", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    return run_cli(parser.parse_args(argv))


__all__ = [
    "PretrainConfig",
    "PretrainingClips",
    "StreamingPretrainingClips",
    "EpochSampler",
    "TrainState",
    "CheckpointWriteError",
    "Checkpoints",
    "StopSignals",
    "add_cli_arguments",
    "available_recipes",
    "build_dataloader",
    "build_model",
    "build_rr_encoder",
    "check_output_dir",
    "check_resume_settings",
    "check_run_folder",
    "checkpoint_damage",
    "config_from_args",
    "cosine_schedule_with_warmup",
    "export_pretrained",
    "find_resume_checkpoint",
    "iterate_batches",
    "load_pretraining_corpus",
    "main",
    "parameter_groups",
    "pretrain",
    "resolve_recipe",
    "run_cli",
]


if __name__ == "__main__":
    sys.exit(main())
