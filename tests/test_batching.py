"""Which boxes an image over train.max_boxes gives the models (data/batching.py image_batch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmrecall.config import ParamsError, TrainParams
from mmrecall.data.batching import image_batch
from mmrecall.data.store import FeatureStore
from mmrecall.data.tsv import AREA, BOX_DIM, FEATURE_DIM


def store_of(areas: list[list[float]]) -> FeatureStore:
    """A store with one row per image; box j of every image has feature value (its store index + 1)."""
    counts = [len(a) for a in areas]
    total = sum(counts)
    boxes = np.zeros((total, BOX_DIM), np.float32)
    boxes[:, AREA] = np.concatenate(areas)
    features = np.repeat(np.arange(1, total + 1, dtype=np.float32)[:, None], FEATURE_DIM, axis=1)
    rows = pd.DataFrame({"offset": np.cumsum([0] + counts[:-1]), "n_kept": counts})
    return FeatureStore.in_memory(rows, features, boxes, np.arange(total) % 33)


def kept(batch) -> list[list[int]]:
    """Store indices of the boxes each row of the batch holds, in their order."""
    ids = batch["img_feat"][:, :, 0].long() - 1
    return [row[mask].tolist() for row, mask in zip(ids, batch["img_mask"])]


def test_over_the_cap_largest_keeps_the_largest_in_file_order():
    store = store_of([[0.1, 0.6, 0.05, 0.3], [0.2, 0.9]])  # image 0: boxes 0-3, image 1: boxes 4-5
    rows = np.array([0, 1])
    assert kept(image_batch(store, rows, 2, "first")) == [[0, 1], [4, 5]]
    assert kept(image_batch(store, rows, 2, "largest")) == [[1, 3], [4, 5]]  # not [1, 3] reordered by size
    largest = image_batch(store, rows, 2, "largest")
    assert largest["img_box"][0, :, AREA].tolist() == pytest.approx([0.6, 0.3])
    assert largest["img_label"][0].tolist() == [1, 3]
    # under the cap (or no cap) nothing changes: every box, file order
    assert kept(image_batch(store, rows, 4, "largest")) == kept(image_batch(store, rows, None, "largest")) == [[0, 1, 2, 3], [4, 5]]


def test_equal_areas_keep_the_earlier_box_and_bad_values_are_refused():
    store = store_of([[0.3, 0.5, 0.3, 0.3]])
    assert kept(image_batch(store, np.array([0]), 2, "largest")) == [[0, 1]]
    with pytest.raises(ValueError, match="box_select"):
        image_batch(store, np.array([0]), 2, "biggest")
    with pytest.raises(ParamsError, match="train.box_select"):
        TrainParams(box_select="biggest")
    assert TrainParams().box_select == "largest"


def test_largest_box_features_take_each_images_largest_box():
    """The re-ranker's box views (rerank.box_views) read each image's largest box: ties give the earlier box, an
    image without boxes zeros."""
    store = store_of([[0.1, 0.6, 0.05, 0.6], [], [0.2], [0.3, 0.9]])  # boxes 0-3, none, 4, 5-6
    largest = store.largest_box_features()
    assert largest.shape == (4, FEATURE_DIM)
    assert largest[:, 0].tolist() == [2, 0, 5, 7]  # store index + 1 of boxes 1, -, 4 and 6
    assert (largest[1] == 0).all()
    some = store.largest_box_features(np.array([3, 0]))  # only these rows, in this order
    np.testing.assert_array_equal(some, largest[[3, 0]])
    # neighbour_words' memory: each image's 2 largest boxes, largest first (ties: the earlier), -1 past its boxes
    assert store.largest_boxes(2).tolist() == [[1, 3], [-1, -1], [4, -1], [6, 5]]
    assert store.largest_boxes(2, np.array([3, 2])).tolist() == [[6, 5], [4, -1]]


def test_img_index_names_each_slots_box_and_box_features_read_it():
    """A member that scores one box reports it by the slot's img_index (its position among the image's boxes),
    which FeatureStore.box_features reads back: whatever boxes the cap kept, padding and boxless rows aside."""
    store = store_of([[0.1, 0.6, 0.05, 0.3], [0.2, 0.9], []])  # boxes 0-3, 4-5, none
    batch = image_batch(store, np.array([0, 1, 2]), 2, "largest")
    assert batch["img_index"][batch["img_mask"]].tolist() == [1, 3, 0, 1]
    slot = np.array([1, 0, 0])  # row 0: its second kept box (box 3), row 1: its first (box 4), row 2: nothing
    position = batch["img_index"].numpy()[np.arange(3), slot]
    features = store.box_features(position)
    assert features[:, 0].tolist() == [4, 5, 0]  # store index + 1 of boxes 3 and 4; zeros without boxes
    with pytest.raises(ValueError, match="outside"):
        store.box_features(np.array([4, 0, 0]))  # row 0 has boxes 0-3
    with pytest.raises(ValueError, match="3 rows"):
        store.box_features(np.array([0, 0]))
