"""Training and scoring throughput of each model at the faithful size (configs/faithful.yaml), per precision.

    .venv/bin/python bench/bench_gpu.py --out bench/results/gpu.json          # on a GPU machine: ~10 min
    .venv/bin/python bench/bench_gpu.py --models mcan --steps 300 --precisions 16-mixed bf16-mixed
    .venv/bin/python bench/bench_gpu.py --tiny                                # tiny sizes: seconds on a CPU

For every model x precision: the member's settings from configs/faithful.yaml applied to a copy of
params.yaml (batch size, boxes, query length, lr, schedule, the model's architecture), random weights of
the same architecture (no hub access needed: models/backbone.py knows the roberta-large and
bert-large-uncased configs), and synthetic random batches (queries of 4-12 tokens, 1-max_boxes boxes per
image, mean ~4 like the real data). `--steps` optimizer steps through the project's TrainingModule (its
loss and optimizer) in the real Lightning Trainer on one device; the first 10 % are warm-up and not timed.
Reported: training samples/s (a sample = one (query, image) pair scored: two per triple for MCAN and
VisualBERT, one per row for the two-tower), peak GPU memory (torch.cuda.max_memory_allocated) of the
training, scoring pairs/s (no gradients, autocast, the eval batch size members.py scores with), and how
far the autocast scores of 256 pairs are from a float32 forward (largest difference in logit standard
deviations; share of 30-row groups with the same top 5).
Without a GPU it runs on the CPU (16-mixed is skipped there: Lightning supports it on GPUs only).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("16-mixed", "bf16-mixed")
# --tiny: the same architectures 32 wide (a random 1-layer BERT backbone) with small batches: seconds on a CPU.
TINY_MODELS = {
    "mcan": {"hidden": 32, "heads": 4, "ff": 64, "layers": 1, "flat_mlp": 16, "flat_out": 24, "img_mlp": 32},
    "visualbert": {"backbone_layers": 1},
    "two_tower": {"hidden": 32, "heads": 4, "ff": 64, "layers": 1},
}
TINY_TRAIN = {"batch_size": 4, "eval_batch_size": 16, "max_boxes": 5, "max_query_len": 12}


def faithful_params(tiny_backbone: Path | None = None):
    """params.yaml with configs/faithful.yaml applied (in a temporary copy); with `tiny_backbone` (a folder
    holding a small BERT config.json) the tiny sizes on top."""
    from mmrecall.config import apply_overlay

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(ROOT / "params.yaml", Path(tmp) / "params.yaml")
        params = apply_overlay(ROOT / "configs" / "faithful.yaml", Path(tmp) / "params.yaml")
    if tiny_backbone:
        overrides = {m: {**(o or {}), **TINY_TRAIN} for m, o in params.train.overrides.items()}
        sections = {m: {**getattr(params.train, m), **TINY_MODELS[m], "backbone": str(tiny_backbone)} for m in TINY_MODELS}
        params.train = dataclasses.replace(params.train, overrides=overrides, **sections)
    return params


def random_batch(n: int, max_len: int, max_boxes: int, vocab: int, g) -> dict:
    """n synthetic (query, image) rows in the model batch format: real tokens first, boxes padded with zeros."""
    import torch

    lengths = torch.randint(4, max(max_len, 5) + 1, (n,), generator=g)  # (n,) tokens incl. specials
    boxes = torch.randint(1, max_boxes + 1, (n,), generator=g).minimum(torch.poisson(torch.full((n,), 3.0), g).long() + 1)
    T, N = int(lengths.max()), int(boxes.max())
    text_mask = torch.arange(T)[None, :] < lengths[:, None]  # (n, T)
    img_mask = torch.arange(N)[None, :] < boxes[:, None]  # (n, N)
    return {
        "input_ids": torch.randint(3, vocab, (n, T), generator=g) * text_mask + (~text_mask) * 1,
        "attention_mask": text_mask.long(),
        "img_feat": torch.rand(n, N, 2048, generator=g).relu_() * img_mask[..., None],  # non-negative like ROI features
        "img_box": torch.rand(n, N, 6, generator=g) * img_mask[..., None],
        "img_label": torch.randint(0, 33, (n, N), generator=g) * img_mask,
        "img_mask": img_mask,
    }


def train_batches(name: str, tp, vocab: int, count: int):
    """`count` training batches: triples (pos, neg share the query) or the two-tower's positive pairs."""
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(count):
        pos = random_batch(tp.batch_size, tp.max_query_len, tp.max_boxes, vocab, g)
        if name == "two_tower":
            yield {"pos": pos, "query": torch.arange(tp.batch_size)}
        else:
            neg = random_batch(tp.batch_size, tp.max_query_len, tp.max_boxes, vocab, g)
            neg.update(input_ids=pos["input_ids"], attention_mask=pos["attention_mask"])
            yield {"pos": pos, "neg": neg}


def vocab_size(model) -> int:
    return next(m for n, m in model.named_modules() if n.endswith("word_embeddings")).num_embeddings


