"""Mixed precision and devices: masking that fits every float dtype, each model through the real Lightning
Trainer with bf16-mixed on CPU (16-mixed, the faithful setting, needs a GPU: bench/bench_gpu.py runs it
there), and where trained members score (ranking/members.py)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from mmrecall.config import load_params
from mmrecall.data.batching import EvalBatches
from mmrecall.data.store import FeatureStore
from mmrecall.models.backbone import backbone_path, tiny_config
from mmrecall.models.image_input import NEG_INF, mask_value, masked_softmax
from mmrecall.models.mcan import MCAN, AttFlat, MCANConfig, MultiHeadAttention
from mmrecall.ranking import members
from mmrecall.ranking.members import copy_tokenizer_files
from mmrecall.stages import pools, prepare
from mmrecall.training import fit

# -- masking in half precision ------------------------------------------------------------------------------


def test_mask_value_fits_the_dtype_and_keeps_float32_numbers():
    assert mask_value(torch.float32) == mask_value(torch.bfloat16) == NEG_INF  # unchanged where -1e9 fits
    assert mask_value(torch.float16) == torch.finfo(torch.float16).min == -65504
    with pytest.raises(RuntimeError, match="overflow"):  # what -1e9 did under 16-mixed
        torch.zeros(2, dtype=torch.float16).masked_fill(torch.tensor([True, False]), NEG_INF)


def half_inputs(seed: int = 0):
    """Keys of 3 rows: 4 real, 1 real + 3 padded, and all 4 padded (a batch's empty image)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # (B, Tk)
    return torch.randn(3, 4, 16, generator=g).half(), mask


def test_half_precision_masked_softmax_gives_padding_no_weight():
    logits = (torch.randn(3, 4) * 100).half()  # (B, T), scores far from 0
    mask = half_inputs()[1]
    w = masked_softmax(logits, mask)
    assert w.dtype == torch.float16 and torch.isfinite(w).all()
    assert (w[:2][~mask[:2]] == 0).all()
    torch.testing.assert_close(w[:2].float().sum(-1), torch.ones(2), atol=2e-3, rtol=0)
    assert torch.isfinite(w[2]).all()  # a fully padded row: uniform, not NaN


def test_half_precision_mcan_attention_and_attflat():
    torch.manual_seed(0)
    cfg = MCANConfig(hidden=16, heads=4, flat_mlp=8, flat_out=12)
    att, flat = MultiHeadAttention(cfg).half().eval(), AttFlat(cfg).half().eval()
    x, mask = half_inputs()
    with torch.no_grad():
        out = att(x, x, x, mask)  # (B, Tq, H)
        pooled = flat(x, mask)  # (B, flat_out)
        # padded keys get no weight: changing them changes nothing
        noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 1e3)
        out_noisy, pooled_noisy = att(x, noisy, noisy, mask), flat(noisy, mask)
    assert out.dtype == pooled.dtype == torch.float16
    assert torch.isfinite(out).all() and torch.isfinite(pooled).all()
    torch.testing.assert_close(out_noisy[:2], out[:2])
    torch.testing.assert_close(pooled_noisy[:2], pooled[:2])


# -- each model through the Lightning Trainer with bf16-mixed -----------------------------------------------

TINY = {
    "mcan": {"hidden": 32, "heads": 4, "ff": 64, "layers": 1, "flat_mlp": 16, "flat_out": 24, "img_mlp": 32},
    "visualbert": {"backbone": "tiny-bert", "pretrained": False},  # bf16 matmuls are slow on CPUs: a 32-wide BERT
    "two_tower": {"hidden": 32, "heads": 4, "ff": 64, "layers": 1, "init_text_from_backbone": False, "loss": "bce"},
}


@pytest.fixture(scope="module")
def prepared(micro_data, tmp_path_factory):
    """The micro data's feature stores, prepared once for this module, and tiny-bert/: a random 32-wide BERT
    folder (config + the shipped MiniLM's tokenizer files)."""
    root = tmp_path_factory.mktemp("bf16")
    shutil.copytree(micro_data, root / "data")
    tiny_config(layers=1).to_json_file(copy_tokenizer_files(backbone_path(), root / "tiny-bert") / "config.json")
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}}))
    here = os.getcwd()
    os.chdir(root)
    try:
        for split in ("train", "valid"):
            prepare.main(["--split", split, "--no-progress"])
        pools.main([])
    finally:
        os.chdir(here)
    return root


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_mixed_training_through_the_trainer(name, prepared, monkeypatch):
    monkeypatch.chdir(prepared)
    train = {"steps": 3, "eval_every": 3, "batch_size": 8, "negatives": 2, "eval_batch_size": 64, "max_boxes": 5,
             "precision": "bf16-mixed", "overrides": {}, name: TINY[name]}
    (prepared / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}, "data": {"eval_splits": ["valid"]},
                                                          "train": train}))
    setup = fit.build_data(name, 1, load_params())
    before = [p.detach().clone() for p in setup.model.parameters() if p.requires_grad]
    trainer, _ = fit.build_trainer(setup, prepared / "checkpoints" / name, progress=False)
    fit.train(setup, trainer)
    assert trainer.global_step == 3 and trainer.precision == "bf16-mixed"
    assert math.isfinite(float(trainer.callback_metrics["loss"]))
    assert 0.0 <= float(trainer.callback_metrics["ndcg_at_5"]) <= 1.0  # the valid pass ran under autocast too
    after = [p for p in setup.model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(after) // 2  # most weights moved


# -- where members score ------------------------------------------------------------------------------------


def test_scoring_device_follows_the_accelerator():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [members.scoring_device(a, cuda_available=True) for a in ("gpu", "auto", "cuda", "cpu")] == [cuda, cuda, cuda, cpu]
    assert [members.scoring_device(a, cuda_available=False) for a in ("gpu", "auto", "cpu")] == [cpu, cpu, cpu]
    assert members.scoring_device("gpu") == (cuda if torch.cuda.is_available() else cpu)
    assert (members.eval_batch_size(256, cpu), members.eval_batch_size(256, cuda)) == (256, 256 * members.GPU_EVAL_BATCH_FACTOR)
    assert isinstance(members.autocast(cpu, "16-mixed"), contextlib.nullcontext)  # the CPU scores in float32
    assert isinstance(members.autocast(cuda, "32-true"), contextlib.nullcontext)


def test_cpu_scoring_is_a_plain_float32_forward(prepared, tmp_path):
    """A member trained for a GPU, loaded on a machine without one, scores on the CPU exactly as a plain forward."""
    cfg = MCANConfig(**TINY["mcan"], pretrained=False)
    torch.manual_seed(0)
    model = MCAN.from_config(cfg).eval()
    path = tmp_path / "model.pt"
    members.save(path, "mcan", cfg, model, {"train": {"accelerator": "gpu", "precision": "16-mixed", "eval_batch_size": 64,
                                                       "max_query_len": 16, "max_boxes": 5}})
    member = members.load(path, accelerator="cpu" if torch.cuda.is_available() else None)
    assert (member.device, member.batch_size, member.precision) == (torch.device("cpu"), 64, "16-mixed")
    store = FeatureStore.open(prepared / "features" / "valid")
    table, fused = members.score(member, store)
    batches = EvalBatches(store, member.tokenizer, 16, 64, 5)
    with torch.no_grad():
        plain = torch.cat([model(batch).logits for batch in batches]).numpy()
    np.testing.assert_array_equal(table.score.to_numpy(), plain)
    assert fused.dtype == np.float16 and len(fused) == len(store)
