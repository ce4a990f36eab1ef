"""The word-detector member: its vocabulary, masks, score and loss on tiny configs; one real training."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mmrecall.models.backbone import load_tokenizer
from mmrecall.models.image_input import BOX_DIM, FEAT_DIM, NUM_LABELS
from mmrecall.models.word_detector import (LABEL_DIM, UNKNOWN, WordDetector, WordDetectorConfig, box_geometry,
                                           exclusive_rows, first_occurrence, query_words)
from mmrecall.ranking import members

from .test_models import QUERIES, make_batch

TINY = WordDetectorConfig(hidden=16, layers=2, dropout=0.0, max_words=64, bag=1, pseudo_threshold=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def detector(tokenizer, texts=QUERIES, **kw) -> WordDetector:
    torch.manual_seed(0)
    model = WordDetector(WordDetectorConfig(**{**vars(TINY), **kw}), tokenizer.vocab_size)
    enc = tokenizer(texts, padding=True, return_tensors="np")
    model.fit_vocabulary(enc["input_ids"], enc["attention_mask"])
    return model.eval()


def test_query_words_skip_special_tokens_and_padding(tokenizer):
    enc = tokenizer(["red dress", "a red cotton dress"], padding=True, return_tensors="pt")
    words = query_words(enc["input_ids"], enc["attention_mask"])
    picked = [tokenizer.convert_ids_to_tokens(ids[keep].tolist()) for ids, keep in zip(enc["input_ids"], words)]
    assert picked == [["red", "dress"], ["a", "red", "cotton", "dress"]]


def test_repeated_words_count_once():
    rows = torch.tensor([[5, 7, 5, 0, 7]])
    valid = torch.tensor([[True, True, True, False, True]])
    assert first_occurrence(rows, valid).tolist() == [[True, True, False, False, False]]


def test_vocabulary_keeps_the_most_frequent_words(tokenizer):
    texts = ["red dress", "red skirt", "blue dress", "red hat"]
    model = detector(tokenizer, texts, max_words=3)  # 2 detector rows besides UNKNOWN
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("red", "dress", "blue", "skirt", "hat")}
    assert model.vocabulary_size == 2
    assert (model.word_row[[ids["red"], ids["dress"]]] != UNKNOWN).all()
    assert (model.word_row[[ids["blue"], ids["skirt"], ids["hat"]]] == UNKNOWN).all()
    assert model.word_row[tokenizer.cls_token_id] == UNKNOWN and model.word_row[tokenizer.sep_token_id] == UNKNOWN


def test_shapes_and_padding_invariance(tokenizer):
    model = detector(tokenizer)
    with torch.no_grad():
        ref = model(make_batch(tokenizer))
        assert ref.logits.shape == (len(QUERIES),) and ref.fused.shape == (len(QUERIES), model.fused_dim)
        assert torch.isfinite(ref.logits).all() and (ref.logits <= 0).all()  # a mean log-probability
        padded = make_batch(tokenizer, text_pad=4, box_pad=6)
        torch.testing.assert_close(model(padded).logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(padded).fused, ref.fused, atol=1e-5, rtol=0)
        padded["img_mask"] = torch.ones_like(padded["img_mask"])  # the garbage boxes now count
        assert not torch.allclose(model(padded).logits, ref.logits, atol=1e-4)


def word_log_probs(model: WordDetector, batch: dict, tokenizer):
    """Per query of QUERIES: (row, its text, (real boxes, known words) log-probabilities from the weights)."""
    net = model.nets[0]
    h = net.boxes(batch)
    for b, text in enumerate(QUERIES):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = sorted({int(model.word_row[i]) for i in ids} - {UNKNOWN})
        n = int(batch["img_mask"][b].sum())
        yield b, text, F.logsigmoid(h[b, :n] @ net.detectors.weight[rows].T + net.bias.weight[rows].T)  # (n, words)


def test_score_is_the_best_box_mean_word_log_probability(tokenizer):
    model = detector(tokenizer)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        out = model(batch)
        for b, _, log_p in word_log_probs(model, batch, tokenizer):
            assert out.logits[b].item() == pytest.approx(log_p.mean(-1).max().item(), abs=1e-5)


def test_details_name_the_weak_and_strong_words(tokenizer):
    """The re-ranker's word features, against a direct computation from the detector weights."""
    model = detector(tokenizer)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        details = model(batch).details
        for b, text, log_p in word_log_probs(model, batch, tokenizer):
            at_best = log_p[log_p.mean(-1).argmax()].sort().values
            own = log_p.max(0).values
            second = at_best[min(1, len(at_best) - 1)]
            expected = {"word_min": at_best[0], "word_second": second, "word_max": at_best[-1],
                        "word_min_own_box": own.min(), "word_mean_own_box": own.mean()}
            for name, value in expected.items():
                assert details[name][b].item() == pytest.approx(value.item(), abs=1e-5), (name, text)
        unknown = model({**batch, **tokenizer(["zebra giraffe"] * len(QUERIES), return_tensors="pt")}).details
    assert all((value == 0).all() for value in unknown.values())  # no known word: zeros, as the score


