"""The shared optimisation pieces (`cat_hf.optimization`): the fused EMA teacher update equals the per-tensor one,
the pretraining schedule keeps its numbers, and both loops decay the same parameters (the authors' rule)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cat_hf import CATConfig, CATForAudioClassification, CATForPreTraining
from cat_hf.optimization import build_param_groups, ema_update, warmup_cosine, warmup_cosine_schedule

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _looped_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """The EMA update as a Python loop over tensors, one `lerp_` each (what the fused update replaces)."""
    with torch.no_grad():
        student_parameters = dict(student.named_parameters())
        for name, parameter in teacher.named_parameters():
            source = student_parameters[name].detach().to(parameter.dtype)
            if student_parameters[name].requires_grad:
                parameter.lerp_(source, 1.0 - decay)
            else:
                parameter.copy_(source)
        student_buffers = dict(student.named_buffers())
        for name, buffer in teacher.named_buffers():
            buffer.copy_(student_buffers[name])


def test_the_fused_ema_update_equals_the_per_tensor_loop_bit_for_bit():
    torch.manual_seed(0)
    fused = CATForPreTraining(CATConfig.from_preset("cat-tiny", num_hidden_layers=2, rr_embedding_dim=8))
    fused.cat.embeddings.cls_token.requires_grad_(False)  # a frozen parameter is copied, not averaged
    looped = copy.deepcopy(fused)
    for step in range(1, 21):
        with torch.no_grad():
            for a, b in zip(fused.cat.parameters(), looped.cat.parameters()):
                move = torch.randn_like(a) * 1e-2
                a.add_(move)
                b.add_(move)
        ema_update(fused.teacher, fused.cat, fused.teacher_decay(step))
        _looped_ema(looped.teacher, looped.cat, looped.teacher_decay(step))
    for (name, got), want in zip(fused.teacher.state_dict().items(), looped.teacher.state_dict().values()):
        assert torch.equal(got, want), name
    assert torch.equal(fused.teacher.embeddings.cls_token, fused.cat.embeddings.cls_token)
    moved = fused.teacher.layers[0].mlp.fc1.weight
    assert not torch.equal(moved, fused.cat.layers[0].mlp.fc1.weight)  # an average, not a copy


def test_the_pretraining_schedule_keeps_its_numbers():
    """Warm-up from lr / (W + 1) at the first update to lr at update W + 1, then half a cosine to min_lr_ratio."""
    warmup, total, floor = 20, 200, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(optimizer, warmup_steps=warmup, max_steps=total, min_ratio=floor,
                                      start_ratio=0.0, offset=1)
    factor = schedule.lr_lambdas[0]
    for step in range(warmup):
        assert factor(step) == (step + 1) / (warmup + 1)  # exactly, as before the shared schedule
    for step in range(warmup, total + 3):
        progress = min(1.0, (step - warmup) / (total - warmup))
        assert factor(step) == floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    assert warmup_cosine(0, warmup_steps=10, max_steps=110, min_ratio=0.02) == pytest.approx(0.02)  # finetuning's


def test_both_loops_decay_weight_matrices_and_the_cls_token_not_biases_or_norms():
    pretraining = CATForPreTraining(CATConfig.from_preset("cat-tiny", num_hidden_layers=2, rr_embedding_dim=8))
    classifier = CATForAudioClassification(CATConfig.from_preset("cat-tiny", num_hidden_layers=2, num_labels=3))
    for model in (pretraining, classifier):
        groups = build_param_groups(model, learning_rate=1e-3, weight_decay=0.05)
        decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
        assert decay["cat.embeddings.cls_token"] == 0.05  # (1, 1, D): decayed, as the authors' data2vec 2.0 code
        assert decay["cat.layers.0.attention.q_proj.weight"] == 0.05
        assert decay["cat.layers.0.attention.q_proj.bias"] == 0.0 and decay["cat.layers.0.norm1.weight"] == 0.0
        assert all(group["lr"] == 1e-3 for group in groups)  # no layer decay unless asked
    trained = {name for group in build_param_groups(pretraining, learning_rate=1e-3, weight_decay=0.05)
               for name in group["names"]}
    assert not any(name.startswith("teacher.") for name in trained)  # the EMA teacher is not optimised
