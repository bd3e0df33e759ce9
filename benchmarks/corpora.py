"""Benchmark corpora of real audio built from Debian packages (no internet, nothing recorded by this project).

    python benchmarks/corpora.py build NAME [NAME ...] --root DIR [--seed 0] [--clips-per-class 60] [--force]
        [--split-by program] [--hits-per-class 60,15,30] [--speakers 80,15,25]
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
  `--split-by program` gives each GM program to one split, so the test notes come from unseen instruments.
- `drums`: percussion-hit classification (12 classes of General MIDI drum keys), one hit per clip rendered with
  fluidsynth with its trailing silence cut (0.1-1.5 s). Split by source: training hits come from FluidR3_GM,
  validation and test hits from TimGM6mb (disjoint kits), a sound font never heard in training.
- `speech-commands`: keyword spotting on the 10 Speech Commands words synthesised with espeak-ng; a speaker is an
  English voice, a voice variant, a pitch and a speed. Split by speaker, the variants of validation and test
  speakers never heard in training.
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
import re
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
#: How `instruments` is split: "clip" (seeded, stratified by family) or "program" (every family's GM programs go to
#: one split each, so validation/test notes come from programs never heard in training).
INSTRUMENT_SPLIT_BY = ("clip", "program")

#: General MIDI percussion key numbers of each `drums` class (played on MIDI channel 10).
DRUM_CLASSES: dict[str, tuple[int, ...]] = {
    "kick": (35, 36),
    "snare": (38, 40),
    "rim": (37,),
    "clap": (39,),
    "hihat_closed": (42, 44),
    "hihat_open": (46,),
    "tom": (41, 43, 45, 47, 48, 50),
    "cymbal": (49, 51, 52, 53, 55, 57, 59),
    "cowbell": (56,),
    "hand_drum": (60, 61, 62, 63, 64),
    "shaker": (54, 69, 70),
    "wood": (75, 76, 77),
}
#: MIDI channel 10 (index 9) plays the drum kit selected by a program change on it (GM bank 128).
PERCUSSION_CHANNEL = 9
#: Where the hits of each split come from: (sound font role, drum kits). Training hits are rendered from one sound
#: font, validation and test hits from another one (a sample set never heard in training); the held-out font's
#: kits are divided between validation and test.
DRUM_SPLIT_KITS: dict[str, tuple[str, tuple[int, ...]]] = {
    "train": ("train", (0, 8, 16, 24, 25, 32, 40, 48)),
    "validation": ("heldout", (8, 16)),
    "test": ("heldout", (0, 24, 25, 32, 40, 48)),
}
#: Keys a drum kit plays as something else than the GM drum: the Orchestra kit (48) of GS-style sound fonts
#: (FluidR3_GM) plays a chromatic timpani scale on keys 41-53 (GM toms, hi-hats and cymbals), so those are not drawn.
DRUM_KIT_EXCLUDED_KEYS: dict[int, tuple[int, ...]] = {48: tuple(range(41, 54))}
#: Hits per class in train, validation and test (`--hits-per-class`).
DRUM_HITS_PER_CLASS = (60, 15, 30)
DRUM_VELOCITY_RANGE = (30, 127)
#: Each hit is rendered for this long (note off at the end), then its trailing silence is cut: the clip ends
#: DRUM_TRIM_PAD_SECONDS after the last sample within DRUM_TRIM_DB of the peak, and lasts DRUM_MIN_SECONDS at least.
DRUM_RENDER_SECONDS = 1.5
DRUM_TRIM_DB = 50.0
DRUM_TRIM_PAD_SECONDS = 0.02
DRUM_MIN_SECONDS = 0.1
#: A clip cut inside the sound (at DRUM_RENDER_SECONDS) fades out linearly over this long instead of clicking.
FADE_OUT_SECONDS = 0.01
#: Candidates found silent or identical to an earlier hit, remembered so that a resumed build skips them.
SKIPPED_HITS_FILE = ".skipped-hits.json"

#: The ten keywords of `speech-commands` (the command words of Google's Speech Commands).
SPEECH_COMMAND_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: Speakers in train, validation and test (`--speakers`); one clip per speaker and word.
SPEECH_SPEAKERS = (80, 15, 25)
#: espeak-ng pitch (0-99, default 50) and speed (words per minute, default 175) drawn per speaker.
SPEECH_PITCH_RANGE = (25, 75)
SPEECH_SPEED_RANGE = (130, 210)
#: espeak-ng pads its words with silence: keep SPEECH_TRIM_PAD_SECONDS around the samples within SPEECH_TRIM_DB of
#: the peak.
SPEECH_TRIM_DB = 45.0
SPEECH_TRIM_PAD_SECONDS = 0.05
#: The word each espeak-ng voice variant is tried on (variants that fail or sound like another are left out).
ESPEAK_PROBE_WORD = "seven"


@dataclasses.dataclass
class Sources:
    """Where the Debian packages put their audio; every path can be overridden (tests, other distributions)."""

    asterisk_dir: Path = Path("/usr/share/asterisk/sounds")
    soundfont: Path | None = None  # None: the first of SOUNDFONTS that exists
    fluidsynth: str = "fluidsynth"
    sonic_pi_dir: Path = Path("/usr/share/sonic-pi/samples")
    freedesktop_dir: Path = Path("/usr/share/sounds/freedesktop/stereo")
    alsa_dir: Path = Path("/usr/share/sounds/alsa")
    #: `drums`: the training hits come from the first font, the validation and test hits from the second.
    drums_train_soundfont: Path = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
    drums_heldout_soundfont: Path = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
    espeak: str = "espeak-ng"


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


def soundfont_package(path: str | os.PathLike) -> str | None:
    """The Debian package shipping sound font `path` (None for a font of no known package)."""
    return next((package for font, package in SOUNDFONTS if font == Path(path)), None)


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
    if corpus == "drums":
        if shutil.which(sources.fluidsynth) is None:
            required.append("fluidsynth")
        for font in (sources.drums_train_soundfont, sources.drums_heldout_soundfont):
            if not Path(font).is_file():
                package = soundfont_package(font)
                if package is None:
                    raise CorpusBuildError(
                        f"Sound font {str(font)!r} does not exist; fix --drums-train-soundfont or "
                        "--drums-heldout-soundfont."
                    )
                required.append(package)
    if corpus == "speech-commands" and shutil.which(sources.espeak) is None:
        required.append("espeak-ng")
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


def trim_silence(
    waveform: np.ndarray,
    *,
    threshold_db: float,
    pad_seconds: float,
    leading: bool = True,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    rate: int = SAMPLING_RATE,
) -> np.ndarray:
    """Cuts the silence around a sound.

    The sound spans the first to the last sample whose magnitude is within `threshold_db` of the clip's peak. The
    cut keeps `pad_seconds` after it, and before it when `leading` (otherwise everything from the start, so an
    onset stays intact). The result lasts at least `min_seconds` (more of the signal, zeros past its end) and at
    most `max_seconds`; a cut inside the sound fades out over FADE_OUT_SECONDS instead of clicking.
    """
    signal = np.asarray(waveform, dtype=np.float32)
    magnitude = np.abs(signal)
    peak = float(magnitude.max()) if signal.size else 0.0
    if peak <= 0.0:
        raise ValueError("Cannot trim the silence of a clip that is all silence; skip such clips instead.")
    loud = np.flatnonzero(magnitude >= peak * 10 ** (-threshold_db / 20))
    pad = round(pad_seconds * rate)
    start = max(0, int(loud[0]) - pad) if leading else 0
    end = max(min(len(signal), int(loud[-1]) + 1 + pad), start + round(min_seconds * rate))
    cut_inside = False
    if max_seconds is not None and end - start > round(max_seconds * rate):
        end = start + round(max_seconds * rate)
        cut_inside = end <= int(loud[-1])
    out = np.pad(signal[start:end], (0, max(0, end - len(signal))))
    if cut_inside:
        fade = min(len(out), round(FADE_OUT_SECONDS * rate))
        out[len(out) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


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


def wav_digest(path: str | os.PathLike) -> str:
    """Content hash of a file's 16-bit samples (for a written clip: what is on disk, so a resumed build agrees
    with a fresh one)."""
    data, _ = sf.read(str(path), dtype="int16", always_2d=True)
    return hashlib.sha1(data.tobytes()).hexdigest()


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


def single_note_midi(
    program: int, pitch: int, velocity: int, note_seconds: float, total_seconds: float, *, channel: int = 0
) -> bytes:
    """A format-0 Standard MIDI File playing one note on `channel` (0-15) with the given GM program.

    On the percussion channel (`PERCUSSION_CHANNEL`) the program selects the drum kit and the pitch the drum.
    The end-of-track event sits at `total_seconds`, so the player keeps running through the note's release.
    """
    for name, value, low, high in (("program", program, 0, 127), ("pitch", pitch, 0, 127),
                                   ("velocity", velocity, 1, 127), ("channel", channel, 0, 15)):  # fmt: skip
        if not low <= int(value) <= high:
            raise ValueError(f"MIDI {name} must be in [{low}, {high}], got {value}.")
    if not 0 < note_seconds <= total_seconds:
        raise ValueError(f"Need 0 < note_seconds <= total_seconds, got {note_seconds} and {total_seconds}.")
    note_ticks = seconds_to_ticks(note_seconds)
    tail_ticks = max(0, seconds_to_ticks(total_seconds) - note_ticks)
    events = b"".join([
        _variable_length(0) + b"\xff\x51\x03" + MIDI_TEMPO_US_PER_QUARTER.to_bytes(3, "big"),  # set tempo
        _variable_length(0) + bytes([0xC0 | channel, program]),  # program change
        _variable_length(0) + bytes([0x90 | channel, pitch, velocity]),  # note on
        _variable_length(note_ticks) + bytes([0x80 | channel, pitch, 0]),  # note off
        _variable_length(tail_ticks) + b"\xff\x2f\x00",  # end of track
    ])  # fmt: skip
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, MIDI_TICKS_PER_QUARTER)
    return header + b"MTrk" + struct.pack(">I", len(events)) + events


# ================================================================================================================
# splits
# ================================================================================================================


def split_counts(n: int, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, validation, test) sizes for `n` items of one label: round(fraction * n) each, at least one for a
    positive fraction while at least one item stays in training."""
    n_test = min(max(1, round(test_fraction * n)) if test_fraction > 0 else 0, max(0, n - 1))
    n_val = min(max(1, round(validation_fraction * n)) if validation_fraction > 0 else 0, max(0, n - 1 - n_test))
    return n - n_val - n_test, n_val, n_test


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
        _, n_val, n_test = split_counts(len(order), validation_fraction, test_fraction)
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
    split_by: str = "clip"  # instruments: "clip" or "program" (INSTRUMENT_SPLIT_BY)
    hits_per_class: tuple[int, int, int] = DRUM_HITS_PER_CLASS  # drums: train, validation, test
    speakers: tuple[int, int, int] = SPEECH_SPEAKERS  # speech-commands: train, validation, test


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
                "fraction_under_half_second": round(float(np.mean(np.asarray(durations) < 0.5)), 4),
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
            digest = wav_digest(path)
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