def test_unknown_words_do_not_count(tokenizer):
    model = detector(tokenizer, ["red dress"])
    batch = make_batch(tokenizer)
    with torch.no_grad():
        known = model({**batch, **tokenizer(["red dress"] * 3, return_tensors="pt")}).logits
        extra = model({**batch, **tokenizer(["red zebra dress"] * 3, return_tensors="pt")}).logits
    torch.testing.assert_close(known, extra)


def test_in_batch_loss_learns_the_words(tokenizer):
    """A few steps on two looks for two queries: each image then scores its own query higher."""
    texts = ["red dress", "blue hat"]
    model = detector(tokenizer, texts).train()
    g = torch.Generator().manual_seed(0)
    looks = torch.rand(2, 2048, generator=g)
    batch = {**tokenizer(texts, return_tensors="pt"),
             "img_feat": looks[:, None, :] + 0.01 * torch.rand(2, 3, 2048, generator=g),
             "img_box": torch.full((2, 3, 6), 0.5), "img_label": torch.zeros(2, 3, dtype=torch.long),  # the same for both
             "img_mask": torch.tensor([[True, True, False], [True, True, True]])}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model.in_batch_loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    model.eval()
    with torch.no_grad():
        swapped = {**batch, **tokenizer(texts[::-1], return_tensors="pt")}
        assert (model(batch).logits > model(swapped).logits).all()


def test_a_bag_averages_its_detectors(tokenizer):
    """Score, details and loss of a bag are its detectors' means; the fused vector their unit codes side by side."""
    model = detector(tokenizer, bag=3)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        out = model(batch)
        rows, valid = model.words(batch)
        each, per_box = zip(*(net(batch, rows, valid) for net in model.nets))
        torch.testing.assert_close(out.logits, torch.stack([o.logits for o in each]).mean(0))
        for name, value in out.details.items():
            torch.testing.assert_close(value, torch.stack([o.details[name] for o in each]).mean(0))
        assert out.fused.shape == (len(QUERIES), 3 * 16) and model.fused_dim == 48
        torch.testing.assert_close(out.fused[:, 16:32], F.normalize(each[1].fused, dim=-1))
        assert not torch.allclose(each[0].logits, each[1].logits)  # each detector has its own initialisation
        bag_box = torch.stack(per_box).mean(0)  # (B, N) the bag's mean per-box score
        assert torch.equal(out.best_box, bag_box.argmax(1)) and batch["img_mask"].gather(1, out.best_box[:, None]).all()
        for o, p in zip(each, per_box):  # a detector's score is its own best box's
            torch.testing.assert_close(o.logits, p.gather(1, o.best_box[:, None]).squeeze(1))
        singles = []  # each detector alone, as a bag of one
        for net in model.nets:
            single = WordDetector(WordDetectorConfig(**{**vars(model.cfg), "bag": 1}), tokenizer.vocab_size)
            single.nets[0].load_state_dict(net.state_dict())
            single.word_row.copy_(model.word_row)
            single.exclusive = model.exclusive
            singles.append(single.eval())
        torch.testing.assert_close(singles[1](batch).logits, each[1].logits)
        expected = torch.stack([single.in_batch_loss(batch) for single in singles]).mean()
        torch.testing.assert_close(model.in_batch_loss(batch), expected)


def test_box_input_reads_geometry_and_class(tokenizer):
    """With box_input the score depends on each box's geometry and detector class; without, on its feature only."""
    batch = make_batch(tokenizer)
    moved = {**batch, "img_box": batch["img_box"].flip(1), "img_label": (batch["img_label"] + 1) % NUM_LABELS}
    with torch.no_grad():
        for box_input in (True, False):
            model = detector(tokenizer, box_input=box_input)
            assert model.nets[0].boxes.mlp[0].in_features == FEAT_DIM + (BOX_DIM + LABEL_DIM) * box_input
            same = torch.allclose(model(moved).logits, model(batch).logits)
            assert same != box_input
    thin = torch.tensor([[0.1, 0.2, 0.9, 0.2, 0.0, 8e5]])  # a zero-width box: its aspect is clipped
    assert box_geometry(thin)[0, 5].item() == pytest.approx(math.log(100.0))


