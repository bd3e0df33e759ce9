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
# On the percussion channel it writes a 2 s decaying noise burst instead (stdlib only, fast): seeded by the sound
# font, kit, key and velocity; closed hi-hats decay fast, open hi-hats and cymbals slowly; kit 48 has no cowbell
# (silence); the rim shot ignores the velocity, so rim candidates of one kit are identical renders.
FAKE_FLUIDSYNTH = """#!{python}
import sys
args = sys.argv[1:]
out = args[args.index("-F") + 1]
data = open(args[-1], "rb").read()
assert data[:4] == b"MThd" and b"MTrk" in data and args[-2].endswith(".sf2")
change = next(i for i in range(22, len(data)) if data[i] & 0xF0 == 0xC0)
if data[change] == 0xC9:
    import math, os, random, struct, wave
    kit, key, velocity = data[change + 1], data[change + 4], data[change + 5]
    assert data[change + 3] == 0x99
    rate = int(args[args.index("-r") + 1])
    tau = 0.01 if key in (42, 44) else 0.5 if key in (46, 49, 51, 52, 53, 55, 57, 59) else 0.05
    seed = os.path.basename(args[-2]) + f":{{kit}}:{{key}}:" + ("" if key == 37 else str(velocity))
    noise = random.Random(seed)
    gain = 0.0 if (kit, key) == (48, 56) else 0.5 if key == 37 else velocity / 127 * 0.5
    sounding = min(int(2.0 * rate), int(tau * math.log(1e6) * rate))  # then below one 16-bit step: zeros
    samples = [round(32767 * gain * noise.uniform(-1, 1) * math.exp(-n / rate / tau)) for n in range(sounding)]
    samples += [0] * (int(2.0 * rate) - sounding)
    with wave.open(out, "wb") as stream:
        stream.setnchannels(1)
        stream.setsampwidth(2)
        stream.setframerate(rate)
        stream.writeframes(struct.pack(f"<{{len(samples)}}h", *samples))
    sys.exit(0)
import numpy as np, soundfile as sf
at = data.index(bytes([0x90]))
pitch, velocity = data[at + 1], data[at + 2]
rate = int(args[args.index("-r") + 1])
t = np.arange(int(2.5 * rate)) / rate
tone = 0.0 if pitch > 90 else velocity / 127 * 0.3 * np.sin(2 * np.pi * 440 * 2 ** ((pitch - 69) / 12) * t)
sf.write(out, np.stack([tone * np.ones_like(t)] * 2, axis=1), rate, subtype="PCM_16")
"""