class RenderedCorpusBuilder(CorpusBuilder):
    """A corpus of synthesised clips chosen from seeded candidates.

    Candidates are rendered in their seeded order until enough of them sound (and, where asked, differ from
    every clip chosen before); the others are remembered in `skipped_file`, so the chosen clips depend only on
    the seed and the installed synthesizer data, and a resumed build renders nothing twice.
    """

    skipped_file: str = SILENT_NOTES_FILE

    def _render_to_disk(self, clip: Clip) -> bool:
        """Renders and writes `clip`; False (nothing written) when it comes out silent."""
        raise NotImplementedError

    def produce(self, clip: Clip) -> None:
        if not self._render_to_disk(clip):  # plan() already rendered every chosen clip; this is a safety net
            raise RuntimeError(f"{clip.origin} rendered silence on a second try; rebuild with --force.")

    def _load_skipped(self) -> set[str]:
        path = self.folder / self.skipped_file
        return set(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else set()

    def _choose(
        self,
        candidates: Sequence[Clip],
        needed: int,
        pool: ThreadPoolExecutor,
        skipped: set[str],
        *,
        shortage: str,
        digests: set[str] | None = None,
    ) -> tuple[list[Clip], int]:
        """The first `needed` candidates that sound, and how many were passed over on the way.

        With `digests` (the 16-bit sample hashes of the clips chosen so far, updated here) a candidate identical
        to an earlier clip is deleted and passed over too. `shortage` ends the error raised when the candidates
        run out.
        """
        chosen: list[Clip] = []
        position = 0
        while len(chosen) < needed:
            if position >= len(candidates):
                raise CorpusBuildError(f"Only {len(chosen)} of {len(candidates)} candidate {shortage}.")
            batch = candidates[position:position + needed - len(chosen)]
            position += len(batch)
            todo = [c for c in batch if c.path not in skipped and not (self.folder / c.path).is_file()]
            for clip, sounded in zip(todo, pool.map(self._render_to_disk, todo)):
                if not sounded:
                    skipped.add(clip.path)
            for clip in batch:
                if clip.path in skipped:
                    continue
                if digests is not None:
                    digest = wav_digest(self.folder / clip.path)
                    if digest in digests:
                        (self.folder / clip.path).unlink()
                        skipped.add(clip.path)
                        continue
                    digests.add(digest)
                chosen.append(clip)
            write_text(self.folder / self.skipped_file, json.dumps(sorted(skipped), indent=0) + "\n")
        return chosen, position - len(chosen)


class InstrumentsBuilder(RenderedCorpusBuilder):
    name = "instruments"
    description = (
        "Instrument-family classification (NSynth-like): single notes of General MIDI programs rendered by "
        "fluidsynth from a sound font of sampled real instruments; random program of the family, pitch, velocity, "
        "note length; 2 s clips."
    )

    def parameters(self) -> dict[str, Any]:
        soundfont = find_soundfont(self.sources)
        parameters = {
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
        if self.options.split_by != INSTRUMENT_SPLIT_BY[0]:  # the default build's build.json stays as it was
            parameters["split_by"] = self.options.split_by
        return parameters

    def packages(self) -> list[str]:
        soundfont = find_soundfont(self.sources)
        font_package = soundfont_package(soundfont) if soundfont is not None else None
        return ["fluidsynth"] + ([font_package] if font_package else [])

    def plan(self) -> list[Clip]:
        unknown = [f for f in self.options.families if f not in GM_FAMILIES]
        if unknown:
            raise CorpusBuildError(f"Unknown instrument families {unknown}; choose from {sorted(GM_FAMILIES)}.")
        if self.options.clips_per_class < 3:
            raise CorpusBuildError("--clips-per-class must be at least 3 (one clip per split).")
        if self.options.split_by not in INSTRUMENT_SPLIT_BY:
            raise CorpusBuildError(
                f"Unknown --split-by {self.options.split_by!r} for instruments; choose one of {INSTRUMENT_SPLIT_BY}."
            )
        font = self.parameters()["soundfont"]
        skipped = self._load_skipped()
        by_program = self.options.split_by == "program"
        clips: list[Clip] = []
        with ThreadPoolExecutor(max_workers=max(1, int(self.options.workers))) as pool:
            for family in self.options.families:
                groups = self._program_groups(family) if by_program else [("", None, self.options.clips_per_class)]
                for split, programs, needed in groups:
                    candidates = self._candidates(family, font, needed, programs=programs, stream=split)
                    chosen, passed = self._choose(
                        candidates, needed, pool, skipped,
                        shortage=f"notes of family {family!r}{f' ({split})' if split else ''} sound with sound font "
                        f"{font}; lower --clips-per-class or use another --soundfont",
                    )  # fmt: skip
                    for clip in chosen:
                        clip.split = split
                    where = f" {split} (programs {', '.join(map(str, programs))})" if programs else ""
                    _log(f"[{self.name}]   {family}{where}: {len(chosen)} notes ({passed} silent candidates skipped)")
                    clips.extend(chosen)
        if by_program:
            return clips
        splits = stratified_split(
            [c.path for c in clips], [c.label for c in clips], seed=self.options.seed,
            validation_fraction=self.options.validation_fraction, test_fraction=self.options.test_fraction,
        )  # fmt: skip
        split_of = {path: split for split, paths in splits.items() for path in paths}
        for clip in clips:
            clip.split = split_of[clip.path]
        return clips

    def _program_groups(self, family: str) -> list[tuple[str, list[int], int]]:
        """(split, the family's GM programs in it, notes to draw) for `--split-by program`.

        The family's 8 programs are split like clips (seeded, `--validation-fraction`/`--test-fraction` of them,
        at least one each), and so are its `--clips-per-class` notes; each split's notes use only its programs.
        """
        index = GM_FAMILIES[family][0]
        programs = [f"{program:03d}" for program in range(8 * index, 8 * index + 8)]
        by_split = stratified_split(
            programs, [family] * len(programs), seed=self.options.seed,
            validation_fraction=self.options.validation_fraction, test_fraction=self.options.test_fraction,
        )  # fmt: skip
        counts = split_counts(self.options.clips_per_class, self.options.validation_fraction,
                              self.options.test_fraction)  # fmt: skip
        return [(split, [int(p) for p in by_split[split]], n) for split, n in zip(SPLITS, counts) if n > 0]

    def _candidates(
        self, family: str, font: str | None, needed: int, *, programs: Sequence[int] | None = None, stream: str = ""
    ) -> list[Clip]:
        """Distinct seeded (program, pitch, velocity, note length) draws for `family`, in drawing order.

        `programs` restricts the draws to some of the family's programs; `stream` names an independent random
        stream (the split, with `--split-by program`).
        """
        index, (low, high) = GM_FAMILIES[family]
        if programs is None:
            programs = range(8 * index, 8 * index + 8)
        name = f"{family}/{stream}" if stream else family
        digest = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.options.seed, digest])
        velocities = VELOCITY_RANGE[1] - VELOCITY_RANGE[0] + 1
        limit = min(CANDIDATE_FACTOR * needed, len(programs) * (high - low + 1) * velocities * len(NOTE_SECONDS))
        seen: set[tuple[int, int, int, float]] = set()
        clips: list[Clip] = []
        while len(clips) < limit:
            program = int(programs[int(rng.integers(0, len(programs)))])
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


