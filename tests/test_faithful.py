"""configs/faithful.yaml: applied with one command, and every model builds at the original sizes and
trains a few steps on CPU with random weights (no hub access: the backbone architectures are known)."""

from __future__ import annotations

import dataclasses
import gc
import shutil

import numpy as np
import pytest
import torch

from mmrecall.config import apply_overlay, load_params
from mmrecall.data.batching import QueryTokens, image_batch
from mmrecall.data.store import FeatureStore
from mmrecall.models.backbone import load_tokenizer
from mmrecall.models.registry import build_model, model_config
from mmrecall.models.two_tower import in_batch_loss
from mmrecall.stages import prepare
from mmrecall.training.losses import focal_loss_with_logits

from .conftest import ROOT


@pytest.fixture
def faithful(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overlay(ROOT / "configs" / "faithful.yaml", params)
    return params


def test_apply_keeps_comments_and_sets_the_original_sizes(faithful):
    text = faithful.read_text()
    assert "# One section per stage" in text  # round-trip: the comments of params.yaml survive
    tp = load_params(faithful).train
    assert (tp.batch_size, tp.lr, tp.negatives, tp.random_negatives, tp.max_boxes) == (64, 1e-5, 10, 0.0, 30)
    assert tp.mcan["backbone"] == "roberta-large" and tp.mcan["layers"] == 12 and tp.mcan["hidden"] == 1024
    assert tp.visualbert["backbone"] == "bert-large-uncased"
    # the CPU default freezes the word embeddings; the original fine-tuned them in every model
    assert all(getattr(tp, m)["train_word_embeddings"] for m in ("mcan", "visualbert", "two_tower"))
    two = tp.for_model("two_tower")
    assert (two.batch_size, two.lr, two.weight_decay, two.two_tower["hidden"]) == (512, 2e-5, 0.0, 768)
    assert tp.for_model("visualbert").lr == 1e-5  # the CPU overrides are replaced, not kept


def test_bad_overlay_leaves_params_untouched(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  no_such_key: 1\n")
    before = params.read_text()
    with pytest.raises(Exception, match="no_such_key"):
        apply_overlay(bad, params)
    assert params.read_text() == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mcan", "visualbert", "two_tower"])
def test_faithful_model_trains_a_few_steps_on_cpu(name, faithful, micro_copy, monkeypatch):
    monkeypatch.chdir(micro_copy.parent)
    prepare.main(["--split", "valid", "--no-progress"])
    store = FeatureStore.open("features/valid")
    tp = load_params(faithful).train.for_model(name)
    cfg = model_config(name, tp)
    if hasattr(cfg, "pretrained"):
        cfg = dataclasses.replace(cfg, pretrained=False)  # random weights: no hub here
    torch.manual_seed(0)
    model = build_model(name, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > {"mcan": 400e6, "visualbert": 300e6, "two_tower": 80e6}[name]  # two_tower: 52M text + 31M image (no word table)

    rows = np.arange(4)
    tokens = QueryTokens.build(store.rows.query_clean.iloc[rows].tolist(), load_tokenizer(), tp.max_query_len)
    batch = {**tokens.batch(rows), **image_batch(store, rows, tp.max_boxes)}
    opt = torch.optim.AdamW(model.parameters(), lr=tp.lr)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad][-1]
    for _ in range(2):
        if name == "two_tower":
            loss = in_batch_loss(model.encode_text(batch), model.encode_image(batch))
        else:
            logits = model(batch).logits
            loss = focal_loss_with_logits(logits, torch.tensor([1.0, 0.0, 0.0, 1.0]), tp.focal_alpha, tp.focal_gamma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    after = [p for p in model.parameters() if p.requires_grad][-1]
    assert not torch.equal(before, after)
    del model, opt
    gc.collect()
