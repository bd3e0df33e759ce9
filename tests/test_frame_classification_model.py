"""CATForAudioFrameClassification: per-time-patch logits for sound event detection, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForAudioFrameClassification

from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioFrameClassification


def tiny_model(seed: int = 0, **overrides) -> CATForAudioFrameClassification:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, stem_channels=[16, 32], stem_depths=[1, 1],
                max_time_patches=64, decoder_groups=8, rr_embedding_dim=None, num_labels=3)
    torch.manual_seed(seed)
    return CATForAudioFrameClassification(CATConfig(**{**base, **overrides})).eval()


def test_forward_backward_shapes_and_frame_times():
    model = tiny_model().train()
    x = torch.randn(2, 160, 128)
    labels = (torch.rand(2, 10, 3) > 0.7).float()
    out = model(x, labels=labels)
    assert out.logits.shape == (2, 10, 3) and out.frame_mask.shape == (2, 10) and out.frame_mask.all()
    # Time patch t reads frames 16t .. 16t + 15 (25 ms windows every 10 ms): samples 160t .. 160t + 175 ms.
    torch.testing.assert_close(out.frame_times, 87.5 + 160.0 * torch.arange(10.0))
    assert model.config.time_patch_hop_ms == 160.0 and model.config.time_patch_centre_ms(3) == 567.5
    out.loss.backward()
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    assert model.classifier.weight.grad is not None and model.cat.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    # The head reads every time patch's frequency tokens, averaged.
    with torch.no_grad():
        model.eval()
        hidden = model.cat(x).last_hidden_state[:, 1:].reshape(2, 10, 8, 64).mean(2)
        torch.testing.assert_close(model(x).logits, model.classifier(model.fc_norm(hidden)), atol=1e-6, rtol=0)


def test_finer_label_grid_repeats_each_patch():
    model = tiny_model(frame_label_hop_ms=40)
    with torch.no_grad():
        out = model(torch.randn(1, 96, 128))
    assert model.config.frame_label_repeats == 4 and out.logits.shape == (1, 24, 3)
    assert torch.equal(out.logits, out.logits[:, ::4].repeat_interleave(4, dim=1))
    # 40 ms frames tile each patch's 160 ms hop interval (its centre +- 80 ms): centres 27.5, 67.5, ... ms.
    torch.testing.assert_close(out.frame_times, 27.5 + 40.0 * torch.arange(24.0))
    torch.testing.assert_close(out.frame_times.view(6, 4).mean(1), model.config.time_patch_centre_ms(torch.arange(6.0)))
    with pytest.raises(Exception, match="frame_label_hop_ms=30 does not divide the 160 ms time patch"):
        tiny_model(frame_label_hop_ms=30)


def test_padded_batch_equals_single_clips():
    model = tiny_model(frame_label_hop_ms=80)
    extractor = CATFeatureExtractor(max_length=1024)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 7000, 3100)]
    batch = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt")
    with torch.no_grad():
        together = model(**batch)
        for i, clip in enumerate(clips):
            alone = model(**extractor([clip], sampling_rate=16000, padding="longest", return_tensors="pt"))
            frames = alone.logits.shape[1]
            torch.testing.assert_close(together.logits[i, :frames], alone.logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(together.frame_times[:frames], alone.frame_times)
            assert together.frame_mask[i, :frames].all() and not together.frame_mask[i, frames:].any()


def test_loss_ignores_padded_frames():
    model = tiny_model()
    x = torch.randn(2, 128, 128)
    mask = torch.ones(2, 128, dtype=torch.long)
    mask[1, 48:] = 0  # row 1: 3 real patches of 8
    labels = (torch.rand(2, 8, 3) > 0.5).float()
    with torch.no_grad():
        out = model(x, attention_mask=mask, labels=labels)
        noisy = labels.clone()
        noisy[1, 3:] = 1.0 - noisy[1, 3:]  # flip every label of the padded frames
        assert torch.equal(model(x, attention_mask=mask, labels=noisy).loss, out.loss)
    real = out.frame_mask
    assert real[0].all() and real[1, :3].all() and not real[1, 3:].any()
    expected = F.binary_cross_entropy_with_logits(out.logits[real], labels[real])
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match=r"labels have shape \(2, 10, 3\), but the logits of this batch have \(2, 8"):
        model(x, attention_mask=mask, labels=torch.zeros(2, 10, 3))


def test_save_and_load_through_the_auto_class(tmp_path):
    model = tiny_model(frame_label_hop_ms=40)
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForAudioFrameClassification"] == "modeling_cat.CATForAudioFrameClassification"
    loaded = AutoModelForAudioFrameClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CATForAudioFrameClassification) and loaded.config.frame_label_hop_ms == 40
    x = torch.randn(1, 64, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    # An encoder folder (here the frame model's own encoder) starts a frame head for finetuning.
    model.cat.save_pretrained(tmp_path / "encoder")
    head, info = AutoModelForAudioFrameClassification.from_pretrained(tmp_path / "encoder", num_labels=5,
                                                                      output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(head.cat.layers[0].mlp.fc1.weight, model.cat.layers[0].mlp.fc1.weight)
