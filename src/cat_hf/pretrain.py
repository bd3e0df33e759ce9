"""Pretraining CAT: bootstrap EMA teacher + Representation Regularization, in plain PyTorch + Accelerate.

The file reads top to bottom in the order a run happens:

1. `PretrainConfig`: the whole recipe in one dataclass. Recipes are YAML files (`recipes/pretrain_base.yaml`, the
   authors' AudioSet recipe; `recipes/pretrain_tiny.yaml`, a few CPU minutes), changed with `--set key=value`
   (`cat_hf.training_config`).
2. Data: any corpus `load_audio_corpus` reads (Hub name, audiofolder, folder of files, CSV, streaming), decoded by
   us (soundfile + soxr), randomly cropped / zero-padded so that the fbank has exactly `target_length` frames.
   An unreadable or empty clip is replaced by the next readable one (batches stay full, which data-parallel
   training needs) and counted.
3. Model (`CATForPreTraining`), AdamW and the warm-up + cosine schedule (`cat_hf.optimization`).
4. The loop: features computed on the accelerator device, masks drawn from a generator seeded by (seed, step,
   micro-batch, process) so a run is reproducible and resumable, forward, backward, gradient clipping, optimiser
   step, EMA teacher update; collapse monitoring (`cat_hf.collapse`); metrics to tqdm, TensorBoard and
   `metrics.jsonl`. Checkpoints (`cat_hf.checkpoints`) every `save_every` steps and when SIGTERM / SIGINT arrives;
   `--resume` continues exactly: the loss sequence after resuming equals the one of an uninterrupted run.
5. Export: the student as a folder `AutoModel.from_pretrained` loads (+ feature extractor + `training_summary.json`),
   and the full pretraining model (teacher, decoder, RR projector) under `pretraining/`.
6. Command line: `cat-hf pretrain --config tiny --data DIR --output-dir OUT`, or
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
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .audio import DEFAULT_SAMPLING_RATE as SAMPLING_RATE
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    LOGS_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    TENSORBOARD_PROJECT,
    TRAINER_STATE_FILE,
    CheckpointWriteError,
    Checkpoints,
    TrainState,
    check_resume_settings,
    checkpoint_damage,
    find_resume_checkpoint,
)
from .collapse import CollapseError, CollapseGuard, embedding_ranks, prediction_variances
from .configuration_cat import CAT_PRESETS, CATConfig
from .feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor
from .files import apply_default_modes, atomic_write_json, atomic_write_text
from .optimization import adamw, build_param_groups, ema_update, warmup_cosine_schedule
from . import training
from .training_config import AUTO, RecipeConfig, add_config_arguments, parse_config

logger = logging.getLogger(__name__)

#: Where a run embeds its corpus with an audio RR encoder (`rr_precompute`), inside the output folder.
RR_CACHE_DIR = "rr-cache"
PRETRAINING_DIR = "pretraining"  # the full CATForPreTraining (teacher, decoder, projector) of the final export
CONFIG_FILE = "pretrain_config.yaml"

#: One 25 ms Kaldi window at 16 kHz: a shorter clip is treated as unusable.
MIN_CLIP_SAMPLES = 400
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
class PretrainConfig(RecipeConfig):
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

    recipe_prefix = "pretrain_"
    setting_noun = "pretraining config key"
    config_file = CONFIG_FILE
    resume_free_settings = frozenset({
        "output_dir", "resume", "stop_at_step", "save_every", "keep_checkpoints", "log_every", "report_to",
        "progress_bar", "num_workers", "threads", "activation_checkpointing", "overwrite_output_dir",
        "resume_allow_changed", "monitor_every", "monitor_clips", "collapse_guard", "min_target_var", "min_pred_var",
        "min_effective_rank", "collapse_patience", "collapse_check_after",
    })
    path_settings = frozenset({"data", "init_from"})

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
        return training.samples_for_frames(self.frames, SAMPLING_RATE)

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


    def state_settings(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """As `RecipeConfig.state_settings`, with the fbank frames in place of the two ways to give them."""
        values = self.to_dict() if values is None else values
        flat = super().state_settings({k: v for k, v in values.items() if k not in ("target_length", "clip_seconds")})
        target_length, clip_seconds = values.get("target_length"), values.get("clip_seconds")
        flat["frames (target_length / clip_seconds)"] = (
            int(target_length) if target_length is not None
            else frames_for_seconds(clip_seconds) if clip_seconds is not None else None)
        return flat


def frames_for_seconds(seconds: float) -> int:
    """10 ms frames of `seconds` of audio, rounded half up to a multiple of 16 (one time patch), at least 16."""
    return max(16, math.floor(float(seconds) * 100 / 16 + 0.5) * 16)


#: `tiny` / `base` (or `pretrain_tiny`) -> the packaged YAML; anything else must be an existing YAML file.
resolve_recipe = PretrainConfig.recipe_path


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
                     num_processes: int) -> tuple[DataLoader, training.EpochSampler | None]:
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
    sampler = training.EpochSampler(len(dataset), config.seed)
    return DataLoader(dataset, sampler=sampler, **common), sampler


# ================================================================================================================
# 3. Model, and what the run folder may hold
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


# ================================================================================================================
# 4. The training loop
# ================================================================================================================


@dataclass
class PretrainState(TrainState):
    """Where a pretraining run is (saved per process with every checkpoint, restored by --resume)."""

    clips_seen: int = 0  # over all processes
    bad_indices: list[int] = field(default_factory=list)  # this process's distinct unusable rows
    streaming_skipped: int = 0  # skip counter of a streamed corpus at the last step
    collapse_guard: dict[str, Any] = field(default_factory=dict)  # CollapseGuard.state_dict()
    initial_ranks: dict[str, float] = field(default_factory=dict)  # effective ranks of the step-0 student


@dataclass
class PretrainRun:
    """What the loop works with, built by `start_run`."""

    config: PretrainConfig
    accelerator: Any
    corpus: Any
    dataset: Dataset | IterableDataset
    rr_encoder: Any
    extractor: CATFeatureExtractor
    output_dir: Path
    model: Any  # as prepared by Accelerate (DDP-wrapped on several processes)
    student_teacher: Any  # the CATForPreTraining inside it
    optimizer: Any
    scheduler: Any
    checkpoints: Checkpoints
    state: PretrainState
    batches: Iterator[dict]
    guard: CollapseGuard
    monitor_inputs: torch.Tensor | None
    resumed_from: Path | None


def pretrain(config: PretrainConfig | Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) pretraining. Returns {"metrics": per-step records of this session, "state": final
    PretrainState, "output_dir", "checkpoint": last checkpoint folder, "interrupted": signal name or None,
    "finished": bool, "model": the unwrapped CATForPreTraining, "process_index", "num_processes"}."""
    config = PretrainConfig.from_any(config)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    check_run_folder(config)  # before anything is written into output_dir
    output_dir = Path(config.output_dir).expanduser()
    # data first: a corpus that cannot work fails before anything is built
    corpus, dataset, rr_encoder = load_pretraining_corpus(config)
    extractor = CATFeatureExtractor.from_preset(config.feature_preset, max_length=config.frames)
    accelerator = training.make_accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_dir=output_dir, log_with="tensorboard" if config.report_to == "tensorboard" else None,
    )
    try:
        run = start_run(config, accelerator, corpus, dataset, rr_encoder, extractor, output_dir)
        return train(run)
    finally:
        training.release_accelerator(accelerator)


