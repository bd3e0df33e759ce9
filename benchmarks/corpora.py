"""Benchmark corpora of real audio built from Debian packages (no internet, nothing recorded by this project).

    python benchmarks/corpora.py build NAME [NAME ...] --root DIR [--seed 0] [--clips-per-class 60] [--force]
    python benchmarks/corpora.py stats NAME --root DIR
    python benchmarks/corpora.py check [NAME ...]          # are the Debian packages there? prints apt-get line
    python benchmarks/corpora.py list

Corpora (`CORPORA`):

- `spoken-words`: keyword classification, one class per digit word ("zero" ... "nine"), every class spoken by
  each installed Asterisk voice (en, es, fr, it, ru: five real speakers, one per language). The packages hold
  ONE recording per (speaker, word), so a class has as many clips as there are voices (5); `--speed-perturb`
  adds speed-perturbed copies of *training* clips only, so validation/test stay untouched real recordings.
- `spoken-language`: language (= Asterisk voice) identification over every prompt of the five voices:
  ~2,600 real clips in 5 balanced classes, the larger speech benchmark.
- `instruments`: NSynth-like instrument-family classification: single notes rendered with fluidsynth from a
  General MIDI sound font (samples of real instruments) for programs grouped into GM families, random pitch,
  velocity and note length per clip, `--clips-per-class` clips per family (chance = 1 / number of families).
- `pretrain-mix`: unlabelled pretraining audio: every Asterisk prompt, the sonic-pi samples, the freedesktop
  and ALSA sounds, and the *training* clips of `instruments` (validation/test clips of the labelled corpora are
  left out, so a pretrained model never saw the clips it is evaluated on), optionally cut into segments.

Layout: `<root>/<name>/<label>/<clip>.wav` (16 kHz mono PCM16, resampled with soxr), the fixed splits
`<root>/<name>/{train,validation,test}.csv` (columns `path,label,...`, paths relative to the CSV; seeded and
stratified by label), `build.json` (the build parameters, written first) and `corpus.json` (statistics, written
last: its presence marks a finished build). Building is idempotent: a finished corpus is skipped, an interrupted
one resumes (every clip is written to a hidden temporary name and renamed), and a corpus built with other
parameters is refused until `--force` (rebuild) or another `--root` is given.

This script installs nothing: `check` and `build` list the missing Debian packages and print the exact
`apt-get install -y ...` command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

#: Rate of every written clip. Equals `cat_hf.audio.DEFAULT_SAMPLING_RATE`; kept local so that building corpora
#: does not import transformers (tests/test_corpora.py checks the two agree).
SAMPLING_RATE = 16000

#: Format of `build.json` / `corpus.json`, bumped when the layout or the clip plans change.
CORPUS_FORMAT = "cat-hf-corpus/1"
SPLITS = ("train", "validation", "test")
BUILD_FILE = "build.json"
STATS_FILE = "corpus.json"

#: Asterisk voices: language code -> (Debian package, voice folder prefix under the sounds folder).
ASTERISK_VOICES: dict[str, str] = {
    "en": "asterisk-core-sounds-en-wav",
    "es": "asterisk-core-sounds-es-wav",
    "fr": "asterisk-core-sounds-fr-wav",
    "it": "asterisk-core-sounds-it-wav",
    "ru": "asterisk-core-sounds-ru-wav",
}
#: Clips shorter than this (tiny prompts, empty files) are not speech samples worth classifying.
MIN_SPEECH_SECONDS = 0.3
#: Shorter files (clicks, empty prompts) are left out of the pretraining mix: under ten 10 ms frames.
MIN_PRETRAIN_SECONDS = 0.1

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Label sets of `spoken-words`: label -> file under `<voice>/digits` or `<voice>/letters`.
WORD_SETS: dict[str, dict[str, str]] = {
    "digits": {word: f"digits/{i}.wav" for i, word in enumerate(DIGIT_WORDS)},
    "numbers": {
        **{str(i): f"digits/{i}.wav" for i in range(21)},
        **{str(i): f"digits/{i}.wav" for i in range(30, 100, 10)},
    },
    "letters": {chr(c): f"letters/{chr(c)}.wav" for c in range(ord("a"), ord("z") + 1)},
}

#: General MIDI families (program = 8 * family index + 0..7) with the MIDI pitch range rendered for each.
GM_FAMILIES: dict[str, tuple[int, tuple[int, int]]] = {
    "piano": (0, (36, 96)),
    "chromatic_percussion": (1, (60, 96)),
    "organ": (2, (36, 84)),
    "guitar": (3, (40, 84)),
    "bass": (4, (28, 55)),
    "strings": (5, (43, 91)),
    "ensemble": (6, (43, 84)),
    "brass": (7, (40, 82)),
    "reed": (8, (45, 84)),
    "pipe": (9, (60, 96)),
    "synth_lead": (10, (48, 84)),
    "synth_pad": (11, (48, 84)),
    "synth_effects": (12, (48, 84)),
    "ethnic": (13, (48, 84)),
    "percussive": (14, (48, 84)),
    "sound_effects": (15, (48, 84)),
}
#: Families of the default `instruments` corpus: pitched, clearly distinct timbres (11 classes, chance 9.1 %).
DEFAULT_FAMILIES = (
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "brass", "reed", "pipe",
    "synth_lead", "synth_pad",
)  # fmt: skip
NOTE_SECONDS = (0.5, 1.0, 1.5)
VELOCITY_RANGE = (50, 127)
CLIP_SECONDS = 2.0
#: fluidsynth renders at the sound font's native-ish rate; soxr then resamples to 16 kHz.
RENDER_RATE = 44100
FLUIDSYNTH_GAIN = 1.0
#: A rendered note whose peak stays below this is silence (no sample zone for that program/pitch in the font).
SILENCE_PEAK = 1e-3
#: How many seeded candidate notes per family are drawn at most, as a multiple of --clips-per-class.
CANDIDATE_FACTOR = 4
#: The candidate notes found silent, remembered so that a resumed build does not render them again.
SILENT_NOTES_FILE = ".silent-notes.json"


@dataclasses.dataclass
class Sources:
    """Where the Debian packages put their audio; every path can be overridden (tests, other distributions)."""

    asterisk_dir: Path = Path("/usr/share/asterisk/sounds")
    soundfont: Path | None = None  # None: the first of SOUNDFONTS that exists
    fluidsynth: str = "fluidsynth"
    sonic_pi_dir: Path = Path("/usr/share/sonic-pi/samples")
    freedesktop_dir: Path = Path("/usr/share/sounds/freedesktop/stereo")
    alsa_dir: Path = Path("/usr/share/sounds/alsa")


#: Sound fonts tried in order, with the package that ships each.
SOUNDFONTS: tuple[tuple[Path, str], ...] = (
    (Path("/usr/share/sounds/sf2/TimGM6mb.sf2"), "timgm6mb-soundfont"),
    (Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"), "fluid-soundfont-gm"),
)


class CorpusBuildError(ValueError):
    """A corpus cannot be built as asked; the message says why and what to do."""


class MissingPackagesError(CorpusBuildError):
    """Debian packages a corpus needs are not installed; `packages` lists them, the message has the apt-get line."""

    def __init__(self, corpus: str, packages: Sequence[str]):
        self.packages = list(packages)
        super().__init__(
            f"Corpus {corpus!r} needs Debian packages that are not installed: {', '.join(self.packages)}. "
            f"Install them with:\n  {install_command(self.packages)}"
        )


def install_command(packages: Iterable[str]) -> str:
    """The exact shell line that installs `packages` on Debian (as root)."""
    return "apt-get update && apt-get install -y --no-install-recommends " + " ".join(sorted(set(packages)))


# ================================================================================================================
# package checks
# ================================================================================================================


def asterisk_voice_dirs(sources: Sources) -> dict[str, Path]:
    """Installed Asterisk voices: language code -> voice folder (e.g. 'en' -> .../en_US_f_Allison)."""
    found: dict[str, Path] = {}
    if sources.asterisk_dir.is_dir():
        for language in ASTERISK_VOICES:
            candidates = sorted(p for p in sources.asterisk_dir.glob(f"{language}_*") if p.is_dir())
            if candidates:
                found[language] = candidates[0]
    return found


def find_soundfont(sources: Sources) -> Path | None:
    if sources.soundfont is not None:
        return sources.soundfont if Path(sources.soundfont).is_file() else None
    return next((path for path, _ in SOUNDFONTS if path.is_file()), None)


def missing_packages(corpus: str, sources: Sources) -> tuple[list[str], list[str]]:
    """(required, optional) Debian packages missing for `corpus`; optional ones only add voices."""
    required: list[str] = []
    optional: list[str] = []
    if corpus in ("spoken-words", "spoken-language", "pretrain-mix"):
        voices = asterisk_voice_dirs(sources)
        if "en" not in voices:
            required.append(ASTERISK_VOICES["en"])
        optional.extend(pkg for lang, pkg in ASTERISK_VOICES.items() if lang != "en" and lang not in voices)
        if corpus == "spoken-language" and len(voices) < 2:
            required.extend(optional)
            optional = []
    if corpus in ("instruments", "pretrain-mix"):
        if shutil.which(sources.fluidsynth) is None:
            required.append("fluidsynth")
        if find_soundfont(sources) is None:
            if sources.soundfont is not None:
                raise CorpusBuildError(f"Sound font {str(sources.soundfont)!r} does not exist; fix --soundfont.")
            required.append(SOUNDFONTS[0][1])
    if corpus == "pretrain-mix":
        for folder, package in (
            (sources.sonic_pi_dir, "sonic-pi-samples"),
            (sources.freedesktop_dir, "sound-theme-freedesktop"),
            (sources.alsa_dir, "alsa-utils"),
        ):
            if not Path(folder).is_dir():
                required.append(package)
    return required, optional


def require_packages(corpus: str, sources: Sources, *, warn: Callable[[str], None] = print) -> None:
    """Raises `MissingPackagesError` for missing required packages; warns (with the command) for optional ones."""
    required, optional = missing_packages(corpus, sources)
    if required:
        raise MissingPackagesError(corpus, required + optional)
    if optional:
        warn(
            f"[{corpus}] optional packages missing (fewer voices): {', '.join(optional)}; add them with\n"
            f"  {install_command(optional)}"
        )


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed Debian versions (None when dpkg does not know the package), recorded in corpus.json."""
    versions: dict[str, str | None] = {}
    for package in sorted(set(packages)):
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
            )
            versions[package] = out.stdout.strip() or None
        except OSError:
            versions[package] = None
    return versions


