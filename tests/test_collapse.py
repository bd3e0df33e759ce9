"""Collapse monitoring of pretraining: target/prediction variances and effective rank are logged, and the guard
stops a run that collapses (real runs of a micro CAT on real wav files)."""

from __future__ import annotations

import json

import pytest

from cat_hf.collapse import CollapseError, CollapseGuard
from cat_hf.pretrain import CHECKPOINTS_DIR, METRICS_FILE, PretrainConfig, pretrain

from test_pretrain import MICRO, _write_corpus

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _config(corpus, out, **overrides) -> PretrainConfig:
    values = {**MICRO, "data": str(corpus), "output_dir": str(out), "clip_seconds": 1.28, "progress_bar": False,
              "report_to": "none", "save_every": 0, "warmup_steps": 0, "monitor_every": 5, "monitor_clips": 8}
    return PretrainConfig.from_yaml("tiny").with_overrides({**values, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("collapse-corpus") / "audio", count=12, bad=False)


def test_guard_warns_once_then_stops_after_its_patience():
    guard = CollapseGuard(min_target_var=0.1, min_pred_var=0.01, min_effective_rank=2.0, patience=3, check_after=10)
    assert guard.update(5, {"target_var": 0.0}) == ([], None)  # before check_after: not counted
    warnings, stop = guard.update(10, {"target_var": 0.05, "pred_var": 0.5})
    assert stop is None and len(warnings) == 1 and "min_target_var" in warnings[0]
    assert guard.update(11, {"target_var": 0.05, "pred_var": 0.5}) == ([], None)  # warned once
    _, stop = guard.update(12, {"target_var": 0.05, "pred_var": 0.5})
    assert stop is not None and "target_var below 0.1 since step 10" in stop and "ema_decay" in stop
    # a value back above its minimum resets the count
    guard = CollapseGuard(patience=3, check_after=0)
    guard.update(1, {"target_var": 0.05})
    guard.update(2, {"target_var": 0.5})
    assert guard.update(3, {"target_var": 0.05})[1] is None and guard.update(4, {"target_var": 0.05})[1] is None
    # the rank, measured every few steps, keeps its verdict in between
    guard = CollapseGuard(patience=20, check_after=0)
    guard.update(100, {"effective_rank_mean": 1.5})
    assert guard.update(110, {"target_var": 1.0})[1] is None
    assert "effective_rank_mean below 2 since step 100" in guard.update(120, {"target_var": 1.0})[1]
    # warn-only and off
    assert CollapseGuard(patience=1, check_after=0, mode="warn").update(1, {"pred_var": 0.0})[1] is None
    assert CollapseGuard(patience=1, check_after=0, mode="off").update(1, {"pred_var": 0.0}) == ([], None)
    with pytest.raises(ValueError, match="collapse_guard"):
        CollapseGuard(mode="sometimes")


def test_variances_and_effective_rank_are_logged(corpus, tmp_path):
    result = pretrain(_config(corpus, tmp_path / "out", max_steps=10))
    records = [json.loads(line) for line in (tmp_path / "out" / METRICS_FILE).read_text().splitlines()]
    assert all(r["target_var"] > 0 and r["pred_var"] > 0 for r in records)
    ranked = [r["step"] for r in records if "effective_rank" in r]
    assert ranked == [5, 10]
    assert all(1.0 <= r["effective_rank_mean"] <= 8 and "effective_rank_cls" in r for r in records if "effective_rank" in r)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["final_effective_rank"] == pytest.approx(records[-1]["effective_rank"], abs=1e-3)
    assert result["finished"]


def test_a_collapsing_run_is_stopped_with_its_checkpoint_kept(corpus, tmp_path):
    # Without RR, a teacher that copies the student after every step (EMA decay 0) with a large learning rate: within a
    # few dozen steps every clip gets nearly the same embedding while the loss still falls (what the guard is for).
    collapsing = dict(max_steps=300, learning_rate=5e-3, collapse_check_after=0, collapse_patience=5, rr_encoder="none",
                      **{"model.ema_decay": 0.0, "model.ema_end_decay": 0.0})
    out = tmp_path / "collapse"
    with pytest.raises(CollapseError, match="collapsed") as caught:
        pretrain(_config(corpus, out, **collapsing))
    message = str(caught.value)
    assert "ema_decay" in message and "--resume" in message and "saved in" in message
    checkpoints = sorted((out / CHECKPOINTS_DIR).iterdir())
    assert checkpoints, "the state at the stop is kept"
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    ranks = [r["effective_rank_mean"] for r in records if "effective_rank_mean" in r]
    assert records[-1]["step"] < 300 and ranks[-1] < 2.0 and "effective_rank_mean below 2" in message
    assert int(checkpoints[-1].name.split("-")[1]) == records[-1]["step"]
    # the same run with the guard set to warn goes on
    warned = pretrain(_config(corpus, tmp_path / "warned", **{**collapsing, "max_steps": records[-1]["step"] + 5,
                                                              "collapse_guard": "warn"}))
    assert warned["finished"]
