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
from mmrecall.models.neighbour_words import NeighbourWords, NeighbourWordsConfig, largest_boxes
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


def batch(tokenizer, texts: list[str], images: list[str], pad_boxes: int = 0, scene: bool = False
          ) -> dict[str, torch.Tensor]:
    """One candidate per (query, image look): its look in a large box, next to a small box of noise (and
    `pad_boxes` padded slots holding a huge box that must be ignored); `scene`: the look in the small box."""
    rng = np.random.default_rng(1)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    B, N = len(texts), 2 + pad_boxes
    feat = torch.zeros(B, N, FEAT_DIM)
    box = torch.zeros(B, N, 6)
    for b, image in enumerate(images):
        feat[b, 0] = torch.from_numpy(rng.normal(0, 1, FEAT_DIM).astype(np.float32))  # small clutter box first
        feat[b, 1] = torch.from_numpy(looks(image, rng))
        box[b, 0, 4], box[b, 1, 4] = (0.6, 0.1) if scene else (0.1, 0.6)
        box[b, 2:, 4] = 5.0  # padding with a huge "area"
    mask = torch.arange(N)[None, :] < 2
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "img_feat": feat, "img_box": box,
            "img_label": torch.zeros(B, N, dtype=torch.long), "img_mask": mask.expand(B, N)}


def test_largest_boxes_ignore_padding():
    box = torch.zeros(3, 3, 6)
    box[0, :, 4] = torch.tensor([0.2, 0.5, 0.9])  # slot 2 is padding
    box[1, :, 4] = torch.tensor([0.4, 0.4, 0.1])  # a tie: the earlier box first
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])  # row 2: no boxes
    slots, real = largest_boxes(box, mask, 2)
    assert slots[:2].tolist() == [[1, 0], [0, 1]]
    assert real.tolist() == [[True, True], [True, True], [True, False]]  # a boxless row still scores its slot 0
    slots, real = largest_boxes(box[:, :1], mask[:, :1], 2)  # fewer slots than boxes asked for
    assert slots.shape == (3, 1)


def test_vocabulary_skips_punctuation_and_special_tokens(tokenizer):
    model = fitted(tokenizer)
    row = lambda token: int(model.word_row[tokenizer.convert_tokens_to_ids(token)])  # noqa: E731
    assert row("red") != UNKNOWN and row("dress") != UNKNOWN and row("s") != UNKNOWN
    assert row("'") == UNKNOWN and row("[CLS]") == UNKNOWN and row("sofa") == UNKNOWN


def test_scores_the_words_of_the_nearest_train_images(tokenizer):
    model = fitted(tokenizer, boxes=1)  # the look's box only (with 2, a near-miss scores as its noise box's average)
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


def test_a_product_beside_a_larger_box_is_found_among_the_largest_boxes(tokenizer):
    """With boxes 2 a candidate scores as its best of its 2 largest boxes (and names it): the look in the small
    box of a scene still beats a near-miss; with boxes 1 only the large noise box is read."""
    texts, images = ["red dress", "red dress"], ["red dress", "blue dress"]
    out = fitted(tokenizer)(batch(tokenizer, texts, images, scene=True))
    assert out.logits[0] > out.logits[1] and out.best_box[0] == 1  # slot 1: the small box, the look
    assert out.details["word_min"][0] == pytest.approx(1.0, abs=1e-4)
    plain = fitted(tokenizer)(batch(tokenizer, texts, images))  # the look in the large box: found the same
    torch.testing.assert_close(plain.logits, out.logits)
    assert plain.best_box.tolist() == out.best_box.tolist()
    one = fitted(tokenizer, boxes=1)(batch(tokenizer, texts, images, scene=True))
    assert one.best_box.tolist() == [0, 0] and one.logits[0] < out.logits[0]  # the large noise box only


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
    train = FeatureStore.open(root / "features" / "train")
    boxes = np.minimum(train.rows.n_kept.to_numpy(), 2).sum()  # the 2 largest boxes of each train image
    assert member.model.memory.shape == (boxes, FEAT_DIM) and boxes > len(train)
    table, fused = members.score(member, FeatureStore.open(root / "features" / "valid"))
    saved = pd.read_parquet(root / "outputs" / "neighbour_words-seed1" / "valid.parquet")
    np.testing.assert_allclose(table.score.to_numpy(), saved.score.to_numpy(), atol=1e-5)
    valid = FeatureStore.open(root / "features" / "valid")
    best, largest = saved.best_box.to_numpy(), valid.largest_boxes(2)  # each row's best of its 2 largest boxes
    assert ((valid.rows.offset.to_numpy() + best)[:, None] == largest).any(1).all()
    assert fused.shape == (len(saved), 64) and list(table.columns) == list(saved.columns)
