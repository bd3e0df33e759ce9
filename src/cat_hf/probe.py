"""Is a representation any good? Linear probes, the log-mel statistics baseline and effective rank.

- `effective_rank(embeddings)`: RankMe (Garrido et al., ICML 2023) of mean-centred embeddings, the exponential of
  the entropy of the normalised singular values: 1 when every clip maps to one line, up to min(N, D) when the
  variance is spread evenly. A collapsing self-supervised run shows it falling while its loss still falls.
- `LinearProbe`: features standardised with the training statistics, then an L2-penalised logistic regression
  (softmax for single-label, one sigmoid per class for multi-label), fitted to convergence with full-batch L-BFGS in
  float64 from zero: deterministic, no scikit-learn needed.
- `fit_probe(...)`: the L2 penalty chosen on a validation split from `WEIGHT_DECAYS`, the rule every result of the
  project uses, so that encoders and baselines are compared on equal terms.
- `log_mel_statistics(...)`: per clip, the mean and standard deviation of each mel bin over the clip's real frames:
  the baseline any audio encoder must beat (a logistic regression on it takes seconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: L2 penalties tried by `fit_probe` (the penalty is 0.5 * decay * |W|^2 added to the mean loss per clip).
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Added to the standard deviation when standardising, so constant features stay finite.
STANDARDISE_EPS = 1e-6


def effective_rank(embeddings: np.ndarray | torch.Tensor) -> float:
    """RankMe of (N, D) embeddings after subtracting their mean: exp(entropy of the singular values / their sum)."""
    x = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    x = x.detach().to(torch.float64).cpu()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"effective_rank needs (N >= 2, D) embeddings, got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError("effective_rank: the embeddings hold NaN or inf.")
    singular = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    total = singular.sum()
    if total <= 0:
        return 1.0  # every row equal: one point, rank 1 by convention
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _as_targets(labels: Sequence[Any] | np.ndarray, multi_label: bool) -> torch.Tensor:
    targets = torch.as_tensor(np.asarray(labels))
    if multi_label:
        if targets.ndim != 2:
            raise ValueError(f"multi-label targets must be (N, num_classes) multi-hot, got shape {tuple(targets.shape)}.")
        return targets.to(torch.float64)
    if targets.ndim != 1:
        raise ValueError(f"single-label targets must be (N,) class indices, got shape {tuple(targets.shape)}.")
    return targets.to(torch.long)


@dataclass
class LinearProbe:
    """Standardisation + L2-penalised logistic regression on frozen features.

    `fit(x, y)` takes (N, D) features and (N,) class indices or, with `multi_label=True`, (N, C) multi-hot targets.
    `num_classes` defaults to the largest index + 1 (single-label) or the number of columns (multi-label).
    """

    weight_decay: float = 1e-2
    multi_label: bool = False
    num_classes: int | None = None
    max_iter: int = 1000
    mean: np.ndarray | None = field(default=None, repr=False)
    std: np.ndarray | None = field(default=None, repr=False)
    weight: torch.Tensor | None = field(default=None, repr=False)
    bias: torch.Tensor | None = field(default=None, repr=False)

    def _standardised(self, x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"features must be (N, {len(self.mean)}), got shape {x.shape}.")
        return torch.from_numpy((x - self.mean) / self.std)

    def fit(self, x: np.ndarray, y: Sequence[Any] | np.ndarray) -> LinearProbe:
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("LinearProbe.fit: the features hold NaN or inf.")
        targets = _as_targets(y, self.multi_label)
        if len(targets) != len(x):
            raise ValueError(f"{len(x)} feature rows but {len(targets)} targets.")
        classes = self.num_classes or (targets.shape[1] if self.multi_label else int(targets.max()) + 1)
        self.num_classes = int(classes)
        self.mean, self.std = x.mean(0), x.std(0) + STANDARDISE_EPS
        inputs = self._standardised(x)
        weight = torch.zeros(x.shape[1], self.num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, history_size=20,
                                      tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = self._loss(inputs @ weight + bias, targets) + 0.5 * self.weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """(N, C) logits."""
        if self.weight is None:
            raise RuntimeError("LinearProbe: call fit() first.")
        return (self._standardised(x) @ self.weight + self.bias).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N,) class indices (single-label) or (N, C) 0/1 decisions at probability 0.5 (multi-label)."""
        logits = self.decision_function(x)
        return (logits > 0).astype(np.int64) if self.multi_label else logits.argmax(1)

    def score(self, x: np.ndarray, y: Sequence[Any] | np.ndarray) -> float:
        """Accuracy (single-label) or mAP (multi-label)."""
        return probe_metric(self.decision_function(x), y, self.multi_label)

    def loss(self, x: np.ndarray, y: Sequence[Any] | np.ndarray) -> float:
        return float(self._loss(torch.from_numpy(self.decision_function(x)), _as_targets(y, self.multi_label)))


def probe_metric(logits: np.ndarray, targets: Sequence[Any] | np.ndarray, multi_label: bool) -> float:
    """Accuracy of argmax (single-label) or mAP over the classes with a positive example (multi-label)."""
    if not multi_label:
        return float((np.asarray(logits).argmax(1) == np.asarray(targets)).mean())
    from .metrics.multilabel_tagging import average_precision

    targets = np.asarray(targets)
    scored = [average_precision(logits[:, c], targets[:, c] > 0) for c in range(targets.shape[1]) if targets[:, c].any()]
    return float(np.mean(scored)) if scored else float("nan")


