"""Corpus loading, validation, training datasets and fixed splits, on real audio files in tmp_path."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from cat_hf.data import (
    MULTI_LABEL,
    SINGLE_LABEL,
    AudioClipDataset,
    CorpusError,
    IterableAudioClipDataset,
    build_label_maps,
    collate_skip_bad,
    load_audio_corpus,
    load_splits,
    split_corpus,
    validate_corpus,
)


def _tone(freq: float, sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    mono = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


@pytest.fixture
def audiofolder(tmp_path: Path) -> Path:
    """<root>/<label>/<clip> with mixed formats, rates and channel counts."""
    root = tmp_path / "folder"
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    sf.write(root / "dog" / "a.wav", _tone(300, 16000, 0.5), 16000, subtype="PCM_16")
    sf.write(root / "dog" / "b.flac", _tone(500, 44100, 0.75), 44100)
    sf.write(root / "cat" / "c.ogg", _tone(700, 22050, 0.5), 22050, format="OGG", subtype="VORBIS")
    sf.write(root / "cat" / "d.wav", _tone(900, 8000, 1.0, channels=2), 8000, subtype="FLOAT")
    (root / "cat" / "notes.txt").write_text("not audio")
    return root


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "tags"])
        writer.writerows(rows)
    return path


def _audio_paths(ds) -> list[str]:
    return [entry["path"] for entry in ds["audio"]]


# ------------------------------------------------------------------------------------------------ loading


def test_audiofolder_layout_gives_folder_labels_and_undecoded_audio(audiofolder, monkeypatch):
    monkeypatch.chdir(audiofolder.parent)
    ds = load_audio_corpus("folder")  # relative paths become absolute
    assert isinstance(ds, datasets.Dataset) and len(ds) == 4
    assert ds.features["audio"] == datasets.Audio(decode=False)
    assert ds.column_names == ["audio", "labels"]
    assert _audio_paths(ds) == sorted(str(p) for p in audiofolder.rglob("*.*") if p.suffix != ".txt")
    assert ds["labels"] == [["cat"], ["cat"], ["dog"], ["dog"]]
    assert ds[0]["audio"]["bytes"] is None  # paths only; nothing decoded by datasets

    # split folders: <root>/<split>/<label>/<clip>
    split_root = audiofolder.parent / "splits"
    (split_root / "train").mkdir(parents=True)
    audiofolder.rename(split_root / "train" / "all")
    (split_root / "test" / "x").mkdir(parents=True)
    sf.write(split_root / "test" / "x" / "t.wav", _tone(100, 16000, 0.1), 16000)
    test = load_audio_corpus(split_root, split="test", labels_from_folders=True)
    assert len(test) == 1 and test["labels"] == [["x"]]
    with pytest.raises(CorpusError, match=r"no 'validation'.*split=NAME"):
        load_audio_corpus(split_root, split="validation")


def test_plain_folder_is_scanned_recursively_without_labels(tmp_path):
    root = tmp_path / "sounds"
    (root / "nested" / "deeper").mkdir(parents=True)
    sf.write(root / "top.wav", _tone(200, 16000, 0.2), 16000)
    sf.write(root / "nested" / "deeper" / "x.flac", _tone(200, 16000, 0.2), 16000)
    (root / ".hidden.wav").write_bytes(b"ignored")
    ds = load_audio_corpus(root)
    assert ds.column_names == ["audio"]
    assert [Path(p).name for p in _audio_paths(ds)] == ["x.flac", "top.wav"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match=r"No audio files found under .*empty"):
        load_audio_corpus(empty)
    with pytest.raises(CorpusError, match="does not exist"):
        load_audio_corpus(tmp_path / "nowhere")


def test_csv_and_jsonl_tags_files_resolve_relative_paths(audiofolder, tmp_path):
    csv_path = _write_csv(
        audiofolder / "tags.csv",
        [("dog/a.wav", "dog, loud"), ("cat/c.ogg", "cat"), (str(audiofolder / "cat" / "d.wav"), "cat,stereo")],
    )
    ds = load_audio_corpus(csv_path)
    assert _audio_paths(ds) == [str(audiofolder / "dog" / "a.wav"), str(audiofolder / "cat" / "c.ogg"),
                                str(audiofolder / "cat" / "d.wav")]  # fmt: skip
    assert ds["labels"] == [["dog", "loud"], ["cat"], ["cat", "stereo"]]

    jsonl = tmp_path / "meta" / "clips.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text(
        json.dumps({"file": "../folder/dog/b.flac", "tags": ["dog"], "speaker": "s1"})
        + "\n\n"
        + json.dumps({"file": "../folder/cat/c.ogg", "tags": "cat,quiet", "speaker": "s2"})
        + "\n"
    )
    ds = load_audio_corpus(jsonl)
    assert _audio_paths(ds) == [str(audiofolder / "dog" / "b.flac"), str(audiofolder / "cat" / "c.ogg")]
    assert ds["labels"] == [["dog"], ["cat", "quiet"]] and ds["speaker"] == ["s1", "s2"]

    # datasets' audiofolder metadata convention: metadata.csv with file_name next to the clips
    (audiofolder / "metadata.csv").write_text("file_name,label\ndog/a.wav,puppy\ncat/d.wav,kitten\n")
    ds = load_audio_corpus(audiofolder)
    assert _audio_paths(ds) == [str(audiofolder / "dog" / "a.wav"), str(audiofolder / "cat" / "d.wav")]
    assert ds["labels"] == [["puppy"], ["kitten"]]

    bad = tmp_path / "bad.csv"
    bad.write_text("clip_name,tags\nx.wav,dog\n")
    with pytest.raises(CorpusError, match=r"no path column; its columns are \['clip_name', 'tags'\]"):
        load_audio_corpus(bad)
    assert _audio_paths(load_audio_corpus(bad, audio_column="clip_name")) == [str(tmp_path / "x.wav")]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"path": "a.wav"}\n{not json\n')
    with pytest.raises(CorpusError, match="Line 2 of .* is not valid JSON"):
        load_audio_corpus(broken)


def test_save_to_disk_and_hub_style_parquet_are_normalised(audiofolder, tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    load_audio_corpus(audiofolder).save_to_disk(str(saved))
    ds = load_audio_corpus(saved)
    assert ds["labels"] == [["cat"], ["cat"], ["dog"], ["dog"]] and ds.features["audio"] == datasets.Audio(
        decode=False
    )

    # A Hub-style dataset: embedded bytes, a decoding Audio feature under another name, ClassLabel ints.
    files = sorted(audiofolder.rglob("*.wav"))
    raw = (
        datasets.Dataset.from_dict(
            {"clip": [{"bytes": f.read_bytes(), "path": f.name} for f in files], "category": [1, 0]}
        )
        .cast_column("clip", datasets.Audio())
        .cast_column("category", datasets.ClassLabel(names=["cat", "dog"]))
    )
    repo = tmp_path / "hub_repo" / "data"
    repo.mkdir(parents=True)
    raw.to_parquet(str(repo / "train-00000.parquet"))
    raw.save_to_disk(str(tmp_path / "raw_saved"))
    for source in (tmp_path / "hub_repo", tmp_path / "raw_saved"):
        ds = load_audio_corpus(source)
        assert ds.features["audio"] == datasets.Audio(decode=False)
        assert ds["labels"] == [["dog"], ["cat"]]
        assert ds[0]["audio"]["bytes"] == files[0].read_bytes()
        # embedded clips need no file on disk; check_audio reads their headers from the bytes
        summary = validate_corpus(ds, check_audio=True)
        assert (summary.num_clips, summary.num_missing, summary.num_unreadable) == (2, 0, 0)
    stream = load_audio_corpus(tmp_path / "hub_repo", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["labels"] for row in stream] == [["dog"], ["cat"]]

    # A name that is no local path goes to the Hub (offline here: a clear error naming both readings).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError, match=r"Could not load corpus 'someorg/clips': it is not an existing local path"):
        load_audio_corpus("someorg/clips")

    nothing = datasets.Dataset.from_dict({"text": ["a"], "score": [1]})
    with pytest.raises(
        CorpusError, match=r"No audio column found; the columns are \['text', 'score'\].*audio_column=NAME"
    ):
        load_audio_corpus(nothing)


def test_in_memory_datasets_are_normalised(audiofolder):
    files = [str(audiofolder / "dog" / "a.wav"), str(audiofolder / "cat" / "c.ogg")]
    tagged = datasets.Dataset.from_dict({"file": files, "tags": [[0, 2], [1]]})
    tagged = tagged.cast_column("tags", datasets.List(datasets.ClassLabel(names=["dog", "cat", "loud"])))
    ds = load_audio_corpus(tagged)
    assert ds.column_names == ["audio", "labels"] and ds.features["audio"] == datasets.Audio(decode=False)
    assert ds["labels"] == [["dog", "loud"], ["cat"]]

    # already decoded arrays (e.g. from a user's own pipeline) are kept and decoded by load_audio
    decoded = datasets.Dataset.from_dict(
        {"audio": [{"array": np.full(8000, 0.25, dtype=np.float32), "sampling_rate": 8000}], "label": ["hum"]}
    )
    ds = load_audio_corpus(decoded)
    assert ds["labels"] == [["hum"]]
    item = AudioClipDataset(ds, clip_samples=20000, label2id={"hum": 0})[0]
    assert item["length"] == 16000 and item["waveform"][100:15900].mean().item() == pytest.approx(0.25, abs=1e-3)

    with pytest.raises(CorpusError, match=r"label_column='genre' is not a column; the columns are"):
        load_audio_corpus(tagged, label_column="genre")
    assert load_audio_corpus(tagged, label_column=False).column_names == ["audio", "tags"]


def test_streaming_folder_and_csv_yield_the_same_rows(audiofolder):
    eager = load_audio_corpus(audiofolder)
    stream = load_audio_corpus(audiofolder, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [(r["audio"]["path"], r["labels"]) for r in stream] == list(zip(_audio_paths(eager), eager["labels"]))
    csv_path = _write_csv(audiofolder / "t.csv", [("dog/a.wav", "dog"), ("cat/c.ogg", "cat")])
    assert [r["labels"] for r in load_audio_corpus(csv_path, streaming=True)] == [["dog"], ["cat"]]


# ------------------------------------------------------------------------------------------------ validation


def test_validate_summary_and_label_maps(audiofolder):
    csv_path = _write_csv(
        audiofolder / "tags.csv", [("dog/a.wav", "dog,loud"), ("dog/b.flac", "dog"), ("cat/c.ogg", "cat")]
    )
    multi = load_audio_corpus(csv_path)
    summary = validate_corpus(multi)
    assert (summary.num_clips, summary.num_labels, summary.multi_label) == (3, 3, True)
    assert summary.label_counts == {"cat": 1, "dog": 2, "loud": 1} and summary.problem_type == MULTI_LABEL
    label2id, id2label, problem_type = build_label_maps(multi)
    assert label2id == {"cat": 0, "dog": 1, "loud": 2} and id2label[2] == "loud" and problem_type == MULTI_LABEL

    single = validate_corpus(load_audio_corpus(audiofolder), check_audio=True)
    assert not single.multi_label and single.problem_type == SINGLE_LABEL and single.num_unreadable == 0
    assert "4 clips, 2 labels (single-label)" in str(single)
    assert build_label_maps(load_audio_corpus(audiofolder), labels=["dog", "cat"])[0] == {"dog": 0, "cat": 1}


def test_validate_reports_offending_rows(audiofolder, tmp_path):
    csv_path = _write_csv(
        audiofolder / "tags.csv",
        [("dog/a.wav", "dog"), ("dog/missing.wav", "dog"), ("cat/c.ogg", ""), ("cat/d.wav", "bird")],
    )
    ds = load_audio_corpus(csv_path)
    with pytest.raises(CorpusError) as caught:
        validate_corpus(ds, labels=["dog", "cat", "bird", "frog"])
    message = str(caught.value)
    assert f"row 1: '{audiofolder / 'dog' / 'missing.wav'}' does not exist" in message
    assert "1 row(s) have an empty tag list" in message and f"row 2: '{audiofolder / 'cat' / 'c.ogg'}'" in message
    assert "label(s) have no example in the training split: ['cat', 'frog']" in message
    assert caught.value.rows == [1, 2]

    with pytest.raises(CorpusError, match=r"row 1: unknown tag\(s\) \['bird'\]"):
        validate_corpus(ds.select([0, 3]), labels=["dog"])

    nowhere = _write_csv(tmp_path / "nowhere.csv", [("a.wav", "x"), ("b.wav", "y")])
    with pytest.raises(
        CorpusError, match=r"(?s)No usable files at all: none of the 2 clips.*row 0: .*a.wav' does not exist"
    ):
        validate_corpus(load_audio_corpus(nowhere))
    with pytest.raises(CorpusError, match=r"has no 'audio' column; its columns are \['x'\]"):
        validate_corpus(datasets.Dataset.from_dict({"x": [1]}))
    with pytest.raises(CorpusError, match="has no labels"):
        validate_corpus(load_audio_corpus(audiofolder, label_column=False), require_labels=True)


def test_validate_check_audio_counts_unreadable_and_fails_when_nothing_is_usable(audiofolder, caplog):
    (audiofolder / "dog" / "broken.wav").write_bytes(b"garbage" * 10)
    caplog.set_level(logging.WARNING, logger="cat_hf.data")
    summary = validate_corpus(load_audio_corpus(audiofolder), check_audio=True)
    assert summary.num_unreadable == 1 and summary.num_clips == 5 and "broken.wav" in summary.unreadable[0]
    assert "1 of 5 clips in the training corpus are unreadable" in caplog.text

    only_bad = audiofolder.parent / "only_bad"
    only_bad.mkdir()
    (only_bad / "empty.wav").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"(?s)No usable files at all.*empty.wav.*empty file \(0 bytes\)"):
        validate_corpus(load_audio_corpus(only_bad), check_audio=True)


# ------------------------------------------------------------------------------------------------ training datasets


def test_clip_dataset_skips_and_counts_bad_files_through_a_dataloader(audiofolder, caplog):
    (audiofolder / "dog" / "empty.wav").write_bytes(b"")
    (audiofolder / "cat" / "corrupt.wav").write_bytes(b"RIFF" + b"\x01" * 200)
    ds = load_audio_corpus(audiofolder)
    label2id, _, problem_type = build_label_maps(ds)
    clips = AudioClipDataset(ds, clip_samples=4000, label2id=label2id, problem_type=problem_type, train=True, seed=3)

    caplog.set_level(logging.WARNING, logger="cat_hf.data")
    assert clips[[_audio_paths(ds).index(str(audiofolder / "cat" / "corrupt.wav"))][0]] is None
    assert clips.num_skipped == 1 and "1 skip(s) so far" in caplog.text and "corrupt.wav" in caplog.text
    clips.reset_skipped()

    loader = DataLoader(clips, batch_size=3, num_workers=2, persistent_workers=True, collate_fn=collate_skip_bad)
    batches = [b for b in loader if b is not None]
    assert clips.num_skipped == 2  # counted across worker processes
    clips.set_epoch(1)  # reaches the persistent workers: their crops equal the main process's for epoch 1
    epoch1 = {i: w for b in loader if b is not None for i, w in zip(b["index"].tolist(), b["waveform"])}
    assert clips.num_skipped == 4 and len(epoch1) == 4
    assert all(torch.equal(w, clips[i]["waveform"]) for i, w in epoch1.items())
    clips.reset_skipped()
    assert sum(b["waveform"].shape[0] for b in batches) == 4 and sum(b["num_skipped"] for b in batches) == 2
    for batch in batches:
        assert batch["waveform"].dtype == torch.float32 and batch["waveform"].shape[1] == 4000
        assert batch["labels"].dtype == torch.long
    seen = sorted(i for b in batches for i in b["index"].tolist())
    assert [ds[i]["labels"][0] for i in seen] == ["cat", "cat", "dog", "dog"]

    assert collate_skip_bad([None, None]) is None


def test_crops_are_deterministic_per_seed_epoch_and_index(audiofolder):
    ds = load_audio_corpus(audiofolder)
    index = _audio_paths(ds).index(str(audiofolder / "cat" / "d.wav"))  # 1 s at 8 kHz -> 16000 samples at 16 kHz
    full = AudioClipDataset(ds, clip_samples=None)[index]["waveform"]
    assert full.shape == (16000,)

    def crop(seed: int, epoch: int, train: bool = True) -> torch.Tensor:
        clips = AudioClipDataset(ds, clip_samples=4000, seed=seed, train=train)
        clips.set_epoch(epoch)
        return clips[index]["waveform"]

    first = crop(seed=1, epoch=0)
    torch.manual_seed(123)
    np.random.seed(123)  # global RNG state must not matter
    assert torch.equal(first, crop(seed=1, epoch=0))
    assert not torch.equal(first, crop(seed=1, epoch=1)) and not torch.equal(first, crop(seed=2, epoch=0))
    offset = next(o for o in range(16000 - 4000 + 1) if torch.equal(full[o : o + 4000], first))
    assert 0 <= offset <= 12000
    assert torch.equal(crop(seed=5, epoch=7, train=False), full[:4000])  # eval: the start

    short = AudioClipDataset(ds, clip_samples=20000, label2id={"cat": 0, "dog": 1})[index]
    assert short["length"] == 16000 and torch.all(short["waveform"][16000:] == 0)
    assert torch.equal(short["waveform"][:16000], full) and short["labels"].item() == 0


def test_multi_label_targets_and_iterable_dataset(audiofolder):
    csv_path = _write_csv(
        audiofolder / "tags.csv", [("dog/a.wav", "dog,loud"), ("cat/broken.wav", "cat"), ("cat/c.ogg", "cat")]
    )
    (audiofolder / "cat" / "broken.wav").write_bytes(b"\x00" * 64)
    label2id = {"cat": 0, "dog": 1, "loud": 2}
    item = AudioClipDataset(load_audio_corpus(csv_path), clip_samples=8000, label2id=label2id)[0]
    assert item["labels"].tolist() == [0.0, 1.0, 1.0] and item["labels"].dtype == torch.float32

    stream = IterableAudioClipDataset(
        load_audio_corpus(csv_path, streaming=True),
        clip_samples=3000,
        label2id=label2id,
        problem_type=MULTI_LABEL,
        seed=4,
    )
    stream.set_epoch(2)
    items = list(stream)
    assert len(items) == 2 and stream.num_skipped == 1
    # set_epoch also reaches the HF stream, which reorders its shards per epoch; the order is fixed by the epoch.
    assert sorted(i["labels"].tolist() for i in items) == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    again = list(stream)
    assert len(again) == 2 and all(torch.equal(a["waveform"], b["waveform"]) for a, b in zip(items, again))
    batch = next(iter(DataLoader(stream, batch_size=4, collate_fn=collate_skip_bad)))
    assert batch["waveform"].shape == (2, 3000) and batch["labels"].shape == (2, 3)

    with pytest.raises(ValueError, match="single-label"):
        AudioClipDataset(load_audio_corpus(csv_path), clip_samples=800, label2id=label2id, problem_type=SINGLE_LABEL)[
            0
        ]


# ------------------------------------------------------------------------------------------------ splits


def _labelled_corpus(n_per_class: int = 10) -> datasets.Dataset:
    rows = {"audio": [], "labels": [], "speaker": []}
    for label in ("a", "b", "c"):
        for i in range(n_per_class):
            rows["audio"].append(f"/data/{label}/{i}.wav")
            rows["labels"].append([label])
            rows["speaker"].append(f"spk{i % 4}")
    return load_audio_corpus(datasets.Dataset.from_dict(rows))


def test_split_is_fixed_by_seed_and_written_to_disk(tmp_path):
    corpus = _labelled_corpus()
    splits = split_corpus(corpus, test_size=0.2, validation_size=3, seed=0, output_dir=tmp_path / "split")
    assert {k: len(v) for k, v in splits.items()} == {"train": 21, "validation": 3, "test": 6}
    all_paths = sum((_audio_paths(s) for s in splits.values()), [])
    assert sorted(all_paths) == sorted(_audio_paths(corpus))  # a partition

    again = split_corpus(corpus, test_size=0.2, validation_size=3, seed=0)
    assert _audio_paths(again["test"]) == _audio_paths(splits["test"])
    assert _audio_paths(split_corpus(corpus, test_size=0.2, seed=1)["test"]) != _audio_paths(splits["test"])

    stored = json.loads((tmp_path / "split" / "splits.json").read_text())
    assert stored["splits"]["test"]["paths"] == _audio_paths(splits["test"])
    with (tmp_path / "split" / "test.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == _audio_paths(splits["test"]) and rows[0]["tags"] in ("a", "b", "c")
    assert not list((tmp_path / "split").glob("*.tmp"))

    reused = load_splits(corpus, tmp_path / "split" / "splits.json")
    assert _audio_paths(reused["validation"]) == _audio_paths(splits["validation"])
    assert _audio_paths(
        split_corpus(corpus, test_size=0.2, validation_size=3, seed=0, output_dir=tmp_path / "split")["test"]
    ) == _audio_paths(splits["test"])
    with pytest.raises(CorpusError, match=r"was written with parameters .*choose another output_dir"):
        split_corpus(corpus, test_size=0.3, seed=0, output_dir=tmp_path / "split")
    with pytest.raises(CorpusError, match="was made for a different corpus"):
        load_splits(corpus.select(range(29)), tmp_path / "split" / "splits.json")


def test_group_and_stratified_splits(tmp_path):
    corpus = _labelled_corpus()
    grouped = split_corpus(corpus, test_size=0.25, seed=3, by="speaker")
    assert not set(grouped["train"]["speaker"]) & set(grouped["test"]["speaker"])

    stratified = split_corpus(corpus, test_size=0.2, seed=3, stratify=True)
    test_counts = {label: sum(t == [label] for t in stratified["test"]["labels"]) for label in "abc"}
    assert test_counts == {"a": 2, "b": 2, "c": 2}
    # the training split keeps every class, so validation with the full label list passes
    validate_corpus(stratified["train"], labels=["a", "b", "c"], check_files=False)

    with pytest.raises(ValueError, match="fraction in \\(0, 1\\) or a whole number"):
        split_corpus(corpus, test_size=1.5, seed=0)
    with pytest.raises(CorpusError, match="leave none for training"):
        split_corpus(corpus, test_size=30, seed=0)