# ================================================================================================================
# audio helpers
# ================================================================================================================


def read_mono(path: str | os.PathLike, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decodes a file with soundfile, mixes to mono and resamples to `target_rate` with soxr (float32)."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def speed_perturb(waveform: np.ndarray, factor: float, rate: int = SAMPLING_RATE) -> np.ndarray:
    """Plays the clip `factor` times faster (tempo and pitch together, as Kaldi's speed perturbation)."""
    return np.ascontiguousarray(soxr.resample(waveform, rate * factor, rate, quality="HQ"), dtype=np.float32)


def write_wav(path: Path, waveform: np.ndarray, rate: int = SAMPLING_RATE) -> None:
    """Writes 16-bit PCM mono atomically (hidden temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clipped = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        sf.write(temporary, clipped, rate, subtype="PCM_16", format="WAV")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text(path: Path, text: str) -> None:
    """Atomic text write: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-links an already converted clip (no extra disk), copying when linking is impossible; atomic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{os.getpid()}.tmp"
    if temporary.exists():
        temporary.unlink()
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def pcm_digest(waveform: np.ndarray) -> str:
    """Content hash of a clip (as 16-bit samples), used to drop files that are identical across packages."""
    pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767).astype("<i2")
    return hashlib.sha1(pcm.tobytes()).hexdigest()