class SilentNoteError(RuntimeError):
    """fluidsynth produced (near) silence: the sound font has no sample zone for that program and pitch."""


def fluidsynth_render(fluidsynth: str, soundfont: Path, midi: bytes, seconds: float) -> np.ndarray:
    """Plays a Standard MIDI File with fluidsynth (reverb and chorus off) and returns its first `seconds` as 16 kHz
    mono audio, zero-padded to that length.

    Raises `SilentNoteError` when the peak stays below SILENCE_PEAK; a peak above 0.99 is scaled down to 0.99 (never
    clip), other levels are kept (they follow the velocity).
    """
    with tempfile.TemporaryDirectory(prefix="cat-hf-note-") as tmp:
        midi_path, wav = Path(tmp) / "note.mid", Path(tmp) / "note.wav"
        midi_path.write_bytes(midi)
        command = [fluidsynth, "-ni", "-q", "-R", "0", "-C", "0", "-g", str(FLUIDSYNTH_GAIN),
                   "-r", str(RENDER_RATE), "-F", str(wav), str(soundfont), str(midi_path)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"fluidsynth failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
        waveform = read_mono(wav)
    length = round(seconds * SAMPLING_RATE)
    waveform = np.pad(waveform[:length], (0, max(0, length - len(waveform))))
    peak = float(np.max(np.abs(waveform)))
    if peak < SILENCE_PEAK:
        raise SilentNoteError(f"fluidsynth rendered silence from {Path(soundfont).name}.")
    if peak > 0.99:  # never clip; keep the velocity's loudness otherwise
        waveform = waveform * (0.99 / peak)
    return waveform.astype(np.float32)


def render_note(
    sources: Sources, program: int, pitch: int, velocity: int, note_seconds: float, clip_seconds: float
) -> np.ndarray:
    """Renders one note with fluidsynth (reverb and chorus off) and returns `clip_seconds` of 16 kHz mono audio."""
    soundfont = find_soundfont(sources)
    if soundfont is None:
        raise MissingPackagesError("instruments", [SOUNDFONTS[0][1]])
    midi = single_note_midi(program, pitch, velocity, note_seconds, clip_seconds)
    return fluidsynth_render(sources.fluidsynth, soundfont, midi, clip_seconds)


def render_drum_hit(fluidsynth: str, soundfont: Path, kit: int, key: int, velocity: int) -> np.ndarray:
    """One hit of GM drum `key` from drum kit `kit` (16 kHz mono), its trailing silence cut (see DRUM_TRIM_DB)."""
    midi = single_note_midi(kit, key, velocity, DRUM_RENDER_SECONDS, DRUM_RENDER_SECONDS, channel=PERCUSSION_CHANNEL)
    waveform = fluidsynth_render(fluidsynth, soundfont, midi, DRUM_RENDER_SECONDS)
    return trim_silence(
        waveform, threshold_db=DRUM_TRIM_DB, pad_seconds=DRUM_TRIM_PAD_SECONDS, leading=False,
        min_seconds=DRUM_MIN_SECONDS, max_seconds=DRUM_RENDER_SECONDS,
    )  # fmt: skip


class DrumsBuilder(RenderedCorpusBuilder):
    name = "drums"
    description = (
        "Percussion classification: single General MIDI drum hits (12 classes of drum keys) rendered by fluidsynth, "
        "random key, velocity and drum kit, trailing silence cut (hits of 0.1-1.5 s). Split by source: training "
        "hits come from one sound font, validation and test hits from another (disjoint kits), never heard in "
        "training."
    )
    skipped_file = SKIPPED_HITS_FILE

    def _fonts(self) -> dict[str, Path]:
        """Sound font role ('train', 'heldout') -> file."""
        sources = self.sources
        return {"train": Path(sources.drums_train_soundfont), "heldout": Path(sources.drums_heldout_soundfont)}

    def parameters(self) -> dict[str, Any]:
        return {
            "seed": self.options.seed,
            "hits_per_class": dict(zip(SPLITS, map(int, self.options.hits_per_class))),
            "classes": {label: list(keys) for label, keys in DRUM_CLASSES.items()},
            "excluded_keys": {str(kit): list(keys) for kit, keys in DRUM_KIT_EXCLUDED_KEYS.items()},
            "soundfonts": {role: font.name for role, font in self._fonts().items()},
            "split_kits": {
                split: {"soundfont": role, "kits": list(kits)} for split, (role, kits) in DRUM_SPLIT_KITS.items()
            },
            "velocity_range": list(DRUM_VELOCITY_RANGE),
            "render_seconds": DRUM_RENDER_SECONDS,
            "trim_db": DRUM_TRIM_DB,
            "trim_pad_seconds": DRUM_TRIM_PAD_SECONDS,
            "min_seconds": DRUM_MIN_SECONDS,
            "gain": FLUIDSYNTH_GAIN,
        }

    def packages(self) -> list[str]:
        return ["fluidsynth"] + [p for p in map(soundfont_package, self._fonts().values()) if p is not None]

    def plan(self) -> list[Clip]:
        counts = tuple(self.options.hits_per_class)
        if len(counts) != len(SPLITS) or min(counts) < 1:
            raise CorpusBuildError(
                f"--hits-per-class needs three positive counts (train,validation,test), got {counts}."
            )
        fonts = self._fonts()
        if len({font.name for font in fonts.values()}) < len(fonts):
            raise CorpusBuildError(
                "drums needs two different sound fonts (the held-out one provides the validation and test hits); "
                f"got {fonts['train']} twice. Fix --drums-train-soundfont or --drums-heldout-soundfont."
            )
        skipped = self._load_skipped()
        digests: set[str] = set()
        clips: list[Clip] = []
        with ThreadPoolExecutor(max_workers=max(1, int(self.options.workers))) as pool:
            for split, needed in zip(SPLITS, counts):
                role, kits = DRUM_SPLIT_KITS[split]
                for label in DRUM_CLASSES:
                    candidates = self._candidates(label, split, fonts[role], kits, needed)
                    chosen, passed = self._choose(
                        candidates, needed, pool, skipped, digests=digests,
                        shortage=f"{split} {label!r} hits of {fonts[role].name} kits {list(kits)} sound and differ; "
                        "lower --hits-per-class",
                    )  # fmt: skip
                    for clip in chosen:
                        clip.split = split
                    _log(f"[{self.name}]   {split} {label}: {len(chosen)} hits from {fonts[role].name} "
                         f"({passed} silent or duplicate candidates skipped)")  # fmt: skip
                    clips.extend(chosen)
        return clips

    def _candidates(self, label: str, split: str, font: Path, kits: Sequence[int], needed: int) -> list[Clip]:
        """Distinct seeded (kit, key, velocity) draws of class `label` for `split`, in drawing order."""
        keys = DRUM_CLASSES[label]
        digest = int(hashlib.sha1(f"drums/{split}/{label}".encode("utf-8")).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.options.seed, digest])
        velocities = DRUM_VELOCITY_RANGE[1] - DRUM_VELOCITY_RANGE[0] + 1
        playable = sum(key not in DRUM_KIT_EXCLUDED_KEYS.get(kit, ()) for kit in kits for key in keys)
        limit = min(CANDIDATE_FACTOR * needed, playable * velocities)
        seen: set[tuple[int, int, int]] = set()
        clips: list[Clip] = []
        while len(clips) < limit:
            kit = int(kits[int(rng.integers(0, len(kits)))])
            key = int(keys[int(rng.integers(0, len(keys)))])
            velocity = int(rng.integers(DRUM_VELOCITY_RANGE[0], DRUM_VELOCITY_RANGE[1] + 1))
            if (kit, key, velocity) in seen or key in DRUM_KIT_EXCLUDED_KEYS.get(kit, ()):
                continue
            seen.add((kit, key, velocity))
            stem = f"{label}_{font.stem}_kit{kit:03d}_k{key:03d}_v{velocity:03d}"
            origin = f"fluidsynth:{font.name}:kit={kit}:key={key}:velocity={velocity}"
            clips.append(Clip(f"{label}/{stem}.wav", label, "", origin,
                              {"soundfont": font.name, "kit": kit, "key": key, "velocity": velocity}))  # fmt: skip
        return clips

    def _render_to_disk(self, clip: Clip) -> bool:
        font = next(f for f in self._fonts().values() if f.name == clip.extra["soundfont"])
        extra = clip.extra
        try:
            waveform = render_drum_hit(self.sources.fluidsynth, font, int(extra["kit"]), int(extra["key"]),
                                       int(extra["velocity"]))  # fmt: skip
        except SilentNoteError:
            return False
        write_wav(self.folder / clip.path, waveform)
        return True


