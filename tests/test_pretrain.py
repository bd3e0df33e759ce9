"""Pretraining loop: real runs of a micro CAT on real wav files (CPU), resume, interruption, export, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch

from cat_hf.data import CorpusError
from cat_hf.external_encoders import EmbeddingDimMismatchError
from cat_hf.pretrain import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    PretrainConfig,
    pretrain,
    resolve_recipe,
)

SR = 16000
# A CAT small enough for CPU tests, with every part of the method: multi-resolution stem, clones, decoder, EMA.
MICRO = {
    "model.hidden_size": 64, "model.num_attention_heads": 2, "model.num_hidden_layers": 2,
    "model.stem_channels": [16, 32], "model.decoder_layers": 2, "model.clone_batch": 2,
}
# The schedule of the resume tests (max_steps) is longer than what they run, so that stopping early is a real stop.
# The tests pin what they exercise rather than follow the tiny recipe's defaults (its RR toward the shipped teachers
# has tests of its own in test_teachers.py).
RESUME_RUN = {**MICRO, "clip_seconds": 1.28, "max_steps": 200, "warmup_steps": 5, "learning_rate": 2e-3,
              "batch_size": 4, "rr_encoder": "none", "rr_standardize": False, "model.rr_view": "masked",
              "model.rr_pooling": "cls", "progress_bar": False, "report_to": "none", "save_every": 0}
REFERENCE_STEPS = 10
COMPARED = ("loss", "frame_loss", "utterance_loss", "lr", "ema_decay", "grad_norm", "skipped_files", "epoch")


def _write_corpus(folder: Path, count: int = 10, bad: bool = True) -> Path:
    """Harmonic tones with random pitch and tremolo (learnable structure), plus one corrupt and one empty file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        n = int(SR * rng.uniform(1.0, 2.5))
        t = np.arange(n) / SR
        f0 = rng.uniform(150, 1500)
        tone = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 4))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4.0) * t)
        wave = 0.15 * tone * envelope + 0.005 * rng.standard_normal(n)
        sf.write(folder / f"clip_{i:02d}.wav", wave.astype(np.float32), SR)
    if bad:
        (folder / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)
        (folder / "empty.wav").write_bytes(b"")
    return folder


def _config(corpus: Path, output_dir: Path, **overrides) -> PretrainConfig:
    return PretrainConfig.from_yaml("tiny").with_overrides(
        {**RESUME_RUN, "data": str(corpus), "output_dir": str(output_dir), **overrides}
    )


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines() if line.strip()]


def _same_trajectory(run: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in run] == [m["step"] for m in reference]
    for got, want in zip(run, reference):
        for key in COMPARED:
            assert got[key] == want[key], f"step {got['step']}: {key} {got[key]!r} != {want[key]!r}"


def _cli_overrides(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return out


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("pretrain-corpus") / "audio")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> list[dict]:
    """An uninterrupted run of REFERENCE_STEPS steps (of a 200-step schedule)."""
    out = tmp_path_factory.mktemp("reference")
    result = pretrain(_config(corpus, out, stop_at_step=REFERENCE_STEPS))
    assert not result["finished"] and result["state"].step == REFERENCE_STEPS
    metrics = _metrics(out)
    assert len(metrics) == REFERENCE_STEPS
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------