@dataclass
class ProbeResult:
    """The probe with the best validation score, its test score, and every penalty tried."""

    metric: str  # "accuracy" or "mAP"
    validation: float
    test: float | None
    weight_decay: float
    probe: LinearProbe = field(repr=False)
    tried: dict[float, float] = field(default_factory=dict)  # weight decay -> validation score

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "validation": self.validation, "test": self.test,
                "weight_decay": self.weight_decay, "tried": {str(k): v for k, v in self.tried.items()}}


def fit_probe(train: tuple[np.ndarray, Any], validation: tuple[np.ndarray, Any],
              test: tuple[np.ndarray, Any] | None = None, *, multi_label: bool = False,
              num_classes: int | None = None, weight_decays: Iterable[float] = WEIGHT_DECAYS) -> ProbeResult:
    """Fit one probe per L2 penalty on `train`, keep the best on `validation` (ties: the lower validation loss),
    and score it on `test`. Each split is a (features, targets) pair."""
    if num_classes is None and not multi_label:
        num_classes = int(max(np.max(train[1]), np.max(validation[1]), np.max(test[1]) if test else 0)) + 1
    best, best_key, tried = None, None, {}
    for decay in weight_decays:
        probe = LinearProbe(weight_decay=decay, multi_label=multi_label, num_classes=num_classes).fit(*train)
        score = probe.score(*validation)
        tried[decay] = score
        key = (score, -probe.loss(*validation))
        if best_key is None or key > best_key:
            best, best_key = probe, key
    return ProbeResult(
        metric="mAP" if multi_label else "accuracy", validation=best_key[0],
        test=best.score(*test) if test is not None else None, weight_decay=best.weight_decay, probe=best, tried=tried,
    )


def log_mel_statistics(waveforms: Iterable[np.ndarray], feature_extractor: Any = None,
                       sampling_rate: int | None = None, batch_size: int = 32) -> np.ndarray:
    """(N, 2 * mel bins): each clip's per-bin mean and standard deviation of the normalised log-mel fbank over its
    real frames (a clip shorter than one 25 ms frame is padded to one). The extractor defaults to CAT's."""
    if feature_extractor is None:
        from .feature_extraction_cat import CATFeatureExtractor

        feature_extractor = CATFeatureExtractor()
    rate = sampling_rate or feature_extractor.sampling_rate
    rows: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if not batch:
            return
        out = feature_extractor(batch, sampling_rate=rate, padding="longest", return_attention_mask=True,
                                return_tensors="np")
        values, mask = out["input_values"].astype(np.float64), out["attention_mask"].astype(bool)
        for v, m in zip(values, mask):
            real = v[m] if m.any() else v[:1]
            rows.append(np.concatenate([real.mean(0), real.std(0)]))
        batch.clear()

    for wave in waveforms:
        wave = np.asarray(wave, dtype=np.float32)
        if len(wave) < 400:
            wave = np.pad(wave, (0, 400 - len(wave)))
        batch.append(wave)
        if len(batch) == batch_size:
            flush()
    flush()
    return np.stack(rows).astype(np.float32)


def log_mel_baseline(train: tuple[Sequence[np.ndarray], Any], evaluation: tuple[Sequence[np.ndarray], Any], *,
                     validation: tuple[Sequence[np.ndarray], Any] | None = None, multi_label: bool = False,
                     num_classes: int | None = None, feature_extractor: Any = None, sampling_rate: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """The baseline every result is reported beside: a logistic regression on each clip's log-mel mean and standard
    deviation (`log_mel_statistics`), fitted on `train` (waveforms, targets), its L2 penalty chosen on `validation`
    (or on a seeded fifth of `train` when none is given, then refitted on all of it), scored on `evaluation`.
    Returns {"metric", "score", "weight_decay", "num_train", "num_evaluated", "seconds"}."""
    import time

    start = time.perf_counter()

    def features(waves: Sequence[np.ndarray]) -> np.ndarray:
        return log_mel_statistics(waves, feature_extractor, sampling_rate)

    x_train, y_train = features(train[0]), np.asarray(train[1])
    if validation is not None:
        held_out = (features(validation[0]), np.asarray(validation[1]))
        fitted = (x_train, y_train)
    else:
        order = np.random.default_rng(seed).permutation(len(x_train))
        cut = max(1, len(order) // 5)
        held_out = (x_train[order[:cut]], y_train[order[:cut]])
        fitted = (x_train[order[cut:]], y_train[order[cut:]])
    x_eval, y_eval = features(evaluation[0]), np.asarray(evaluation[1])
    if num_classes is None and not multi_label:
        num_classes = int(max(y_train.max(), y_eval.max(), held_out[1].max())) + 1
    chosen = fit_probe(fitted, held_out, multi_label=multi_label, num_classes=num_classes)
    probe = chosen.probe
    if validation is None:  # refit on the whole training set with the chosen penalty
        probe = LinearProbe(chosen.weight_decay, multi_label, num_classes).fit(x_train, y_train)
    return {"metric": chosen.metric, "score": probe.score(x_eval, y_eval), "weight_decay": chosen.weight_decay,
            "num_train": len(x_train), "num_evaluated": len(x_eval),
            "seconds": round(time.perf_counter() - start, 1)}


__all__ = [
    "WEIGHT_DECAYS",
    "LinearProbe",
    "ProbeResult",
    "effective_rank",
    "fit_probe",
    "log_mel_baseline",
    "log_mel_statistics",
    "probe_metric",
]