def run_one(name: str, precision: str, steps: int, params, accelerator: str, score_batches: int) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from mmrecall.models.registry import build_model, model_config
    from mmrecall.ranking import members
    from mmrecall.training.module import TrainingModule

    tp = dataclasses.replace(params.train.for_model(name), steps=steps, accelerator=accelerator, precision=precision)
    cfg = model_config(name, tp)
    cfg = dataclasses.replace(cfg, **{k: False for k in ("pretrained", "init_text_from_backbone") if hasattr(cfg, k)})
    L.seed_everything(0, verbose=False)
    model = build_model(name, cfg)
    vocab = vocab_size(model)
    module = TrainingModule(name, model, tp, seed=0)
    warmup = max(1, steps // 10)

    class Timer(L.Callback):
        seconds, samples = 0.0, 0

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step > warmup:
                self.samples += len(batch["pos"]["input_ids"]) * (2 if "neg" in batch else 1)
            if trainer.global_step == steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds = time.perf_counter() - self.started

    timer = Timer()
    cuda = accelerator == "gpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=DataLoader(list(train_batches(name, tp, vocab, steps)), batch_size=None))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    # scoring: what members.score_batches does (device, autocast, eval batch size), timed on synthetic rows
    device = members.scoring_device(accelerator)
    rows = members.eval_batch_size(tp.eval_batch_size, device)
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(rows, tp.max_query_len, tp.max_boxes, vocab, g) for _ in range(score_batches + 1)]
    model.eval().to(device)
    with torch.no_grad(), members.autocast(device, precision):
        for i, batch in enumerate(batches):
            if i == 1:  # the first batch warms up
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
            model({k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    if cuda:
        torch.cuda.synchronize()
    score_seconds = time.perf_counter() - started
    agreement = score_agreement(model, batches[0], device, precision)
    return {
        "model": name,
        "precision": precision,
        "device": str(device),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch_size": tp.batch_size,
        "max_boxes": tp.max_boxes,
        "steps": steps,
        "samples_per_s": round(timer.samples / timer.seconds, 1),
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "score_batch": rows,
        "score_pairs_per_s": round(rows * score_batches / score_seconds, 1),
        **agreement,
    }


def score_agreement(model, batch: dict, device, precision: str, rows: int = 256) -> dict:
    """How far the autocast scores of `rows` pairs are from a float32 forward on the same device: the largest
    difference in units of the logits' spread, and the share of 30-row groups whose top 5 is the same set."""
    import torch

    from mmrecall.ranking import members

    batch = {k: v[:rows].to(device) for k, v in batch.items()}
    with torch.no_grad():
        exact = model(batch).logits.float().cpu()
        with members.autocast(device, precision):
            mixed = model(batch).logits.float().cpu()
    groups = [(exact[i:i + 30], mixed[i:i + 30]) for i in range(0, len(exact) - 29, 30)]
    same_top5 = [set(e.topk(5).indices.tolist()) == set(m.topk(5).indices.tolist()) for e, m in groups]
    return {"score_max_diff_in_sd": round(float((exact - mixed).abs().max() / exact.std().clamp_min(1e-12)), 4),
            "score_same_top5": round(sum(same_top5) / len(same_top5), 3) if same_top5 else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mcan", "visualbert", "two_tower"])
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 300; 5 with --tiny)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=[*PRECISIONS, "32-true"])
    parser.add_argument("--score-batches", type=int, default=20, help="timed scoring batches per run")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and batches (CPU smoke run)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from mmrecall.models.backbone import tiny_config

    steps = args.steps or (5 if args.tiny else 300)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    if args.tiny:
        tiny_config(layers=1).to_json_file(tmp / "config.json")  # a random 32-wide BERT: built, never downloaded
    params = faithful_params(tmp if args.tiny else None)
    runs = []
    for name in args.models:
        for precision in args.precisions:
            if precision == "16-mixed" and accelerator == "cpu":
                runs.append({"model": name, "precision": precision, "skipped": "16-mixed needs a GPU"})
                continue
            runs.append(run_one(name, precision, steps, params, accelerator, args.score_batches))
            print(json.dumps(runs[-1]), file=sys.stderr)
            gc.collect()
            if accelerator == "gpu":
                torch.cuda.empty_cache()

    print("| model | precision | params (M) | batch | boxes | train samples/s | peak GPU (GiB) | score pairs/s "
          "| autocast vs fp32: max diff (sd) | same top 5 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "skipped" in r:
            print(f"| {r['model']} | {r['precision']} | {r['skipped']} | | | | | | | |")
        else:
            print(f"| {r['model']} | {r['precision']} | {r['params_m']} | {r['batch_size']} | {r['max_boxes']} | "
                  f"{r['samples_per_s']} | {r['peak_gpu_gib']} | {r['score_pairs_per_s']} "
                  f"| {r['score_max_diff_in_sd']} | {r['score_same_top5']} |")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        device = torch.cuda.get_device_name() if accelerator == "gpu" else platform.processor() or platform.machine()
        meta = {"device": device, "torch": torch.__version__, "tiny": args.tiny, "steps": steps}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
