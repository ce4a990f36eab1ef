"""`mmrecall params show [--model M]`: the params every stage reads, or the train settings one model trains with.

A model's effective settings are built by the same functions training uses: `load_params` (which applies
best_params.yaml to train.overrides.<tune.model> when train.best_params is true), then
`TrainParams.for_model` (train.overrides.<model> on top of the train section), then the model's config
dataclass from train.<model> with its code defaults filled in.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from ..config import MODEL_SECTIONS, Params, load_params, to_dict, user_path
from ..models.registry import MODELS, model_config

log = logging.getLogger(__name__)


def layers(params: Params, model: str) -> list[str]:
    """The layers that set `model`'s train settings, lowest first."""
    out = ["params.yaml train"]
    if params.train.overrides.get(model):
        out.append(f"train.overrides.{model}")
    if params.train.best_params and params.tune.model == model:
        out.append(f"{params.tune.output} (train.best_params)")
    return out


def effective(params: Params, model: str) -> dict:
    """{train: the member's train settings, <model>: its architecture}, as training computes them."""
    tp = params.train.for_model(model)
    train = {k: v for k, v in to_dict(tp).items() if k not in ("models", "seeds", "overrides", "best_params", *MODEL_SECTIONS)}
    train["backbone_lr"] = tp.effective_backbone_lr  # null means "= lr": show the value the optimizer gets
    return {"train": train, model: to_dict(model_config(model, tp))}


def show(params: Params, model: str | None = None) -> str:
    """YAML text: the whole params, or the effective settings of `model` under a comment naming its layers."""
    if model is None:
        return yaml.safe_dump(to_dict(params), sort_keys=False)
    head = f"# {model}: {' + '.join(layers(params, model))}\n"
    return head + yaml.safe_dump(effective(params, model), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall params",
        description="Print params as the stages read them (YAML).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    show_parser = sub.add_parser(
        "show",
        help="print the loaded params, or one model's effective train settings",
        description="Without --model: every section of params.yaml as loaded (code defaults filled in, "
        "best_params.yaml applied when train.best_params is true). With --model M: the settings member M "
        "trains with: the train section, then train.overrides.M, then best_params.yaml when train.best_params "
        "is true and tune.model is M; backbone_lr shows the lr the backbone gets (null = lr); and M's "
        "architecture (train.M over the code defaults).",
    )
    show_parser.add_argument("--model", choices=sorted(MODELS), help="one model's effective train settings")
    show_parser.add_argument("--params", type=user_path, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    sys.stdout.write(show(load_params(args.params), args.model))
    return 0
