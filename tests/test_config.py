"""params.yaml: per-model overrides of the train section, one source of defaults, finding the file."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from mmrecall.config import Params, ParamsError, ScheduleParams, TrainParams, load_params

from .conftest import ROOT


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


# --- one source of defaults --------------------------------------------------------------------------


def test_params_yaml_restates_the_code_defaults():
    """The dataclasses hold the defaults; params.yaml must say the same (a drift fails here, not in a run)."""
    from mmrecall.models.registry import MODELS, model_config

    from_file, code = load_params(ROOT / "params.yaml", apply_best=False), Params()
    for name in MODELS:  # the model sections restate (a subset of) the model config defaults
        assert model_config(name, from_file.train) == model_config(name, code.train) == MODELS[name][1](), name
    strip = {name: {} for name in MODELS}
    assert replace(from_file, train=replace(from_file.train, **strip)) == replace(code, train=replace(code.train, **strip))


def test_load_params_finds_the_repository_file_or_says_why(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"steps": 7}}))
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    assert load_params().train.steps == 7  # found in a parent folder, never silently the code defaults

    monkeypatch.chdir(tmp_path.parent)
    (tmp_path.parent / "params.yaml").unlink(missing_ok=True)
    with pytest.raises(ParamsError, match="no params.yaml in"):
        load_params()
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
