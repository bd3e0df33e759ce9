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
