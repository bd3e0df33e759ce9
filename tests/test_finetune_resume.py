"""Finetuning checkpoints: a run stopped (at stop_at_step, or by SIGTERM) and resumed ends with exactly the weights,
validation history and evaluation of an uninterrupted run; a resume under other settings is refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import micro_config, run_settings, write_audiofolder

from cat_hf import CATFeatureExtractor, CATModel
from cat_hf.checkpoints import CHECKPOINTS_DIR, checkpoint_damage
from cat_hf.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Every source of randomness is on: drop path, mixup, SpecAugment, roll and gain; two micro-batches per step.
RANDOM_RUN = dict(max_steps=8, warmup_steps=2, eval_steps=3, drop_path_rate=0.1, mixup_alpha=0.8,
                  gradient_accumulation_steps=2, batch_size=6, baseline=False, save_every=0)
#: The SIGTERM test's schedule is longer than what it runs, so that the signal stops a run in the middle.
LONG_RUN = {**RANDOM_RUN, "max_steps": 400, "eval_steps": 2, "gradient_accumulation_steps": 1}
LONG_RUN_STOP = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_audiofolder(tmp_path_factory.mktemp("resume-corpus") / "sounds", per_class=8)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resume-encoder") / "cat-micro"
    CATModel(micro_config()).save_pretrained(folder)
    CATFeatureExtractor(max_length=64).save_pretrained(folder)
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_a_stopped_and_resumed_run_ends_exactly_like_an_uninterrupted_one(corpus, encoder_dir, tmp_path):
    reference = finetune(run_settings(corpus, encoder_dir, tmp_path / "reference", **RANDOM_RUN))
    assert reference["finished"] and [h["step"] for h in reference["history"]] == [3, 6, 8]

    out = tmp_path / "resumed"
    first = finetune(run_settings(corpus, encoder_dir, out, stop_at_step=4, **RANDOM_RUN))
    assert not first["finished"] and first["interrupted"] is None and first["steps"] == 4
    checkpoint = out / CHECKPOINTS_DIR / "step-0000004"
    assert Path(first["checkpoint"]) == checkpoint and checkpoint_damage(checkpoint) is None
    assert first["history"] == reference["history"][:1]
    assert not (out / "model.safetensors").exists()  # nothing exported yet
    with pytest.raises(ValueError, match="already holds checkpoints"):
        finetune(run_settings(corpus, encoder_dir, out, **RANDOM_RUN))

    second = finetune(run_settings(corpus, encoder_dir, out, resume="latest", **RANDOM_RUN))
    assert second["finished"] and second["steps"] == 8
    assert second["history"] == reference["history"]  # validation scores, best flags, epochs
    assert (second["best_step"], second["best_metric"]) == (reference["best_step"], reference["best_metric"])
    assert second["eval_results"] == reference["eval_results"]
    _assert_same_weights(_weights(out), _weights(tmp_path / "reference"))
    assert json.loads((out / "training_summary.json").read_text())["epochs"] == reference["epochs"]


def test_resuming_under_other_settings_names_them(corpus, encoder_dir, tmp_path):
    out = tmp_path / "run"
    finetune(run_settings(corpus, encoder_dir, out, stop_at_step=2, **RANDOM_RUN))
    changed = {**RANDOM_RUN, "learning_rate": 1e-2}
    with pytest.raises(ValueError, match=r"learning_rate: 0\.002 in the checkpoint, 0\.01 now.*--allow-changed "
                                         r"learning_rate"):
        finetune(run_settings(corpus, encoder_dir, out, resume="latest", stop_at_step=3, **changed))
    result = finetune(run_settings(corpus, encoder_dir, out, resume="latest", stop_at_step=3,
                                   resume_allow_changed=["learning_rate"], **changed))
    assert result["steps"] == 3  # told by name: continued


def test_sigterm_saves_the_state_and_exits_143_and_resume_continues_exactly(corpus, encoder_dir, tmp_path):
    """The command line (with --set) stopped by SIGTERM mid-run; resumed to step LONG_RUN_STOP it has the weights
    and validation history of a run that was never stopped."""
    reference_dir = tmp_path / "reference"
    reference = finetune(run_settings(corpus, encoder_dir, reference_dir, stop_at_step=LONG_RUN_STOP, **LONG_RUN))
    assert reference["steps"] == LONG_RUN_STOP

    out = tmp_path / "killed"
    settings = run_settings(corpus, encoder_dir, out, **LONG_RUN)
    command = [sys.executable, "-m", "cat_hf.finetune", "--data", settings.pop("data"), "--model",
               settings.pop("model"), "--output-dir", settings.pop("output_dir")]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference's arithmetic
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None and not (out / "checkpoint-best").is_dir():
        time.sleep(0.05)  # the first validation (step 2) has written the best model
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr  # 128 + SIGTERM, as pretraining
    assert "SIGTERM received" in stderr and "Stopped by SIGTERM" in stdout and "Traceback" not in stderr
    (checkpoint,) = (out / CHECKPOINTS_DIR).iterdir()
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < LONG_RUN_STOP and checkpoint_damage(checkpoint) is None
    assert json.loads(stdout[stdout.index("{"):])["interrupted"] == "SIGTERM"

    resumed = finetune(run_settings(corpus, encoder_dir, out, resume="latest", stop_at_step=LONG_RUN_STOP,
                                    **LONG_RUN))
    assert resumed["history"] == reference["history"]
    _assert_same_weights(_weights(out / CHECKPOINTS_DIR / f"step-{LONG_RUN_STOP:07d}"),
                         _weights(reference_dir / CHECKPOINTS_DIR / f"step-{LONG_RUN_STOP:07d}"))