def test_checkpoints_from_before_the_bag_load(tokenizer, tmp_path):
    """A checkpoint saved before `bag`, `box_input` and `open_negative_weight` (no such config fields, one detector
    at the top level of the state dict) loads as a bag of one reading ROI features only, and scores as before."""
    import dataclasses

    model = detector(tokenizer, box_input=False)
    later = ("bag", "box_input", "open_negative_weight")
    config = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in later}
    state = {k.removeprefix("nets.0."): v for k, v in model.state_dict().items()}
    assert "detectors.weight" in state and not any(k.startswith("nets.") for k in state)
    torch.save({"model": "word_detector", "config": config, "state_dict": state}, tmp_path / "model.pt")
    loaded = members.load(tmp_path / "model.pt")
    assert loaded.model.cfg.bag == 1 and not loaded.model.cfg.box_input and loaded.model.cfg.open_negative_weight == 1.0
    batch = make_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch).logits, model(batch).logits)
    with pytest.raises(ValueError, match="bag"):
        WordDetector(WordDetectorConfig(bag=0), tokenizer.vocab_size)


def test_exclusive_rows_are_words_of_one_slot():
    """Two colours (1, 2) or two categories (4, 5) never share a query: exclusive; a colour and a category or a
    material (6) share them as often as chance: not. Repeats within a query and the chunking change nothing."""
    queries = [[c, k, m] for c in (1, 2, UNKNOWN) for k in (4, 5) for m in (6, UNKNOWN)]
    rows = np.array([q + [UNKNOWN] for q in queries])
    exclusive = exclusive_rows(rows, 8)
    assert exclusive[1, 2] and exclusive[2, 1] and exclusive[4, 5]
    assert not exclusive[1, 4] and not exclusive[1, 6] and not exclusive[5, 6] and not exclusive[1, 1]
    repeated = rows.copy()
    repeated[:, 3] = repeated[:, 0]  # each query's first word twice
    assert torch.equal(exclusive_rows(repeated, 8), exclusive)
    assert torch.equal(exclusive_rows(rows, 8, chunk=5), exclusive)


# colour x material x kind: "red" and "blue" exclude each other, "cotton" is open for "red dress"
OPEN_TEXTS = [" ".join(f"{c} {m} {k}".split())
              for c in ("red", "blue", "") for m in ("cotton", "") for k in ("dress", "sofa")]


def open_word_batch(tokenizer, model):
    """A batch of "red dress" and "cotton sofa" images; its (B, T) rows and valid, the (U,) batch words, the (B, U)
    targets and loss weights, and the column of each word."""
    batch = {**tokenizer(["red dress", "cotton sofa"], padding=True, return_tensors="pt"),
             **{k: v[:2] for k, v in make_batch(tokenizer).items() if k.startswith("img_")}}
    rows, valid = model.words(batch)
    vocab, inverse = torch.unique(rows[valid], return_inverse=True)
    target = torch.zeros(2, len(vocab))
    target[valid.nonzero()[:, 0], inverse] = 1.0
    weight = model.target_weights(rows, valid, vocab, target)
    col = {w: int((vocab == model.word_row[tokenizer.convert_tokens_to_ids(w)]).nonzero()) for w in
           ("red", "dress", "cotton", "sofa")}
    return batch, rows, valid, vocab, target, weight, col


def test_open_negatives_count_less(tokenizer):
    """An image of "red dress" is a sure negative of "sofa" (excluded by "dress") but an open one of "cotton"
    (its query says nothing of the material): the loss weighs that target open_negative_weight."""
    model = detector(tokenizer, OPEN_TEXTS, open_negative_weight=0.2).train()
    batch, rows, valid, vocab, target, weight, col = open_word_batch(tokenizer, model)
    assert weight[0, col["red"]] == weight[0, col["dress"]] == weight[0, col["sofa"]] == 1.0
    assert weight[1, col["cotton"]] == weight[1, col["sofa"]] == weight[1, col["dress"]] == 1.0
    assert weight[0, col["cotton"]] == weight[1, col["red"]] == pytest.approx(0.2)
    full = detector(tokenizer, OPEN_TEXTS, open_negative_weight=1.0).train()  # the same initial weights
    assert full.target_weights(rows, valid, vocab, target) is None
    assert model.in_batch_loss(batch).item() < full.in_batch_loss(batch).item()
    with pytest.raises(RuntimeError, match="fit_vocabulary"):
        WordDetector(model.cfg, tokenizer.vocab_size).in_batch_loss(batch)


