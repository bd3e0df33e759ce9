"""benchmarks/corpora.py: MIDI writer, seeded stratified splits, and whole builds on small real files on disk.

The Debian packages are replaced by folders laid out like theirs (tones written here), and fluidsynth by a small
stand-in program that parses our MIDI file and writes the note as a tone, so these tests need neither the
packages nor the synthesizer; the real packages are exercised by `python benchmarks/corpora.py build`.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from benchmark_modules import load_benchmark

corpora = load_benchmark("corpora")

LANGUAGES = {"en": "en_US_f_Test", "fr": "fr_CA_f_Test", "it": "it_IT_m_Test"}

# A stand-in for fluidsynth: reads the note from our MIDI file, writes a 44.1 kHz stereo tone 2.5 s long, and
# renders silence above pitch 90 (like a sound font without a sample zone there).
FAKE_FLUIDSYNTH = """#!{python}
import sys
import numpy as np, soundfile as sf
args = sys.argv[1:]
out = args[args.index("-F") + 1]
data = open(args[-1], "rb").read()
assert data[:4] == b"MThd" and b"MTrk" in data and args[-2].endswith(".sf2")
at = data.index(bytes([0x90]))
pitch, velocity = data[at + 1], data[at + 2]
rate = int(args[args.index("-r") + 1])
t = np.arange(int(2.5 * rate)) / rate
tone = 0.0 if pitch > 90 else velocity / 127 * 0.3 * np.sin(2 * np.pi * 440 * 2 ** ((pitch - 69) / 12) * t)
sf.write(out, np.stack([tone * np.ones_like(t)] * 2, axis=1), rate, subtype="PCM_16")
"""


def _tone(seconds: float, rate: int, frequency: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@pytest.fixture()
def sources(tmp_path: Path):
    """Package-like folders: three Asterisk voices, sonic-pi, freedesktop, ALSA, a sound font and 'fluidsynth'."""
    asterisk = tmp_path / "asterisk"
    for k, (language, voice) in enumerate(LANGUAGES.items()):
        _mk(asterisk / voice / "digits")
        for digit in range(10):
            sf.write(str(asterisk / voice / "digits" / f"{digit}.wav"),
                     _tone(0.5 + 0.02 * digit, 8000, 200 + 40 * digit + 7 * k), 8000, subtype="PCM_16")  # fmt: skip
        for prompt in ("hello", "goodbye", "please-wait"):
            sf.write(str(asterisk / voice / f"{prompt}.wav"), _tone(1.0, 8000, 300 + 50 * k + len(prompt)), 8000,
                     subtype="PCM_16")  # fmt: skip
        # the same beep in every package, a too-short prompt and a silence file: none is a language sample
        sf.write(str(asterisk / voice / "beep.wav"), _tone(0.5, 8000, 1000), 8000, subtype="PCM_16")
        sf.write(str(asterisk / voice / "ok.wav"), _tone(0.2, 8000, 500 + k), 8000, subtype="PCM_16")
        _mk(asterisk / voice / "silence")
        sf.write(str(asterisk / voice / "silence" / "1.wav"), np.zeros(8000, np.float32), 8000, subtype="PCM_16")
    sonic = tmp_path / "sonic-pi"
    _mk(sonic)
    sf.write(str(sonic / "loop_long.flac"), np.stack([_tone(12.0, 44100, 110)] * 2, axis=1), 44100)
    sf.write(str(sonic / "bd_short.flac"), _tone(0.4, 44100, 60), 44100)
    freedesktop = tmp_path / "freedesktop"
    _mk(freedesktop)
    sf.write(str(freedesktop / "bell.oga"), _tone(1.0, 44100, 880), 44100, format="OGG", subtype="VORBIS")
    alsa = tmp_path / "alsa"
    _mk(alsa)
    sf.write(str(alsa / "Front_Center.wav"), _tone(1.4, 48000, 440), 48000, subtype="PCM_16")
    font = tmp_path / "Test.sf2"
    font.write_bytes(b"RIFF")
    fluidsynth = tmp_path / "fluidsynth"
    fluidsynth.write_text(FAKE_FLUIDSYNTH.format(python=sys.executable))
    fluidsynth.chmod(fluidsynth.stat().st_mode | stat.S_IEXEC)
    return corpora.Sources(asterisk_dir=asterisk, soundfont=font, fluidsynth=str(fluidsynth), sonic_pi_dir=sonic,
                           freedesktop_dir=freedesktop, alsa_dir=alsa)  # fmt: skip


def _mk(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def _check_wav(path: Path) -> None:
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV"), path


# ----------------------------------------------------------------------------------------------------------------


def test_single_note_midi_is_a_valid_standard_midi_file():
    data = corpora.single_note_midi(program=41, pitch=64, velocity=90, note_seconds=1.0, total_seconds=2.0)
    assert data[:4] == b"MThd"
    length, fmt, tracks, division = struct.unpack(">IHHH", data[4:14])
    assert (length, fmt, tracks, division) == (6, 0, 1, corpora.MIDI_TICKS_PER_QUARTER)
    assert data[14:18] == b"MTrk"
    (track_length,) = struct.unpack(">I", data[18:22])
    events = data[22:]
    assert len(events) == track_length and events.endswith(b"\xff\x2f\x00")
    assert bytes([0xC0, 41]) in events and bytes([0x90, 64, 90]) in events and bytes([0x80, 64, 0]) in events
    # delta times: note off after 1 s (960 ticks at 120 bpm), end of track 1 s later
    assert corpora._variable_length(960) == bytes([0x87, 0x40]) and events.count(bytes([0x87, 0x40])) == 2
    assert corpora._variable_length(0) == b"\x00" and corpora._variable_length(0x3FFF) == b"\xff\x7f"
    with pytest.raises(ValueError, match="pitch"):
        corpora.single_note_midi(program=0, pitch=128, velocity=90, note_seconds=1.0, total_seconds=2.0)
    with pytest.raises(ValueError, match="note_seconds"):
        corpora.single_note_midi(program=0, pitch=60, velocity=90, note_seconds=3.0, total_seconds=2.0)


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class():
    items = [f"c{c}/{i}" for c in range(4) for i in range(10 + 5 * c)]
    labels = [item.split("/")[0] for item in items]
    kwargs = {"validation_fraction": 0.1, "test_fraction": 0.2}
    first = corpora.stratified_split(items, labels, seed=3, **kwargs)
    assert first == corpora.stratified_split(items, labels, seed=3, **kwargs)
    assert first != corpora.stratified_split(items, labels, seed=4, **kwargs)
    assert sorted(i for members in first.values() for i in members) == sorted(items)  # disjoint, complete
    for c in range(4):
        n = 10 + 5 * c
        counts = {split: sum(i.startswith(f"c{c}/") for i in members) for split, members in first.items()}
        n_test, n_val = round(0.2 * n), round(0.1 * n)
        assert counts == {"test": n_test, "validation": n_val, "train": n - n_test - n_val}
    # adding a class leaves the other classes' splits unchanged
    more = corpora.stratified_split(items + ["c9/0", "c9/1", "c9/2"], labels + ["c9"] * 3, seed=3, **kwargs)
    assert {s: [i for i in m if not i.startswith("c9")] for s, m in more.items()} == first
    assert sorted(i for m in more.values() for i in m if i.startswith("c9")) == ["c9/0", "c9/1", "c9/2"]
    with pytest.raises(ValueError, match="unique"):
        corpora.stratified_split(["a", "a"], ["x", "x"], seed=0, **kwargs)


def test_missing_packages_name_the_apt_get_command(tmp_path, capsys):
    empty = corpora.Sources(asterisk_dir=tmp_path / "none", fluidsynth="no-such-fluidsynth-binary",
                            sonic_pi_dir=tmp_path / "x", freedesktop_dir=tmp_path / "y", alsa_dir=tmp_path / "z")
    with pytest.raises(corpora.MissingPackagesError) as info:
        corpora.build_corpus("spoken-words", tmp_path / "out", sources=empty)
    message = str(info.value)
    assert "apt-get install -y" in message and "asterisk-core-sounds-en-wav" in message
    assert not (tmp_path / "out" / "spoken-words").exists()
    required, _ = corpora.missing_packages("pretrain-mix", empty)
    assert {"fluidsynth", "sonic-pi-samples", "sound-theme-freedesktop", "alsa-utils"} <= set(required)
    code = corpora.main(["check", "instruments", "--fluidsynth", "no-such-fluidsynth-binary"])
    assert code == 1 and "apt-get update && apt-get install -y" in capsys.readouterr().out


def test_spoken_words_build_layout_splits_and_idempotency(tmp_path, sources):
    root = tmp_path / "corpora"
    options = corpora.BuildOptions(speed_perturb=(0.9, 1.1))
    stats = corpora.build_corpus("spoken-words", root, options=options, sources=sources)
    folder = root / "spoken-words"
    assert stats["labels"] == sorted(corpora.DIGIT_WORDS) and stats["chance_accuracy"] == 0.1
    splits = {name: _rows(folder / f"{name}.csv") for name in corpora.SPLITS}
    # 3 voices per word: one clip each for test and validation, one original + 2 speed copies for train
    for name, expected in (("test", 1), ("validation", 1), ("train", 3)):
        for word in corpora.DIGIT_WORDS:
            assert sum(r["label"] == word for r in splits[name]) == expected, (name, word)
    assert all(float(r["speed"]) == 1.0 for r in splits["test"] + splits["validation"])
    originals = {r["origin"] for r in splits["train"] if float(r["speed"]) == 1.0}
    assert {r["origin"] for r in splits["train"]} == originals  # speed copies come from training clips only
    held_out = {r["origin"] for r in splits["test"] + splits["validation"]}
    assert not held_out & originals
    for row in splits["train"] + splits["test"]:
        path = folder / row["path"]
        assert path.parent.name == row["label"]
        _check_wav(path)
    fast = next(r for r in splits["train"] if float(r["speed"]) == 1.1)
    source_seconds = sf.info(fast["origin"]).duration
    assert sf.info(str(folder / fast["path"])).duration == pytest.approx(source_seconds / 1.1, abs=0.002)
    assert not list(folder.rglob("*.tmp")) and not list(folder.rglob(".*"))

    # a second build reuses everything; other parameters are refused until --force
    clip = folder / splits["test"][0]["path"]
    before = clip.stat().st_mtime_ns
    assert corpora.build_corpus("spoken-words", root, options=options, sources=sources) == stats
    assert clip.stat().st_mtime_ns == before
    with pytest.raises(corpora.CorpusBuildError, match="speed_perturb.*--force"):
        corpora.build_corpus("spoken-words", root, sources=sources)
    rebuilt = corpora.build_corpus("spoken-words", root, sources=sources, force=True)
    assert rebuilt["num_clips"] == 30 and len(list(folder.glob("*/*.wav"))) == 30

    # an interrupted build resumes: a lost clip and a stale file are fixed, nothing else is rewritten
    (folder / corpora.STATS_FILE).unlink()
    lost = folder / _rows(folder / "train.csv")[0]["path"]
    lost.unlink()
    stale = folder / "zero" / "not-in-plan.wav"
    corpora.write_wav(stale, np.zeros(1600, np.float32))
    kept = folder / _rows(folder / "test.csv")[0]["path"]
    kept_time = kept.stat().st_mtime_ns
    corpora.build_corpus("spoken-words", root, sources=sources)
    assert lost.is_file() and not stale.exists() and kept.stat().st_mtime_ns == kept_time


def test_split_csv_loads_with_the_project_loader(tmp_path, sources):
    from cat_hf.audio import DEFAULT_SAMPLING_RATE
    from cat_hf.data import load_audio_corpus

    assert corpora.SAMPLING_RATE == DEFAULT_SAMPLING_RATE
    corpora.build_corpus("spoken-words", tmp_path, sources=sources)
    train = load_audio_corpus(tmp_path / "spoken-words" / "train.csv")
    assert len(train) == 10 and sorted(t[0] for t in train["labels"]) == sorted(corpora.DIGIT_WORDS)
    assert all(os.path.isfile(entry["path"]) for entry in train.with_format(None)["audio"])


def test_spoken_language_drops_shared_short_and_silent_files(tmp_path, sources):
    stats = corpora.build_corpus("spoken-language", tmp_path, sources=sources)
    assert stats["labels"] == sorted(LANGUAGES) and stats["num_clips"] == 3 * 13  # 10 digits + 3 prompts each
    rows = [r for split in corpora.SPLITS for r in _rows(tmp_path / "spoken-language" / f"{split}.csv")]
    prompts = {r["prompt"] for r in rows}
    assert "beep" not in prompts and "ok" not in prompts and not any(p.startswith("silence") for p in prompts)
    assert {r["label"] for r in rows if r["prompt"] == "hello"} == set(LANGUAGES)


def test_instruments_and_pretrain_mix(tmp_path, sources):
    options = corpora.BuildOptions(clips_per_class=5, families=("bass", "pipe"), segment_seconds=5.0)
    root = tmp_path / "corpora"
    stats = corpora.build_corpus("pretrain-mix", root, options=options, sources=sources)

    instruments = root / "instruments"
    notes = [r for split in corpora.SPLITS for r in _rows(instruments / f"{split}.csv")]
    assert sorted({r["label"] for r in notes}) == ["bass", "pipe"] and len(notes) == 10
    for row in notes:
        family_index = corpora.GM_FAMILIES[row["label"]][0]
        assert 8 * family_index <= int(row["program"]) < 8 * family_index + 8
        assert int(row["pitch"]) <= 90  # the stand-in's silent notes were skipped, not written
        _check_wav(instruments / row["path"])
        assert sf.info(str(instruments / row["path"])).duration == pytest.approx(corpora.CLIP_SECONDS)
    silent = json.loads((instruments / corpora.SILENT_NOTES_FILE).read_text())
    assert all(int(Path(p).stem.split("_n")[1][:3]) > 90 for p in silent)

    mix = root / "pretrain-mix"
    rows = {split: _rows(mix / f"{split}.csv") for split in ("train", "validation")}
    assert not (mix / "test.csv").exists()
    everything = rows["train"] + rows["validation"]
    assert stats["num_clips"] == len(everything) and stats["labels"] == []
    origins = {r["origin"] for r in everything}
    for corpus in ("spoken-words", "spoken-language", "instruments"):
        for split in ("validation", "test"):
            assert not origins & {r["origin"] for r in _rows(root / corpus / f"{split}.csv")}, (corpus, split)
    assert {r["origin"] for r in everything if r["source"] == "instruments"} == {
        r["origin"] for r in _rows(instruments / "train.csv")
    }
    beeps = [r for r in everything if r["path"].endswith("beep.wav")]
    assert len(beeps) == 1  # identical in every package: kept once
    pieces = sorted((r for r in everything if "loop_long" in r["path"]), key=lambda r: r["path"])
    assert [r["path"].rsplit("/", 1)[1] for r in pieces] == [f"loop_long_seg00{k}.wav" for k in range(2)]
    train_paths = {r["path"] for r in rows["train"]}
    assert {r["source"] for r in pieces} == {"sonic-pi"}
    assert len({r["path"] in train_paths for r in pieces}) == 1  # pieces of one file share a split
    assert [sf.info(str(mix / r["path"])).duration for r in pieces] == pytest.approx([5.0, 7.0], abs=1e-3)
    for source in ("freedesktop", "alsa", "sonic-pi", "asterisk-en", "instruments"):
        assert any(r["source"] == source for r in everything), source
    for row in everything:
        _check_wav(mix / row["path"])