#: One row of `espeak-ng --voices=...`: priority, language, age/gender, name, file, then (other languages).
_ESPEAK_VOICE_ROW = re.compile(r"^\s*\d+\s+(?P<language>\S+)\s+\S+\s+\S+\s+(?P<file>[^(]+?)\s*(?:\(.*\))?$")


def espeak_voice_table(espeak: str, which: str) -> list[tuple[str, str]]:
    """(language, voice file) of every row `espeak-ng --voices=WHICH` lists."""
    result = subprocess.run([espeak, f"--voices={which}"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{espeak} --voices={which} failed ({result.returncode}): {result.stderr[-2000:]}")
    rows = [_ESPEAK_VOICE_ROW.match(line) for line in result.stdout.splitlines()[1:]]
    return [(row["language"], row["file"]) for row in rows if row]


def espeak_english_voices(espeak: str) -> list[str]:
    """English espeak-ng voices by language code (en-gb, en-us, ...), leaving out MBROLA voices (extra packages)."""
    voices = [language for language, file in espeak_voice_table(espeak, "en")
              if (language == "en" or language.startswith("en-")) and not file.startswith("mb/")]  # fmt: skip
    return sorted(set(voices))


def espeak_say(
    espeak: str, voice: str, word: str, *, variant: str = "", pitch: int = 50, speed: int = 175
) -> np.ndarray:
    """`word` spoken by espeak-ng voice `voice` (+`variant`) at `pitch` (0-99) and `speed` (words per minute), as
    16 kHz mono audio (espeak-ng writes 22.05 kHz, soxr resamples)."""
    with tempfile.TemporaryDirectory(prefix="cat-hf-espeak-") as tmp:
        wav = Path(tmp) / "word.wav"
        command = [espeak, "-v", f"{voice}+{variant}" if variant else voice, "-s", str(int(speed)),
                   "-p", str(int(pitch)), "-w", str(wav), word]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"espeak-ng failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
        return read_mono(wav)


def espeak_variants(espeak: str, voice: str, *, workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """The voice variants (`espeak-ng --voices=variant`) that give a voice of their own, and why the others do not.

    Each variant says ESPEAK_PROBE_WORD with `voice`; a variant is left out when that fails, is silent, or sounds
    exactly like the plain voice (espeak-ng falls back to it for a variant it cannot load) or like an earlier
    variant (an alias). Names with spaces are left out too (they cannot be joined to a voice name).
    """
    names = sorted({file[len("!v/"):] for language, file in espeak_voice_table(espeak, "variant")
                    if language == "variant" and file.startswith("!v/")})  # fmt: skip
    dropped = {name: "name has a space" for name in names if any(c.isspace() for c in name)}
    names = [name for name in names if name not in dropped]

    def probe(variant: str) -> str | None:
        try:
            waveform = espeak_say(espeak, voice, ESPEAK_PROBE_WORD, variant=variant)
        except RuntimeError:
            return None
        return pcm_digest(waveform) if float(np.max(np.abs(waveform), initial=0.0)) >= SILENCE_PEAK else None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        base, *digests = list(pool.map(probe, ["", *names]))
    if base is None:
        raise CorpusBuildError(f"espeak-ng voice {voice!r} says nothing; check the espeak-ng installation.")
    owner: dict[str, str] = {base: "the plain voice"}
    usable: list[str] = []
    for name, digest in zip(names, digests):
        if digest is None:
            dropped[name] = "fails or is silent"
        elif digest in owner:
            dropped[name] = f"sounds like {owner[digest]}"
        else:
            owner[digest] = name
            usable.append(name)
    return usable, dropped


class SpeechCommandsBuilder(CorpusBuilder):
    name = "speech-commands"
    description = (
        "Keyword spotting: the 10 Speech Commands words (yes, no, up, down, left, right, on, off, stop, go) "
        "synthesised by espeak-ng; a speaker is an English voice (accent), a voice variant, a pitch and a speed. "
        "Split by speaker, with the variants of validation and test speakers never heard in training."
    )

    def __init__(self, root: Path, options: BuildOptions, sources: Sources):
        super().__init__(root, options, sources)
        self._voices: tuple[list[str], list[str]] | None = None

    def voices(self) -> tuple[list[str], list[str]]:
        """(English voices, usable variants) of the installed espeak-ng, found once per builder."""
        if self._voices is None:
            voices = espeak_english_voices(self.sources.espeak)
            if not voices:
                raise CorpusBuildError(f"{self.sources.espeak} lists no English voice; reinstall espeak-ng-data.")
            probe_voice = "en-us" if "en-us" in voices else voices[0]
            variants, dropped = espeak_variants(self.sources.espeak, probe_voice, workers=self.options.workers)
            if dropped:
                _log(f"[{self.name}] {len(dropped)} espeak-ng variants left out: "
                     + ", ".join(f"{name} ({why})" for name, why in sorted(dropped.items())))  # fmt: skip
            self._voices = (voices, variants)
        return self._voices

    def parameters(self) -> dict[str, Any]:
        voices, variants = self.voices()
        return {
            "seed": self.options.seed,
            "words": list(SPEECH_COMMAND_WORDS),
            "speakers": dict(zip(SPLITS, map(int, self.options.speakers))),
            "voices": voices,
            "variants": variants,
            "pitch_range": list(SPEECH_PITCH_RANGE),
            "speed_range": list(SPEECH_SPEED_RANGE),
            "trim_db": SPEECH_TRIM_DB,
            "trim_pad_seconds": SPEECH_TRIM_PAD_SECONDS,
        }

    def packages(self) -> list[str]:
        return ["espeak-ng", "espeak-ng-data"]

    def speakers(self) -> list[dict[str, Any]]:
        """The speakers of every split: id, split, voice, variant, pitch, speed (seeded).

        The variants are split first (in proportion to the speakers per split), so no validation or test speaker
        shares a variant with a training speaker; each split's speakers take its variants in turn, with a random
        voice, pitch and speed each.
        """
        counts = tuple(int(n) for n in self.options.speakers)
        if len(counts) != len(SPLITS) or min(counts) < 1:
            raise CorpusBuildError(f"--speakers needs three positive counts (train,validation,test), got {counts}.")
        voices, variants = self.voices()
        total = sum(counts)
        if len(variants) < len(SPLITS):
            raise CorpusBuildError(f"Only {len(variants)} usable espeak-ng variants; speech-commands needs 3 or more.")
        by_split = stratified_split(
            variants, ["variant"] * len(variants), seed=self.options.seed,
            validation_fraction=counts[1] / total, test_fraction=counts[2] / total,
        )  # fmt: skip
        rng = np.random.default_rng([self.options.seed, int(hashlib.sha1(b"speech-commands").hexdigest()[:8], 16)])
        speakers: list[dict[str, Any]] = []
        seen: set[tuple[str, str, int, int]] = set()
        for split, count in zip(SPLITS, counts):
            order = [by_split[split][i] for i in rng.permutation(len(by_split[split]))]
            for k in range(count):
                variant = order[k % len(order)]
                while True:
                    voice = voices[int(rng.integers(0, len(voices)))]
                    pitch = int(rng.integers(SPEECH_PITCH_RANGE[0], SPEECH_PITCH_RANGE[1] + 1))
                    speed = int(rng.integers(SPEECH_SPEED_RANGE[0], SPEECH_SPEED_RANGE[1] + 1))
                    if (voice, variant, pitch, speed) not in seen:
                        break
                seen.add((voice, variant, pitch, speed))
                speakers.append({"speaker": f"spk{len(speakers):03d}", "split": split, "voice": voice,
                                 "variant": variant, "pitch": pitch, "speed": speed})  # fmt: skip
        return speakers

    def plan(self) -> list[Clip]:
        clips: list[Clip] = []
        for speaker in self.speakers():
            extra = {key: speaker[key] for key in ("speaker", "voice", "variant", "pitch", "speed")}
            for word in SPEECH_COMMAND_WORDS:
                origin = (f"espeak-ng:{speaker['voice']}+{speaker['variant']}:pitch={speaker['pitch']}:"
                          f"speed={speaker['speed']}:{word}")  # fmt: skip
                path = f"{word}/{word}_{speaker['speaker']}.wav"
                clips.append(Clip(path, word, speaker["split"], origin, dict(extra)))
        return clips

    def produce(self, clip: Clip) -> None:
        extra = clip.extra
        waveform = espeak_say(self.sources.espeak, extra["voice"], clip.label, variant=extra["variant"],
                              pitch=int(extra["pitch"]), speed=int(extra["speed"]))  # fmt: skip
        if float(np.max(np.abs(waveform), initial=0.0)) < SILENCE_PEAK:
            raise RuntimeError(f"{clip.origin} came out silent, though its variant said {ESPEAK_PROBE_WORD!r}.")
        write_wav(self.folder / clip.path,
                  trim_silence(waveform, threshold_db=SPEECH_TRIM_DB, pad_seconds=SPEECH_TRIM_PAD_SECONDS))


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
                digest = wav_digest(path)
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
    for builder in (
        SpokenWordsBuilder, SpokenLanguageBuilder, InstrumentsBuilder, DrumsBuilder, SpeechCommandsBuilder,
        PretrainMixBuilder,
    )
}  # fmt: skip
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
            f"(mean {info['mean_seconds']:.2f} s, {info['min_seconds']:.2f}-{info['max_seconds']:.2f} s"
            + (f", {info['fraction_under_half_second']:.0%} < 0.5 s" if "fraction_under_half_second" in info else "")
            + ")"
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


def _parse_split_counts(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as err:
        message = f"expected three counts TRAIN,VALIDATION,TEST like 60,15,30, got {text!r}"
        raise argparse.ArgumentTypeError(message) from err
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive counts TRAIN,VALIDATION,TEST, got {text!r}")
    return values  # type: ignore[return-value]


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
        p.add_argument("--drums-train-soundfont", type=Path, default=defaults.drums_train_soundfont,
                       help="drums: GM sound font of the training hits")
        p.add_argument("--drums-heldout-soundfont", type=Path, default=defaults.drums_heldout_soundfont,
                       help="drums: another GM sound font, of the validation and test hits")
        p.add_argument("--espeak", default=defaults.espeak, help="speech-commands: the espeak-ng program")

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
    build.add_argument("--split-by", default=INSTRUMENT_SPLIT_BY[0], choices=INSTRUMENT_SPLIT_BY,
                       help="instruments: 'program' puts each GM program in one split (test notes come from programs "
                       "never heard in training); default 'clip'")
    build.add_argument("--hits-per-class", type=_parse_split_counts, default=DRUM_HITS_PER_CLASS, metavar="TRAIN,VAL,TEST",
                       help="drums: hits per class in train,validation,test (default 60,15,30)")
    build.add_argument("--speakers", type=_parse_split_counts, default=SPEECH_SPEAKERS, metavar="TRAIN,VAL,TEST",
                       help="speech-commands: speakers in train,validation,test (default 80,15,25)")
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
        drums_train_soundfont=args.drums_train_soundfont, drums_heldout_soundfont=args.drums_heldout_soundfont,
        espeak=args.espeak,
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
        split_by=args.split_by, hits_per_class=args.hits_per_class, speakers=args.speakers,
    )  # fmt: skip
    for name in args.names:
        print(describe(build_corpus(name, args.root, options=options, sources=sources, force=args.force)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
