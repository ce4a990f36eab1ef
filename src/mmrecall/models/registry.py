"""The model registry: a model's name in params (`train.models`) -> its class and config dataclass.

    cfg = model_config("mcan", params.train.for_model("mcan"))   # MCANConfig from params train.mcan
    model = build_model("mcan", cfg)                              # reads the pretrained backbone weights
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import ParamsError, TrainParams
from .mcan import MCAN, MCANConfig
from .neighbour_words import NeighbourWords, NeighbourWordsConfig
from .two_tower import TwoTower, TwoTowerConfig
from .visualbert import VisualBERT, VisualBERTConfig
from .word_detector import WordDetector, WordDetectorConfig

MODELS = {
    "mcan": (MCAN, MCANConfig),
    "visualbert": (VisualBERT, VisualBERTConfig),
    "two_tower": (TwoTower, TwoTowerConfig),
    "word_detector": (WordDetector, WordDetectorConfig),
    "neighbour_words": (NeighbourWords, NeighbourWordsConfig),
}


def model_config(name: str, params: TrainParams):
    """The config dataclass of model `name` with the values of params `train.<name>`."""
    if name not in MODELS:
        raise ParamsError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    cls = MODELS[name][1]
    overrides = getattr(params, name)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(overrides) - known):
        raise ParamsError(f"params.yaml train.{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**overrides)


def build_model(name: str, cfg) -> nn.Module:
    return MODELS[name][0].from_config(cfg)
