"""A training run's folder: the names of what a run writes, and its checkpoints, written whole and resumed exactly.

    <output_dir>/
        checkpoints/step-0000100/   `accelerator.save_state` + trainer_state-rank*.json + the run's config YAML +
                                     checkpoint_manifest.json (size and SHA-256 of every file, written last)
        metrics.jsonl, tensorboard/ (pretraining), logs/ (finetuning trackers), training_summary.json

A checkpoint is written into a temporary folder and renamed into place, so a crash mid-save never leaves a
half-written checkpoint that `--resume` would pick up; a save that fails (disk full) leaves the previous one intact
and says so. `--resume` takes the newest checkpoint whose files all match its manifest, passing over damaged ones
with a warning, and refuses to continue a state under settings that differ from those of the run that wrote it
unless told by name (`--allow-changed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .files import apply_default_modes, atomic_write_text, file_sha256, safetensors_damage, zip_damage
from .training_config import AUTO, RecipeConfig, load_yaml

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE_FILE = "trainer_state-rank{rank}.json"
CHECKPOINT_MANIFEST_FILE = "checkpoint_manifest.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training_summary.json"
#: Tracker folders: pretraining's TensorBoard project (in the output folder), finetuning's trackers (under logs/).
TENSORBOARD_PROJECT = "tensorboard"
LOGS_DIR = "logs"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission, ...); the previous one is left as it was."""


@dataclass
class TrainState:
    """Where a run is; saved per process with every checkpoint (JSON), restored by --resume. The loops add their
    own fields in a subclass."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches this process has taken from the current epoch
    train_seconds: float = 0.0  # summed over sessions
    skipped_files: int = 0

    def save(self, folder: Path, rank: int) -> None:
        atomic_write_text(folder / TRAINER_STATE_FILE.format(rank=rank), json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, folder: Path, rank: int):
        path = folder / TRAINER_STATE_FILE.format(rank=rank)
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: the checkpoint was written by a run with fewer processes, or is damaged; "
                "resume with the same number of processes, or from another checkpoint."
            )
        return cls(**json.loads(path.read_text(encoding="utf-8")))


class Checkpoints:
    """`output_dir/checkpoints/step-XXXXXXX` folders of `accelerator.save_state`, written atomically, last K kept."""

    def __init__(self, accelerator: Any, output_dir: Path, keep: int):
        self.accelerator = accelerator
        self.root = Path(output_dir) / CHECKPOINTS_DIR
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
                logger.warning("Resuming at step %d: removing the later checkpoint %s of the abandoned run.", step,
                               later)
                shutil.rmtree(later, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, state: TrainState, config: RecipeConfig) -> Path:
        """All processes call this together. A save that fails (disk full, ...) removes its temporary folder, leaves
        the earlier checkpoints alone and raises CheckpointWriteError saying so."""
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
                atomic_write_text(tmp / config.config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
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
        return _newest_complete(checkpoints, required=resume == "latest")
    path = Path(resume).expanduser()
    if not (path / TRAINER_STATE_FILE.format(rank=0)).is_file():
        raise ValueError(f"--resume {resume}: not a checkpoint folder (no {TRAINER_STATE_FILE.format(rank=0)}).")
    problem = checkpoint_damage(path)
    if problem:
        earlier = [p.name for p in checkpoints.all() if p.resolve() != path.resolve()]
        raise ValueError(f"--resume {resume}: the checkpoint is damaged ({problem}). Resume from another one"
                         + (f" (in {checkpoints.root}: {', '.join(earlier)})." if earlier else "."))
    return path


def _newest_complete(checkpoints: Checkpoints, required: bool) -> Path | None:
    found = checkpoints.all()
    if not found and required:
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


def check_resume_settings(checkpoint: Path | None, config: RecipeConfig) -> None:
    """ValueError naming every setting that shapes the training state (data, batch, seed, schedule, optimiser,
    architecture, ...) and differs from the run that wrote `checkpoint`, unless listed in
    `config.resume_allow_changed` (`--allow-changed KEY,...`). A key of a mapping field (`model.num_hidden_layers`)
    is also allowed by the field's name (`model`); a value `auto` is resolved when the run starts and not compared."""
    saved_file = checkpoint / config.config_file if checkpoint is not None else None
    if saved_file is None or not saved_file.is_file():
        return
    try:
        saved = load_yaml(saved_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"--resume: {saved_file} cannot be read ({error}).") from error
    allowed = set(config.resume_allow_changed or [])
    before, now = config.state_settings(saved), config.state_settings()
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        name = key.replace(" ", ".").split(".")[0]
        if old == new or key in allowed or name in allowed or AUTO in (old, new):
            continue
        if key not in before and "." not in key:  # a setting newer than the run that wrote the checkpoint
            continue
        changed.append((key, old, new))
    if changed:
        listing = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
        names = ",".join(dict.fromkeys(key.split(" ")[0] for key, _, _ in changed))
        raise ValueError(
            f"--resume: these settings differ from the run that wrote {checkpoint}: {listing}. Resuming continues "
            f"its saved state exactly only with the same settings (they are in {saved_file}): run with those "
            f"values, or, to continue that state under the new ones, say so with --allow-changed {names} "
            f"(--set resume_allow_changed=[{names}])."
        )


__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_MANIFEST_FILE",
    "CHECKPOINT_PREFIX",
    "CheckpointWriteError",
    "Checkpoints",
    "LOGS_DIR",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "TENSORBOARD_PROJECT",
    "TRAINER_STATE_FILE",
    "TrainState",
    "check_resume_settings",
    "checkpoint_damage",
    "find_resume_checkpoint",
]