# ================================================================================================================
# a tiny Standard MIDI File writer
# ================================================================================================================

MIDI_TICKS_PER_QUARTER = 480
MIDI_TEMPO_US_PER_QUARTER = 500_000  # 120 bpm: 960 ticks per second


def _variable_length(value: int) -> bytes:
    """MIDI variable-length quantity: 7 bits per byte, high bit set on all but the last byte."""
    if value < 0:
        raise ValueError(f"MIDI delta times are non-negative, got {value}.")
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def seconds_to_ticks(seconds: float) -> int:
    return round(seconds * 1e6 / MIDI_TEMPO_US_PER_QUARTER * MIDI_TICKS_PER_QUARTER)


def single_note_midi(program: int, pitch: int, velocity: int, note_seconds: float, total_seconds: float) -> bytes:
    """A format-0 Standard MIDI File playing one note on channel 0 with the given GM program.

    The end-of-track event sits at `total_seconds`, so the player keeps running through the note's release.
    """
    for name, value, low, high in (("program", program, 0, 127), ("pitch", pitch, 0, 127),
                                   ("velocity", velocity, 1, 127)):  # fmt: skip
        if not low <= int(value) <= high:
            raise ValueError(f"MIDI {name} must be in [{low}, {high}], got {value}.")
    if not 0 < note_seconds <= total_seconds:
        raise ValueError(f"Need 0 < note_seconds <= total_seconds, got {note_seconds} and {total_seconds}.")
    note_ticks = seconds_to_ticks(note_seconds)
    tail_ticks = max(0, seconds_to_ticks(total_seconds) - note_ticks)
    events = b"".join([
        _variable_length(0) + b"\xff\x51\x03" + MIDI_TEMPO_US_PER_QUARTER.to_bytes(3, "big"),  # set tempo
        _variable_length(0) + bytes([0xC0, program]),  # program change, channel 0
        _variable_length(0) + bytes([0x90, pitch, velocity]),  # note on
        _variable_length(note_ticks) + bytes([0x80, pitch, 0]),  # note off
        _variable_length(tail_ticks) + b"\xff\x2f\x00",  # end of track
    ])  # fmt: skip
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, MIDI_TICKS_PER_QUARTER)
    return header + b"MTrk" + struct.pack(">I", len(events)) + events


# ================================================================================================================
# splits
# ================================================================================================================


def stratified_split(
    items: Sequence[str],
    labels: Sequence[str],
    *,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
) -> dict[str, list[str]]:
    """Seeded split of `items` (unique ids) keeping every label's share in each split.

    Per label with n items: round(fraction * n) go to test and to validation, at least one each while the
    label keeps at least one training item; the result depends only on the items, labels and seed.
    """
    if len(items) != len(labels):
        raise ValueError(f"Got {len(items)} items but {len(labels)} labels; give one label per item.")
    if len(set(items)) != len(items):
        raise ValueError("Split items must be unique ids (group members first, then split the groups).")
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise ValueError(
            f"validation_fraction={validation_fraction} and test_fraction={test_fraction} must be in [0, 1) and "
            "sum to less than 1."
        )
    by_label: dict[str, list[str]] = {}
    for item, label in zip(items, labels):
        by_label.setdefault(label, []).append(item)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for index, label in enumerate(sorted(by_label)):
        members = sorted(by_label[label])
        # A per-label generator: adding a class never reshuffles the others.
        digest = int(hashlib.sha1(label.encode("utf-8")).hexdigest()[:8], 16)
        order = [members[i] for i in np.random.default_rng([seed, digest]).permutation(len(members))]
        n = len(order)
        n_test = min(max(1, round(test_fraction * n)) if test_fraction > 0 else 0, max(0, n - 1))
        n_val = min(max(1, round(validation_fraction * n)) if validation_fraction > 0 else 0,
                    max(0, n - 1 - n_test))  # fmt: skip
        splits["test"].extend(order[:n_test])
        splits["validation"].extend(order[n_test:n_test + n_val])
        splits["train"].extend(order[n_test + n_val:])
    return {name: sorted(members) for name, members in splits.items()}


# ================================================================================================================
# the corpus builder
# ================================================================================================================


@dataclasses.dataclass
class Clip:
    """One planned clip: where it goes, its label (None for unlabelled corpora), its split and provenance."""

    path: str  # relative to the corpus folder, '<label or source>/<name>.wav'
    label: str | None
    split: str
    origin: str  # the Debian file or the rendering recipe it comes from
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BuildOptions:
    """The knobs of `build` (see the CLI help); the ones a corpus depends on are recorded in its build.json."""

    seed: int = 0
    clips_per_class: int = 60
    families: tuple[str, ...] = DEFAULT_FAMILIES
    words: str = "digits"
    speed_perturb: tuple[float, ...] = ()
    segment_seconds: float = 0.0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    workers: int = 2


def _log(message: str) -> None:
    print(message, flush=True)


