"""The synthetic generator writes the official format and the real data's hard structure."""

from __future__ import annotations

import base64
import csv
import json

import numpy as np
import pandas as pd

from mmrecall.config import SynthParams
from mmrecall.data.synth import World, generate
from mmrecall.data.tsv import COLUMNS

from .conftest import MICRO


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype={"query": str})


def test_layout_and_format(micro_data):
    for rel in ("train/train.tsv", "valid/valid.tsv", "valid/valid_answer.json", "testA/testA.tsv",
                "testA/testA_answer.json", "multimodal_labels.txt"):
        assert (micro_data / rel).exists(), rel
    labels = pd.read_csv(micro_data / "multimodal_labels.txt", sep="\t")
    assert labels.columns.tolist() == ["category_id", "category_name"] and labels.category_id.tolist() == list(range(33))
    df = read(micro_data / "valid" / "valid.tsv")
    assert tuple(df.columns) == COLUMNS
    r = df.iloc[0]
    n = int(r.num_boxes)
    boxes = np.frombuffer(base64.b64decode(r.boxes), "<f4").reshape(n, 4)
    feats = np.frombuffer(base64.b64decode(r.features), "<f4").reshape(n, 2048)
    labs = np.frombuffer(base64.b64decode(r.class_labels), "<i8")
    assert (feats >= 0).all() and (feats == 0).mean() > 0.3  # ReLU-like and sparse
    assert (boxes[:, 2] <= r.image_h).all() and (boxes[:, 3] <= r.image_w).all() and (boxes[:, :2] >= 0).all()
    assert labs.min() >= 0 and labs.max() <= 32


def test_same_seed_same_bytes(micro_data, tmp_path):
    generate(tmp_path / "again", SynthParams(**MICRO), progress=False)
    for rel in ("train/train.tsv", "valid/valid.tsv", "testA/testA_answer.json"):
        assert (micro_data / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_candidate_structure(micro_data):
    df = read(micro_data / "valid" / "valid.tsv")
    answers = {int(q): set(p) for q, p in json.loads((micro_data / "valid" / "valid_answer.json").read_text()).items()}
    assert df.groupby("query_id").size().eq(30).all()
    assert np.mean([len(a) == 6 for a in answers.values()]) > 0.8
    test = read(micro_data / "testA" / "testA.tsv")
    counts = pd.concat([df.product_id, test.product_id]).value_counts()
    is_answer = np.array([p in answers[q] for q, p in zip(df.query_id, df.product_id)])
    once = df.product_id.map(counts).eq(1).to_numpy()
    assert once[is_answer].all()  # answers occur once
    assert 0.1 < once[~is_answer].mean() < 0.7  # negatives mostly recur
    # every answer is a candidate of its own query
    for q, a in answers.items():
        assert a <= set(df.product_id[df.query_id == q])


def test_queries_look_like_the_real_ones(micro_data):
    train = read(micro_data / "train" / "train.tsv")
    n_words = train["query"].str.split().str.len()
    assert n_words.between(2, 6).all()
    assert train.groupby("query_id").size().mean() > 1.5  # several products per train query
    nb = train.num_boxes
    assert nb.min() >= 1 and 2.8 < nb.mean() < 5.0


def test_worlds_change_what_they_name(tmp_path):
    """near-miss adds negatives of the query's category; every world keeps the official layout."""
    import dataclasses

    from mmrecall.data.synth import WORLDS

    small = SynthParams(train_queries=30, valid_queries=6, test_queries=6)
    hard = dataclasses.replace(small, **{**WORLDS["hard"], "train_queries": 30})
    assert hard.near_miss_rate > 0 and hard.attribute_groups > small.attribute_groups
    counts = generate(tmp_path / "hard", hard, progress=False)
    assert counts["train_queries"] == 30 and counts["valid_rows"] == 6 * small.candidates
    for split in ("train", "valid", "testA"):
        assert (tmp_path / "hard" / split / f"{split}.tsv").stat().st_size > 0
    assert set(WORLDS) >= {"default", "near-miss", "looks", "noise", "small", "hard"}
    assert all(hasattr(small, key) for overrides in WORLDS.values() for key in overrides)


def test_a_scene_shows_the_product_small_beside_a_large_clutter_box(tmp_path):
    """main_large_rate: the largest box of an image is the product (the default), or in a scene a clutter box,
    mostly of the clutter classes (others, body parts)."""
    from mmrecall.config import PrepareParams
    from mmrecall.data.ingest import ingest_tsv
    from mmrecall.data.store import FeatureStore
    from mmrecall.data.synth import BODY_PARTS, OTHERS

    def largest_labels(rate: float) -> np.ndarray:
        out = tmp_path / str(rate)
        generate(out, SynthParams(train_queries=40, valid_queries=4, test_queries=4, main_large_rate=rate), progress=False)
        ingest_tsv(out / "train" / "train.tsv", out / "store", PrepareParams(workers=0), train=True, progress=False)
        store = FeatureStore.open(out / "store")
        labels = []
        for i in range(len(store)):
            _, boxes, box_labels = store.image(i)
            labels.append(box_labels[np.argmax(boxes[:, 4])])
        return np.isin(labels, [OTHERS, *BODY_PARTS])

    assert not largest_labels(1.0).any()  # the product is the large box
    assert largest_labels(0.0).mean() > 0.6  # a scene's large box is clutter


def test_features_do_not_depend_on_last_bit_float_differences():
    """Two CPUs' BLAS/LAPACK differ in the last bits of the world's rotations and projection: same bytes anyway."""
    params = SynthParams(**MICRO)
    exact, noisy = World(params, np.random.default_rng(5)), World(params, np.random.default_rng(5))
    wobble = np.random.default_rng(99)
    noisy.projection = noisy.projection * (1 + 1e-13 * wobble.standard_normal(noisy.projection.shape))
    noisy.rotation = noisy.rotation * (1 + 1e-13 * wobble.standard_normal(noisy.rotation.shape))
    assert not np.array_equal(exact.projection, noisy.projection)
    values = 0
    for _ in range(300):
        product = exact.random_product()
        assert noisy.random_product() == product
        a, b = exact.image(product)[3], noisy.image(product)[3]
        assert a.dtype == np.float32 and a.tobytes() == b.tobytes()
        values += a.size
    assert values > 1_000_000
