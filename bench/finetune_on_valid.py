"""Fine-tune a finished run's word detector on valid's labelled candidates, honestly, and refit the re-ranker on it.

    .venv/bin/python bench/finetune_on_valid.py WORLD EXP [--lr 1e-4] [--epochs 3] [--folds 5] [--add]

Valid is the only split with real negatives, near-misses among them, and the members never see it: only stage 2
learns from it. This prototype asks whether the word detector itself can. Valid's queries are split into `folds`
(seeded); for each fold a copy of WORLD's word detector (models/word_detector/seed1) is fine-tuned on the other
folds' queries with a listwise loss (softmax over a query's candidates, its answers the targets) and scores the
held-out fold: so every valid row is scored by a model that never saw its query (out of fold). testA is scored by a
copy fine-tuned on all of valid. EXP is a folder beside WORLD, as bench/retrain_word_detector.sh makes it (data,
features, pools and models linked; the other members' outputs copied): the fine-tuned tables replace the word
detector's (or, with --add, join as a member `wdft-seed1`), then `mmrecall rerank` refits stage 2 there. Prints the
member's and the re-ranker's NDCG@5; testA is reported, not for choosing. BENCHMARKS.md ("Fine-tuning the word
detector on valid") has what it gave.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from mmrecall.data.batching import QueryTokens, image_batch
from mmrecall.data.store import FeatureStore
from mmrecall.ranking import members, outputs
from mmrecall.ranking.metrics import evaluate_scores, read_metrics

MEMBER = "word_detector-seed1"
SHARPNESS = 4.0  # the listwise softmax reads 4 x the member's score (a mean log-probability: near-misses differ by ~1)
QUERIES_PER_STEP = 8


def listwise_loss(score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a query's (n,) candidate scores against its answers (n,) 0/1, spread evenly over them."""
    return -(F.log_softmax(score * SHARPNESS, 0) * label).sum() / label.sum()


class ValidQueries:
    """valid's candidates grouped by query, as model batches, with their 0/1 labels."""

    def __init__(self, store: FeatureStore, member: members.Member):
        rows, answers = store.rows, store.answers
        self.query_of_row = rows.query_id.to_numpy()
        self.queries = np.unique(self.query_of_row)
        texts = rows.query_clean.tolist()
        label = np.array([p in answers.get(q, ()) for q, p in zip(self.query_of_row, rows.product_id)], np.float32)
        self.batches = {}
        for q in self.queries:
            r = np.flatnonzero(self.query_of_row == q)
            if label[r].sum() == 0:  # nothing to learn from a query without answers among its rows
                continue
            tokens = QueryTokens.encode([texts[r[0]]] * len(r), member.tokenizer, member.max_query_len)
            self.batches[q] = ({**tokens, **image_batch(store, r, member.max_boxes, member.box_select)},
                               torch.from_numpy(label[r]))

    def finetune(self, model: torch.nn.Module, queries: np.ndarray, lr: float, epochs: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        queries = [q for q in queries if q in self.batches]
        for _ in range(epochs):
            for step in np.array_split(rng.permutation(queries), max(len(queries) // QUERIES_PER_STEP, 1)):
                loss = torch.stack([listwise_loss(model(self.batches[q][0]).logits, self.batches[q][1]) for q in step])
                opt.zero_grad()
                loss.mean().backward()
                opt.step()
        return model.eval()


def prepare_folder(world: Path, exp: Path, add: bool) -> str:
    """EXP beside WORLD; returns the member name the fine-tuned tables go to."""
    shutil.rmtree(exp, ignore_errors=True)
    (exp / "outputs").mkdir(parents=True)
    for name in ("data", "features", "pools", "models"):
        (exp / name).symlink_to(world / name)
    for name in ("neighbour_words-seed1", "wordproto", "smoothed") + ((MEMBER,) if add else ()):
        shutil.copytree(world / "outputs" / name, exp / "outputs" / name)
    params = yaml.safe_load((world / "params.yaml").read_text())
    if add:
        params["rerank"]["members"] = [MEMBER, "neighbour_words-seed1", "wdft-seed1"]
    (exp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q", str(exp)], check=True)
    return "wdft-seed1" if add else MEMBER


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("world", type=Path, help="a clone after make repro / dvc repro")
    ap.add_argument("exp", type=Path, help="the folder to write (replaced)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--add", action="store_true", help="a member of its own beside the word detector (else: replaces it)")
    args = ap.parse_args(argv)
    world, exp = args.world.resolve(), args.exp.resolve()
    name = prepare_folder(world, exp, args.add)
    torch.set_num_threads(2)
    member = members.load(world / "models" / "word_detector" / "seed1" / "model.pt")
    valid, test = FeatureStore.open(world / "features" / "valid"), FeatureStore.open(world / "features" / "testA")
    data = ValidQueries(valid, member)
    folds = np.array_split(np.random.default_rng(0).permutation(data.queries), args.folds)
    start = time.time()
    table, fused = members.score(member, valid)  # every row is overwritten by its fold's model below
    for k, fold in enumerate(folds):
        model = data.finetune(member.model, np.setdiff1d(data.queries, fold), args.lr, args.epochs, seed=k)
        fold_table, fold_fused = members.score(dataclasses.replace(member, model=model), valid)
        held_out = np.isin(data.query_of_row, fold)
        table.loc[held_out] = fold_table.loc[held_out]
        fused[held_out] = fold_fused[held_out]
        print(f"fold {k + 1}/{args.folds} done ({time.time() - start:.0f} s)", flush=True)
    tuned = dataclasses.replace(member, model=data.finetune(member.model, data.queries, args.lr, args.epochs,
                                                            seed=args.folds))
    test_table, test_fused = members.score(tuned, test)
    outputs.write(exp / "outputs", name, "valid", table, fused)
    outputs.write(exp / "outputs", name, "testA", test_table, test_fused)
    before = read_metrics(world / "metrics" / "train", MEMBER)
    print(f"member valid {before['valid']['ndcg_at_5']:.4f} -> out of fold {evaluate_scores(table, valid.answers):.4f}; "
          f"testA {before['testA']['ndcg_at_5']:.4f} -> {evaluate_scores(test_table, test.answers):.4f} "
          f"({time.time() - start:.0f} s)", flush=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(exp / "rerank.log", "w") as log:
        subprocess.run([str(Path(sys.executable).with_name("mmrecall")), "rerank"], cwd=exp, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    base, now = read_metrics(world / "metrics", "rerank")["rerank"], read_metrics(exp / "metrics", "rerank")["rerank"]
    print(f"re-ranker valid out of fold {base['valid']['ndcg_at_5']:.4f} -> {now['valid']['ndcg_at_5']:.4f}; "
          f"testA {base['testA']['ndcg_at_5']:.4f} -> {now['testA']['ndcg_at_5']:.4f}")


if __name__ == "__main__":
    main()