def start_run(config: PretrainConfig, accelerator: Any, corpus: Any, dataset: Dataset | IterableDataset,
              rr_encoder: Any, extractor: CATFeatureExtractor, output_dir: Path) -> PretrainRun:
    """Model, optimiser, schedule and data on the accelerator, restored from the checkpoint to resume (if any)."""
    from accelerate.utils import set_seed

    rank, world = accelerator.process_index, accelerator.num_processes
    checkpoints = Checkpoints(accelerator, output_dir, config.keep_checkpoints)
    resume_from = find_resume_checkpoint(config.resume, checkpoints)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_stale_temporaries()
        atomic_write_text(output_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()

    set_seed(config.seed)  # same initialisation on every process
    model = build_model(config)
    groups = build_param_groups(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    optimizer = adamw(groups, learning_rate=config.learning_rate, betas=config.adam_betas, eps=config.adam_epsilon)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                       min_ratio=config.min_lr_ratio, start_ratio=0.0, offset=1)
    dataloader, sampler = build_dataloader(config, dataset, rank, world)
    if isinstance(dataset, IterableDataset):
        # Each process already reads its own shard of the stream; prepare() would instead decode the whole
        # stream on every process (or broadcast it from the main one).
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        # Batches stay on the CPU: the feature extractor takes the raw waveforms and computes on the device.
        model, optimizer, dataloader, scheduler = accelerator.prepare(
            model, optimizer, dataloader, scheduler, device_placement=[True, True, False, True]
        )
    state = PretrainState()
    if resume_from is not None:
        training.load_checkpoint(accelerator, resume_from)
        state = PretrainState.load(resume_from, rank)
        logger.info("Resumed from %s at step %d (epoch %d).", resume_from, state.step, state.epoch)
        checkpoints.rewind(state.step)
    if accelerator.is_main_process:
        _truncate_metrics(output_dir / METRICS_FILE, state.step)  # a resumed run rewrites what came after it
    if config.report_to == "tensorboard":
        accelerator.init_trackers(TENSORBOARD_PROJECT, config=training.tracker_config(config))

    guard = CollapseGuard(config.min_target_var, config.min_pred_var, config.min_effective_rank,
                          config.collapse_patience, config.collapse_check_after, config.collapse_guard)
    guard.load_state_dict(state.collapse_guard)
    batches = training.iterate_batches(accelerator, dataloader, sampler, dataset, state, lambda: _no_usable_audio(
        "streamed" if isinstance(dataset, IterableDataset) else len(dataset)))
    monitor_inputs = monitor_batch(config, corpus, extractor, accelerator.device) if config.monitor_every else None
    rr_encoder = rr_encoder.to(accelerator.device) if rr_encoder is not None else None
    return PretrainRun(config, accelerator, corpus, dataset, rr_encoder, extractor, output_dir, model,
                       accelerator.unwrap_model(model), optimizer, scheduler, checkpoints, state, batches, guard,
                       monitor_inputs, resume_from)


def train(run: PretrainRun) -> dict[str, Any]:
    """Steps until max_steps (or stop_at_step, a signal, a collapse), checkpoints, then the export."""
    from tqdm.auto import tqdm

    config, state, accelerator = run.config, run.state, run.accelerator
    stop_at = min(config.max_steps, config.stop_at_step or config.max_steps)
    _announce(run, stop_at)
    bar = tqdm(total=config.max_steps, initial=state.step, desc="pretrain", dynamic_ncols=True,
               disable=not (config.progress_bar and accelerator.is_local_main_process))
    run.model.train()
    session_start = time.perf_counter()
    bad_seen, session_metrics, last_ranks = set(state.bad_indices), [], {}
    last_checkpoint, interrupted = run.resumed_from, None
    with training.StopSignals() as signals:
        while state.step < stop_at and not interrupted:
            record, interrupted = train_step(run, bad_seen, signals)
            if run.monitor_inputs is not None and (state.step % config.monitor_every == 0 or state.step == stop_at):
                # every process measures the same fixed clips with the same weights: the guard agrees everywhere
                last_ranks = embedding_ranks(run.student_teacher.cat, run.monitor_inputs)
                record.update(last_ranks)
            warnings, collapse = run.guard.update(state.step, record)
            state.collapse_guard = run.guard.state_dict()
            for warning in warnings:
                logger.warning("Possible collapse at %s", warning)
            session_metrics.append(record)
            bar.set_postfix(_postfix({**last_ranks, **record}), refresh=False)  # shown by the update
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == stop_at:
                _log(accelerator, run.output_dir / METRICS_FILE, record)
            periodic = config.save_every and state.step % config.save_every == 0
            if interrupted or collapse or periodic or state.step == stop_at:
                state.bad_indices = sorted(bad_seen)
                last_checkpoint = run.checkpoints.save(state, config)
            if collapse and not interrupted:
                bar.close()
                raise CollapseError(f"{collapse} The training state at step {state.step} is saved in "
                                    f"{last_checkpoint}.")
    bar.close()
    return finish(run, session_metrics, last_checkpoint, interrupted, time.perf_counter() - session_start)


def train_step(run: PretrainRun, bad_seen: set[int],
               signals: training.StopSignals) -> tuple[dict[str, Any], str | None]:
    """One optimiser update over `gradient_accumulation_steps` micro-batches, then the EMA teacher update.
    Returns the step's record (losses and variances averaged over micro-batches and processes) and the signal
    that asks the run to stop, if any process received one: one collective per step carries all of it."""
    config, state, accelerator = run.config, run.state, run.accelerator
    metric_names, world = LOSS_NAMES + VARIANCE_NAMES, accelerator.num_processes
    step_start = time.perf_counter()
    totals = torch.zeros(len(metric_names) + 2, dtype=torch.float64)  # metrics, new unusable clips, stop request
    grad_norm = torch.zeros(())
    for micro in range(config.gradient_accumulation_steps):
        batch = next(run.batches)
        totals[-2] += _count_new_bad(batch, run.dataset, state, bad_seen)
        output, norm = _forward_backward(run, batch, micro)
        grad_norm = norm if norm is not None else grad_norm
        values = [getattr(output, name) for name in LOSS_NAMES] + list(prediction_variances(output).values())
        for i, value in enumerate(values):
            if value is not None:
                value = value.detach().double().cpu() if torch.is_tensor(value) else value
                totals[i] += value / config.gradient_accumulation_steps
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    state.step += 1
    decay = run.student_teacher.teacher_decay(state.step)  # EMA teacher, after the optimiser step
    ema_update(run.student_teacher.teacher, run.student_teacher.cat, decay)
    clips_per_step = config.batch_size * config.gradient_accumulation_steps * world
    state.clips_seen += clips_per_step

    totals[-1] = 1.0 if signals.received else 0.0
    reduced = accelerator.reduce(totals.to(accelerator.device), reduction="sum").double().cpu()
    means = (reduced[: len(metric_names)] / world).tolist()
    state.skipped_files += int(reduced[-2].item())
    step_seconds = time.perf_counter() - step_start
    state.train_seconds += step_seconds
    record = {
        "step": state.step,
        "epoch": state.epoch,
        **{name: means[i] for i, name in enumerate(metric_names) if name != "rr_loss" or run.rr_encoder},
        "lr": lr,
        "ema_decay": decay,
        "grad_norm": float(grad_norm),
        "clips_per_s": clips_per_step / step_seconds,
        "skipped_files": state.skipped_files,
    }
    return record, signals.received or ("signal" if reduced[-1].item() > 0 else None)


def _forward_backward(run: PretrainRun, batch: Mapping[str, Any], micro: int) -> tuple[Any, torch.Tensor | None]:
    """Forward and backward of one micro-batch; the optimiser steps on the last one (the gradient norm then)."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    input_values = training.featurize(run.extractor, batch["waveform"], batch["length"], device)[0]
    rr_embeddings = _rr_targets(run.rr_encoder, batch) if run.rr_encoder is not None else None
    # Masks (and decoder noise) from (seed, step, micro-batch, process): reproducible and resumable.
    seed = training.derive_seed(config.seed, run.state.step, micro, accelerator.process_index)
    mask_generator = torch.Generator().manual_seed(seed)
    noise_generator = mask_generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    grid = (config.frames // run.student_teacher.config.patch_size, run.student_teacher.config.frequency_patches)
    mask = run.student_teacher.make_mask(input_values.shape[0], grid, generator=mask_generator).to(device)
    grad_norm = None
    with accelerator.accumulate(run.model):
        output = run.model(input_values=input_values, mask=mask, rr_embeddings=rr_embeddings, generator=noise_generator)
        accelerator.backward(output.loss)  # divided by the accumulation steps by Accelerate
        if accelerator.sync_gradients:
            # (an infinite bound measures the norm without clipping)
            grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm or math.inf)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    return output, grad_norm


def finish(run: PretrainRun, session_metrics: list[dict[str, Any]], last_checkpoint: Path | None,
           interrupted: str | None, session_seconds: float) -> dict[str, Any]:
    """Export a finished run; say where an unfinished one stopped and how to continue it."""
    config, state, accelerator = run.config, run.state, run.accelerator
    finished = state.step >= config.max_steps
    if interrupted:
        accelerator.print(
            f"Stopped by {interrupted} at step {state.step}; the training state is saved in {last_checkpoint}. "
            f"Continue with the same command plus --resume (or --resume {last_checkpoint})."
        )
    if finished:
        summary = training_summary(run, session_metrics)
        export_pretrained(accelerator, run.student_teacher, run.extractor, run.output_dir, summary)
        accelerator.print(f"Pretraining finished at step {state.step}; model saved to {run.output_dir} "
                          f"(load it with AutoModel.from_pretrained after `import cat_hf`).")
    elif not interrupted:
        accelerator.print(f"Session ended at step {state.step} of {config.max_steps} (stop_at_step); "
                          f"checkpoint {last_checkpoint}; continue with --resume.")
    accelerator.wait_for_everyone()
    return {
        "metrics": session_metrics,
        "state": state,
        "output_dir": str(run.output_dir),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "interrupted": interrupted,
        "finished": finished,
        "model": run.student_teacher,
        "session_seconds": session_seconds,
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
    }


def _announce(run: PretrainRun, stop_at: int) -> None:
    """The run in one line, and the initial effective rank of the monitor clips' embeddings."""
    config, state, accelerator = run.config, run.state, run.accelerator
    student_teacher = run.student_teacher
    accelerator.print(
        f"Pretraining {config.model.get('preset') or config.init_from} "
        f"({sum(p.numel() for p in student_teacher.cat.parameters()) / 1e6:.1f} M encoder parameters) on "
        f"{len(run.dataset) if isinstance(run.dataset, PretrainingClips) else 'a stream of'} clips of "
        f"{config.frames} frames: {config.batch_size} clips x {config.gradient_accumulation_steps} micro-batches x "
        f"{accelerator.num_processes} processes per step, {student_teacher.config.clone_batch} masked clones each, "
        f"RR {getattr(run.rr_encoder, 'name', 'off')}, steps {state.step + 1}..{stop_at} of {config.max_steps}, "
        f"on {training.describe_hardware(accelerator)}"
        + (", activation checkpointing." if config.activation_checkpointing else ".")
    )
    if run.monitor_inputs is not None and state.step == 0:
        state.initial_ranks = ranks = embedding_ranks(student_teacher.cat, run.monitor_inputs)
        accelerator.print(f"Effective rank of the initial student's clip embeddings on {len(run.monitor_inputs)} "
                          f"fixed clips: CLS {ranks['effective_rank_cls']:.1f}, mean {ranks['effective_rank_mean']:.1f}"
                          " (a collapsing run drives it towards 1).")


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


def _count_new_bad(batch: Mapping[str, Any], dataset: Any, state: PretrainState, bad_seen: set[int]) -> int:
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


# ================================================================================================================
# 5. Export
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
            atomic_write_json(staging / "model" / SUMMARY_FILE, summary)
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


def training_summary(run: PretrainRun, session_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """`training_summary.json`: the facts the model card shows (steps, batch, lr, wall time, hardware, losses)."""
    config, state, accelerator, model = run.config, run.state, run.accelerator, run.student_teacher
    num_examples = len(run.dataset) if isinstance(run.dataset, PretrainingClips) else None
    data = config.data if isinstance(config.data, (str, os.PathLike)) else f"{type(config.data).__name__} (in memory)"
    return {
        "mode": "self-supervised pretraining (EMA teacher + Representation Regularization)"
        if run.rr_encoder is not None else "self-supervised pretraining (EMA teacher)",
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
        "rr_encoder": getattr(run.rr_encoder, "name", None) or "none",
        "rr_loss_weight": model.config.rr_loss_weight if run.rr_encoder is not None else 0.0,
        "ema_decay_final": model.teacher_decay(state.step),
        "skipped_files": state.skipped_files,
        "wall_time_s": round(state.train_seconds, 1),
        "hardware": training.describe_hardware(accelerator),
        **_final_metrics(run.output_dir / METRICS_FILE, session_metrics, state),
        "config": config.to_dict(),
        "versions": training.library_versions(),
    }


def _final_metrics(path: Path, session_metrics: list[dict[str, Any]], state: PretrainState) -> dict[str, Any]:
    """Final losses and variances: means over the last FINAL_LOSS_WINDOW records of metrics.jsonl (which spans
    resumed sessions); the last and the initial effective ranks."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else session_metrics
    window = records[-FINAL_LOSS_WINDOW:]
    finals: dict[str, Any] = {"final_loss_window_steps": len(window)}
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
    return finals


# ================================================================================================================
# 6. Command line
# ================================================================================================================


#: The flags beside --config, --resume, --allow-changed and --set (any other setting: --set KEY=VALUE):
#: field -> help.
CLI_FLAGS = {
    "data": "corpus: folder, audiofolder, path,tags CSV/JSONL, Hub dataset, saved dataset",
    "output_dir": "where the model, checkpoints and logs go",
    "max_steps": "optimiser steps of the schedule",
    "batch_size": "clips per device per micro-batch",
    "threads": "torch CPU threads (one per process is fastest on a shared machine)",
    "rr_encoder": "external encoder for RR (hf:..., cache:DIR, column:NAME, python:module:fn?embedding_dim=D, a "
                  "shipped teacher such as aisfx) or 'none'",
    "streaming": "stream the corpus",
    "stop_at_step": "end this session at this step with a checkpoint",
    "overwrite_output_dir": "write into --output-dir although it holds a model pretraining did not write (the export "
                            "replaces it)",
}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig, {"settings": CLI_FLAGS}, recipe_required=True)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return parse_config(PretrainConfig, args)


def check_run_folder(config: PretrainConfig) -> None:
    """What `output_dir` holds may be written over: no model pretraining did not write (`check_output_dir`), and
    with --resume a complete checkpoint written with the same state-shaping settings (`check_resume_settings`)."""
    check_output_dir(config)
    output_dir = Path(config.output_dir).expanduser()
    checkpoint = find_resume_checkpoint(config.resume, Checkpoints(None, output_dir, config.keep_checkpoints))
    check_resume_settings(checkpoint, config)


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
    return training.exit_code(result.get("interrupted"))  # 0 also for a session ended at stop_at_step


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m cat_hf.pretrain` / `accelerate launch -m cat_hf.pretrain`."""
    parser = argparse.ArgumentParser(prog="cat_hf.pretrain", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    return run_cli(parser.parse_args(argv))


__all__ = [
    # run-folder names, defined in cat_hf.checkpoints (hub.py and benchmarks/ import them from here)
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "LOGS_DIR",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "TENSORBOARD_PROJECT",
    "TRAINER_STATE_FILE",
    "checkpoint_damage",
    # this module
    "PretrainConfig",
    "PretrainRun",
    "PretrainState",
    "PretrainingClips",
    "StreamingPretrainingClips",
    "add_cli_arguments",
    "build_dataloader",
    "build_model",
    "build_rr_encoder",
    "check_output_dir",
    "check_run_folder",
    "config_from_args",
    "export_pretrained",
    "load_pretraining_corpus",
    "main",
    "monitor_batch",
    "pretrain",
    "resolve_recipe",
    "run_cli",
    "start_run",
    "train",
    "train_step",
    "training_summary",
]


if __name__ == "__main__":
    sys.exit(main())
