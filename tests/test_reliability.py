"""The reliability matrix of issue 20: what a demanding user does wrong, or what goes wrong around them, and what
cat-hf answers. Real files, real subprocesses for signals, a loopback server for the network, and a deadline on
everything that once hung.

Groups (extend a group's parameter list to add a case):
- bad arrays: waveforms with rates no recording has;
- bad files: damaged weights and checkpoints, output folders that hold other things, file modes, evaluation results;
- bad corpora: link loops, files whose header reads but whose data does not;
- interruption: SIGINT / SIGTERM to pretraining and to the demo, a disk that fills up while a checkpoint is written;
- damaged checkpoints and changed settings on --resume;
- concurrency: readers beside atomic writers, evaluations into one folder side by side, a Hub that never answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import cat_hf  # noqa: F401 - registers CAT with the Auto classes
from cat_hf import cli
from cat_hf.files import atomic_write_json, check_safetensors_values, DamagedFileError, write_folder_atomically

SR = 16000
# A pretraining run small enough for a few CPU seconds, with every part of the method.
MICRO = {
    "model.hidden_size": 64, "model.num_attention_heads": 2, "model.num_hidden_layers": 2,
    "model.stem_channels": [16, 32], "model.decoder_layers": 2, "model.clone_batch": 2,
    "clip_seconds": 1.28, "max_steps": 100, "warmup_steps": 2, "learning_rate": 2e-3, "progress_bar": False,
    "report_to": "none", "save_every": 0, "num_workers": 0, "monitor_every": 0,
}

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts the Python code running in this thread."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: this used to hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _tones(folder: Path, count: int, seconds: float = 1.0, seed: int = 0, prefix: str = "clip") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        t = np.arange(int(SR * seconds)) / SR
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.01 * rng.standard_normal(t.size)
        paths.append(folder / f"{prefix}_{i:02d}.wav")
        sf.write(paths[-1], wave.astype(np.float32), SR)
    return paths


def _pretrain_config(corpus: Path, output_dir: Path, **overrides):
    from cat_hf.pretrain import PretrainConfig

    return PretrainConfig.from_yaml("tiny").with_overrides(
        {**MICRO, "data": str(corpus), "output_dir": str(output_dir), **overrides})


def _cli_args(values: dict) -> list[str]:
    return [arg for key, value in values.items()
            for arg in ("--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}")]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    end = time.time() + seconds
    while time.time() < end and process.poll() is None and not condition():
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    assert condition(), "the run did not get there in time"


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x10]))


def _zip_data_offset(path: Path) -> int:
    """The middle of the largest member's data in a zip archive (a tensor's bytes in a torch file)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    with open(path, "rb") as stream:
        stream.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(stream.read(4), dtype="<u2")
    return info.header_offset + 30 + int(name_length) + int(extra_length) + info.compress_size // 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reliability-corpus") / "audio"
    _tones(folder, 8)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_classifier_dir) -> Path:
    """The conftest's tiny classifier (labels dog, rain, siren), copied so tests may write beside it."""
    return Path(shutil.copytree(tiny_classifier_dir, tmp_path_factory.mktemp("classifier") / "model"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """An audiofolder with test/ and train/ splits of the classifier's labels."""
    root = tmp_path_factory.mktemp("labelled") / "sounds"
    for split, seed in (("test", 1), ("train", 2)):
        for index, label in enumerate(("dog", "rain", "siren")):
            _tones(root / split / label, 2, seconds=0.5, seed=10 * seed + index, prefix=label)
    return root


# ================================================================================================================
# bad arrays
# ================================================================================================================


@pytest.mark.parametrize("rate", [2, 100, 999])
def test_waveform_at_a_rate_no_recording_has_is_refused(tiny_classifier_dir, rate):
    from cat_hf.audio import AudioDecodeError
    from cat_hf.inference import load_classifier, predict_long

    model, extractor = load_classifier(tiny_classifier_dir)
    with deadline(60), pytest.raises(AudioDecodeError, match=rf"sampling rate is {rate} Hz"):
        predict_long(model, extractor, np.zeros(16000, dtype=np.float32), sampling_rate=rate)


def test_waveform_at_a_low_real_rate_is_scored(tiny_classifier_dir):
    from cat_hf.inference import load_classifier, predict_long

    model, extractor = load_classifier(tiny_classifier_dir)
    with deadline(60):
        prediction = predict_long(model, extractor, np.zeros(8000, dtype=np.float32), sampling_rate=8000)
    assert prediction.duration == pytest.approx(1.0) and np.isfinite(prediction.probabilities).all()


# ================================================================================================================
# bad files
# ================================================================================================================


def test_predict_on_a_2_hz_wav_says_so_instead_of_hanging(tiny_classifier_dir, tmp_path, capsys):
    path = tmp_path / "two-hertz.wav"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32), 2, subtype="PCM_16")
    with deadline(120):
        code = cli.main(["predict", str(path), "--model", str(tiny_classifier_dir)])
    assert code == 1
    assert "sampling rate is 2 Hz" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_safetensors_with_overwritten_bytes_is_refused(classifier, tmp_path, seed):
    """64 bytes of tensor data overwritten (the issue's case): the values are garbage, mostly far beyond any trained
    weight, and sometimes NaN/inf. Published or checked, the folder is refused naming the tensor."""
    from cat_hf.hub import ModelFolderError, check_model_folder, push_folder

    folder = Path(shutil.copytree(classifier, tmp_path / "model"))
    weights = folder / "model.safetensors"
    header = 8 + int(np.frombuffer(weights.read_bytes()[:8], dtype="<u8")[0])
    rng = np.random.default_rng(seed)
    offset = header + int(rng.integers(0, weights.stat().st_size - header - 64))
    _overwrite(weights, offset, rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    with pytest.raises(DamagedFileError, match="damaged"):
        check_safetensors_values(weights)
    with pytest.raises(ModelFolderError, match="damaged"):
        check_model_folder(folder)
    with pytest.raises(ModelFolderError, match="damaged"):
        push_folder(folder, "user/cat", dry_run=True)
    assert check_model_folder(classifier) == "model"  # the undamaged original passes


def test_safetensors_with_a_nan_weight_is_refused(classifier, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(classifier, tmp_path / "model"))
    state = load_file(folder / "model.safetensors")
    name = sorted(state)[3]
    state[name].view(-1)[0] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DamagedFileError, match=rf"{name}: 1 NaN/inf"):
        check_safetensors_values(folder / "model.safetensors")


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory) -> Path:
    from original_format import pretraining_checkpoint
    from cat_hf import CATConfig, CATForPreTraining

    torch.manual_seed(0)
    config = CATConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, stem_type="patch",
                       max_time_patches=64, decoder_groups=8, rr_embedding_dim=24)
    path = tmp_path_factory.mktemp("original") / "checkpoint_last.pt"
    torch.save(pretraining_checkpoint(CATForPreTraining(config)), path)
    return path