def test_recipes_and_overrides():
    base = PretrainConfig.from_yaml("base")
    assert resolve_recipe("base").name == "pretrain_base.yaml"
    assert base.model["preset"] == "cat-base" and base.model["clone_batch"] == 4
    assert (base.learning_rate, base.adam_betas, base.weight_decay, base.max_grad_norm) == (5e-4, (0.9, 0.95), 0.05, 4.0)
    assert (base.max_steps, base.batch_size, base.frames, base.model["rr_embedding_dim"]) == (400_000, 12, 1024, 512)
    assert base.mixed_precision == "fp16" and base.model["rr_loss_weight"] == 1.0
    # 1024 frames need exactly 400 + 160 * 1023 samples (Kaldi frames without centre padding).
    assert base.clip_samples == 164_080
    from cat_hf import CATFeatureExtractor

    for config in (base, PretrainConfig.from_yaml("tiny")):
        assert CATFeatureExtractor().num_frames(config.clip_samples) == config.frames
        assert CATFeatureExtractor().num_frames(config.clip_samples - 1) == config.frames - 1

    tiny = PretrainConfig.from_yaml("tiny").with_overrides(
        ["learning_rate=5e-4", "model.clone_batch=8", "mixed_precision=no", "adam_betas=[0.8, 0.9]", "clip_seconds=2"]
    )
    assert tiny.learning_rate == 5e-4 and tiny.model["clone_batch"] == 8 and tiny.model["preset"] == "cat-tiny"
    assert tiny.mixed_precision == "no" and tiny.adam_betas == (0.8, 0.9)
    assert tiny.frames == 208 and tiny.frames % 16 == 0  # 2 s -> nearest multiple of 16 frames
    with pytest.raises(ValueError, match="Unknown pretraining config key"):
        PretrainConfig.from_yaml("tiny").with_overrides(["learnig_rate=1"])
    with pytest.raises(ValueError, match="neither a YAML file nor a recipe"):
        PretrainConfig.from_yaml("huge")
    with pytest.raises(ValueError, match="Unknown model override"):
        PretrainConfig.from_yaml("tiny").with_overrides({"model.hiden_size": 8, "data": "x"}).validate()


# ----------------------------------------------------------------------------------------------------------------
# a full tiny run: bad files, RR, learning, export
# ----------------------------------------------------------------------------------------------------------------


BANDS_ENCODER = '''
import numpy as np

def embed(clips):
    """16 log band energies per clip: a cheap stand-in for a frozen audio encoder."""
    out = []
    for x in clips:
        spec = np.abs(np.fft.rfft(x[:16000], n=2048)) ** 2
        out.append(np.log1p([b.sum() for b in np.array_split(spec[1:], 16)]) / 10)
    return np.stack(out).astype(np.float32)

embed.embedding_dim = 16
'''


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    (tmp / "bands.py").write_text(BANDS_ENCODER)
    out = tmp / "cat-micro"
    # A slowly moving teacher keeps the regression targets nearly still, so 40 steps show clear learning.
    config = _config(corpus, out, max_steps=40, save_every=10, keep_checkpoints=2, report_to="tensorboard",
                     rr_encoder=f"python:{tmp / 'bands.py'}:embed",
                     **{"model.rr_embedding_dim": 16, "model.ema_decay": 0.998, "model.ema_end_decay": 0.999})
    return pretrain(config), out


def test_loss_falls_and_bad_files_are_counted(full_run):
    result, out = full_run
    metrics = result["metrics"]
    assert result["finished"] and len(metrics) == 40

    def mean(name, part):
        return np.mean([m[name] for m in part])

    assert mean("loss", metrics[-5:]) < 0.85 * mean("loss", metrics[:5])
    assert mean("frame_loss", metrics[-5:]) < 0.9 * mean("frame_loss", metrics[:5])
    assert mean("rr_loss", metrics[-5:]) < 0.5 * mean("rr_loss", metrics[:5])
    # 40 steps x 4 clips = 13 passes over 12 files: the corrupt and the empty file are met, counted once each.
    assert metrics[-1]["skipped_files"] == 2
    assert _metrics(out) == metrics  # metrics.jsonl holds every step, as returned
    assert metrics[0]["lr"] < metrics[5]["lr"]  # warm-up
    assert metrics[0]["ema_decay"] < metrics[-1]["ema_decay"] < 1.0