# A stand-in for espeak-ng (stdlib only): lists voices and variants like espeak-ng 1.51, and says a word as a
# 0.2-0.7 s tone between 100 ms and 300 ms of silence (espeak-ng pads its words). Variant 'broken' fails, 'm1-copy'
# sounds like m1, and 'missing' falls back to the plain voice, as espeak-ng does for a variant it cannot load.
FAKE_ESPEAK = """#!{python}
import math, struct, sys, wave, zlib
args = sys.argv[1:]
if args[0] == "--voices=en":
    print("Pty Language       Age/Gender VoiceName          File                 Other Languages")
    print(" 2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)")
    print(" 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)")
    print(" 5  en-us           --/F      us-mbrola-1        mb/mb-us1            (en 8)")
    print(" 9  en              --/F      en-german-1        mb/mb-de1-en         ")
    print(" 5  variant         --/M      Storm              !v/Storm             (en-us 5)")
    print(" 5  en-gb-scotland  --/M      English_(Scotland) gmw/en-GB-scotland   (en 4)")
    sys.exit(0)
if args[0] == "--voices=variant":
    print("Pty Language       Age/Gender VoiceName          File                 Other Languages")
    for name in ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "broken", "m1-copy", "missing"):
        print(f" 5  variant         --/M      {{name:<18}} !v/{{name:<18}}")
    print(" 5  variant         --/M      Half-LifeAnnouncementSystem !v/announcer         ")
    print(" 5  variant         --/M      Mr_Serious         !v/Mr serious        ")
    print(" 5  variant         --/M      Storm              !v/Storm             (en-us 5)")
    sys.exit(0)
voice, _, variant = args[args.index("-v") + 1].partition("+")
if variant == "broken":
    sys.exit("cannot load variant")
variant = {{"m1-copy": "m1", "missing": ""}}.get(variant, variant)
pitch, speed, word = int(args[args.index("-p") + 1]), int(args[args.index("-s") + 1]), args[-1]
rate = 22050
frequency = 100 + 3 * pitch + zlib.crc32(variant.encode()) % 1000 / 4 + zlib.crc32(voice.encode()) % 20
seconds = (0.1 + 0.08 * len(word)) * 175 / speed
tone = [round(12000 * math.sin(2 * math.pi * frequency * n / rate)) for n in range(int(seconds * rate))]
samples = [0] * int(0.1 * rate) + tone + [0] * int(0.3 * rate)
with wave.open(args[args.index("-w") + 1], "wb") as stream:
    stream.setnchannels(1)
    stream.setsampwidth(2)
    stream.setframerate(rate)
    stream.writeframes(struct.pack(f"<{{len(samples)}}h", *samples))
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
    fonts = [tmp_path / name for name in ("Test.sf2", "TrainKit.sf2", "HeldoutKit.sf2")]
    for font in fonts:
        font.write_bytes(b"RIFF")
    programs = {}
    for name, script in (("fluidsynth", FAKE_FLUIDSYNTH), ("espeak-ng", FAKE_ESPEAK)):
        programs[name] = tmp_path / name
        programs[name].write_text(script.format(python=sys.executable))
        programs[name].chmod(programs[name].stat().st_mode | stat.S_IEXEC)
    return corpora.Sources(asterisk_dir=asterisk, soundfont=fonts[0], fluidsynth=str(programs["fluidsynth"]),
                           sonic_pi_dir=sonic, freedesktop_dir=freedesktop, alsa_dir=alsa,
                           drums_train_soundfont=fonts[1], drums_heldout_soundfont=fonts[2],
                           espeak=str(programs["espeak-ng"]))  # fmt: skip


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


def test_single_note_midi_on_the_percussion_channel():
    data = corpora.single_note_midi(program=25, pitch=42, velocity=100, note_seconds=1.5, total_seconds=1.5,
                                    channel=corpora.PERCUSSION_CHANNEL)  # fmt: skip
    events = data[22:]
    assert bytes([0xC9, 25]) in events and bytes([0x99, 42, 100]) in events and bytes([0x89, 42, 0]) in events
    assert bytes([0xC0, 25]) not in events
    with pytest.raises(ValueError, match="channel"):
        corpora.single_note_midi(program=0, pitch=42, velocity=90, note_seconds=1.0, total_seconds=1.0, channel=16)


def test_trim_silence_keeps_short_hits_short():
    rate = corpora.SAMPLING_RATE
    t = np.arange(int(1.5 * rate)) / rate
    # exp(-t / tau) falls 50 dB below its peak (at t = 0) at t = tau * ln(10 ** 2.5)
    for tau in (0.02, 0.05, 0.1):
        hit = (np.cos(2 * np.pi * 3000 * t) * np.exp(-t / tau)).astype(np.float32)
        trimmed = corpora.trim_silence(hit, threshold_db=50, pad_seconds=0.02, leading=False, min_seconds=0.1,
                                       max_seconds=1.5)  # fmt: skip
        expected = max(tau * np.log(10**2.5) + 0.02, 0.1)
        assert len(trimmed) / rate == pytest.approx(expected, abs=0.002), tau
        np.testing.assert_array_equal(trimmed, hit[: len(trimmed)])  # a cut, nothing rescaled
    # a sound longer than max_seconds is cut there with a fade-out; a click is kept for min_seconds
    drone = np.full(int(2.0 * rate), 0.5, np.float32)
    cut = corpora.trim_silence(drone, threshold_db=50, pad_seconds=0.02, leading=False, max_seconds=1.5)
    assert len(cut) == int(1.5 * rate) and cut[-1] == 0.0 and cut[0] == 0.5
    assert 0 < cut[-int(corpora.FADE_OUT_SECONDS * rate) // 2] < 0.5
    click = np.zeros(int(0.05 * rate), np.float32)
    click[10] = 1.0
    kept = corpora.trim_silence(click, threshold_db=50, pad_seconds=0.02, leading=False, min_seconds=0.1)
    assert len(kept) == int(0.1 * rate) and kept[10] == 1.0 and not kept[11:].any()
    # speech: silence cut on both sides, pad kept
    word = np.concatenate([np.zeros(3200), 0.3 * np.sin(np.arange(4800) * 0.3), np.zeros(8000)]).astype(np.float32)
    spoken = corpora.trim_silence(word, threshold_db=45, pad_seconds=0.05)
    assert len(spoken) == pytest.approx(4800 + 2 * 800, abs=3) and not spoken[:790].any() and spoken[800:810].any()
    with pytest.raises(ValueError, match="silence"):
        corpora.trim_silence(np.zeros(100, np.float32), threshold_db=50, pad_seconds=0.0)


def test_drums_split_by_sound_font_dedupe_and_resume(tmp_path, sources):
    options = corpora.BuildOptions(hits_per_class=(1, 2, 1))
    stats = corpora.build_corpus("drums", tmp_path, options=options, sources=sources)
    folder = tmp_path / "drums"
    splits = {name: _rows(folder / f"{name}.csv") for name in corpora.SPLITS}
    assert stats["labels"] == sorted(corpora.DRUM_CLASSES) and stats["num_clips"] == 12 * 4
    for name, expected in (("train", 1), ("validation", 2), ("test", 1)):
        assert {label: sum(r["label"] == label for r in splits[name]) for label in corpora.DRUM_CLASSES} == {
            label: expected for label in corpora.DRUM_CLASSES
        }, name
    # unseen sources: training hits come from one sound font, validation and test from another, in disjoint kits
    assert {r["soundfont"] for r in splits["train"]} == {"TrainKit.sf2"}
    assert {r["soundfont"] for r in splits["validation"] + splits["test"]} == {"HeldoutKit.sf2"}
    assert {int(r["kit"]) for r in splits["validation"]} <= {8, 16}
    assert {int(r["kit"]) for r in splits["test"]} <= {0, 24, 25, 32, 40, 48}
    durations = {}
    digests = set()
    for row in (r for rows in splits.values() for r in rows):
        assert int(row["key"]) in corpora.DRUM_CLASSES[row["label"]] and 30 <= int(row["velocity"]) <= 127
        assert (int(row["kit"]), int(row["key"])) != (48, 56)  # the stand-in's silent cowbell was skipped
        assert int(row["key"]) not in corpora.DRUM_KIT_EXCLUDED_KEYS.get(int(row["kit"]), ())
        path = folder / row["path"]
        _check_wav(path)
        durations[row["label"]] = durations.get(row["label"], []) + [sf.info(str(path)).duration]
        digests.add(corpora.wav_digest(path))
    assert len(digests) == stats["num_clips"]  # no two clips are the same render
    # the velocity-blind rim shot has one render per kit: the two validation rims are kits 8 and 16; with seed 0
    # kit 16 was drawn four times first, so three identical renders were skipped (and deleted) on the way
    assert sorted(int(r["kit"]) for r in splits["validation"] if r["label"] == "rim") == [8, 16]
    skipped = json.loads((folder / corpora.SKIPPED_HITS_FILE).read_text())
    assert sum(p.startswith("rim/rim_HeldoutKit_kit016") for p in skipped) == 3
    assert not any((folder / p).exists() for p in skipped)
    # trailing silence cut: closed hi-hats (-50 dB after 58 ms) last the minimum 0.1 s, cymbals ring to 1.5 s,
    # other hits (tau 50 ms) about 0.31 s
    assert durations["hihat_closed"] == pytest.approx([0.1] * 4)
    assert durations["cymbal"] == pytest.approx([1.5] * 4) and durations["hihat_open"] == pytest.approx([1.5] * 4)
    assert all(0.25 < d < 0.35 for d in durations["kick"] + durations["wood"])
    assert stats["splits"]["test"]["fraction_under_half_second"] == pytest.approx(10 / 12, abs=1e-4)

    # the Orchestra kit's timpani keys are never drawn: no open hi-hat there, only kit 0 hits beside it
    builder = corpora.DrumsBuilder(tmp_path, options, sources)
    assert builder._candidates("hihat_open", "test", Path("X.sf2"), (48,), 1) == []
    assert {c.extra["kit"] for c in builder._candidates("hihat_open", "test", Path("X.sf2"), (0, 48), 50)} == {0}

    # an interrupted build resumes with the same clips, re-rendering only what is missing
    csvs = {name: (folder / f"{name}.csv").read_text() for name in corpora.SPLITS}
    (folder / corpora.STATS_FILE).unlink()
    lost = folder / splits["test"][0]["path"]
    lost.unlink()
    corpora.build_corpus("drums", tmp_path, options=options, sources=sources)
    assert lost.is_file() and {name: (folder / f"{name}.csv").read_text() for name in corpora.SPLITS} == csvs


def test_speech_commands_split_by_speaker_with_unseen_variants(tmp_path, sources, capsys):
    options = corpora.BuildOptions(speakers=(2, 1, 2))
    stats = corpora.build_corpus("speech-commands", tmp_path, options=options, sources=sources)
    usable = ["Storm", "announcer", "f1", "f2", "f3", "m1", "m2", "m3", "m4"]
    assert stats["parameters"]["voices"] == ["en-gb", "en-gb-scotland", "en-us"]  # no MBROLA voice, no variant
    assert stats["parameters"]["variants"] == usable
    assert ("4 espeak-ng variants left out: Mr serious (name has a space), broken (fails or is silent), m1-copy "
            "(sounds like m1), missing (sounds like the plain voice)") in capsys.readouterr().out  # fmt: skip
    folder = tmp_path / "speech-commands"
    splits = {name: _rows(folder / f"{name}.csv") for name in corpora.SPLITS}
    assert stats["labels"] == sorted(corpora.SPEECH_COMMAND_WORDS) and stats["num_clips"] == 5 * 10
    speakers = {name: {r["speaker"] for r in rows} for name, rows in splits.items()}
    variants = {name: {r["variant"] for r in rows} for name, rows in splits.items()}
    assert [len(speakers[name]) for name in corpora.SPLITS] == [2, 1, 2]
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not speakers[a] & speakers[b] and not variants[a] & variants[b], (a, b)
    assert set().union(*variants.values()) <= set(usable)
    for name, rows in splits.items():
        for speaker in speakers[name]:
            own = [r for r in rows if r["speaker"] == speaker]
            assert sorted(r["label"] for r in own) == sorted(corpora.SPEECH_COMMAND_WORDS)
            assert len({(r["voice"], r["variant"], r["pitch"], r["speed"]) for r in own}) == 1
    for row in splits["test"]:
        assert row["voice"] in ("en-gb", "en-gb-scotland", "en-us")
        assert 25 <= int(row["pitch"]) <= 75 and 130 <= int(row["speed"]) <= 210
        path = folder / row["path"]
        _check_wav(path)
        # the stand-in's word: a tone of (0.1 + 0.08 * letters) * 175 / speed seconds, padded by 50 ms each side
        spoken = (0.1 + 0.08 * len(row["label"])) * 175 / int(row["speed"])
        assert sf.info(str(path)).duration == pytest.approx(spoken + 0.1, abs=0.003)
    build = json.loads((folder / corpora.BUILD_FILE).read_text())
    assert build["variants"] == usable and build["speakers"] == {"train": 2, "validation": 1, "test": 2}


def test_instruments_split_by_program(tmp_path, sources):
    default = corpora.InstrumentsBuilder(tmp_path, corpora.BuildOptions(), sources).parameters()
    assert "split_by" not in default  # the default corpus keeps its build.json
    options = corpora.BuildOptions(clips_per_class=6, families=("bass", "pipe"), split_by="program")
    stats = corpora.build_corpus("instruments", tmp_path, options=options, sources=sources)
    folder = tmp_path / "instruments"
    assert json.loads((folder / corpora.BUILD_FILE).read_text())["split_by"] == "program"
    splits = {name: _rows(folder / f"{name}.csv") for name in corpora.SPLITS}
    assert stats["num_clips"] == 12
    for family in ("bass", "pipe"):
        programs = {name: {int(r["program"]) for r in rows if r["label"] == family} for name, rows in splits.items()}
        counts = [sum(r["label"] == family for r in splits[name]) for name in corpora.SPLITS]
        assert counts == list(corpora.split_counts(6, 0.1, 0.1)) == [4, 1, 1]
        assert not programs["train"] & (programs["validation"] | programs["test"])
        assert not programs["validation"] & programs["test"]
        index = corpora.GM_FAMILIES[family][0]
        assert set().union(*programs.values()) <= set(range(8 * index, 8 * index + 8))
    with pytest.raises(corpora.CorpusBuildError, match="split_by"):
        corpora.build_corpus("instruments", tmp_path, options=corpora.BuildOptions(clips_per_class=6,
                             families=("bass", "pipe")), sources=sources)  # fmt: skip


def test_new_corpora_name_their_packages(tmp_path):
    missing = corpora.Sources(fluidsynth="no-such-fluidsynth-binary", espeak="no-such-espeak-binary",
                              drums_heldout_soundfont=corpora.SOUNDFONTS[0][0].with_name("absent.sf2"))  # fmt: skip
    assert corpora.missing_packages("speech-commands", missing) == (["espeak-ng"], [])
    with pytest.raises(corpora.CorpusBuildError, match="absent.sf2.*--drums-heldout-soundfont"):
        corpora.missing_packages("drums", missing)
    gone = tmp_path / "gone"
    default_paths = corpora.Sources(fluidsynth="no-such-fluidsynth-binary")
    required, _ = corpora.missing_packages("drums", default_paths)
    assert required[0] == "fluidsynth"
    with pytest.raises(corpora.MissingPackagesError, match="espeak-ng"):
        corpora.build_corpus("speech-commands", gone, sources=missing)
    assert not gone.exists()