def test_convert_refuses_a_checkpoint_with_one_flipped_byte(original_checkpoint, tmp_path, capsys):
    damaged = tmp_path / "flipped.pt"
    shutil.copy(original_checkpoint, damaged)
    _flip_byte(damaged, _zip_data_offset(damaged))
    assert cli.main(["convert", str(damaged), str(tmp_path / "out")]) == 2
    assert "fails its CRC-32 check" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    from original_format import pretraining_checkpoint
    from cat_hf import CATConfig, CATForPreTraining
    from cat_hf.convert import CheckpointConversionError, convert_checkpoint

    model = CATForPreTraining(CATConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=2,
                                        stem_type="patch", max_time_patches=64, decoder_groups=8))
    with torch.no_grad():
        model.cat.layers[1].mlp.fc1.weight[0, :3] = float("inf")
    torch.save(pretraining_checkpoint(model, fp16=False), tmp_path / "diverged.pt")
    with pytest.raises(CheckpointConversionError, match=r"layers\.1\.mlp\.fc1\.weight: 3 NaN/inf"):
        convert_checkpoint(tmp_path / "diverged.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


CONVERTER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}


@pytest.mark.parametrize("case", ["checkpoint-folder", "dot", "user-files", "foreign-weights", "file"])
def test_convert_overwrite_replaces_only_its_own_files(original_checkpoint, tmp_path, monkeypatch, capsys, case):
    from transformers import AutoModel

    work = tmp_path / "work"
    work.mkdir()
    checkpoint = Path(shutil.copy(original_checkpoint, work / "checkpoint_last.pt"))
    (work / "train.py").write_text("print('mine')\n")
    if case == "checkpoint-folder":  # the case: it deleted the checkpoint and train.py
        assert cli.main(["convert", str(checkpoint), str(work), "--overwrite"]) == 2
        assert "holds the checkpoint being converted" in capsys.readouterr().err
        assert sorted(p.name for p in work.iterdir()) == ["checkpoint_last.pt", "train.py"]
        assert checkpoint.read_bytes() == original_checkpoint.read_bytes()
        return
    if case == "file":
        (tmp_path / "out").write_text("a file")
        assert cli.main(["convert", str(checkpoint), str(tmp_path / "out"), "--overwrite"]) == 2
        assert (tmp_path / "out").read_text() == "a file"
        return
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.md").write_text("keep me")
    if case == "foreign-weights":
        (target / "pytorch_model.bin").write_bytes(b"another model")
        assert cli.main(["convert", str(checkpoint), str(target), "--overwrite"]) == 2
        assert "pytorch_model.bin" in capsys.readouterr().err
        assert sorted(p.name for p in target.iterdir()) == ["notes.md", "pytorch_model.bin"]
        return
    if case == "dot":
        monkeypatch.chdir(target)
        assert cli.main(["convert", str(checkpoint), ".", "--overwrite"]) == 0
    else:
        assert cli.main(["convert", str(checkpoint), str(target)]) == 2  # not empty, no --overwrite: refused
        assert cli.main(["convert", str(checkpoint), str(target), "--overwrite"]) == 0
    names = {p.name for p in target.iterdir()}
    assert CONVERTER_FILES <= names and "notes.md" in names
    assert (target / "notes.md").read_text() == "keep me" and (work / "train.py").is_file()
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no staging folder left
    assert AutoModel.from_pretrained(target).config.hidden_size == 96


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_written_files_get_the_mode_of_their_neighbours(tmp_path, original_checkpoint, classifier, labelled):
    from cat_hf.convert import convert_checkpoint
    from cat_hf.evaluation import evaluate_model

    atomic_write_json(tmp_path / "new.json", {"a": 1})
    assert _mode(tmp_path / "new.json") == 0o644
    (tmp_path / "private.json").write_text("{}")
    os.chmod(tmp_path / "private.json", 0o640)
    atomic_write_json(tmp_path / "private.json", {"b": 2})  # a replaced file keeps its own mode
    assert _mode(tmp_path / "private.json") == 0o640

    from cat_hf import CATConfig, CATModel

    encoder = CATModel(CATConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, stem_type="patch"))
    folder = write_folder_atomically(tmp_path / "saved", encoder.save_pretrained)  # safetensors writes 0600
    assert {p.name: _mode(p) for p in folder.iterdir()} == {p.name: 0o644 for p in folder.iterdir()}

    converted = convert_checkpoint(original_checkpoint, tmp_path / "converted")
    assert _mode(converted) == 0o755
    assert {p.name: _mode(p) for p in converted.iterdir()} == {p.name: 0o644 for p in converted.iterdir()}

    evaluated = Path(shutil.copytree(classifier, tmp_path / "evaluated"))
    evaluate_model(str(evaluated), str(labelled), split="test", output_dir=evaluated)
    for name in ("eval_results.json", "per_class_scores.csv", "predictions.csv", "confusion_matrix.png"):
        assert _mode(evaluated / name) == 0o644, name


