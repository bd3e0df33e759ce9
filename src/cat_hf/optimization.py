"""How the training loops optimise: AdamW parameter groups, the warm-up + cosine schedule, the EMA teacher update.

Parameter groups follow the authors' code (data2vec 2.0 / EAT, pretraining and finetuning alike): weight decay on
weight matrices and kernels, none on biases and 1-D parameters (norms). The CLS token, a (1, 1, D) parameter, is
decayed; the positions are a fixed buffer. Finetuning adds layer-wise learning-rate decay as the original assigns
it (data2vec 2.0's "multi" branch of `EAT_audio_classification.py`): with L blocks, block i (0-based) gets
`lr * decay ** (L - i)`; everything outside the blocks (stem, CLS token, context LayerNorm, fc_norm, classifier)
keeps the full rate, or with `decay_stem` the BEiT rule (stem, CLS token, context norm at `decay ** (L + 1)`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from .training_config import ConfigError

_BLOCK_PATTERN = re.compile(r"(?:^|\.)cat\.layers\.(\d+)\.")
_STEM_PATTERN = re.compile(r"(?:^|\.)cat\.embeddings\.")


def layer_lr_scale(name: str, num_layers: int, layer_decay: float, decay_stem: bool = False) -> float:
    """Learning-rate multiplier of a parameter (the rule is in the module docstring)."""
    if layer_decay == 1.0:
        return 1.0
    block = _BLOCK_PATTERN.search(name)
    if block is not None:
        return layer_decay ** (num_layers - int(block.group(1)))
    if decay_stem and _STEM_PATTERN.search(name):
        return layer_decay ** (num_layers + 1)
    return 1.0


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """No weight decay on biases and 1-D parameters (LayerNorm weights), as the original."""
    return parameter.ndim > 1 and not name.endswith(".bias")


def build_param_groups(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    num_layers: int | None = None,
    decay_stem: bool = False,
    lora_plus_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    """One AdamW group per (lr scale, weight decay on/off) over the trainable parameters (a frozen EMA teacher is
    left out), largest scale first. `lora_plus_ratio` is LoRA+'s lambda (Hayou et al., 2024): the LoRA B matrices
    learn that many times faster than the A matrices. Each group lists its parameters' `names`."""
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = layer_lr_scale(name, num_layers or 0, layer_decay, decay_stem)
        if ".lora_B." in name:
            scale *= lora_plus_ratio
        decay = uses_weight_decay(name, parameter)
        group = groups.setdefault((scale, decay), {
            "params": [], "names": [], "lr": learning_rate * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0,
        })  # fmt: skip
        group["params"].append(parameter)
        group["names"].append(name)
    if not groups:
        raise ConfigError("The model has no trainable parameters; check the lora / linear_probe settings.")
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def adamw(groups: Sequence[dict[str, Any]], *, learning_rate: float, betas: tuple[float, float],
          eps: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, as fairseq's Adam) over `build_param_groups` groups."""
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=learning_rate,
                             betas=betas, eps=eps)


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float,
                  start_ratio: float | None = None) -> float:
    """Learning-rate factor at `step`: linear from `start_ratio` (default: `min_ratio`) to 1 over the warm-up, then
    half a cosine down to `min_ratio` at `max_steps`."""
    start = min_ratio if start_ratio is None else start_ratio
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _factor_from(offset: int, step: int, **schedule: Any) -> float:
    return warmup_cosine(step + offset, **{**schedule, "warmup_steps": schedule["warmup_steps"] + offset,
                                           "max_steps": schedule["max_steps"] + offset})


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                           min_ratio: float = 0.0, start_ratio: float | None = None,
                           offset: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine` as a scheduler stepped once per optimiser update. `offset` is the schedule position of the
    first update: finetuning's starts at `start_ratio` (offset 0); pretraining's recipe counts its updates from 1,
    so its first update already gets lr / (warmup_steps + 1) (offset 1, start_ratio 0)."""
    factor = functools.partial(_factor_from, offset, warmup_steps=warmup_steps, max_steps=max_steps,
                               min_ratio=min_ratio, start_ratio=start_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student over the student's trainable tensors, as one fused
    `torch._foreach_lerp_`; frozen parameters and buffers are copied (one `torch._foreach_copy_`). The teacher
    keeps its dtype (fp32 under mixed precision)."""
    student_parameters = dict(student.named_parameters())
    moving, targets, fixed, sources = [], [], [], []
    for name, parameter in teacher.named_parameters():
        source = student_parameters[name].detach()
        if source.dtype != parameter.dtype:
            source = source.to(parameter.dtype)
        if student_parameters[name].requires_grad:
            moving.append(parameter)
            targets.append(source)
        else:
            fixed.append(parameter)
            sources.append(source)
    student_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        fixed.append(buffer)
        sources.append(student_buffers[name])
    if moving:
        torch._foreach_lerp_(moving, targets, 1.0 - decay)
    if fixed:
        torch._foreach_copy_(fixed, sources)


__all__ = [
    "adamw",
    "build_param_groups",
    "ema_update",
    "layer_lr_scale",
    "uses_weight_decay",
    "warmup_cosine",
    "warmup_cosine_schedule",
]
