"""The neighbour-words member: its vocabulary, memory, largest box and score on tiny data; one real fit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmrecall.models import neighbour_words as nw
from mmrecall.models.backbone import load_tokenizer
from mmrecall.models.image_input import FEAT_DIM
from mmrecall.models.neighbour_words import NeighbourWords, NeighbourWordsConfig, largest_box
from mmrecall.models.word_detector import UNKNOWN
from mmrecall.ranking import members

TRAIN_TEXTS = ["red dress", "red silk dress", "blue dress", "blue cotton dress", "men's red shoes", "blue shoes"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def looks(text: str, rng: np.random.Generator) -> np.ndarray:
    """A 2048-d feature: one direction per colour and one per kind of product, plus a little noise."""
    x = rng.normal(0, 0.05, FEAT_DIM)
    for i, word in enumerate(("red", "blue", "dress", "shoes")):
        if word in text.split():
            x[i * 100:(i + 1) * 100] += 1.0
    return x.astype(np.float32)


def fitted(tokenizer, k: int = 3, **kw) -> NeighbourWords:
    rng = np.random.default_rng(0)
    texts = TRAIN_TEXTS * 3
    model = NeighbourWords(NeighbourWordsConfig(k=k, max_words=64, **kw), tokenizer.vocab_size)
    enc = tokenizer(texts, padding=True, return_tensors="np")
    model.fit_vocabulary(enc["input_ids"], enc["attention_mask"])
    keep = model.memory_subset(len(texts), seed=0)
    model.fit_memory(np.stack([looks(texts[i], rng) for i in keep]), enc["input_ids"][keep], enc["attention_mask"][keep])
    return model.eval()


def batch(tokenizer, texts: list[str], images: list[str], pad_boxes: int = 0) -> dict[str, torch.Tensor]:
    """One candidate per (query, image look): its look in a large box, next to a small box of noise (and
    `pad_boxes` padded slots holding a huge box that must be ignored)."""
    rng = np.random.default_rng(1)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    B, N = len(texts), 2 + pad_boxes
    feat = torch.zeros(B, N, FEAT_DIM)
    box = torch.zeros(B, N, 6)
    for b, image in enumerate(images):
        feat[b, 0] = torch.from_numpy(rng.normal(0, 1, FEAT_DIM).astype(np.float32))  # small clutter box first
        feat[b, 1] = torch.from_numpy(looks(image, rng))
        box[b, 0, 4], box[b, 1, 4] = 0.1, 0.6
        box[b, 2:, 4] = 5.0  # padding with a huge "area"
    mask = torch.arange(N)[None, :] < 2
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "img_feat": feat, "img_box": box,
            "img_label": torch.zeros(B, N, dtype=torch.long), "img_mask": mask.expand(B, N)}


def test_largest_box_ignores_padding():
    feat = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    box = torch.zeros(2, 3, 6)
    box[0, :, 4] = torch.tensor([0.2, 0.5, 0.9])  # slot 2 is padding
    box[1, :, 4] = torch.tensor([0.4, 0.4, 0.1])  # a tie: the earlier box
    mask = torch.tensor([[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(largest_box(feat, box, mask).numpy(), feat[[0, 1], [1, 0]].numpy())


def test_vocabulary_skips_punctuation_and_special_tokens(tokenizer):
    model = fitted(tokenizer)
    row = lambda token: int(model.word_row[tokenizer.convert_tokens_to_ids(token)])  # noqa: E731
    assert row("red") != UNKNOWN and row("dress") != UNKNOWN and row("s") != UNKNOWN
    assert row("'") == UNKNOWN and row("[CLS]") == UNKNOWN and row("sofa") == UNKNOWN


def test_scores_the_words_of_the_nearest_train_images(tokenizer):
    model = fitted(tokenizer)
    out = model(batch(tokenizer, ["red dress", "red dress", "red dress", "sofa"],
                      ["red dress", "blue dress", "red shoes", "red dress"], pad_boxes=1))
    score = out.logits
    assert score[0] > score[1] and score[0] > score[2]  # the answer beats both near-misses
    assert score[3] == 0  # no known word: no evidence either way
    assert out.fused.shape == (4, 64) and out.fused[:, UNKNOWN].eq(0).all()
    np.testing.assert_allclose(out.fused.sum(1).numpy()[:3] >= 1.0, True)  # every neighbour names >= 1 word
    assert out.details["word_min"][0] == pytest.approx(1.0, abs=1e-4)  # all 3 neighbours say "red" and "dress"
    assert out.details["word_min"][1] < 0.5 and out.details["word_max"][1] == pytest.approx(1.0, abs=1e-4)
    assert out.details["word_min"][3] == 0 and out.details["word_max"][3] == 0


def test_memory_chunks_give_the_same_neighbours(tokenizer, monkeypatch):
    model = fitted(tokenizer, k=5)
    b = batch(tokenizer, ["red dress", "blue shoes"], ["red silk dress", "blue shoes"])
    whole = model(b)
    monkeypatch.setattr(nw, "MEMORY_CHUNK", 4)  # 18 images in 5 chunks
    chunked = model(b)
    torch.testing.assert_close(chunked.logits, whole.logits)
    torch.testing.assert_close(chunked.fused, whole.fused)


def test_memory_subset_is_seeded_and_capped(tokenizer):
    model = NeighbourWords(NeighbourWordsConfig(memory_rows=5), tokenizer.vocab_size)
    np.testing.assert_array_equal(model.memory_subset(4, seed=1), np.arange(4))
    kept = model.memory_subset(100, seed=1)
    assert len(kept) == 5 and (np.diff(kept) > 0).all()
    np.testing.assert_array_equal(kept, model.memory_subset(100, seed=1))
    assert not np.array_equal(kept, model.memory_subset(100, seed=2))


def test_unfitted_model_refuses_to_score(tokenizer):
    model = NeighbourWords(NeighbourWordsConfig(max_words=64), tokenizer.vocab_size)
    with pytest.raises(RuntimeError, match="fit_memory"):
        model(batch(tokenizer, ["red dress"], ["red dress"]))
    with pytest.raises(ValueError, match="k >= 1"):
        NeighbourWords(NeighbourWordsConfig(k=0), tokenizer.vocab_size)


def test_checkpoint_round_trip_keeps_the_memory(tokenizer, tmp_path):
    model = fitted(tokenizer)
    path = tmp_path / "model.pt"
    members.save(path, "neighbour_words", model.cfg, model, {"seed": 1, "best_step": 0, "train": {}})
    loaded = members.load(path).model
    assert loaded.memory.shape == model.memory.shape == (18, FEAT_DIM)
    b = batch(tokenizer, ["red dress", "blue shoes"], ["red dress", "blue dress"])
    torch.testing.assert_close(loaded(b).logits, model(b).logits)


@pytest.mark.slow
def test_fitted_member_round_trips(micro_copy, monkeypatch):
    """The train stage fits the member without optimizer steps; its checkpoint scores as the stage did."""
    import yaml

    from mmrecall.data.store import FeatureStore
    from mmrecall.stages import pools, prepare
    from mmrecall.stages import train as train_stage

    root = micro_copy.parent
    monkeypatch.chdir(root)
    train = {"models": ["neighbour_words"], "neighbour_words": {"k": 5, "max_words": 64}}
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": 1}, "train": train}))
    for split in ("train", "valid", "testA"):
        prepare.main(["--split", split, "--no-progress"])
    pools.main([])
    assert train_stage.main(["--model", "neighbour_words", "--seed", "1", "--no-progress"]) == 0
    result = json.loads((root / "metrics" / "train" / "neighbour_words-seed1.json").read_text())
    assert result["steps"] == result["steps_run"] == result["best_step"] == 0
    assert 0 <= result["valid"]["ndcg_at_5"] <= 1 and result["logged_model"]["model_id"]
    assert not (root / "checkpoints" / "neighbour_words-seed1").exists()  # no Lightning run
    member = members.load(root / "models" / "neighbour_words" / "seed1" / "model.pt")
    train_rows = len(FeatureStore.open(root / "features" / "train"))
    assert member.model.memory.shape == (train_rows, FEAT_DIM)
    table, fused = members.score(member, FeatureStore.open(root / "features" / "valid"))
    saved = pd.read_parquet(root / "outputs" / "neighbour_words-seed1" / "valid.parquet")
    np.testing.assert_allclose(table.score.to_numpy(), saved.score.to_numpy(), atol=1e-5)
    assert fused.shape == (len(saved), 64) and list(table.columns) == list(saved.columns)