def test_evaluations_of_other_data_are_kept_beside_each_other(classifier, labelled, tmp_path):
    from huggingface_hub import ModelCard

    from cat_hf.evaluation import evaluate_model
    from cat_hf.hub import render_model_card

    folder = Path(shutil.copytree(classifier, tmp_path / "model"))
    test = evaluate_model(str(folder), str(labelled), split="test", output_dir=folder)
    first = (folder / "per_class_scores.csv").read_bytes()
    train = evaluate_model(str(folder), str(labelled), split="train", output_dir=folder)
    saved = json.loads((folder / "eval_results.json").read_text())
    assert [(r["split"], r["metrics"]) for r in saved] == [("test", test["metrics"]), ("train", train["metrics"])]
    assert (folder / "per_class_scores.csv").read_bytes() == first  # the test result's files are untouched
    assert saved[1]["files"]["per_class"] == "per_class_scores.sounds-train.csv"
    assert (folder / saved[1]["files"]["per_class"]).is_file()

    again = evaluate_model(str(folder), str(labelled), split="test", output_dir=folder)  # same data: replaced
    saved = json.loads((folder / "eval_results.json").read_text())
    assert [r["split"] for r in saved] == ["train", "test"] and saved[1]["metrics"] == again["metrics"]
    assert saved[1]["files"]["per_class"] == "per_class_scores.csv"

    card = ModelCard(render_model_card(folder, repo_id="user/cat"))
    assert {r.dataset_split for r in card.data.eval_results} == {"test", "train"}
    assert "per_class_scores.sounds-train.csv" in card.text


