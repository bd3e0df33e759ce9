"""The end-to-end path in small: synthesised tagged clips -> pretrain with RR -> LoRA finetune -> merge ->
evaluate -> pipeline (the `cat-hf demo` code, with a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import pipeline

from cat_hf.demo import CLASSES, run_demo, synthesize_clip


def test_demo_end_to_end_in_small(tmp_path):
    report = run_demo(tmp_path, pretrain_steps=12, finetune_steps=12, clips_per_class=6)
    names = [s["step"] for s in report["steps"]]
    assert names[0] == "synthesise corpus" and names[-1].startswith("pipeline")
    assert 0.0 <= report["accuracy"] <= 1.0
    merged = tmp_path / "cat-tiny-lora" / "merged"
    assert (merged / "model.safetensors").is_file() and (tmp_path / "cat-tiny-lora" / "adapter_model.safetensors").is_file()
    config = json.loads((merged / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(CLASSES)
    pretraining = json.loads((tmp_path / "cat-tiny-pretrained" / "training_summary.json").read_text())
    assert pretraining["steps"] == 12 and pretraining["rr_loss_weight"] > 0 and "aisfx" in pretraining["rr_encoder"]
    assert report["effective_rank"] == pretraining["final_effective_rank_mean"] > 1.0
    classifier = pipeline("audio-classification", model=str(merged))
    scores = classifier({"array": synthesize_clip("hiss", np.random.default_rng(0), 1.5), "sampling_rate": 16000},
                        top_k=len(CLASSES))
    assert {s["label"] for s in scores} == set(CLASSES)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)
    # Running it again in the same folder starts afresh instead of failing on the old checkpoints.
    again = run_demo(tmp_path, pretrain_steps=4, finetune_steps=4, clips_per_class=6)
    assert json.loads((tmp_path / "cat-tiny-pretrained" / "training_summary.json").read_text())["steps"] == 4
    assert again["model_dir"] == report["model_dir"]