class CorpusBuilder:
    """Plans the clips of one corpus, writes the missing ones, then the split CSVs and statistics."""

    name: str = ""
    description: str = ""
    labelled: bool = True

    def __init__(self, root: Path, options: BuildOptions, sources: Sources):
        self.root = Path(root)
        self.folder = self.root / self.name
        self.options = options
        self.sources = sources

    # -- to implement ------------------------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        """Everything the clip plan depends on; a corpus built with other parameters is not reused."""
        raise NotImplementedError

    def plan(self) -> list[Clip]:
        raise NotImplementedError

    def produce(self, clip: Clip) -> None:
        """Writes `clip` (called only for clips not yet on disk)."""
        raise NotImplementedError

    def packages(self) -> list[str]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------------
    def build(self, *, force: bool = False) -> dict[str, Any]:
        require_packages(self.name, self.sources, warn=_log)
        params = {"format": CORPUS_FORMAT, "corpus": self.name, **self.parameters()}
        build_file, stats_file = self.folder / BUILD_FILE, self.folder / STATS_FILE
        if force and self.folder.exists():
            _log(f"[{self.name}] --force: removing {self.folder}")
            shutil.rmtree(self.folder)
        if build_file.is_file():
            stored = json.loads(build_file.read_text(encoding="utf-8"))
            if stored != params:
                changed = sorted(k for k in set(stored) | set(params) if stored.get(k) != params.get(k))
                raise CorpusBuildError(
                    f"{self.folder} was built with other parameters (differing: {', '.join(changed)}). Rebuild it "
                    "with --force, or build into another --root."
                )
            if stats_file.is_file():
                _log(f"[{self.name}] already built in {self.folder}; nothing to do (use --force to rebuild)")
                return json.loads(stats_file.read_text(encoding="utf-8"))
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(build_file, json.dumps(params, indent=1, sort_keys=True) + "\n")
        clips = self.plan()
        self._check_plan(clips)
        self._remove_stale(clips)
        todo = [clip for clip in clips if not (self.folder / clip.path).is_file()]
        _log(f"[{self.name}] {len(clips)} clips planned, {len(clips) - len(todo)} already on disk, writing {len(todo)}")
        self._produce_all(todo)
        self._write_splits(clips)
        stats = self._statistics(clips, time.perf_counter() - start)
        write_text(stats_file, json.dumps(stats, indent=1, sort_keys=True) + "\n")
        _log(f"[{self.name}] done in {stats['build_seconds']:.1f} s: {self.folder}")
        return stats

    def _check_plan(self, clips: Sequence[Clip]) -> None:
        paths = [clip.path for clip in clips]
        duplicates = [p for p, n in Counter(paths).items() if n > 1]
        if duplicates:
            raise RuntimeError(f"[{self.name}] the clip plan names some files twice, e.g. {duplicates[:3]}")
        if not clips:
            raise CorpusBuildError(f"[{self.name}] no clips found in the installed packages; check the packages.")

    def _remove_stale(self, clips: Sequence[Clip]) -> None:
        """Deletes clips on disk that the plan does not name (left by an interrupted build of older code), so the
        folder layout holds exactly the corpus."""
        planned = {clip.path for clip in clips}
        stale = [p for p in self.folder.glob("*/*.wav") if p.relative_to(self.folder).as_posix() not in planned]
        for path in stale:
            path.unlink()
        if stale:
            _log(f"[{self.name}] removed {len(stale)} clips not in the plan, e.g. {stale[0]}")

    def _produce_all(self, todo: Sequence[Clip]) -> None:
        if not todo:
            return
        done = 0
        step = max(1, len(todo) // 10)
        workers = max(1, int(self.options.workers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(self.produce, todo):
                done += 1
                if done % step == 0 or done == len(todo):
                    _log(f"[{self.name}]   {done}/{len(todo)} clips written")

    def _write_splits(self, clips: Sequence[Clip]) -> None:
        extra_keys = sorted({key for clip in clips for key in clip.extra})
        header = ["path", "label"] if self.labelled else ["path"]
        header += ["origin", *extra_keys]
        for split in SPLITS:
            rows = sorted((clip for clip in clips if clip.split == split), key=lambda c: c.path)
            if not rows:
                continue
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(header)
            for clip in rows:
                row = [clip.path, clip.label] if self.labelled else [clip.path]
                writer.writerow(row + [clip.origin] + [clip.extra.get(key, "") for key in extra_keys])
            write_text(self.folder / f"{split}.csv", buffer.getvalue())

    def _statistics(self, clips: Sequence[Clip], seconds: float) -> dict[str, Any]:
        per_split: dict[str, Any] = {}
        for split in SPLITS:
            members = [clip for clip in clips if clip.split == split]
            if not members:
                continue
            durations = [sf.info(str(self.folder / clip.path)).duration for clip in members]
            key = (lambda c: c.label) if self.labelled else (lambda c: c.path.split("/", 1)[0])
            counts = Counter(key(clip) for clip in members)
            per_split[split] = {
                "clips": len(members),
                "hours": round(sum(durations) / 3600, 4),
                "mean_seconds": round(float(np.mean(durations)), 3),
                "min_seconds": round(float(np.min(durations)), 3),
                "max_seconds": round(float(np.max(durations)), 3),
                ("label_counts" if self.labelled else "source_counts"): dict(sorted(counts.items())),
            }
        labels = sorted({clip.label for clip in clips if clip.label is not None})
        return {
            "format": CORPUS_FORMAT,
            "corpus": self.name,
            "description": self.description,
            "sampling_rate": SAMPLING_RATE,
            "num_clips": len(clips),
            "labels": labels,
            "num_labels": len(labels),
            "chance_accuracy": round(1 / len(labels), 4) if labels else None,
            "splits": per_split,
            "parameters": self.parameters(),
            "packages": package_versions(self.packages()),
            "build_seconds": round(seconds, 1),
        }


class SpokenWordsBuilder(CorpusBuilder):
    name = "spoken-words"
    description = (
        "Keyword classification: each class is one word spoken by every installed Asterisk voice (one real speaker "
        "per language); validation/test clips are untouched recordings, speed-perturbed copies (if any) are train-only."
    )

    def parameters(self) -> dict[str, Any]:
        return {
            "seed": self.options.seed,
            "words": self.options.words,
            "languages": sorted(asterisk_voice_dirs(self.sources)),
            "speed_perturb": list(self.options.speed_perturb),
            "validation_fraction": self.options.validation_fraction,
            "test_fraction": self.options.test_fraction,
        }

    def packages(self) -> list[str]:
        return [ASTERISK_VOICES[lang] for lang in asterisk_voice_dirs(self.sources)]

    def plan(self) -> list[Clip]:
        if self.options.words not in WORD_SETS:
            raise CorpusBuildError(f"Unknown word set {self.options.words!r}; choose one of {sorted(WORD_SETS)}.")
        voices = asterisk_voice_dirs(self.sources)
        originals: list[Clip] = []
        for label, relative in WORD_SETS[self.options.words].items():
            for language, voice in sorted(voices.items()):
                source = voice / relative
                if source.is_file():
                    stem = f"{label}_{language}"
                    originals.append(Clip(f"{label}/{stem}.wav", label, "", str(source), {"language": language}))
        if not originals:
            raise CorpusBuildError(f"No '{self.options.words}' words found under {self.sources.asterisk_dir}.")
        splits = stratified_split(
            [c.path for c in originals], [c.label for c in originals], seed=self.options.seed,
            validation_fraction=self.options.validation_fraction, test_fraction=self.options.test_fraction,
        )  # fmt: skip
        split_of = {path: split for split, paths in splits.items() for path in paths}
        clips: list[Clip] = []
        for clip in originals:
            clip.split = split_of[clip.path]
            clip.extra["speed"] = 1.0
            clips.append(clip)
            if clip.split != "train":
                continue
            for factor in self.options.speed_perturb:
                stem = clip.path[: -len(".wav")]
                clips.append(Clip(f"{stem}_speed{factor:g}.wav", clip.label, "train", clip.origin,
                                  {"language": clip.extra["language"], "speed": float(factor)}))  # fmt: skip
        return clips

    def produce(self, clip: Clip) -> None:
        waveform = read_mono(clip.origin)
        factor = float(clip.extra.get("speed", 1.0))
        if factor != 1.0:
            waveform = speed_perturb(waveform, factor)
        write_wav(self.folder / clip.path, waveform)


class SpokenLanguageBuilder(CorpusBuilder):
    name = "spoken-language"
    description = (
        "Language identification over every Asterisk prompt (digits, letters, phonetic alphabet, IVR sentences); one "
        "voice per language (en and es are the same voice talent), so it is also speaker identification."
    )

    def parameters(self) -> dict[str, Any]:
        return {
            "seed": self.options.seed,
            "languages": sorted(asterisk_voice_dirs(self.sources)),
            "min_seconds": MIN_SPEECH_SECONDS,
            "validation_fraction": self.options.validation_fraction,
            "test_fraction": self.options.test_fraction,
        }

    def packages(self) -> list[str]:
        return [ASTERISK_VOICES[lang] for lang in asterisk_voice_dirs(self.sources)]

    def plan(self) -> list[Clip]:
        candidates = asterisk_prompts(self.sources)
        splits = stratified_split(
            [c.path for c in candidates], [c.label for c in candidates], seed=self.options.seed,
            validation_fraction=self.options.validation_fraction, test_fraction=self.options.test_fraction,
        )  # fmt: skip
        split_of = {path: split for split, paths in splits.items() for path in paths}
        for clip in candidates:
            clip.split = split_of[clip.path]
        return candidates

    def produce(self, clip: Clip) -> None:
        write_wav(self.folder / clip.path, read_mono(clip.origin))


def asterisk_prompts(sources: Sources, *, min_seconds: float = MIN_SPEECH_SECONDS) -> list[Clip]:
    """Every speech prompt of the installed voices, labelled by language (split left empty).

    Skips the `silence/` folder, clips shorter than `min_seconds`, and files whose samples occur in more than one
    voice (beeps and tones shipped identically in every package, which no classifier could tell apart).
    """
    entries: list[tuple[str, Path, str]] = []
    owners: dict[str, set[str]] = {}
    for language, voice in sorted(asterisk_voice_dirs(sources).items()):
        for path in sorted(voice.rglob("*.wav")):
            relative = path.relative_to(voice)
            if relative.parts[0] == "silence" or sf.info(str(path)).duration < min_seconds:
                continue
            data, _ = sf.read(str(path), dtype="int16", always_2d=True)
            digest = hashlib.sha1(data.tobytes()).hexdigest()
            owners.setdefault(digest, set()).add(language)
            entries.append((language, path, digest))
    clips: list[Clip] = []
    seen: set[tuple[str, str]] = set()
    for language, path, digest in entries:
        if len(owners[digest]) > 1 or (language, digest) in seen:
            continue
        seen.add((language, digest))
        relative = path.relative_to(asterisk_voice_dirs(sources)[language]).with_suffix("")
        stem = "-".join(relative.parts)
        clips.append(Clip(f"{language}/{stem}.wav", language, "", str(path), {"prompt": "/".join(relative.parts)}))
    return clips


class InstrumentsBuilder(CorpusBuilder):
    name = "instruments"
    description = (
        "Instrument-family classification (NSynth-like): single notes of General MIDI programs rendered by "
        "fluidsynth from a sound font of sampled real instruments; random program of the family, pitch, velocity, "
        "note length; 2 s clips."
    )

    def parameters(self) -> dict[str, Any]:
        soundfont = find_soundfont(self.sources)
        return {
            "seed": self.options.seed,
            "clips_per_class": self.options.clips_per_class,
            "families": list(self.options.families),
            "soundfont": soundfont.name if soundfont else None,
            "clip_seconds": CLIP_SECONDS,
            "note_seconds": list(NOTE_SECONDS),
            "velocity_range": list(VELOCITY_RANGE),
            "gain": FLUIDSYNTH_GAIN,
            "validation_fraction": self.options.validation_fraction,
            "test_fraction": self.options.test_fraction,
        }

    def packages(self) -> list[str]:
        soundfont = find_soundfont(self.sources)
        font_package = next((pkg for path, pkg in SOUNDFONTS if soundfont is not None and path == soundfont), None)
        return ["fluidsynth"] + ([font_package] if font_package else [])

    def plan(self) -> list[Clip]:
        unknown = [f for f in self.options.families if f not in GM_FAMILIES]
        if unknown:
            raise CorpusBuildError(f"Unknown instrument families {unknown}; choose from {sorted(GM_FAMILIES)}.")
        if self.options.clips_per_class < 3:
            raise CorpusBuildError("--clips-per-class must be at least 3 (one clip per split).")
        font = self.parameters()["soundfont"]
        silent_file = self.folder / SILENT_NOTES_FILE
        silent: set[str] = set(json.loads(silent_file.read_text(encoding="utf-8"))) if silent_file.is_file() else set()
        needed = self.options.clips_per_class
        clips: list[Clip] = []
        with ThreadPoolExecutor(max_workers=max(1, int(self.options.workers))) as pool:
            for family in self.options.families:
                candidates = self._candidates(family, font)
                chosen: list[Clip] = []
                position = 0
                # Render candidates in their seeded order until `needed` of them sound: the chosen notes depend
                # only on the seed and the sound font, and a resumed build re-renders nothing.
                while len(chosen) < needed:
                    if position >= len(candidates):
                        raise CorpusBuildError(
                            f"Only {len(chosen)} of {len(candidates)} candidate notes of family {family!r} sound with "
                            f"sound font {font}; lower --clips-per-class or use another --soundfont."
                        )
                    batch = candidates[position:position + needed - len(chosen)]
                    position += len(batch)
                    todo = [c for c in batch if c.path not in silent and not (self.folder / c.path).is_file()]
                    for clip, sounded in zip(todo, pool.map(self._render_to_disk, todo)):
                        if not sounded:
                            silent.add(clip.path)
                    chosen.extend(c for c in batch if c.path not in silent)
                    write_text(silent_file, json.dumps(sorted(silent), indent=0) + "\n")
                skipped = position - len(chosen)
                _log(f"[{self.name}]   {family}: {len(chosen)} notes ({skipped} silent candidates skipped)")
                clips.extend(chosen)
        splits = stratified_split(
            [c.path for c in clips], [c.label for c in clips], seed=self.options.seed,
            validation_fraction=self.options.validation_fraction, test_fraction=self.options.test_fraction,
        )  # fmt: skip
        split_of = {path: split for split, paths in splits.items() for path in paths}
        for clip in clips:
            clip.split = split_of[clip.path]
        return clips

    def _candidates(self, family: str, font: str | None) -> list[Clip]:
        """Distinct seeded (program, pitch, velocity, note length) draws for `family`, in drawing order."""
        index, (low, high) = GM_FAMILIES[family]
        digest = int(hashlib.sha1(family.encode("utf-8")).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.options.seed, digest])
        limit = min(CANDIDATE_FACTOR * self.options.clips_per_class,
                    8 * (high - low + 1) * (VELOCITY_RANGE[1] - VELOCITY_RANGE[0] + 1) * len(NOTE_SECONDS))  # fmt: skip
        seen: set[tuple[int, int, int, float]] = set()
        clips: list[Clip] = []
        while len(clips) < limit:
            program = 8 * index + int(rng.integers(0, 8))
            pitch = int(rng.integers(low, high + 1))
            velocity = int(rng.integers(VELOCITY_RANGE[0], VELOCITY_RANGE[1] + 1))
            seconds = float(NOTE_SECONDS[int(rng.integers(0, len(NOTE_SECONDS)))])
            key = (program, pitch, velocity, seconds)
            if key in seen:
                continue
            seen.add(key)
            stem = f"{family}_p{program:03d}_n{pitch:03d}_v{velocity:03d}_d{int(seconds * 1000):04d}"
            origin = f"fluidsynth:{font}:program={program}:pitch={pitch}:velocity={velocity}:seconds={seconds}"
            clips.append(Clip(f"{family}/{stem}.wav", family, "", origin,
                              {"program": program, "pitch": pitch, "velocity": velocity, "note_seconds": seconds}))
        return clips

    def _render_to_disk(self, clip: Clip) -> bool:
        """Renders and writes `clip`; False (nothing written) when the sound font has no sample for the note."""
        extra = clip.extra
        try:
            waveform = render_note(
                self.sources, int(extra["program"]), int(extra["pitch"]), int(extra["velocity"]),
                float(extra["note_seconds"]), CLIP_SECONDS,
            )  # fmt: skip
        except SilentNoteError:
            return False
        write_wav(self.folder / clip.path, waveform)
        return True

    def produce(self, clip: Clip) -> None:
        if not self._render_to_disk(clip):  # plan() already rendered every chosen note; this is a safety net
            raise RuntimeError(f"{clip.origin} rendered silence on a second try; rebuild with --force.")


class SilentNoteError(RuntimeError):
    """fluidsynth produced (near) silence: the sound font has no sample zone for that program and pitch."""


def render_note(
    sources: Sources, program: int, pitch: int, velocity: int, note_seconds: float, clip_seconds: float
) -> np.ndarray:
    """Renders one note with fluidsynth (reverb and chorus off) and returns `clip_seconds` of 16 kHz mono audio."""
    soundfont = find_soundfont(sources)
    if soundfont is None:
        raise MissingPackagesError("instruments", [SOUNDFONTS[0][1]])
    with tempfile.TemporaryDirectory(prefix="cat-hf-note-") as tmp:
        midi, wav = Path(tmp) / "note.mid", Path(tmp) / "note.wav"
        midi.write_bytes(single_note_midi(program, pitch, velocity, note_seconds, clip_seconds))
        command = [sources.fluidsynth, "-ni", "-q", "-R", "0", "-C", "0", "-g", str(FLUIDSYNTH_GAIN),
                   "-r", str(RENDER_RATE), "-F", str(wav), str(soundfont), str(midi)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"fluidsynth failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
        waveform = read_mono(wav)
    length = round(clip_seconds * SAMPLING_RATE)
    waveform = np.pad(waveform[:length], (0, max(0, length - len(waveform))))
    peak = float(np.max(np.abs(waveform)))
    if peak < SILENCE_PEAK:
        raise SilentNoteError(f"fluidsynth rendered silence for program {program}, pitch {pitch}.")
    if peak > 0.99:  # never clip; keep the velocity's loudness otherwise
        waveform = waveform * (0.99 / peak)
    return waveform.astype(np.float32)


class PretrainMixBuilder(CorpusBuilder):
    name = "pretrain-mix"
    description = (
        "Unlabelled pretraining audio: all Asterisk prompts (5 voices), sonic-pi samples, freedesktop and ALSA "
        "sounds, and the training clips of `instruments`; validation/test clips of the labelled corpora excluded."
    )
    labelled = False
    #: The labelled corpora whose held-out clips must stay out of pretraining (built first when missing).
    dependencies = ("spoken-words", "spoken-language", "instruments")

    def parameters(self) -> dict[str, Any]:
        return {
            "seed": self.options.seed,
            "segment_seconds": self.options.segment_seconds,
            "min_seconds": MIN_PRETRAIN_SECONDS,
            "validation_fraction": self.options.validation_fraction,
            "languages": sorted(asterisk_voice_dirs(self.sources)),
            # the held-out clips that are kept out depend on how the labelled corpora were split
            "dependencies": {
                name: BUILDERS[name](self.root, self.options, self.sources).parameters() for name in self.dependencies
            },
        }

    def packages(self) -> list[str]:
        return (
            [ASTERISK_VOICES[lang] for lang in asterisk_voice_dirs(self.sources)]
            + InstrumentsBuilder(self.root, self.options, self.sources).packages()
            + ["sonic-pi-samples", "sound-theme-freedesktop", "alsa-utils"]
        )

    def _held_out_origins(self) -> tuple[set[str], list[tuple[str, Path]]]:
        """Origins in any validation/test split of the labelled corpora, and the instruments training clips."""
        held_out: set[str] = set()
        instrument_train: list[tuple[str, Path]] = []
        for name in self.dependencies:
            builder = BUILDERS[name](self.root, self.options, self.sources)
            builder.build()
            for split in SPLITS:
                csv_path = builder.folder / f"{split}.csv"
                if not csv_path.is_file():
                    continue
                with open(csv_path, encoding="utf-8", newline="") as stream:
                    for row in csv.DictReader(stream):
                        if split != "train":
                            held_out.add(row["origin"])
                        elif name == "instruments":
                            instrument_train.append((row["origin"], builder.folder / row["path"]))
        return held_out, instrument_train

    def _sources(self) -> list[tuple[str, str, Path, str]]:
        """(source name, relative stem, file, origin) of every whole file going into the mix."""
        held_out, instrument_train = self._held_out_origins()
        entries: list[tuple[str, str, Path, str]] = []
        seen: set[str] = set()
        for language, voice in sorted(asterisk_voice_dirs(self.sources).items()):
            for path in sorted(voice.rglob("*.wav")):
                relative = path.relative_to(voice)
                if relative.parts[0] == "silence" or str(path) in held_out:
                    continue
                data, _ = sf.read(str(path), dtype="int16", always_2d=True)
                digest = hashlib.sha1(data.tobytes()).hexdigest()
                if digest in seen:  # beeps/tones shipped identically in several packages: keep one copy
                    continue
                seen.add(digest)
                entries.append((f"asterisk-{language}", "-".join(relative.with_suffix("").parts), path, str(path)))
        for name, folder, patterns in (
            ("sonic-pi", self.sources.sonic_pi_dir, ("*.flac", "*.wav")),
            ("freedesktop", self.sources.freedesktop_dir, ("*.oga", "*.ogg", "*.wav")),
            ("alsa", self.sources.alsa_dir, ("*.wav",)),
        ):
            files = sorted({p for pattern in patterns for p in Path(folder).rglob(pattern)})
            for path in files:
                entries.append((name, "-".join(path.relative_to(folder).with_suffix("").parts), path, str(path)))
        for origin, path in instrument_train:
            entries.append(("instruments", path.stem, path, origin))
        return [entry for entry in entries if sf.info(str(entry[2])).duration >= MIN_PRETRAIN_SECONDS]

    def plan(self) -> list[Clip]:
        entries = self._sources()
        # Whole files are split (segments of one file never straddle train and validation), stratified by source.
        ids = [f"{source}/{stem}" for source, stem, _, _ in entries]
        splits = stratified_split(
            ids, [source for source, _, _, _ in entries], seed=self.options.seed,
            validation_fraction=self.options.validation_fraction, test_fraction=0.0,
        )  # fmt: skip
        split_of = {item: split for split, items in splits.items() for item in items}
        clips: list[Clip] = []
        segment = float(self.options.segment_seconds)
        for (source, stem, path, origin), item in zip(entries, ids):
            extra: dict[str, Any] = {"source": source, "file": str(path)}
            if segment > 0:
                duration = sf.info(str(path)).duration
                pieces = max(1, int(np.floor(duration / segment + 0.5))) if duration > 1.5 * segment else 1
                for k in range(pieces):
                    start = k * segment
                    end = duration if k == pieces - 1 else (k + 1) * segment
                    name = f"{stem}_seg{k:03d}" if pieces > 1 else stem
                    clips.append(Clip(f"{source}/{name}.wav", None, split_of[item], origin,
                                      {**extra, "start": round(start, 3), "end": round(end, 3)}))  # fmt: skip
            else:
                clips.append(Clip(f"{source}/{stem}.wav", None, split_of[item], origin, extra))
        return clips

    def produce(self, clip: Clip) -> None:
        source_file = Path(clip.extra["file"])
        target = self.folder / clip.path
        whole = "start" not in clip.extra
        if whole and clip.extra["source"] == "instruments":
            link_or_copy(source_file, target)  # already 16 kHz mono PCM16
            return
        waveform = read_mono(source_file)
        if not whole:
            start = round(float(clip.extra["start"]) * SAMPLING_RATE)
            end = round(float(clip.extra["end"]) * SAMPLING_RATE)
            waveform = waveform[start:end]
        write_wav(target, waveform)

    def _write_splits(self, clips: Sequence[Clip]) -> None:
        # The `file` column is an implementation detail of produce(); keep the CSVs to path,origin,source,(start,end).
        trimmed = [Clip(c.path, c.label, c.split, c.origin, {k: v for k, v in c.extra.items() if k != "file"})
                   for c in clips]  # fmt: skip
        super()._write_splits(trimmed)


BUILDERS: dict[str, type[CorpusBuilder]] = {
    builder.name: builder
    for builder in (SpokenWordsBuilder, SpokenLanguageBuilder, InstrumentsBuilder, PretrainMixBuilder)
}
CORPORA = tuple(BUILDERS)


def build_corpus(
    name: str,
    root: str | os.PathLike,
    *,
    options: BuildOptions | None = None,
    sources: Sources | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Builds (or reuses) corpus `name` under `root`; returns its statistics (the content of corpus.json)."""
    if name not in BUILDERS:
        raise CorpusBuildError(f"Unknown corpus {name!r}; choose one of {', '.join(CORPORA)}.")
    builder = BUILDERS[name](Path(root), options or BuildOptions(), sources or Sources())
    return builder.build(force=force)


def describe(stats: Mapping[str, Any]) -> str:
    """A short human-readable summary of a corpus.json."""
    lines = [f"{stats['corpus']}: {stats['num_clips']} clips, {stats['num_labels']} labels"
             + (f", chance {stats['chance_accuracy']:.1%}" if stats.get("chance_accuracy") else "")
             + f", built in {stats['build_seconds']} s"]  # fmt: skip
    for split in [name for name in SPLITS if name in stats["splits"]]:
        info = stats["splits"][split]
        counts = info.get("label_counts") or info.get("source_counts") or {}
        lines.append(
            f"  {split:<10} {info['clips']:>5} clips {info['hours'] * 60:7.1f} min  "
            f"(mean {info['mean_seconds']:.2f} s, {info['min_seconds']:.2f}-{info['max_seconds']:.2f} s)"
        )
        lines.append("    " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return "\n".join(lines)


# ================================================================================================================
# CLI
# ================================================================================================================


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.9,1.1, got {text!r}") from err
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"speed factors must be positive, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_sources(p: argparse.ArgumentParser) -> None:
        defaults = Sources()
        p.add_argument("--asterisk-dir", type=Path, default=defaults.asterisk_dir)
        p.add_argument("--soundfont", type=Path, default=None, help="GM .sf2 (default: TimGM6mb, else FluidR3_GM)")
        p.add_argument("--fluidsynth", default=defaults.fluidsynth)
        p.add_argument("--sonic-pi-dir", type=Path, default=defaults.sonic_pi_dir)
        p.add_argument("--freedesktop-dir", type=Path, default=defaults.freedesktop_dir)
        p.add_argument("--alsa-dir", type=Path, default=defaults.alsa_dir)

    build = sub.add_parser("build", help="build corpora into --root")
    build.add_argument("names", nargs="+", choices=CORPORA, metavar="NAME", help=f"one of {', '.join(CORPORA)}")
    build.add_argument("--root", type=Path, required=True, help="folder receiving <root>/<name>/...")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--clips-per-class", type=int, default=60, help="instruments: clips per family")
    build.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                       help=f"instruments: comma-separated GM families out of {', '.join(GM_FAMILIES)}")
    build.add_argument("--words", default="digits", choices=sorted(WORD_SETS), help="spoken-words: label set")
    build.add_argument("--speed-perturb", type=_parse_floats, default=(),
                       help="spoken-words: extra train-only copies at these speeds, e.g. 0.9,1.1")
    build.add_argument("--segment-seconds", type=float, default=0.0,
                       help="pretrain-mix: cut files longer than 1.5x this into pieces of about this length (0: off)")
    build.add_argument("--validation-fraction", type=float, default=0.1)
    build.add_argument("--test-fraction", type=float, default=0.1)
    build.add_argument("--workers", type=int, default=2, help="parallel conversions / fluidsynth renders")
    build.add_argument("--force", action="store_true", help="delete and rebuild corpora built with other parameters")
    add_sources(build)

    stats = sub.add_parser("stats", help="print the statistics of built corpora")
    stats.add_argument("names", nargs="+", choices=CORPORA, metavar="NAME")
    stats.add_argument("--root", type=Path, required=True)

    check = sub.add_parser("check", help="check that the Debian packages of corpora are installed")
    check.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(CORPORA)} (default: all)")
    add_sources(check)

    sub.add_parser("list", help="list the corpora")
    return parser


def _sources_from(args: argparse.Namespace) -> Sources:
    return Sources(
        asterisk_dir=args.asterisk_dir, soundfont=args.soundfont, fluidsynth=args.fluidsynth,
        sonic_pi_dir=args.sonic_pi_dir, freedesktop_dir=args.freedesktop_dir, alsa_dir=args.alsa_dir,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name, builder in BUILDERS.items():
            print(f"{name:<16} {builder.description}")
        return 0
    if args.command == "stats":
        for name in args.names:
            path = args.root / name / STATS_FILE
            if not path.is_file():
                print(f"{name}: not built under {args.root} (run: python benchmarks/corpora.py build {name} "
                      f"--root {args.root})", file=sys.stderr)  # fmt: skip
                return 1
            print(describe(json.loads(path.read_text(encoding="utf-8"))))
        return 0
    try:
        return _run(args)
    except CorpusBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    sources = _sources_from(args)
    if args.command == "check":
        unknown = [name for name in args.names if name not in BUILDERS]
        if unknown:
            print(f"error: unknown corpora {unknown}; choose from {', '.join(CORPORA)}", file=sys.stderr)
            return 2
        missing: set[str] = set()
        for name in args.names or CORPORA:
            required, optional = missing_packages(name, sources)
            status = "ok" if not required else f"MISSING {', '.join(required)}"
            extra = f" (optional: {', '.join(optional)})" if optional else ""
            print(f"{name:<16} {status}{extra}")
            missing.update(required + optional)
        if missing:
            print(install_command(missing))
        return 1 if any(missing_packages(n, sources)[0] for n in args.names or CORPORA) else 0
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    options = BuildOptions(
        seed=args.seed, clips_per_class=args.clips_per_class, families=families, words=args.words,
        speed_perturb=args.speed_perturb, segment_seconds=args.segment_seconds,
        validation_fraction=args.validation_fraction, test_fraction=args.test_fraction, workers=args.workers,
    )  # fmt: skip
    for name in args.names:
        print(describe(build_corpus(name, args.root, options=options, sources=sources, force=args.force)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
