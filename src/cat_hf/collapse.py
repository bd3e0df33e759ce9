"""Seeing representation collapse in bootstrap pretraining, and stopping a run that has collapsed.

A student that regresses an EMA teacher can satisfy its loss by mapping every input to nearly the same output: the
loss keeps falling while the representation loses everything a classifier needs. Three numbers show it:

- `target_var` / `pred_var`, as data2vec 2.0 and EAT log them: the mean over channels of the standard deviation,
  across the masked patches of the batch, of the teacher targets and of the decoder's predictions. They fall
  towards 0 when the teacher (or the student) gives every patch the same vector.
- `effective_rank`: RankMe (`cat_hf.probe.effective_rank`) of the student's clip embeddings (the pooling its config
  exports; also `effective_rank_cls` and `effective_rank_mean` for the CLS token and the mean of the patch tokens)
  on a fixed batch of clips that never changes during the run, every `monitor_every` steps. A randomly initialised
  cat-tiny scores 20-60 on a few hundred real clips; a collapsed one 1-3.

`CollapseGuard` watches them (the rank of the mean of the patch tokens, the representation every downstream use
reads: the CLS token's rank is low in every run, its utterance target being nearly the same for every clip). A value
below its minimum (`min_target_var`, `min_pred_var`, `min_effective_rank`) is
reported once as a warning; when it stays below for `collapse_patience` consecutive steps (checks, for the rank)
the guard asks the loop to stop with a checkpoint and a `CollapseError` that names the likely cause and the
settings to change. The guard only counts from `collapse_check_after` steps on, past the warm-up where a young
teacher's statistics move fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .probe import effective_rank

#: The data2vec 2.0 form of the variance: the std of every channel across rows, averaged over channels.
_VAR_EPS = 1e-6


class CollapseError(ValueError):
    """Pretraining stopped because the representation collapsed; the message says why and what to change."""


def channel_std(rows: torch.Tensor) -> float:
    """Mean over channels of the standard deviation across rows of a (..., C) tensor (data2vec 2.0's `compute_var`)."""
    rows = rows.detach().float().reshape(-1, rows.shape[-1])
    if rows.shape[0] < 2:
        return float("nan")
    return float(torch.sqrt(rows.var(dim=0) + _VAR_EPS).mean())


def prediction_variances(output: Any) -> dict[str, float]:
    """`target_var` and `pred_var` of a `CATForPreTrainingOutput`, over the masked patches of all clones."""
    mask = output.mask.bool()
    clones = mask.shape[0] // output.targets.shape[0]
    targets = output.targets.detach().repeat_interleave(clones, dim=0)[mask]
    predictions = output.decoder_output.detach()[mask]
    return {"target_var": channel_std(targets), "pred_var": channel_std(predictions)}


@torch.no_grad()
def embedding_ranks(encoder: torch.nn.Module, input_values: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """RankMe of the CLS token, of the mean of the patch tokens, and of the pooling the model's config exports
    (`effective_rank`), over a batch of inputs."""
    was_training = encoder.training
    encoder.eval()
    pooled: dict[str, list[torch.Tensor]] = {"effective_rank": [], "effective_rank_cls": [], "effective_rank_mean": []}
    try:
        for chunk in input_values.split(batch_size):
            out = encoder(input_values=chunk, return_dict=True)
            pooled["effective_rank"].append(out.pooler_output.float().cpu())
            pooled["effective_rank_cls"].append(out.last_hidden_state[:, 0].float().cpu())
            pooled["effective_rank_mean"].append(
                out.last_hidden_state[:, encoder.config.num_extra_tokens:].mean(1).float().cpu())
    finally:
        encoder.train(was_training)
    return {name: effective_rank(torch.cat(rows)) for name, rows in pooled.items()}


@dataclass
class CollapseGuard:
    """Counts how long each monitored value has stayed below its minimum; decides when to warn and when to stop.

    `mode`: "stop" (warn, then stop after `patience`), "warn" (warn only) or "off".
    """

    min_target_var: float | None = 0.1
    min_pred_var: float | None = 0.01
    min_effective_rank: float | None = 2.0
    patience: int = 200
    check_after: int = 500
    mode: str = "stop"
    _below_since: dict[str, int] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.mode not in ("stop", "warn", "off"):
            raise ValueError(f"collapse_guard must be 'stop', 'warn' or 'off', got {self.mode!r}.")
        if self.patience < 1:
            raise ValueError(f"collapse_patience must be >= 1 step, got {self.patience}.")

    def minima(self) -> dict[str, float]:
        limits = {"target_var": self.min_target_var, "pred_var": self.min_pred_var,
                  "effective_rank_mean": self.min_effective_rank}
        return {name: float(value) for name, value in limits.items() if value is not None}

    def update(self, step: int, record: Mapping[str, Any]) -> tuple[list[str], str | None]:
        """(new warnings, stop message or None) after the metrics `record` of `step`."""
        if self.mode == "off" or step < self.check_after:
            return [], None
        warnings, failing = [], []
        for name, minimum in self.minima().items():
            if name not in record:
                continue  # the rank is measured every monitor_every steps only: its last verdict stands
            value = float(record[name])
            if value < minimum:
                first = self._below_since.setdefault(name, step)
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.append(f"step {step}: {name} = {value:.4g} is below {_setting(name)} = {minimum:g}; "
                                    f"{_cause(name)}")
            else:
                self._below_since.pop(name, None)
        for name, first in self._below_since.items():
            if step - first + 1 >= self.patience:
                failing.append(name)
        if self.mode != "stop" or not failing:
            return warnings, None
        details = ", ".join(f"{name} below {self.minima()[name]:g} since step {self._below_since[name]}"
                            for name in failing)
        return warnings, (
            f"pretraining stopped at step {step}: the representation collapsed ({details}). Likely cause: the EMA "
            "teacher follows the student too closely, or the learning rate is too high for this corpus, so every clip "
            "is mapped to nearly the same vector while the loss still falls. Change: a slower teacher "
            "(--set model.ema_decay=0.999 --set model.ema_end_decay=0.9999), a lower --set learning_rate, or "
            "Representation Regularization toward a pretrained frozen encoder (--rr-encoder aisfx). To continue "
            "anyway: --resume with --set collapse_guard=warn."
        )

    # -- state in checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"below_since": dict(self._below_since), "warned": sorted(self._warned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._below_since = {str(k): int(v) for k, v in dict(state.get("below_since", {})).items()}
        self._warned = set(state.get("warned", []))


def _setting(name: str) -> str:
    return {"target_var": "min_target_var", "pred_var": "min_pred_var",
            "effective_rank_mean": "min_effective_rank"}[name]


def _cause(name: str) -> str:
    if name == "target_var":
        return "the teacher gives nearly the same target to every patch (teacher collapse)."
    if name == "pred_var":
        return "the student predicts nearly the same vector for every patch."
    return "the student's clip embeddings span very few directions (embedding collapse)."


__all__ = ["CollapseError", "CollapseGuard", "channel_std", "embedding_ranks", "prediction_variances"]