def test_pseudo_positives_come_from_the_other_detectors(tokenizer):
    """With pseudo_threshold, an open word ("cotton" for "red dress") that the bag's other detector sees with more
    probability than the threshold becomes a soft positive at that probability; own and excluded words keep their
    targets, and each detector is taught by the other, not by itself."""
    model = detector(tokenizer, OPEN_TEXTS, bag=2, pseudo_threshold=0.5).train()
    batch, rows, valid, vocab, target, weight, col = open_word_batch(tokenizer, model)
    sure, unsure = torch.full((2, len(vocab)), 4.0), torch.full((2, len(vocab)), -4.0)  # logits: p 0.98 / 0.02
    first, second = model.pseudo_targets([unsure, sure], target, weight)
    p = torch.sigmoid(torch.tensor(4.0))
    assert first[0, col["cotton"]] == first[1, col["red"]] == pytest.approx(p)  # open: the other detector's belief
    assert first[0, col["sofa"]] == 0 and first[1, col["dress"]] == 0  # excluded words stay negatives
    assert first[0, col["red"]] == first[1, col["cotton"]] == 1  # own words stay positives
    assert torch.equal(second, target)  # the other detector is unsure: nothing changes for the sure one
    off = detector(tokenizer, OPEN_TEXTS, bag=2)
    assert all(torch.equal(t, target) for t in off.pseudo_targets([unsure, sure], target, weight))
    loss = model.in_batch_loss(batch)
    assert torch.isfinite(loss) and loss.requires_grad
    full = detector(tokenizer, OPEN_TEXTS, bag=2, pseudo_threshold=0.5, open_negative_weight=1.0)  # no open words
    assert full.target_weights(rows, valid, vocab, target) is None
    assert all(torch.equal(t, target) for t in full.pseudo_targets([unsure, sure], target, None))
    with pytest.raises(ValueError, match="pseudo_threshold"):
        detector(tokenizer, OPEN_TEXTS, pseudo_threshold=1.5)


@pytest.mark.slow
def test_trained_member_round_trips(workdir):
    """The train stage fits the vocabulary on the train queries; the checkpoint keeps it and scores the same."""
    from mmrecall.stages import train as train_stage

    assert train_stage.main(["--model", "word_detector", "--seed", "3", "--no-progress"]) == 0
    result = json.loads((workdir / "metrics" / "train" / "word_detector-seed3.json").read_text())
    assert 0 <= result["valid"]["ndcg_at_5"] <= 1
    member = members.load(workdir / "models" / "word_detector" / "seed3" / "model.pt")
    assert member.name == "word_detector" and 0 < member.model.vocabulary_size <= 64
    from mmrecall.data.store import FeatureStore

    table, fused = members.score(member, FeatureStore.open(workdir / "features" / "valid"))
    saved = pd.read_parquet(workdir / "outputs" / "word_detector-seed3" / "valid.parquet")
    np.testing.assert_allclose(table.score.to_numpy(), saved.score.to_numpy(), atol=1e-5)
    assert fused.shape == (len(saved), 32)  # a bag of 2: each detector's best-box code
    details = [c for c in saved.columns if c.startswith("word_")]  # the train stage saves the details too
    assert len(details) == 5 and list(table.columns) == list(saved.columns)
    np.testing.assert_allclose(table[details].to_numpy(), saved[details].to_numpy(), atol=1e-5)


@pytest.fixture
def workdir(micro_copy, monkeypatch):
    import yaml

    from mmrecall.stages import pools, prepare

    from .test_train import TINY as TRAIN

    root = micro_copy.parent
    monkeypatch.chdir(root)
    train = {**TRAIN, "models": ["word_detector"], "word_detector": {"hidden": 16, "max_words": 64, "bag": 2},
             "overrides": {"word_detector": {"swap_negatives": 0.0}}}
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}, "train": train}))
    for split in ("train", "valid", "testA"):
        prepare.main(["--split", split, "--no-progress"])
    pools.main([])
    return root
