"""Per-model overrides of the train section."""

from __future__ import annotations

import pytest

from mmrecall.config import ScheduleParams, TrainParams


def test_for_model_applies_only_that_models_overrides():
    tp = TrainParams(lr=1e-3, steps=400, overrides={"visualbert": {"lr": 2e-4, "schedule": {"amplitude": 0.0}}})
    vb, mcan = tp.for_model("visualbert"), tp.for_model("mcan")
    assert (vb.lr, vb.steps, vb.schedule) == (2e-4, 400, ScheduleParams(amplitude=0.0))
    assert (mcan.lr, mcan.schedule) == (1e-3, ScheduleParams())
    assert vb.overrides == {} and tp.lr == 1e-3  # a copy; the params themselves are untouched


def test_for_model_rejects_unknown_or_model_keys():
    with pytest.raises(ValueError, match="no_such"):
        TrainParams(overrides={"mcan": {"no_such": 1}}).for_model("mcan")
    with pytest.raises(ValueError, match="seeds"):
        TrainParams(overrides={"mcan": {"seeds": [1]}}).for_model("mcan")