def test_an_unreadable_eval_results_file_is_not_replaced(classifier, labelled, tmp_path):
    from cat_hf.evaluation import evaluate_model

    folder = Path(shutil.copytree(classifier, tmp_path / "model"))
    (folder / "eval_results.json").write_text("my notes, not JSON")
    with pytest.raises(ValueError, match="not readable JSON"):
        evaluate_model(str(folder), str(labelled), split="test", output_dir=folder)
    assert (folder / "eval_results.json").read_text() == "my notes, not JSON"


# ================================================================================================================
# bad corpora
# ================================================================================================================


@pytest.mark.parametrize("link", [("dog/up", ".."), ("dog/loop", "."), ("cat/alias", "../dog"), ("cat/root", "../..")])
def test_linked_folders_are_listed_once_under_their_own_labels(tmp_path, link):
    from cat_hf.data import load_audio_corpus

    root = tmp_path / "audio"
    for label in ("cat", "dog"):
        _tones(root / label, 2, seconds=0.1, prefix=label)
    where, target = link
    (root / where).symlink_to(target, target_is_directory=True)
    with deadline(60):
        corpus = load_audio_corpus(root)
    rows = sorted((Path(a["path"] if isinstance(a, dict) else a).name, tags[0])
                  for a, tags in zip(corpus.with_format(None)["audio"], corpus["labels"]))
    assert rows == [("cat_00.wav", "cat"), ("cat_01.wav", "cat"), ("dog_00.wav", "dog"), ("dog_01.wav", "dog")]


