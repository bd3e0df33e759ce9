"""Does Representation Regularization (RR) speed up CAT pretraining on real audio? Linear probes against steps.

Two pretraining runs on `pretrain-mix` (see corpora.py) that differ only in RR: same preset, seed, data order,
masks, schedule and number of steps; one regresses the student's CLS onto the embeddings of a frozen, genuinely
pretrained encoder (`--rr-teacher`: aisfx, a sound-effect CNN, or Resemblyzer, a speaker encoder; cat_hf.teachers),
the other has no RR. The student is exported at log-spaced steps (plus one third of the run, the goal's mark) and
probed: a logistic regression on frozen pooled features (CLS token and mean of the patch tokens) of the
`instruments` corpus, and optionally `spoken-language`, scored by 5-fold cross-validation over all clips of the
corpus (the headline; the fixed test split of 66 clips is too small to rank checkpoints) and, alongside, trained on
the fixed train split with the weight decay chosen on the validation split and scored on the test split.
Nothing the teacher or the students saw carries the probe's labels.

The goal (the RR issue): RR reaches the final probe accuracy of the run without RR in at most a third of the steps.

Stages, each resumable (finished parts are skipped, partial ones continue) and bounded by `--time-budget` seconds,
so the experiment runs in pieces of a few minutes:

    embed     the teacher's embeddings of the pretraining clips, once (cat_hf.embed cache, one shard at a time)
    pretrain  both runs in segments (`stop_at_step` + resume), interleaved checkpoint by checkpoint; the student is
              exported to `students/<run>/step-XXXXXXX` at each checkpoint (step 0 = the shared initialisation)
    probe     pooled features of every exported student (cached as .npz) and the linear probes (probes.json)
    report    report.md (tables, steps-to-reach ratio, losses, times) and convergence.png
    all       the four in order, as far as the budget goes

    python benchmarks/convergence_rr.py all --output-dir runs/convergence-rr --time-budget 540

Output folder: `experiment.json` (the settings, written first; a later call with other settings is refused),
`rr-cache-<teacher>/`, `runs/{no-rr,rr}/` (pretraining outputs, checkpoints, metrics.jsonl), `students/`,
`features/<corpus>/<run>/step-XXXXXXX.npz`, `probes.json`, `report.md`, `convergence.png`. Every file is written
under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F

from cat_hf.configuration_cat import RRLossType
from cat_hf.files import atomic_write_bytes, atomic_write_text

def rr_teachers() -> dict[str, tuple[int, str]]:
    """The shipped frozen RR teachers (`cat_hf.teachers`): name -> (embedding size, description)."""
    from cat_hf.teachers import TEACHERS

    return {name: (t.embedding_dim, f"{name} {t.weights.version} ({t.knows})") for name, t in TEACHERS.items()}


def teacher_spec(teacher: str) -> str:
    """The encoder spec of an RR teacher: a shipped teacher is named by its name."""
    return teacher

RUNS = ("no-rr", "rr")
POOLINGS = ("cls", "mean")
SPLITS = ("train", "validation", "test")
PROBE_CORPORA = ("instruments", "spoken-language", "spoken-words")
#: L2 penalties tried by the linear probe; the one with the best validation accuracy is used for the test score.
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: The cross-validated probe: folds over all clips of the corpus (train + validation + test); it tries the same L2
#: penalties as the fixed-split probe.
CV_FOLDS = 5
#: The accuracy the goal and the plot are judged on. The fixed test split of `instruments` has 66 clips, so one
#: checkpoint's test accuracy moves by +-0.06 (binomial s.d.); 5-fold cross-validation over all 660 clips scores
#: every clip once and brings that to +-0.02.
HEADLINE_METRIC = "cv_accuracy"
METRIC_NAMES = {"cv_accuracy": f"{CV_FOLDS}-fold cross-validated accuracy over all clips",
                "test_accuracy": "accuracy on the fixed test split"}  # fmt: skip
SAMPLING_RATE = 16000

SETTINGS_FILE = "experiment.json"
PROBES_FILE = "probes.json"
REPORT_FILE = "report.md"
PLOT_FILE = "convergence.png"
STUDENT_INFO_FILE = "student.json"
#: Seconds per pretraining step assumed before a run has measured its own (conservative for cat-tiny on 2 cores).
DEFAULT_SECONDS_PER_STEP = 3.0
#: Start-up of a pretraining segment (corpus, model, checkpoint load and save), added to its time estimate.
SEGMENT_OVERHEAD_SECONDS = 30.0
#: Seconds per probe clip assumed before a student's features have been timed (measured: 20-35 ms, 1 thread).
DEFAULT_PROBE_SECONDS_PER_CLIP = 0.06
#: Seconds assumed for fitting one student's probes (fixed split + cross-validation) before one has been timed.
DEFAULT_PROBE_FIT_SECONDS = 60.0
#: Losses stored with a student: the mean of the records logged in its last LOSS_WINDOW_STEPS steps.
LOSS_WINDOW_STEPS = 100
#: Seconds per clip assumed for teacher embeddings before a shard is timed (aisfx, the slower: 120-220 ms).
DEFAULT_EMBED_SECONDS_PER_CLIP = 0.25


class ExperimentError(ValueError):
    """The experiment cannot go on as asked; the message names the fix."""


# ================================================================================================================
# Settings
# ================================================================================================================


def default_checkpoints(steps: int) -> list[int]:
    """Log-spaced export steps (doubling from about steps / 30), the last step, and steps / 3 (the goal's mark)."""
    points = {steps, max(1, round(steps / 3))}
    step = max(1, steps // 30)
    while step < steps:
        points.add(step)
        step *= 2
    return sorted(points)


@dataclass
class Settings:
    """Everything the results depend on; stored in `experiment.json` by the first call."""

    corpora_root: str = "/work/corpora"
    pretrain_corpus: str = "pretrain-mix"
    pretrain_clips: int | None = None  # a seeded subset of the training clips (smoke tests); None = all
    # pretraining: the packaged `tiny` recipe (cat-tiny, clone_batch 2, 2.56 s crops, EMA 0.99 -> 0.999) plus:
    preset: str = "cat-tiny"
    steps: int = 3000
    checkpoints: list[int] = field(default_factory=list)
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 300
    seed: int = 1
    rr_loss_weight: float = 1.0
    rr_loss_type: str = "mse"
    # the EMA teacher's decay schedule; None keeps the tiny recipe's (0.99 rising to 0.999 by step 200)
    ema_decay: float | None = None
    ema_end_decay: float | None = None
    ema_anneal_end_step: int | None = None
    embed_shard_size: int = 256
    embed_max_seconds: float = 10.0
    # probing
    probe_corpora: list[str] = field(default_factory=lambda: ["instruments", "spoken-language"])
    probe_max_clips: int | None = None  # per split (smoke tests); None = all
    probe_max_windows: int = 4  # windows of the student's input length averaged per clip
    rr_teacher: str = "aisfx"  # a key of rr_teachers()

    def __post_init__(self) -> None:
        if not self.checkpoints:
            self.checkpoints = default_checkpoints(self.steps)
        self.checkpoints = sorted({int(s) for s in self.checkpoints})

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ExperimentError(f"--steps and --batch-size must be >= 1, got {self.steps} and {self.batch_size}.")
        if self.checkpoints[0] < 1 or self.checkpoints[-1] != self.steps:
            raise ExperimentError(
                f"--checkpoints {self.checkpoints} must be steps between 1 and --steps {self.steps} and end at it; "
                f"e.g. {','.join(map(str, default_checkpoints(self.steps)))}."
            )
        if self.rr_teacher not in rr_teachers():
            raise ExperimentError(f"Unknown --rr-teacher {self.rr_teacher!r}; use one of {sorted(rr_teachers())}.")
        unknown = sorted(set(self.probe_corpora) - set(PROBE_CORPORA))
        if unknown:
            raise ExperimentError(f"Unknown probe corpora {unknown}; use some of {list(PROBE_CORPORA)}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ExperimentError(f"--warmup-steps must be in [0, --steps), got {self.warmup_steps}.")
        root = Path(self.corpora_root)
        for name in [self.pretrain_corpus, *self.probe_corpora]:
            if not (root / name / "corpus.json").is_file():
                raise ExperimentError(
                    f"Corpus {name!r} is not built under {root}; build it with: python benchmarks/corpora.py build "
                    f"{name} --root {root}"
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExperimentError(f"{SETTINGS_FILE} has unknown keys {unknown}; it was written by another version.")
        return cls(**values)


#: Settings passed to the model config under the same names (None = the recipe's value).
EMA_SETTINGS = ("ema_decay", "ema_end_decay", "ema_anneal_end_step")


def _store_settings(path: Path, settings: Settings) -> None:
    atomic_write_text(path, json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def resolve_settings(output_dir: Path, given: Mapping[str, Any]) -> Settings:
    """The stored settings, or new ones from the command line; explicit flags that contradict a stored setting are
    refused (a finished part computed with other settings must not be mixed in), except `--probe-corpora` naming
    the stored corpora and more, which extends the stored list."""
    path = output_dir / SETTINGS_FILE
    if path.is_file():
        stored = Settings.from_dict(json.loads(path.read_text(encoding="utf-8")))
        wanted = given.get("probe_corpora")
        if wanted is not None and set(stored.probe_corpora) <= set(wanted):
            # More probe corpora only add results: nothing computed so far depends on the list.
            added = [name for name in wanted if name not in stored.probe_corpora]
            if added:
                stored.probe_corpora = [*stored.probe_corpora, *added]
                stored.validate()
                _store_settings(path, stored)
                print(f"[settings] probe corpora extended by {added}")
            given = {**given, "probe_corpora": None}
        conflicts = {k: (getattr(stored, k), v) for k, v in given.items() if v is not None and getattr(stored, k) != v}
        if conflicts:
            listed = ", ".join(f"{k}: stored {old!r}, given {new!r}" for k, (old, new) in conflicts.items())
            raise ExperimentError(
                f"{output_dir} holds an experiment with other settings ({listed}); drop those flags to continue it, "
                "or choose another --output-dir."
            )
        return stored
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    settings.validate()
    output_dir.mkdir(parents=True, exist_ok=True)
    _store_settings(path, settings)
    return settings


# ================================================================================================================
# Small helpers
# ================================================================================================================


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


class Budget:
    """Wall-clock seconds left to this call; every stage stops before starting work it cannot finish in time."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.remaining() >= seconds


def read_split_csv(csv_path: Path) -> list[dict[str, str]]:
    """Rows of a corpus CSV with `path` made absolute (paths in the CSV are relative to it)."""
    with open(csv_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str((csv_path.parent / row["path"]).resolve())
    return rows


def seeded_subset(rows: list[dict[str, str]], count: int | None, seed: int, key: str | None = None
                  ) -> list[dict[str, str]]:
    """`count` rows drawn with a fixed seed, kept in their original order (all rows when count is None). With `key`
    the draw is stratified: the groups (e.g. labels) take turns, so every group is represented when it can be."""
    if count is None or count >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    if key is None:
        keep = rng.permutation(len(rows))[:count]
    else:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row[key], []).append(i)
        shuffled = [[members[j] for j in rng.permutation(len(members))] for _, members in sorted(groups.items())]
        turns = [i for position in range(max(map(len, shuffled))) for members in shuffled
                 if position < len(members) for i in [members[position]]]  # fmt: skip
        keep = turns[:count]
    return [rows[i] for i in sorted(keep)]


# ================================================================================================================
# The experiment's folders
# ================================================================================================================


class Experiment:
    """Paths and settings of one experiment folder."""

    def __init__(self, output_dir: Path, settings: Settings):
        self.root = output_dir
        self.settings = settings
        self.rr_cache = output_dir / f"rr-cache-{settings.rr_teacher}"

    @property
    def pretrain_data(self) -> str:
        """The pretraining corpus CSV: the corpus's own train.csv, or a written seeded subset of it."""
        source = Path(self.settings.corpora_root) / self.settings.pretrain_corpus / "train.csv"
        if self.settings.pretrain_clips is None:
            return str(source)
        subset = self.root / "pretrain-subset.csv"
        if not subset.is_file():
            rows = seeded_subset(read_split_csv(source), self.settings.pretrain_clips, self.settings.seed)
            lines = ["path"] + [row["path"] for row in rows]
            atomic_write_text(subset, "\n".join(lines) + "\n")
        return str(subset)

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def student_dir(self, run: str, step: int) -> Path:
        return self.root / "students" / run / f"step-{step:07d}"

    def exported_steps(self, run: str) -> list[int]:
        return [s for s in [0, *self.settings.checkpoints] if (self.student_dir(run, s) / STUDENT_INFO_FILE).is_file()]

    def features_file(self, corpus: str, run: str, step: int) -> Path:
        return self.root / "features" / corpus / run / f"step-{step:07d}.npz"

    def pretrain_config(self, run: str, stop_at_step: int | None) -> Any:
        """The `cat_hf.pretrain` config of a run: the `tiny` recipe plus the experiment's settings. The two runs
        differ only in `rr_encoder` (and, through it, the RR projector that only the RR run has)."""
        from cat_hf.pretrain import PretrainConfig

        s = self.settings
        overrides: dict[str, Any] = {
            "data": self.pretrain_data,
            "output_dir": str(self.run_dir(run)),
            "max_steps": s.steps,
            "batch_size": s.batch_size,
            "learning_rate": s.learning_rate,
            "warmup_steps": s.warmup_steps,
            "seed": s.seed,
            "model.preset": s.preset,
            "model.rr_embedding_dim": rr_teachers()[s.rr_teacher][0],
            "model.rr_loss_weight": s.rr_loss_weight,
            "model.rr_loss_type": s.rr_loss_type,
            **{f"model.{name}": getattr(s, name) for name in EMA_SETTINGS if getattr(s, name) is not None},
            "rr_encoder": f"cache:{self.rr_cache}" if run == "rr" else "none",
            "num_workers": 0,
            "save_every": 0,  # checkpoints come from stop_at_step, one per segment
            "keep_checkpoints": 2,
            "log_every": 10,
            "report_to": "none",
            "progress_bar": False,
            "resume": "auto",
            "stop_at_step": stop_at_step,
        }
        return PretrainConfig.from_yaml("tiny").with_overrides(overrides)


# ================================================================================================================
# Stage 1: embeddings of the RR teacher
# ================================================================================================================


def cache_state(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / "index.json")


def run_embed(exp: Experiment, budget: Budget) -> bool:
    """Fill the RR teacher's embedding cache of the pretraining clips, one shard per call of `embed_corpus`, while
    the budget lasts. Returns whether the cache is complete."""
    from cat_hf.embed import embed_corpus

    s = exp.settings
    index = cache_state(exp.rr_cache)
    if index and index.get("complete"):
        print(f"[embed] {exp.rr_cache} is complete ({index['num_embeddings']} embeddings).")
        return True
    shard_size = int(index["shard_size"]) if index else s.embed_shard_size  # resume with the cache's own shards
    seconds_per_clip = DEFAULT_EMBED_SECONDS_PER_CLIP
    while True:
        index = cache_state(exp.rr_cache)
        if index and index.get("complete"):
            print(f"[embed] complete: {index['num_embeddings']} embeddings, {index['num_failed']} clips failed.")
            return True
        done = len(index["shards"]) if index else 0
        with open(exp.pretrain_data, encoding="utf-8", newline="") as handle:
            num_clips = sum(1 for _ in csv.DictReader(handle))
        estimate = min(shard_size, num_clips - done * shard_size) * seconds_per_clip + 10.0
        if not budget.allows(estimate):
            total = math.ceil(num_clips / shard_size)
            print(f"[embed] stopping for the time budget with {done} of {total} shards done (next shard needs about "
                  f"{estimate:.0f} s); run the same command again to continue.")
            return False
        start = time.perf_counter()
        report = embed_corpus(exp.pretrain_data, teacher_spec(s.rr_teacher), exp.rr_cache, shard_size=shard_size,
                              device="cpu", max_seconds=s.embed_max_seconds, max_shards=1, progress=False)
        seconds = time.perf_counter() - start
        if report.shards_computed:
            clips = min(shard_size, report.num_examples)
            seconds_per_clip = max(seconds_per_clip * 0.25, seconds / clips)
            print(f"[embed] shard done in {seconds:.0f} s ({1000 * seconds / clips:.0f} ms per clip); "
                  f"{report.num_embeddings} of {report.num_examples} clips embedded.")


# ================================================================================================================
# Stage 2: the two pretraining runs, in segments, with student exports
# ================================================================================================================


def latest_checkpoint(exp: Experiment, run: str) -> tuple[int, Path | None]:
    from cat_hf.pretrain import CHECKPOINT_PREFIX, CHECKPOINTS_DIR

    root = exp.run_dir(run) / CHECKPOINTS_DIR
    found = sorted(
        (int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()
    ) if root.is_dir() else []  # fmt: skip
    return found[-1] if found else (0, None)


def seconds_per_step(exp: Experiment) -> float:
    """Measured wall seconds per step (the latest checkpoint of either run), else a conservative default."""
    from cat_hf.pretrain import TRAINER_STATE_FILE

    measured = []
    for run in RUNS:
        _, path = latest_checkpoint(exp, run)
        state = read_json(path / TRAINER_STATE_FILE.format(rank=0)) if path else None
        if state and state.get("step"):
            measured.append(state["train_seconds"] / state["step"])
    return max(measured) if measured else DEFAULT_SECONDS_PER_STEP


def _save_student(exp: Experiment, run: str, step: int, model: Any, info: Mapping[str, Any]) -> Path:
    """Write the student encoder + feature extractor atomically: a temporary folder renamed into place."""
    from cat_hf import CATFeatureExtractor

    config = exp.pretrain_config(run, None)
    target = exp.student_dir(run, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        model.cat.save_pretrained(staging)
        CATFeatureExtractor.from_preset(config.feature_preset, max_length=config.frames).save_pretrained(staging)
        atomic_write_text(staging / STUDENT_INFO_FILE, json.dumps(dict(info), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def export_initial_student(exp: Experiment, run: str) -> None:
    """Step 0: the initialisation `cat_hf.pretrain` starts from (same seed, same `build_model` call)."""
    from accelerate.utils import set_seed

    from cat_hf.pretrain import build_model

    if (exp.student_dir(run, 0) / STUDENT_INFO_FILE).is_file():
        return
    config = exp.pretrain_config(run, None)
    set_seed(config.seed)
    model = build_model(config)
    _save_student(exp, run, 0, model, {"run": run, "step": 0, "train_seconds": 0.0})


def export_student_from_checkpoint(exp: Experiment, run: str, step: int, checkpoint: Path) -> Path:
    """Load the accelerate checkpoint of `step` into a CATForPreTraining and save its student encoder."""
    from safetensors.torch import load_file

    from cat_hf.pretrain import METRICS_FILE, TRAINER_STATE_FILE, build_model

    config = exp.pretrain_config(run, None)
    model = build_model(config)
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise ExperimentError(f"{weights} is missing: the checkpoint is damaged; delete {checkpoint} and run the "
                              "pretrain stage again (it resumes from the previous checkpoint).")  # fmt: skip
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or [k for k in missing if "position" not in k]:
        raise ExperimentError(f"{weights} does not match the {run} model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); delete {exp.run_dir(run)} and pretrain that run again.")  # fmt: skip
    state = read_json(checkpoint / TRAINER_STATE_FILE.format(rank=0), {})
    metrics = exp.run_dir(run) / METRICS_FILE
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    window = [r for r in records if step - LOSS_WINDOW_STEPS < r["step"] <= step]
    losses = {name: float(np.mean([r[name] for r in window])) for name in
              ("loss", "frame_loss", "utterance_loss", "rr_loss") if window and name in window[-1]}  # fmt: skip
    info = {"run": run, "step": step, "train_seconds": state.get("train_seconds"), "epoch": state.get("epoch"),
            "clips_seen": state.get("clips_seen"), **losses}  # fmt: skip
    return _save_student(exp, run, step, model, info)


def advance_run(exp: Experiment, run: str, target: int, budget: Budget) -> bool:
    """Pretrain `run` up to step `target` in segments that fit the budget, then export the student. Returns whether
    the student of `target` is exported."""
    from cat_hf.pretrain import pretrain

    if (exp.student_dir(run, target) / STUDENT_INFO_FILE).is_file():
        return True
    if run == "rr":
        index = cache_state(exp.rr_cache)
        if not (index and index.get("complete")):
            raise ExperimentError(f"The RR run needs the complete {exp.settings.rr_teacher} cache {exp.rr_cache}; run "
                                  "the embed stage first (python benchmarks/convergence_rr.py embed ...).")  # fmt: skip
    while True:
        current, checkpoint = latest_checkpoint(exp, run)
        if current == target and checkpoint is not None:
            path = export_student_from_checkpoint(exp, run, target, checkpoint)
            print(f"[pretrain] {run}: exported the student of step {target} to {path}")
            return True
        if current > target:
            raise ExperimentError(
                f"Run {run} is at step {current}, past checkpoint {target} whose student was never exported; delete "
                f"{exp.run_dir(run)} and {exp.root / 'students' / run} and pretrain it again."
            )
        per_step = seconds_per_step(exp)
        fit = int((budget.remaining() - SEGMENT_OVERHEAD_SECONDS) / per_step)
        stop = min(target, current + fit)
        if stop <= current:
            print(f"[pretrain] {run}: stopping for the time budget at step {current} (about {per_step:.2f} s per "
                  "step); run the same command again to continue.")
            return False
        print(f"[pretrain] {run}: steps {current + 1}..{stop} (checkpoint {target}, about {per_step:.2f} s per step)")
        result = pretrain(exp.pretrain_config(run, stop))
        if result["interrupted"]:
            raise KeyboardInterrupt(f"pretraining of {run} stopped by {result['interrupted']}; a checkpoint was saved")


def run_pretrain(exp: Experiment, budget: Budget, runs: Sequence[str] = RUNS) -> bool:
    """Both runs, checkpoint by checkpoint (interleaved, so partial results always compare equal steps)."""
    for run in runs:
        export_initial_student(exp, run)
    for target in exp.settings.checkpoints:
        for run in runs:
            if not advance_run(exp, run, target, budget):
                return False
    print(f"[pretrain] done: students of {list(runs)} at steps {[0, *exp.settings.checkpoints]}.")
    return True


# ================================================================================================================
# Stage 3: features of every student and linear probes
# ================================================================================================================


@dataclass
class ProbeCorpus:
    name: str
    waves: dict[str, list[np.ndarray]]
    labels: dict[str, np.ndarray]
    classes: list[str]


def load_probe_corpus(settings: Settings, name: str) -> ProbeCorpus:
    """Decode the fixed train / validation / test splits of a labelled corpus (16 kHz mono)."""
    from cat_hf.audio import load_audio

    folder = Path(settings.corpora_root) / name
    rows = {split: seeded_subset(read_split_csv(folder / f"{split}.csv"), settings.probe_max_clips, settings.seed,
                                 key="label") for split in SPLITS}  # fmt: skip
    classes = sorted({row["label"] for row in rows["train"]})
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({row["label"] for split in SPLITS for row in rows[split]} - set(classes))
    if unknown:
        raise ExperimentError(f"{name}: labels {unknown} occur outside the training split; rebuild the corpus.")
    waves = {split: [load_audio(row["path"], SAMPLING_RATE) for row in rows[split]] for split in SPLITS}
    labels = {split: np.array([index[row["label"]] for row in rows[split]], dtype=np.int64) for split in SPLITS}
    return ProbeCorpus(name, waves, labels, classes)


def clip_windows(wave: np.ndarray, window_samples: int, max_windows: int) -> list[np.ndarray]:
    """A clip no longer than one window is one window (padded by the feature extractor); a longer one gives up to
    `max_windows` full windows spread evenly from its start to its end."""
    if len(wave) <= window_samples:
        return [wave]
    count = min(max_windows, math.ceil(len(wave) / window_samples))
    starts = np.linspace(0, len(wave) - window_samples, count).round().astype(int)
    return [wave[s:s + window_samples] for s in starts]


@torch.inference_mode()
def student_features(folder: Path, waves: Sequence[np.ndarray], max_windows: int, batch_size: int = 32
                     ) -> dict[str, np.ndarray]:
    """Per clip, the CLS token and the mean of the patch tokens of the last layer, averaged over its windows."""
    from cat_hf import CATFeatureExtractor, CATModel

    model = CATModel.from_pretrained(folder).eval()
    extractor = CATFeatureExtractor.from_pretrained(folder)
    frames = int(extractor.max_length)
    window_samples = 400 + 160 * (frames - 1)
    windows, owner = [], []
    for i, wave in enumerate(waves):
        for piece in clip_windows(wave, window_samples, max_windows):
            windows.append(piece)
            owner.append(i)
    pooled = {name: np.zeros((len(windows), model.config.hidden_size), dtype=np.float64) for name in POOLINGS}
    extra = model.config.num_extra_tokens
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        inputs = extractor(batch, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=frames,
                           return_tensors="pt")["input_values"]  # fmt: skip
        hidden = model(input_values=inputs).last_hidden_state
        pooled["cls"][first:first + len(batch)] = hidden[:, 0].double().numpy()
        pooled["mean"][first:first + len(batch)] = hidden[:, extra:].mean(1).double().numpy()
    owner_array = np.array(owner)
    counts = np.bincount(owner_array, minlength=len(waves))[:, None]
    out = {}
    for name, values in pooled.items():
        summed = np.zeros((len(waves), values.shape[1]))
        np.add.at(summed, owner_array, values)
        out[name] = (summed / counts).astype(np.float32)
    return out


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, L2-penalised, fitted to convergence with full-batch L-BFGS (float64,
    zero init: deterministic)."""
    inputs = torch.from_numpy(x).double()
    targets = torch.from_numpy(y)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=1000, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight + bias, targets) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(features: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], num_classes: int
                 ) -> dict[str, Any]:
    """Standardise with the training statistics, choose the L2 penalty on validation accuracy (ties: lower
    validation loss), report the test accuracy of that probe."""
    mean = features["train"].mean(0)
    std = features["train"].std(0) + 1e-6
    x = {split: ((features[split] - mean) / std).astype(np.float64) for split in SPLITS}
    tried = []
    for decay in PROBE_WEIGHT_DECAYS:
        weight, bias = fit_linear_probe(x["train"], labels["train"], num_classes, decay)
        scores = {}
        for split in SPLITS:
            logits = torch.from_numpy(x[split]) @ weight + bias
            target = torch.from_numpy(labels[split])
            scores[f"{split}_accuracy"] = float((logits.argmax(1) == target).double().mean())
            scores[f"{split}_loss"] = float(F.cross_entropy(logits, target))
        tried.append({"weight_decay": decay, **scores})
    best = max(tried, key=lambda t: (t["validation_accuracy"], -t["validation_loss"]))
    return {**best, "tried": tried}


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every clip: each class's clips, in a seeded random order, dealt round-robin to the folds."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)  # the next class starts where this one stopped, so the folds stay balanced
    return assignment


def cross_validated_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = CV_FOLDS
                          ) -> dict[str, Any]:
    """Accuracy of the linear probe when every clip is scored once by a probe fitted on the other folds
    (standardised with that fold's training statistics); the L2 penalty with the best pooled accuracy is reported,
    the same rule for every student."""
    fold_of = stratified_folds(labels, folds)
    correct = dict.fromkeys(PROBE_WEIGHT_DECAYS, 0)
    for fold in range(folds):
        train, held_out = fold_of != fold, fold_of == fold
        mean, std = features[train].mean(0), features[train].std(0) + 1e-6
        x_train = ((features[train] - mean) / std).astype(np.float64)
        x_held_out = torch.from_numpy(((features[held_out] - mean) / std).astype(np.float64))
        for decay in PROBE_WEIGHT_DECAYS:
            weight, bias = fit_linear_probe(x_train, labels[train], num_classes, decay)
            correct[decay] += int(((x_held_out @ weight + bias).argmax(1).numpy() == labels[held_out]).sum())
    by_decay = {decay: count / len(labels) for decay, count in correct.items()}
    best = max(by_decay, key=lambda decay: (by_decay[decay], -decay))
    return {"cv_accuracy": by_decay[best], "cv_weight_decay": best, "cv_folds": folds, "cv_clips": len(labels),
            "cv_tried": {str(decay): accuracy for decay, accuracy in by_decay.items()}}  # fmt: skip


def _has_current_cv(entry: Mapping[str, Any]) -> bool:
    """Whether a probes.json entry has the cross-validated probe with the current folds and L2 grid."""
    cv = entry.get(POOLINGS[0], {})
    return (HEADLINE_METRIC in cv and cv.get("cv_folds") == CV_FOLDS
            and sorted(map(float, cv.get("cv_tried", {}))) == sorted(PROBE_WEIGHT_DECAYS))  # fmt: skip


def probe_entry(loaded: Mapping[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """Fixed-split and cross-validated probes of one student's saved features, for every pooling."""
    entry: dict[str, Any] = {"num_classes": num_classes, "chance": 1.0 / num_classes,
                             "clips": {split: len(loaded[f"{split}_labels"]) for split in SPLITS}}  # fmt: skip
    labs = {split: loaded[f"{split}_labels"] for split in SPLITS}
    for pooling in POOLINGS:
        feats = {split: loaded[f"{split}_{pooling}"] for split in SPLITS}
        entry[pooling] = linear_probe(feats, labs, num_classes)
        entry[pooling].update(cross_validated_probe(np.concatenate([feats[split] for split in SPLITS]),
                                                    np.concatenate([labs[split] for split in SPLITS]), num_classes))
    return entry


def run_probe(exp: Experiment, budget: Budget, corpora: Sequence[str] | None = None) -> bool:
    """Features and probes of every exported student not probed yet; returns whether all are probed."""
    path = exp.root / PROBES_FILE
    results: dict[str, Any] = read_json(path, {})
    s = exp.settings
    seconds_per_student: float | None = None
    fit_seconds = DEFAULT_PROBE_FIT_SECONDS
    for corpus_name in [name for name in s.probe_corpora if corpora is None or name in corpora]:
        done = results.get(corpus_name, {})
        todo = [(step, run) for run in RUNS for step in exp.exported_steps(run)  # new, or probed before the CV probe
                if not _has_current_cv(done.get(run, {}).get(str(step), {}))]  # fmt: skip
        if not todo:
            continue
        corpus = load_probe_corpus(s, corpus_name)
        num_classes = len(corpus.classes)
        for step, run in sorted(todo):
            features_path = exp.features_file(corpus_name, run, step)
            if not features_path.is_file():
                clips = sum(len(corpus.waves[split]) for split in SPLITS)
                estimate = seconds_per_student or DEFAULT_PROBE_SECONDS_PER_CLIP * clips
                if not budget.allows(1.2 * estimate + 5):
                    print(f"[probe] stopping for the time budget (about {estimate:.0f} s per student on "
                          f"{corpus_name}); run the same command again to continue.")
                    return False
                start = time.perf_counter()
                student = exp.student_dir(run, step)
                arrays = {}
                for split in SPLITS:
                    pooled = student_features(student, corpus.waves[split], s.probe_max_windows)
                    arrays.update({f"{split}_{p}": pooled[p] for p in POOLINGS})
                arrays.update({f"{split}_labels": corpus.labels[split] for split in SPLITS})
                buffer = _npz_bytes(arrays)
                atomic_write_bytes(features_path, buffer)
                elapsed = time.perf_counter() - start
                seconds_per_student = elapsed if seconds_per_student is None else max(seconds_per_student, elapsed)
            if not budget.allows(fit_seconds):
                print(f"[probe] stopping for the time budget (about {fit_seconds:.0f} s to fit a student's probes); "
                      "run the same command again to continue.")
                return False
            start = time.perf_counter()
            entry = probe_entry(np.load(features_path), num_classes)
            fit_seconds = max(fit_seconds, 1.2 * (time.perf_counter() - start))
            results.setdefault(corpus_name, {}).setdefault(run, {})[str(step)] = entry
            atomic_write_text(path, json.dumps(results, indent=2) + "\n")
            print(f"[probe] {corpus_name} {run} step {step}: CLS / mean: cross-validated "
                  f"{entry['cls']['cv_accuracy']:.3f} / {entry['mean']['cv_accuracy']:.3f}, test split "
                  f"{entry['cls']['test_accuracy']:.3f} / {entry['mean']['test_accuracy']:.3f}")
    return True


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# ================================================================================================================
# Stage 4: report
# ================================================================================================================


def steps_to_reach(steps: Sequence[int], accuracies: Sequence[float], target: float) -> tuple[int | None, float | None]:
    """(first checkpoint whose accuracy reaches `target`, the step where the piecewise-linear curve through the
    checkpoints first reaches it); None when it never does."""
    for i, (step, accuracy) in enumerate(zip(steps, accuracies)):
        if accuracy >= target:
            if i == 0:
                return step, float(step)
            s0, a0 = steps[i - 1], accuracies[i - 1]
            return step, float(s0 + (target - a0) / (accuracy - a0) * (step - s0))
    return None, None


def steps_held(steps: Sequence[int], accuracies: Sequence[float], target: float) -> int | None:
    """The first checkpoint from which every later checkpoint is at or above `target` (None if the last is not):
    a single lucky checkpoint on a small test split does not count as reaching it."""
    held = None
    for step, accuracy in zip(reversed(steps), reversed(accuracies)):
        if accuracy < target:
            break
        held = step
    return held


def summarise(exp: Experiment) -> dict[str, Any]:
    """Per probe corpus and pooling: the accuracy curves and the steps-to-reach ratio of RR against no RR."""
    results = read_json(exp.root / PROBES_FILE, {})
    final = exp.settings.steps
    summary: dict[str, Any] = {}
    for corpus_name, by_run in results.items():
        for pooling in POOLINGS:
            def curve(run: str, metric: str) -> list[tuple[int, float]]:
                return sorted((int(step), entry[pooling][metric]) for step, entry in by_run.get(run, {}).items()
                              if metric in entry[pooling])  # fmt: skip

            # A corpus probed only before the cross-validated probe existed keeps its test-split numbers.
            metric = HEADLINE_METRIC if any(curve(run, HEADLINE_METRIC) for run in RUNS) else "test_accuracy"
            curves = {run: curve(run, metric) for run in RUNS}
            chance = next(entry["chance"] for entries in by_run.values() for entry in entries.values())
            item: dict[str, Any] = {"metric": metric, "curves": curves, "chance": chance,
                                    "test_split_curves": {run: curve(run, "test_accuracy") for run in RUNS}}
            no_rr = dict(curves["no-rr"])
            trained = [(s, a) for s, a in curves["rr"] if s > 0]  # step 0 is the shared initialisation
            if final in no_rr and trained:
                target = no_rr[final]
                first, interpolated = steps_to_reach([s for s, _ in trained], [a for _, a in trained], target)
                held = steps_held([s for s, _ in trained], [a for _, a in trained], target)
                item.update(target=target, rr_first_checkpoint=first, rr_interpolated_step=interpolated,
                            ratio=None if first is None else first / final, rr_held_from=held,
                            goal_met=first is not None and first <= final / 3,
                            goal_held=held is not None and held <= final / 3,
                            no_rr_improved=0 not in no_rr or target > no_rr[0])  # fmt: skip
            summary[f"{corpus_name}/{pooling}"] = item
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_report(exp: Experiment) -> str:
    s = exp.settings
    summary = summarise(exp)
    model = exp.pretrain_config("no-rr", None).model
    lines = [
        "# RR convergence experiment",
        "",
        (
            f"{s.preset} pretrained for {s.steps} steps on `{s.pretrain_corpus}` "
            f"({'all' if s.pretrain_clips is None else s.pretrain_clips} training clips), batch {s.batch_size}, "
            f"lr {s.learning_rate:g} (warm-up {s.warmup_steps}, cosine), EMA teacher decay {model['ema_decay']:g} "
            f"rising to {model['ema_end_decay']:g} by step {model['ema_anneal_end_step']}, seed {s.seed}; "
            f"RR: {rr_teachers()[s.rr_teacher][1]} embeddings "
            f"(frozen, pretrained), {s.rr_loss_type} weight {s.rr_loss_weight:g}. Linear probe: logistic regression "
            f"on frozen pooled features. Judged on its {METRIC_NAMES[HEADLINE_METRIC]} (L2 chosen by that accuracy); "
            "the accuracy on the fixed test split (L2 chosen on validation) is shown alongside."
        ),
        "",
    ]
    progress = []
    for run in RUNS:
        current, _ = latest_checkpoint(exp, run)
        progress.append(f"{run} at step {current} of {s.steps}, students at {exp.exported_steps(run)}")
    lines += ["Progress: " + "; ".join(progress) + ".", ""]
    for key, item in summary.items():
        corpus_name, pooling = key.split("/")
        title = (f"## {corpus_name}, {'CLS' if pooling == 'cls' else 'mean'} pooling (chance {item['chance']:.3f}; "
                 f"judged on the {METRIC_NAMES[item['metric']]})")
        lines += [title, "", "| step | no RR | RR | RR − no RR | test split: no RR | RR |", "|---|---|---|---|---|---|"]
        by_step = {run: dict(item["curves"][run]) for run in RUNS}
        test_split = {run: dict(item["test_split_curves"][run]) for run in RUNS}
        for step in sorted(set(by_step["no-rr"]) | set(by_step["rr"])):
            a, b = by_step["no-rr"].get(step), by_step["rr"].get(step)
            delta = None if a is None or b is None else b - a
            lines.append(f"| {step} | {_fmt(a)} | {_fmt(b)} | {'–' if delta is None else f'{delta:+.3f}'} | "
                         f"{_fmt(test_split['no-rr'].get(step))} | {_fmt(test_split['rr'].get(step))} |")
        lines.append("")
        if "target" in item:
            if item["rr_first_checkpoint"] is None:
                lines.append(f"RR never reaches the no-RR final accuracy {item['target']:.3f} within {s.steps} steps. "
                             "Goal (at most a third of the steps): **not met**.")
            else:
                lines.append(
                    f"No-RR final accuracy {item['target']:.3f} (step {s.steps}); RR first reaches it at checkpoint "
                    f"{item['rr_first_checkpoint']} (interpolated {item['rr_interpolated_step']:.0f}), ratio "
                    f"{item['ratio']:.2f} of the steps. Goal (at most 1/3): "
                    f"**{'met' if item['goal_met'] else 'not met'}**."
                )
                held = item["rr_held_from"]
                lines.append(
                    "Reached and held at every later checkpoint: "
                    + ("never (the last RR checkpoint is below it)." if held is None else
                       f"from checkpoint {held} ({held / s.steps:.2f} of the steps; goal "
                       f"{'met' if item['goal_held'] else 'not met'} on this stricter reading).")
                )
            if not item["no_rr_improved"]:
                lines.append("Caution: the no-RR run ends no better than the initialisation (step 0), so reaching its "
                             "final accuracy says nothing about convergence.")
            lines.append("")
    header = (f"| run | step | wall s (train) | loss (mean of the last {LOSS_WINDOW_STEPS} steps) | frame | utterance "
              "| RR |")
    lines += ["## Pretraining runs", "", header,
              "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        for step in exp.exported_steps(run):
            info = read_json(exp.student_dir(run, step) / STUDENT_INFO_FILE, {})
            lines.append(f"| {run} | {step} | {_fmt(info.get('train_seconds'), 0)} | {_fmt(info.get('loss'))} | "
                         f"{_fmt(info.get('frame_loss'))} | {_fmt(info.get('utterance_loss'))} | "
                         f"{_fmt(info.get('rr_loss'))} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    atomic_write_text(exp.root / REPORT_FILE, text)
    atomic_write_text(exp.root / "summary.json", json.dumps(summary, indent=2) + "\n")
    if summary:
        plot(exp, summary)
    return text


def plot(exp: Experiment, summary: Mapping[str, Any]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(key.split("/")[0] for key in summary))
    figure, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    colours = {"no-rr": "tab:blue", "rr": "tab:red"}
    styles = {"cls": "-", "mean": "--"}
    first = exp.settings.checkpoints[0]
    for axis, corpus_name in zip(axes[0], corpora):
        for pooling in POOLINGS:
            item = summary.get(f"{corpus_name}/{pooling}")
            if not item:
                continue
            for run in RUNS:
                points = item["curves"][run]
                if points:
                    axis.plot([p[0] for p in points], [p[1] for p in points], styles[pooling], marker="o", markersize=3,
                              color=colours[run], label=f"{'RR' if run == 'rr' else 'no RR'}, {pooling}")  # fmt: skip
            if pooling == "cls" and "target" in item:
                axis.axhline(item["target"], color="grey", linewidth=0.8, linestyle=":",
                             label="no-RR final (CLS)")  # fmt: skip
        axis.axvline(exp.settings.steps / 3, color="black", linewidth=0.8, linestyle="-.", label="1/3 of the steps")
        axis.axhline(summary[f"{corpus_name}/cls"]["chance"], color="lightgrey", linewidth=0.8, label="chance")
        axis.set_xscale("symlog", linthresh=first)
        axis.set_xlim(left=0)
        axis.set_xlabel("pretraining step")
        axis.set_ylabel("linear-probe accuracy (5-fold CV)" if HEADLINE_METRIC == "cv_accuracy" else
                        "linear-probe test accuracy")  # fmt: skip
        axis.set_title(corpus_name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, handlelength=3.5)
    figure.suptitle(f"{exp.settings.preset}: RR ({exp.settings.rr_teacher}) vs no RR, same seed and steps")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(exp.root / PLOT_FILE, buffer.getvalue())


# ================================================================================================================
# Command line
# ================================================================================================================


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("embed", "pretrain", "probe", "report", "all"))
    parser.add_argument("--output-dir", type=Path, default=Path("runs/convergence-rr"))
    parser.add_argument("--time-budget", type=float, default=540.0,
                        help="seconds this call may spend; stages stop before work they cannot finish (default 540)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="pretrain stage: which runs")
    parser.add_argument("--corpora", nargs="+", choices=PROBE_CORPORA, default=None,
                        help="probe stage: only these of the experiment's probe corpora (default: all)")
    group = parser.add_argument_group("settings (fixed by the first call; stored in experiment.json)")
    group.add_argument("--corpora-root")
    group.add_argument("--pretrain-clips", type=int, help="seeded subset of the pretraining clips (smoke tests)")
    group.add_argument("--preset", help="CAT preset (default cat-tiny)")
    group.add_argument("--steps", type=int, help="pretraining steps of both runs (default 3000)")
    group.add_argument("--checkpoints", type=_int_list, help="comma list of export steps, ending at --steps "
                                                             "(default: doubling from steps/30, plus steps/3)")
    group.add_argument("--batch-size", type=int, help="clips per step (default 8)")
    group.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-3)")
    group.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 300)")
    group.add_argument("--seed", type=int, help="seed of both runs (default 1)")
    group.add_argument("--rr-teacher", choices=sorted(rr_teachers()), help="frozen RR teacher (default aisfx)")
    group.add_argument("--rr-loss-weight", type=float, help="RR weight of the RR run (default 1.0)")
    group.add_argument("--rr-loss-type", choices=get_args(RRLossType), help="RR loss of the RR run (default mse)")
    group.add_argument("--ema-decay", type=float, help="EMA teacher decay at the start (default: recipe's 0.99)")
    group.add_argument("--ema-end-decay", type=float, help="EMA decay at and after --ema-anneal-end-step "
                                                           "(default: recipe's 0.999)")
    group.add_argument("--ema-anneal-end-step", type=int, help="step where the decay reaches its end value "
                                                               "(default: recipe's 200)")
    group.add_argument("--probe-corpora", nargs="+", choices=PROBE_CORPORA,
                       help="labelled corpora to probe (default instruments spoken-language)")
    group.add_argument("--probe-max-clips", type=int, help="at most this many clips per split (smoke tests)")
    group.add_argument("--probe-max-windows", type=int, help="windows averaged per long clip (default 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = build_parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # no weight loading / writing bars for every student
    if args.threads:
        torch.set_num_threads(args.threads)
    # every setting that has a flag (the others keep their defaults)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    if given["steps"] is not None and given["warmup_steps"] is None and not (args.output_dir / SETTINGS_FILE).is_file():
        given["warmup_steps"] = given["steps"] // 10
    try:
        settings = resolve_settings(args.output_dir, given)
        exp = Experiment(args.output_dir, settings)
        budget = Budget(args.time_budget)
        started = time.perf_counter()
        if args.stage in ("embed", "all"):
            complete = run_embed(exp, budget)
            if args.stage == "all" and not complete:
                return 0
        if args.stage in ("pretrain", "all"):
            run_pretrain(exp, budget, args.runs)
        if args.stage in ("probe", "all"):  # after an unfinished pretrain stage: probes what exists, if time is left
            run_probe(exp, budget, args.corpora)
        if args.stage in ("report", "all", "probe"):
            print(write_report(exp))
            print(f"report: {exp.root / REPORT_FILE}; plot: {exp.root / PLOT_FILE}")
        print(f"[{args.stage}] {time.perf_counter() - started:.0f} s")
    except ExperimentError as err:
        print(f"convergence_rr: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # SIGTERM / Ctrl-C during pretraining: the run saved a checkpoint first
        print(f"convergence_rr: stopped ({err}); run the same command again to continue.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
