"""`cat-hf embed` end to end on a small folder of real wav files: shards, index, unreadable files, resuming
after a crash, damaged shards, corpus fingerprints and reading the cache back."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

from cat_hf.audio import load_audio
from cat_hf.cli import main as cli_main
from cat_hf.data import load_audio_corpus
from cat_hf.embed import (
    EmbeddingCache,
    EmbeddingCacheError,
    corpus_fingerprint,
    embed_corpus,
)
from cat_hf.external_encoders import PrecomputedEmbeddings, build_external_encoder

ENCODER_SOURCE = '''
import json
import os
import numpy as np


def stats(batch):
    """A deterministic 4-d 'embedding'. Logs each call's clip lengths to $CAT_HF_TEST_LOG and crashes once
    the log holds more than $CAT_HF_TEST_CRASH_AFTER calls (a simulated kill)."""
    log = os.environ["CAT_HF_TEST_LOG"]
    with open(log, "a") as handle:
        handle.write(json.dumps([len(x) for x in batch]) + "\\n")
    limit = os.environ.get("CAT_HF_TEST_CRASH_AFTER")
    if limit is not None and len(open(log).read().splitlines()) > int(limit):
        raise RuntimeError("simulated crash")
    return np.stack([[x.mean(), x.std(), len(x) / 16000.0, np.abs(x).max()] for x in batch])


stats.embedding_dim = 4
'''


class CallLog:
    """The clip lengths of every call the test encoder received."""

    def __init__(self, path):
        self.path = path

    def calls(self):
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def clear(self):
        self.path.unlink(missing_ok=True)


@pytest.fixture()
def corpus(tmp_path):
    """10 readable clips at 8, 16 and 22.05 kHz (one stereo) in label folders, plus a corrupt and an empty file."""
    root = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    for i in range(5):
        (root / "dog").mkdir(parents=True, exist_ok=True)
        (root / "rain").mkdir(parents=True, exist_ok=True)
        sf.write(root / "dog" / f"d{i}.wav", (0.1 * rng.standard_normal(4000 + 800 * i)).astype(np.float32), 16000)
        rate = 22050 if i % 2 else 8000
        shape = (3000 + 500 * i, 2) if i == 4 else (3000 + 500 * i,)
        sf.write(root / "rain" / f"r{i}.flac", (0.1 * rng.standard_normal(shape)).astype(np.float32), rate)
    (root / "dog" / "d2_corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio")
    (root / "rain" / "r9_empty.wav").write_bytes(b"")
    return root


@pytest.fixture()
def stats_spec(tmp_path, monkeypatch):
    path = tmp_path / "stats_encoder.py"
    path.write_text(ENCODER_SOURCE)
    log = CallLog(tmp_path / "calls.jsonl")
    monkeypatch.setenv("CAT_HF_TEST_LOG", str(log.path))
    return f"python:{path}:stats", log


def _expected_rows(corpus_root, spec, max_seconds=10.0):
    """What the cache should hold: the encoder run directly on each readable clip, decoded at 16 kHz."""
    dataset = load_audio_corpus(corpus_root, label_column=False)
    encoder = build_external_encoder(spec)
    rows, failed = {}, []
    for i in range(len(dataset)):
        entry = dataset[i]["audio"]
        try:
            waveform = load_audio(entry, target_sr=16000)
        except ValueError:
            failed.append(i)
            continue
        rows[i] = encoder([waveform[: int(max_seconds * 16000)]])[0]
    return dataset, rows, failed


def test_embed_cli_end_to_end_with_unreadable_files(corpus, stats_spec, tmp_path, capsys):
    spec, calls = stats_spec
    out = tmp_path / "cache"
    code = cli_main(["embed", str(corpus), "--encoder", spec, "--output-dir", str(out), "--shard-size", "5",
                     "--batch-size", "2", "--max-seconds", "0.25", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "embedded 10/12 clips" in printed and "2 clip(s) could not be read" in printed
    assert "d2_corrupt.wav" in printed and "r9_empty.wav" in printed

    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    index = json.loads((out / "index.json").read_text())
    dataset, expected, failed = _expected_rows(corpus, spec, max_seconds=0.25)
    assert index["complete"] is True
    assert index["corpus"]["num_examples"] == 12 and index["corpus"]["fingerprint"] == corpus_fingerprint(dataset)
    assert (index["embedding_dim"], index["sampling_rate"], index["num_shards"]) == (4, 16000, 3)
    assert index["encoder"]["spec"] == spec and index["max_seconds"] == 0.25
    assert index["num_embeddings"] == 10 and index["num_failed"] == 2
    assert sorted(f["index"] for f in index["failed"]) == failed and len(failed) == 2
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{k}.safetensors" for k in range(3)]
    assert all(f["reason"] for f in index["failed"])

    shard = load_file(str(out / "shard-00000.safetensors"))
    assert shard["embeddings"].dtype == torch.float32 and shard["indices"].dtype == torch.int64
    assert shard["embeddings"].shape == (len(shard["indices"]), 4)
    # every clip was cut to its first 0.25 s (4000 samples) before encoding
    assert max(n for call in calls.calls() for n in call) == 4000

    cache = EmbeddingCache(out, corpus=dataset)
    assert (len(cache), cache.dim, cache.num_embeddings) == (12, 4, 10)
    assert cache.missing_indices == failed
    for i, row in expected.items():
        torch.testing.assert_close(cache[i], row)
        assert i in cache
    torch.testing.assert_close(cache.get_batch([7, 0, 4]), torch.stack([expected[7], expected[0], expected[4]]))
    assert failed[0] not in cache
    with pytest.raises(KeyError, match="could not be read"):
        cache[failed[0]]
    with pytest.raises(IndexError, match="outside"):
        cache[12]
    assert cache.available_indices() == sorted(expected)

    # the cache as an external encoder for pretraining
    encoder = build_external_encoder(f"cache:{out}", dataset=dataset)
    assert isinstance(encoder, PrecomputedEmbeddings) and not encoder.requires_audio
    encoder.check_embedding_dim(4)
    torch.testing.assert_close(encoder(indices=torch.tensor([1, 8])), torch.stack([expected[1], expected[8]]))


def test_embed_resumes_after_a_crash(corpus, stats_spec, tmp_path, monkeypatch):
    spec, calls = stats_spec
    out = tmp_path / "cache"
    # shard size = batch size: one encoder call per shard; the second call crashes the run.
    monkeypatch.setenv("CAT_HF_TEST_CRASH_AFTER", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_corpus(corpus, spec, out, shard_size=4, batch_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors"]  # no temp files
    partial = json.loads((out / "index.json").read_text())
    assert partial["complete"] is False and [s["shard"] for s in partial["shards"]] == [0]
    with pytest.raises(EmbeddingCacheError, match="incomplete.*running the same `cat-hf embed` command again"):
        EmbeddingCache(out)
    readable = EmbeddingCache(out, allow_incomplete=True)
    assert readable[0].shape == (4,)
    with pytest.raises(KeyError, match="has not written yet"):
        readable[5]
    first_shard = (out / "shard-00000.safetensors").stat().st_mtime_ns

    monkeypatch.delenv("CAT_HF_TEST_CRASH_AFTER")
    calls.clear()
    report = embed_corpus(corpus, spec, out, shard_size=4, batch_size=4, progress=False)
    assert (report.shards_reused, report.shards_computed, report.num_shards) == (1, 2, 3)
    assert report.num_embeddings == 10 and len(report.failed) == 2
    assert sum(len(c) for c in calls.calls()) == 8 - sum(1 for f in report.failed if f["index"] >= 4)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first_shard  # kept, not recomputed

    # identical to an uninterrupted run
    fresh = tmp_path / "fresh"
    embed_corpus(corpus, spec, fresh, shard_size=4, batch_size=4, progress=False)
    resumed, reference = EmbeddingCache(out), EmbeddingCache(fresh)
    assert resumed.missing_indices == reference.missing_indices
    torch.testing.assert_close(resumed.get_batch(reference.available_indices()),
                               reference.get_batch(reference.available_indices()))

    # a third run has nothing left to do
    calls.clear()
    again = embed_corpus(corpus, spec, out, shard_size=4, batch_size=4, progress=False)
    assert (again.shards_reused, again.shards_computed, calls.calls()) == (3, 0, [])


def test_damaged_shard_is_recomputed_and_settings_are_checked(corpus, stats_spec, tmp_path):
    spec, _calls = stats_spec
    out = tmp_path / "cache"
    embed_corpus(corpus, spec, out, shard_size=5, batch_size=5, progress=False)
    expected = EmbeddingCache(out).get_batch([5, 6])
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # as if the disk filled up
    (out / ".shard-00001.safetensors.tmp-stale").write_bytes(b"junk")  # left by a killed writer
    report = embed_corpus(corpus, spec, out, shard_size=5, batch_size=5, progress=False)
    assert (report.shards_reused, report.shards_computed) == (2, 1)
    assert not (out / ".shard-00001.safetensors.tmp-stale").exists()
    torch.testing.assert_close(EmbeddingCache(out).get_batch([5, 6]), expected)

    with pytest.raises(EmbeddingCacheError, match="different shard_size.*--overwrite"):
        embed_corpus(corpus, spec, out, shard_size=4, progress=False)
    with pytest.raises(EmbeddingCacheError, match="different max_seconds"):
        embed_corpus(corpus, spec, out, shard_size=5, max_seconds=1.0, progress=False)
    report = embed_corpus(corpus, spec, out, shard_size=4, overwrite=True, progress=False)
    assert (report.shards_reused, report.shards_computed) == (0, 3)
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{k}.safetensors" for k in range(3)]


def test_cache_refuses_another_corpus(corpus, stats_spec, tmp_path):
    spec, _ = stats_spec
    out = tmp_path / "cache"
    embed_corpus(corpus, spec, out, shard_size=8, progress=False)
    dataset = load_audio_corpus(corpus, label_column=False)

    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, moved)
    assert len(EmbeddingCache(out, corpus=load_audio_corpus(moved, label_column=False))) == 12  # same clips

    os.remove(moved / "dog" / "d0.wav")
    smaller = load_audio_corpus(moved, label_column=False)
    with pytest.raises(EmbeddingCacheError) as err:
        EmbeddingCache(out, corpus=smaller)
    assert "another corpus" in str(err.value) and "12 examples" in str(err.value) and "11 examples" in str(err.value)
    with pytest.raises(EmbeddingCacheError, match="another corpus"):
        build_external_encoder(f"cache:{out}", dataset=dataset.select([1, 0, *range(2, 12)]))  # reordered
    with pytest.raises(EmbeddingCacheError, match="different corpus fingerprint"):
        embed_corpus(moved, spec, out, shard_size=8, progress=False)
    with pytest.raises(EmbeddingCacheError, match="not an embedding cache"):
        EmbeddingCache(tmp_path)


def test_embed_with_a_transformers_teacher(corpus, tmp_path):
    model_dir = tmp_path / "hubert"
    torch.manual_seed(0)
    HubertModel(HubertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )).save_pretrained(model_dir)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(model_dir)
    spec = f"hf:{model_dir}"
    out = tmp_path / "cache"
    report = embed_corpus(corpus, spec, out, shard_size=6, batch_size=4, progress=False)
    assert report.num_embeddings == 10 and report.num_shards == 2
    _, expected, failed = _expected_rows(corpus, spec)
    cache = EmbeddingCache(out)
    assert cache.encoder_name == f"hf:{model_dir}:mean" and cache.dim == 16 and cache.missing_indices == failed
    for i, row in expected.items():  # batched inside the run, alone here: the same embedding
        torch.testing.assert_close(cache[i], row, rtol=1e-4, atol=1e-5)


def test_embed_cli_help_and_errors(tmp_path, capsys, corpus, stats_spec):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["embed", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--encoder", "--output-dir", "--batch-size", "--shard-size", "--max-seconds"):
        assert option in help_text
    code = cli_main(["embed", str(corpus), "--encoder", "clap", "--output-dir", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "hf:<hub name or folder>" in capsys.readouterr().err
    spec, _ = stats_spec
    code = cli_main(["embed", str(tmp_path / "missing"), "--encoder", spec, "--output-dir", str(tmp_path / "y")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# cat-hf embed --model: CAT embeddings for users
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cat_folder(tmp_path_factory):
    from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cat-model")
    config = CATConfig.from_preset("cat-tiny", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   stem_channels=[8, 16], num_labels=2)
    CATForAudioClassification(config).save_pretrained(folder)
    CATFeatureExtractor().save_pretrained(folder)
    return folder


def test_embed_model_clips_to_npy_and_frames_to_parquet(corpus, cat_folder, tmp_path, capsys):
    import pandas as pd

    from cat_hf.embeddings import CATEmbedder

    embedder = CATEmbedder.from_pretrained(cat_folder)
    dataset = load_audio_corpus(corpus, label_column=False)
    waves = {}
    for i in range(len(dataset)):
        try:
            waves[i] = load_audio(dataset[i]["audio"], target_sr=16000)
        except ValueError:
            pass
    assert len(waves) == 10

    out = tmp_path / "clips"
    code = cli_main(["embed", str(corpus), "--model", str(cat_folder), "--output-dir", str(out), "--shard-size", "5",
                     "--batch-size", "3", "--no-progress"])
    assert code == 0 and "embedded 10/12 clips" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["clips.csv", "embed.json", "embeddings.npy"]  # parts removed
    index = json.loads((out / "embed.json").read_text())
    assert index["complete"] is True and index["kind"] == "clips" and index["num_failed"] == 2
    clips = pd.read_csv(out / "clips.csv")
    assert clips["clip"].tolist() == list(range(12))
    assert sorted(clips.loc[clips["num_rows"] == 0, "clip"]) == sorted(set(range(12)) - set(waves))
    assert clips["error"].notna().sum() == 2 and clips["path"].str.endswith((".wav", ".flac")).all()
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (10, 64) and embeddings.dtype == np.float32
    for i, wave in waves.items():
        row = int(clips.loc[clips["clip"] == i, "first_row"].iloc[0])
        expected = embedder.clip_embeddings(wave, sampling_rate=16000)[0]
        np.testing.assert_allclose(embeddings[row], expected.numpy(), atol=1e-5, rtol=1e-5)

    out = tmp_path / "frames"
    code = cli_main(["embed", str(corpus), "--model", str(cat_folder), "--output-dir", str(out), "--frames",
                     "--hop-ms", "80", "--format", "parquet", "--layer", "0", "1", "--no-progress"])
    assert code == 0
    table = pd.read_parquet(out / "embeddings.parquet")
    assert table.columns.tolist() == ["clip", "path", "timestamp_ms", "embedding"]
    averaged = CATEmbedder.from_pretrained(cat_folder, hop_ms=80, layer=[0, 1])
    for i, wave in waves.items():
        rows = table[table["clip"] == i]
        vectors, stamps = averaged.frame_embeddings(wave, sampling_rate=16000).clip(0)
        assert rows["timestamp_ms"].tolist() == stamps.tolist()
        assert rows["timestamp_ms"].max() <= 1000 * len(wave) / 16000
        np.testing.assert_allclose(np.stack(rows["embedding"].to_list()), vectors.numpy(), atol=1e-5, rtol=1e-5)

    # bad combinations are named
    code = cli_main(["embed", str(corpus), "--model", str(cat_folder), "--output-dir", str(out), "--max-seconds", "2"])
    assert code == 2 and "--max-seconds is for --encoder" in capsys.readouterr().err
    code = cli_main(["embed", str(corpus), "--model", str(cat_folder), "--output-dir", str(out), "--no-progress"])
    assert code == 2 and "different kind ('frames', this run: 'clips')" in capsys.readouterr().err


def test_embed_model_resumes_after_a_kill(cat_folder, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "long-corpus"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        sf.write(root / f"clip{i:02d}.wav", (0.1 * rng.standard_normal(16000 * 2 + 997 * i)).astype(np.float32), 16000)
    out = tmp_path / "out"
    args = ["embed", str(root), "--model", str(cat_folder), "--output-dir", str(out), "--frames",
            "--shard-size", "1", "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cat_hf.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / "parts").glob("part-*.npz"))) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "the embed run wrote no parts"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)  # a kill, mid-run: nothing gets to clean up
    finally:
        process.wait()
    index = json.loads((out / "embed.json").read_text())
    done = len(list((out / "parts").glob("part-*.npz")))
    assert index["complete"] is False and 2 <= done < 8 and not (out / "embeddings.npy").exists()

    code = cli_main(args)  # the same command again resumes
    assert code == 0
    report = json.loads((out / "embed.json").read_text())
    assert report["complete"] is True and report["num_embeddings"] == 8
    fresh = tmp_path / "fresh"
    from cat_hf.embed import embed_audio

    full = embed_audio(root, cat_folder, fresh, frames=True, shard_size=1, batch_size=1, progress=False)
    assert (full.shards_computed, full.shards_reused) == (8, 0)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(fresh / "embeddings.npy"), atol=1e-6, rtol=0)
    assert np.array_equal(np.load(out / "timestamps.npy"), np.load(fresh / "timestamps.npy"))
    assert (out / "clips.csv").read_text() == (fresh / "clips.csv").read_text()
    again = embed_audio(root, cat_folder, out, frames=True, shard_size=1, batch_size=1, progress=False)
    assert (again.shards_computed, again.shards_reused) == (0, 8)  # complete: nothing left to do
    partial = embed_audio(root, cat_folder, tmp_path / "partial", shard_size=3, max_shards=2, progress=False)
    resumed = embed_audio(root, cat_folder, tmp_path / "partial", shard_size=3, progress=False)
    assert (partial.shards_computed, resumed.shards_reused, resumed.shards_computed) == (2, 2, 1)