def test_corpus_check_counts_the_clips_training_skips(tmp_path):
    """Files whose header reads but whose samples do not (NaN samples, data cut short, no frames) are counted by
    the check exactly as training skips them."""
    from cat_hf.data import AudioClipDataset, load_audio_corpus, validate_corpus

    root = tmp_path / "audio"
    _tones(root, 3)
    nan = np.zeros(1600, dtype=np.float32)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), SR)
    sf.write(root / "flac-cut.flac", np.random.default_rng(0).uniform(-.5, .5, SR).astype(np.float32), SR)
    data = (root / "flac-cut.flac").read_bytes()
    (root / "flac-cut.flac").write_bytes(data[: len(data) // 3] + bytes(len(data) // 3))
    (root / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)
    corpus = load_audio_corpus(root)
    summary = validate_corpus(corpus, check_audio=True)
    dataset = AudioClipDataset(corpus, clip_samples=SR, train=False)
    skipped = [corpus[i]["audio"] for i in range(len(dataset)) if dataset[i] is None]
    assert summary.num_unreadable == len(skipped) == dataset.num_skipped >= 3
    assert summary.num_clips == len(corpus) == 7


# ================================================================================================================
# interruption
# ================================================================================================================


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_pretraining_stopped_by_a_signal_saves_and_exits_non_zero(corpus, tmp_path, sig, code):
    from cat_hf.pretrain import CHECKPOINTS_DIR, checkpoint_damage

    out = tmp_path / "run"
    command = [sys.executable, "-m", "cat_hf.pretrain", "--config", "tiny", "--data", str(corpus),
               "--output-dir", str(out), *_cli_args(MICRO)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), process)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert f"Stopped by {sig.name}" in stdout and "Traceback" not in stderr
    (checkpoint,) = (out / CHECKPOINTS_DIR).iterdir()
    assert checkpoint_damage(checkpoint) is None


def test_demo_stopped_by_ctrl_c_says_where_and_exits_130(tmp_path):
    work = tmp_path / "demo"
    command = [sys.executable, "-m", "cat_hf.cli", "demo", "--workdir", str(work), "--pretrain-steps", "400",
               "--finetune-steps", "4", "--clips-per-class", "4", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: (work / "cat-tiny-pretrained" / "pretrain_config.yaml").is_file(), process)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "stopped by SIGINT during step 'pretrain cat-tiny with RR' after: synthesise corpus" in stderr
    assert "pretrain cat-tiny with RR:" not in stdout and "finished" not in stdout
    assert "--resume" not in stdout + stderr and "Traceback" not in stderr
    manifest = json.loads((work / ".cat-hf-demo.json").read_text())["files"]
    assert "corpus/train/hum/hum-001.wav" in manifest  # a rerun may replace what it wrote


@pytest.mark.parametrize("folder", ["corpus", "evaluation"])
def test_demo_never_deletes_files_it_did_not_write(tmp_path, capsys, folder):
    from cat_hf.demo import WorkdirInUseError, clear_previous_run, run_demo

    work = tmp_path / "work"
    (work / folder).mkdir(parents=True)
    (work / folder / "my-recording.wav").write_bytes(b"precious")
    with pytest.raises(WorkdirInUseError, match="my-recording.wav"):
        run_demo(work, pretrain_steps=1, finetune_steps=1, clips_per_class=1)
    assert cli.main(["demo", "--workdir", str(work), "--pretrain-steps", "1"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (work / folder / "my-recording.wav").read_bytes() == b"precious"
    assert sorted(p.name for p in work.iterdir()) == [folder]

    # What an earlier demo run recorded is replaced; one more file in its folders stops it before it deletes anything.
    (work / folder / "my-recording.wav").unlink()
    (work / "corpus" / "train").mkdir(parents=True, exist_ok=True)
    (work / "corpus" / "train" / "a.wav").write_bytes(b"demo")
    (work / ".cat-hf-demo.json").write_text(json.dumps({"files": ["corpus/train/a.wav"]}))
    (work / "corpus" / "b.wav").write_bytes(b"user")
    with pytest.raises(WorkdirInUseError, match="b.wav"):
        clear_previous_run(work)
    assert (work / "corpus" / "train" / "a.wav").is_file()
    (work / "corpus" / "b.wav").unlink()
    clear_previous_run(work)
    assert not (work / "corpus").exists()


def _fill_disk_at(limit: int):
    """In the child: files can grow to `limit` bytes only (RLIMIT_FSIZE), and a write past it fails with EFBIG
    instead of killing the process: a full disk, without needing a small file system."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_and_says_so(corpus, tmp_path):
    from cat_hf.pretrain import CHECKPOINTS_DIR, checkpoint_damage, pretrain

    out = tmp_path / "run"
    pretrain(_pretrain_config(corpus, out, stop_at_step=2))
    (previous,) = (out / CHECKPOINTS_DIR).iterdir()
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    command = [sys.executable, "-m", "cat_hf.pretrain", "--config", "tiny", "--data", str(corpus),
               "--output-dir", str(out), "--resume", *_cli_args({**MICRO, "stop_at_step": 4})]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(),
                            preexec_fn=_fill_disk_at(64 * 1024))
    assert result.returncode == 1, result.stderr
    assert "Could not write the checkpoint of step 4" in result.stderr
    assert f"The previous checkpoint {previous} is intact" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in (out / CHECKPOINTS_DIR).iterdir()] == [previous.name]  # no partial folder left
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before and checkpoint_damage(previous) is None


# ================================================================================================================
# damaged checkpoints, changed settings
# ================================================================================================================


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    """Four steps with checkpoints at steps 2 and 4."""
    from cat_hf.pretrain import pretrain

    out = tmp_path_factory.mktemp("checkpointed") / "run"
    pretrain(_pretrain_config(corpus, out, save_every=2, stop_at_step=4))
    return out


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


DAMAGE = {
    "truncated-weights": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
    "flipped-optimizer-byte": lambda c: _flip_byte(c / "optimizer.bin", _zip_data_offset(c / "optimizer.bin")),
    "missing-random-states": lambda c: (c / "random_states_0.pkl").unlink(),
    "legacy-truncated": lambda c: ((c / "checkpoint_manifest.json").unlink(),
                                   (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:999])),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_last_complete_checkpoint(finished_run, corpus, tmp_path, caplog, damage):
    from cat_hf.pretrain import pretrain

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    reference = _losses(run)
    DAMAGE[damage](run / "checkpoints" / "step-0000004")
    with caplog.at_level("WARNING"):
        resumed = pretrain(_pretrain_config(corpus, run, save_every=2, stop_at_step=4, resume="latest"))
    assert "step-0000004 is damaged" in caplog.text
    assert [m["step"] for m in resumed["metrics"]] == [3, 4]
    assert {s: v for s, v in _losses(run).items()} == reference  # exactly the uninterrupted run's steps 3-4


def test_a_damaged_checkpoint_named_explicitly_or_no_complete_one_is_an_error(finished_run, corpus, tmp_path):
    from cat_hf.pretrain import check_run_folder

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    config = _pretrain_config(corpus, run, save_every=2, stop_at_step=4)
    DAMAGE["truncated-weights"](run / "checkpoints" / "step-0000004")
    with pytest.raises(ValueError, match=r"the checkpoint is damaged \(model.safetensors has .* bytes.*step-0000002"):
        check_run_folder(config.with_overrides({"resume": str(run / "checkpoints" / "step-0000004")}))
    DAMAGE["missing-random-states"](run / "checkpoints" / "step-0000002")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        check_run_folder(config.with_overrides({"resume": "latest"}))


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("--batch-size", "6", "batch_size"), ("--set", "max_steps=300", "max_steps"), ("--set", "seed=7", "seed"),
    ("--set", "model.num_hidden_layers=3", "model.num_hidden_layers"), ("--data", "OTHER", "data"),
    ("--set", "learning_rate=0.1", "learning_rate"),
])
def test_resume_with_other_settings_names_them_and_the_override(finished_run, corpus, tmp_path, capsys, flag, value,
                                                               key):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    data = str(corpus)
    other = tmp_path / "other"
    _tones(other, 2)
    value = str(other) if value == "OTHER" else value
    base = ["pretrain", "--config", "tiny", "--data", data, "--output-dir", str(run), "--resume",
            *_cli_args({**MICRO, "save_every": 2, "stop_at_step": 5})]  # if a change went unnoticed: one step
    args = [*base, flag, value]
    if flag == "--data":
        args = [a if a != data else value for a in base]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert f"{key}: " in error and f"--allow-changed {key}" in error and "Traceback" not in error
    from cat_hf.pretrain import check_run_folder, config_from_args

    allowed = [*args, "--allow-changed", key]
    allowed = cli.build_parser(allowed).parse_args(allowed)
    check_run_folder(config_from_args(allowed))  # told by name: accepted


def test_pretraining_into_a_finetuned_classifier_is_refused_unless_told(classifier, corpus, tmp_path, capsys):
    folder = Path(shutil.copytree(classifier, tmp_path / "classifier"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["pretrain", "--config", "tiny", "--data", str(corpus), "--output-dir", str(folder), *_cli_args(MICRO)]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "did not write (a CATForAudioClassification)" in error and "--overwrite-output-dir" in error
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    from cat_hf.pretrain import check_run_folder, config_from_args

    told = [*args, "--overwrite-output-dir"]
    check_run_folder(config_from_args(cli.build_parser(told).parse_args(told)))


# ================================================================================================================
# concurrency
# ================================================================================================================


def test_readers_never_see_a_half_written_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"values": []})
    stop = threading.Event()

    def write():
        rng = np.random.default_rng(0)
        while not stop.is_set():
            atomic_write_json(path, {"values": rng.standard_normal(int(rng.integers(1, 20000))).tolist()})

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(300):
            assert isinstance(json.loads(path.read_text())["values"], list)
    finally:
        stop.set()
        writer.join()
    assert not list(tmp_path.glob(".*tmp"))


def test_evaluations_side_by_side_into_one_folder_keep_every_result(classifier, labelled, tmp_path):
    from cat_hf.evaluation import evaluate_model

    folder = Path(shutil.copytree(classifier, tmp_path / "model"))
    errors = []

    def evaluate(name: str) -> None:
        try:
            evaluate_model(str(folder), str(labelled), split="test", output_dir=folder, dataset_name=name)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=evaluate, args=(f"set-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    saved = json.loads((folder / "eval_results.json").read_text())
    assert sorted(r["dataset"] for r in saved) == ["set-0", "set-1", "set-2"]
    assert all((folder / r["files"]["predictions"]).is_file() for r in saved)


@pytest.fixture
def silent_endpoint():
    """A loopback server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def test_push_to_a_hub_that_never_answers_times_out(classifier, silent_endpoint):
    from cat_hf.hub import HubPushError, push_folder

    start = time.perf_counter()
    with deadline(120), pytest.raises(HubPushError, match=r"did not answer in time.*--timeout"):
        push_folder(classifier, "user/cat", endpoint=silent_endpoint, token="hf_test", timeout=1)
    assert time.perf_counter() - start < 60