def test_export_loads_with_auto_classes(full_run, corpus):
    from transformers import AutoFeatureExtractor, AutoModel

    from cat_hf import CATForPreTraining, CATModel

    result, out = full_run
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, CATModel)
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert extractor.max_length == 128
    wave, rate = sf.read(corpus / "clip_00.wav", dtype="float32")
    inputs = extractor(wave, sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    assert hidden.shape == (1, 1 + 8 * 8, 64) and torch.isfinite(hidden).all()
    # The exported student is the trained one, not the initialisation.
    trained = result["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained.cat.state_dict()[name]), name

    full = CATForPreTraining.from_pretrained(out / "pretraining")
    for name, tensor in trained.teacher.state_dict().items():
        assert torch.equal(full.teacher.state_dict()[name], tensor), name
    student, teacher = full.cat.state_dict(), full.teacher.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # an EMA, not a copy of the student

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 40 and summary["batch_size"] == 4 and summary["learning_rate"] == 2e-3
    assert summary["skipped_files"] == 2 and summary["wall_time_s"] > 0 and "CPU" in summary["hardware"]
    assert summary["final_loss"] == pytest.approx(np.mean([m["loss"] for m in result["metrics"]]), rel=1e-6)
    assert summary["rr_encoder"].endswith(":embed") and summary["final_rr_loss"] > 0

    checkpoints = sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["step-0000030", "step-0000040"]  # keep_checkpoints=2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for events in (out / "tensorboard").rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        logged.update({tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]})
    for name in ("loss", "frame_loss", "utterance_loss", "rr_loss", "lr", "ema_decay", "clips_per_s", "skipped_files"):
        assert len(logged[f"train/{name}"]) == 40, name
    assert logged["train/loss"][-1].value == pytest.approx(result["metrics"][-1]["loss"], rel=1e-6)


def test_rr_from_a_precomputed_cache(corpus, tmp_path):
    """`cat-hf embed` once, then RR looks the embeddings up by row; rows without one count as skipped."""
    from cat_hf.embed import embed_corpus

    (tmp_path / "bands.py").write_text(BANDS_ENCODER)
    embed_corpus(str(corpus), f"python:{tmp_path / 'bands.py'}:embed", tmp_path / "cache", progress=False)
    result = pretrain(_config(corpus, tmp_path / "out", max_steps=3, rr_encoder=f"cache:{tmp_path / 'cache'}",
                              **{"model.rr_embedding_dim": 16}))
    assert result["finished"] and all(m["rr_loss"] > 0 for m in result["metrics"])
    assert result["metrics"][-1]["skipped_files"] == 2


# ----------------------------------------------------------------------------------------------------------------
# exact resume, interruption
# ----------------------------------------------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(corpus, reference, tmp_path):
    out = tmp_path / "resumed"
    first = pretrain(_config(corpus, out, stop_at_step=4))
    assert not first["finished"] and Path(first["checkpoint"]).name == "step-0000004"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(_config(corpus, out, stop_at_step=REFERENCE_STEPS))
    second = pretrain(_config(corpus, out, stop_at_step=REFERENCE_STEPS, resume="latest"))
    assert [m["step"] for m in second["metrics"]] == list(range(5, REFERENCE_STEPS + 1))
    _same_trajectory(_metrics(out), reference)


def test_activation_checkpointing_gives_the_same_run(corpus, reference, tmp_path, capsys):
    """Recomputing the student's blocks in the backward pass changes memory, not numbers: same losses, same
    gradient norms, step by step (dropout / drop path replay the same random draws)."""
    out = tmp_path / "checkpointed"
    result = pretrain(_config(corpus, out, stop_at_step=REFERENCE_STEPS, activation_checkpointing=True))
    assert "activation checkpointing" in capsys.readouterr().out
    _same_trajectory(_metrics(out), reference)
    model, student_block_runs = result["model"].train(), []
    model.cat.layers[0].attention.q_proj.register_forward_pre_hook(lambda *_: student_block_runs.append(1))
    model(torch.randn(2, 128, 128)).loss.backward()
    assert len(student_block_runs) == 2  # forward, then again in the backward pass


def test_sigterm_saves_state_and_resume_continues_exactly(corpus, reference, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "cat_hf.pretrain", "--config", "tiny", "--data", str(corpus),
               "--output-dir", str(out), *_cli_overrides(RESUME_RUN)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same arithmetic as the reference
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (out / METRICS_FILE).is_file() and len((out / METRICS_FILE).read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr  # 128 + SIGTERM: the shell convention for a job a signal stopped
    assert "SIGTERM received" in stderr and "Stopped by SIGTERM" in stdout
    checkpoint = max((out / CHECKPOINTS_DIR).iterdir())
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < REFERENCE_STEPS - 1, stopped_at
    assert not (out / "config.json").exists()  # interrupted: no export

    resumed = pretrain(_config(corpus, out, stop_at_step=REFERENCE_STEPS, resume=str(checkpoint)))
    assert resumed["metrics"][0]["step"] == stopped_at + 1
    _same_trajectory(_metrics(out), reference)


# ----------------------------------------------------------------------------------------------------------------
# clear errors at start
# ----------------------------------------------------------------------------------------------------------------


def test_unusable_corpora_fail_at_start_with_clear_messages(tmp_path, corpus):
    no_audio = tmp_path / "notes"
    no_audio.mkdir()
    (no_audio / "readme.txt").write_text("no audio here")
    with pytest.raises(CorpusError, match="No audio files found"):
        pretrain(_config(no_audio, tmp_path / "o1"))

    text_only = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    text_only.save_to_disk(str(tmp_path / "text-dataset"))
    with pytest.raises(CorpusError, match="No audio column"):
        pretrain(_config(tmp_path / "text-dataset", tmp_path / "o2"))
    with pytest.raises(CorpusError, match="No audio column"):  # an in-memory dataset, from Python
        pretrain(_config(corpus, tmp_path / "o2").with_overrides({"data": text_only}))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.wav").write_bytes(b"not audio at all")
    (broken / "b.wav").write_bytes(b"")
    with pytest.raises(CorpusError, match="no usable audio"):
        pretrain(_config(broken, tmp_path / "o3"))

    (tmp_path / "bands.py").write_text(BANDS_ENCODER)
    with pytest.raises(EmbeddingDimMismatchError, match="rr_embedding_dim"):  # encoder 16-d, model 512-d
        pretrain(_config(corpus, tmp_path / "o4", rr_encoder=f"python:{tmp_path / 'bands.py'}:embed",
                         **{"model.rr_embedding_dim": 512}))

    from cat_hf.pretrain import main

    assert main(["--config", "tiny", "--data", str(no_audio), "--output-dir", str(tmp_path / "o5")]) == 2
    assert not (tmp_path / "o5" / CHECKPOINTS_DIR).exists()


# ----------------------------------------------------------------------------------------------------------------
# data parallel: 2 CPU processes over gloo
# ----------------------------------------------------------------------------------------------------------------


DDP_WORKER = '''
import hashlib, json, sys
import torch
from cat_hf.pretrain import PretrainConfig, pretrain

config = PretrainConfig.from_dict(json.loads(sys.argv[1]))
result = pretrain(config)
rank = result["process_index"]  # the process group is gone once pretrain() returns

def digest(module):
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

model = result["model"]
report = {"student": digest(model.cat), "teacher": digest(model.teacher), "decoder": digest(model.decoder),
          "world_size": result["num_processes"], "losses": [m["loss"] for m in result["metrics"]],
          "student_fc1_sum": float(model.cat.state_dict()[[k for k in model.cat.state_dict() if "fc1.weight" in k][0]].double().sum())}
with open(sys.argv[2] + f"/rank{rank}.json", "w") as f:
    json.dump(report, f)
'''


def test_two_process_data_parallel_keeps_replicas_identical(corpus, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    config = _config(corpus, tmp_path / "ddp", max_steps=3, stop_at_step=None).to_dict()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(29400 + os.getpid() % 500), str(script), json.dumps(config), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["world_size"] == rank1["world_size"] == 2
    for part in ("student", "teacher", "decoder"):
        assert rank0[part] == rank1[part], part
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == 3  # reduced over both processes
    assert rank0["student"] != rank0["teacher"]  # the teacher is an average, not a copy
    summary = json.loads((tmp_path / "ddp" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["batch_size"] == 8


def test_continuing_from_a_model_with_fbanks_at_another_rate_is_refused(corpus, tmp_path):
    """A model converted with `cat-hf convert --sampling-rate 32000` expects 32 kHz fbanks; pretraining makes 16 kHz."""
    from cat_hf import CATConfig, CATFeatureExtractor

    folder = tmp_path / "native-32k"
    CATConfig.from_preset("cat-tiny").save_pretrained(folder)
    CATFeatureExtractor(sampling_rate=32000).save_pretrained(folder)
    with pytest.raises(ValueError, match="computes its fbanks at 32000 Hz, but pretraining works at 16000 Hz"):
        pretrain(_config(corpus, tmp_path / "out", init_from=str(folder)))
    assert not (tmp_path / "out").exists()
