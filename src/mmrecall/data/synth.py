"""A synthetic dataset in exactly the organisers' format and layout (`mmrecall synth` writes it).

It is hard in the ways the real data is hard:
- box features are non-negative, sparse, ReLU-like 2048-d vectors; 1 to ~15 boxes per image
  (mean ~3.8, rare > 40); class 28 ("others") is common among clutter boxes; varied image sizes;
- queries are 2-6 word noun phrases built from facets (audience, style, colour, material + a
  category noun); some valid/test queries start with junk tokens ("is", "'s", "and");
- how an attribute looks depends on the category: each group of categories sees an attribute
  through its own random rotation of a latent space, so "red" has no single direction and a
  bag-of-words probe cannot solve the task;
- valid/test queries have 30 candidates, usually 6 answers, and hard negatives that share the
  category or most named attributes; negatives come from a shared pool and recur across queries
  (and across valid and test), answers are made for their query and occur once (as in the real files).

Everything is drawn from one seeded generator, so a seed gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import SynthParams
from ..console import show_bars
from .tsv import FEATURE_DIM, HEADER, encode_row

# (noun, class id in multimodal_labels.txt)
CATEGORIES = [
    ("dress", 1), ("skirt", 1), ("t-shirt", 0), ("coat", 0), ("shirt", 0), ("sweater", 0),
    ("jeans", 2), ("trousers", 2), ("sneakers", 4), ("sandals", 4), ("boots", 4),
    ("handbag", 3), ("backpack", 3), ("wallet", 3), ("hat", 5), ("scarf", 5), ("necklace", 5),
    ("lipstick", 7), ("perfume", 7), ("tea", 6), ("water bottle", 8), ("sofa", 9),
    ("file cabinet", 9), ("notebook", 10), ("pen", 10), ("kettle", 11), ("fan", 11),
    ("vase", 12), ("curtain", 13), ("frying pan", 14), ("bowl", 14), ("mop", 15),
    ("storage box", 16), ("bicycle", 17), ("tent", 18), ("lamp", 19), ("plush toy", 20),
    ("bra", 21), ("phone case", 22), ("bed sheet", 23), ("stroller", 24), ("toothbrush", 25),
    ("yoga mat", 26), ("baby romper", 27),
]
FACETS = {
    "audience": ["children's", "women's", "men's", "baby", "student", "girls'", "couple"],
    "style": ["vintage", "korean-style", "simple", "cute", "retro", "luxury", "portable", '"ins"', "nordic"],
    "colour": ["red", "black", "white", "blue", "pink", "green", "grey", "yellow", "purple", "brown", "beige"],
    "material": ["cotton", "leather", "wooden", "glass", "plastic", "silk", "denim", "ceramic", "bamboo", "metal"],
}
FACET_ORDER = ("audience", "style", "colour", "material")  # word order in a query
JUNK_PREFIXES = ("is", "'s", "and")
OTHERS, BODY_PARTS = 28, (29, 30, 31, 32)
IMAGE_SIZES = [(800, 800), (750, 750), (1000, 1000), (338, 209), (640, 480), (759, 766), (500, 375), (80, 61)]
LABEL_NAMES = [
    "top clothes (coat, jacket, shirt, etc.)", "skirt & dress", "bottom clothes (trousers, pants, etc.)",
    "luggage, leather goods", "shoes", "accessories (jewelry, clothing accessories, belts, hats, scarves, etc.)",
    "snacks, nuts, liquor and tea", "makeup, perfume, beauty tools and essential oils", "bottle drink",
    "furniture", "stationery", "household electrical appliances", "home decoration", "household fabric",
    "kitchenware", "home / personal cleaning tools", "storage supplies",
    "motorcycle, motorcycle accessories, vehicles, bicycle and riding equipment", "outdoor product",
    "lighting", "toys", "underwear", "digital supplies", "bed linens", "baby products", "personal care",
    "sporting goods", "clothes (accessories, baby clothing, etc.)", "others", "human face", "arm", "hair", "hand",
]


# Named variations of the default world (`mmrecall synth --world NAME`, bench/bench_quality.py): each is
# a set of SynthParams overrides, harder than the default in one known way; "hard" combines milder versions
# of them (1,500 train queries; its wordproto scores ~0.3, a little below the harder dataset of issue 11).
WORLDS: dict[str, dict] = {
    "default": {},
    "near-miss": {"near_miss_rate": 0.35},  # about half of each query's negatives: one named value wrong
    "looks": {"attribute_groups": 44},  # how an attribute looks depends on the exact category
    "noise": {"feature_noise": 0.7},  # twice the feature noise
    "small": {"train_queries": 1500},  # half the train queries
    "clutter": {"main_first_rate": 0.3, "clutter_correlation": 0.5},  # product box rarely first, look-alike clutter
    "scene": {"main_large_rate": 0.5},  # half the images show the product small, beside a large clutter box
    "hard": {"near_miss_rate": 0.35, "attribute_groups": 12, "feature_noise": 0.5, "train_queries": 1500,
             "rows_per_train_query": 3.5, "main_first_rate": 0.4, "clutter_correlation": 0.3},
}


@dataclass(frozen=True)
class Product:
    """A product: its category and one value per facet (index into FACETS[f])."""

    category: int
    values: tuple[int, ...]  # in FACET_ORDER


@dataclass(frozen=True)
class Query:
    category: int
    named: tuple[tuple[int, int], ...]  # (facet index, value index) pairs named in the text

    def matches(self, p: Product) -> bool:
        return p.category == self.category and all(p.values[f] == v for f, v in self.named)


class World:
    """The latent generative model shared by all splits."""

    def __init__(self, params: SynthParams, rng: np.random.Generator):
        self.p = params
        self.rng = rng
        d = params.latent_dim
        n_values = sum(len(v) for v in FACETS.values())
        self.value_offset = np.cumsum([0] + [len(FACETS[f]) for f in FACET_ORDER])[:-1]
        self.category_code = rng.normal(size=(len(CATEGORIES), d))
        self.value_code = rng.normal(size=(n_values, d))
        # Each group of categories sees attributes through its own rotation.
        self.group_of = rng.integers(0, params.attribute_groups, size=len(CATEGORIES))
        self.rotation = np.stack([np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(params.attribute_groups)])
        self.clutter_code = rng.normal(size=(8, d))
        self.projection = rng.normal(size=(d, FEATURE_DIM)) / np.sqrt(d)

    # --- products and queries ------------------------------------------------------------
    def random_product(self, category: int | None = None) -> Product:
        rng = self.rng
        c = int(rng.integers(len(CATEGORIES))) if category is None else category
        return Product(c, tuple(int(rng.integers(len(FACETS[f]))) for f in FACET_ORDER))

    def random_query(self) -> Query:
        rng = self.rng
        c = int(rng.integers(len(CATEGORIES)))
        k = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
        facets = sorted(rng.choice(len(FACET_ORDER), size=k, replace=False).tolist())
        return Query(c, tuple((f, int(rng.integers(len(FACETS[FACET_ORDER[f]])))) for f in facets))

    def product_for(self, q: Query) -> Product:
        """A product that answers q: its category and named values, random other values."""
        values = list(self.random_product(q.category).values)
        for f, v in q.named:
            values[f] = v
        return Product(q.category, tuple(values))

    def near_miss(self, q: Query) -> Product:
        """A product of q's category with all but one named value right: the hardest negative."""
        p = self.product_for(q)
        f, v = q.named[int(self.rng.integers(len(q.named)))]
        n = len(FACETS[FACET_ORDER[f]])
        values = list(p.values)
        values[f] = (v + 1 + int(self.rng.integers(n - 1))) % n
        return Product(p.category, tuple(values))

    def text(self, q: Query, junk: bool = False) -> str:
        named = dict(q.named)
        words = [FACETS[FACET_ORDER[f]][named[f]] for f in range(len(FACET_ORDER)) if f in named]
        words.append(CATEGORIES[q.category][0])
        if junk:
            words.insert(0, str(self.rng.choice(JUNK_PREFIXES)))
        return " ".join(words)

    # --- images ----------------------------------------------------------------------------
    def _latent(self, p: Product) -> np.ndarray:
        z = self.category_code[p.category].copy()
        rot = self.rotation[self.group_of[p.category]]
        for f, v in enumerate(p.values):
            z += rot @ self.value_code[self.value_offset[f] + v]
        return z / np.sqrt(1 + len(p.values))

    def image(self, p: Product) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        """(h, w, boxes (n,4) t,l,b,r pixels, features (n,2048) float32, labels (n,) int64)."""
        rng, prm = self.rng, self.p
        if rng.random() < 0.5:
            h, w = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        else:
            h, w = int(rng.integers(60, 1200)), int(rng.integers(60, 1200))
        z_main = self._latent(p)
        label_main = CATEGORIES[p.category][1]
        latents, labels, boxes = [], [], []
        n_main = 1 + int(rng.random() < 0.3)
        # a scene: the product small, a clutter box large (no draw at rate 1: the default world stays as it was)
        scene = prm.main_large_rate < 1 and rng.random() >= prm.main_large_rate
        for _ in range(n_main):  # the product itself (a second, partial view sometimes)
            latents.append(z_main + prm.feature_noise * rng.normal(size=z_main.shape))
            labels.append(label_main)
            if scene:
                t, l = rng.uniform(0, 0.6) * h, rng.uniform(0, 0.6) * w
                boxes.append((t, l, t + rng.uniform(0.2, 0.4) * h, l + rng.uniform(0.2, 0.4) * w))
            else:
                t, l = rng.uniform(0, 0.15) * h, rng.uniform(0, 0.15) * w
                boxes.append((t, l, rng.uniform(0.8, 1.0) * h, rng.uniform(0.8, 1.0) * w))
        if rng.random() < prm.long_image_rate:
            n_clutter = int(rng.integers(40, 60))
        else:
            n_clutter = min(int(rng.negative_binomial(0.96, 0.278)), 14)
        n_clutter = max(n_clutter, int(scene))  # a scene has its large box
        for i in range(n_clutter):
            r = rng.random()
            if r < 0.15:  # another object in the picture
                other = self.random_product()
                latents.append(self._latent(other) + prm.feature_noise * rng.normal(size=z_main.shape))
                labels.append(CATEGORIES[other.category][1])
            else:
                z = self.clutter_code[int(rng.integers(8))] + 0.6 * rng.normal(size=z_main.shape)
                if prm.clutter_correlation:  # a shelf of similar things, a model wearing it ...
                    z = z + prm.clutter_correlation * z_main
                latents.append(z)
                labels.append(OTHERS if r < 0.75 else int(rng.choice(BODY_PARTS)))
            if scene and i == 0:  # the scene's large box: a person, a room, a shelf
                t, l = rng.uniform(0, 0.15) * h, rng.uniform(0, 0.15) * w
                boxes.append((t, l, rng.uniform(0.8, 1.0) * h, rng.uniform(0.8, 1.0) * w))
                continue
            t, l = rng.uniform(0, 0.8) * h, rng.uniform(0, 0.8) * w
            boxes.append((t, l, min(h, t + rng.uniform(0.05, 0.4) * h), min(w, l + rng.uniform(0.05, 0.4) * w)))
        order = np.arange(len(labels))
        if rng.random() < 1 - prm.main_first_rate:  # the detector does not always list the product first
            rng.shuffle(order)
        x = np.stack(latents)[order] @ self.projection  # (n, 2048), about N(0, 1)
        x += 0.3 * rng.normal(size=x.shape)
        feats = np.maximum(0.0, 1.6 * x - 0.6) * rng.uniform(0.5, 2.0, size=(len(order), 1))  # sparse, ReLU-like
        # Written on the float16 grid: the last-bit float64 differences of BLAS/LAPACK between CPUs (QR, matmul)
        # flip about 1 in 10^5-10^7 float32 values and no float16 one, so a seed gives the same bytes, and the
        # same data.dvc, on any machine.
        feats = feats.astype(np.float16).astype(np.float32)
        return (
            h,
            w,
            np.round(np.asarray(boxes, dtype=np.float32)[order]),
            feats,
            np.asarray(labels, dtype=np.int64)[order],
        )


class Writer:
    """Writes rows of one split in the official format; one product id -> one fixed image."""

    def __init__(self, path: Path, world: World, images: dict[int, tuple]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w", newline="\n")
        self.f.write(HEADER + "\n")
        self.world, self.images = world, images

    def write(self, pid: int, product: Product, query: str, qid: int) -> None:
        if pid not in self.images:
            self.images[pid] = self.world.image(product)
        h, w, boxes, feats, labels = self.images[pid]
        self.f.write(encode_row(pid, h, w, boxes, feats, labels, query, qid) + "\n")

    def close(self) -> None:
        self.f.close()


def _eval_split(world: World, n_queries: int, params: SynthParams, pool: list[tuple[int, Product]],
                next_id, rng: np.random.Generator, junk: bool):
    """Queries with 30 candidates each: answers (fresh) + hard, pool and fresh negatives."""
    by_category: dict[int, list[int]] = {}
    for i, (_, p) in enumerate(pool):
        by_category.setdefault(p.category, []).append(i)
    split = []  # (qid, text, [(pid, product, is_answer)])
    a = params.fresh_negative_rate * 0.4  # U-shaped Beta: most queries reuse pool products,
    b = (1 - params.fresh_negative_rate) * 0.4  # a few have mostly one-off negatives (as real valid)
    for qid in range(n_queries):
        q = world.random_query()
        fresh_rate = rng.beta(a, b)
        n_ans = params.answers if rng.random() < 0.97 else int(rng.integers(2, params.answers))
        cands = [(next_id(), world.product_for(q), True) for _ in range(n_ans)]
        for _ in range(round(params.near_miss_rate * (params.candidates - n_ans))):
            cands.append((next_id(), world.near_miss(q), False))
        seen = set()
        tries = 0
        while len(cands) < params.candidates and tries < 1000:
            tries += 1
            r = rng.random()
            if r < fresh_rate:  # a negative made for this query only
                if rng.random() < 0.6:  # same category, one named value changed
                    p = world.near_miss(q)
                else:  # the named values on another category
                    p = world.product_for(Query(int(rng.integers(len(CATEGORIES))), q.named))
                pid = next_id()
            else:
                if r < fresh_rate + (1 - fresh_rate) * 0.45 and by_category.get(q.category):
                    i = int(rng.choice(by_category[q.category]))  # shares the category
                else:
                    i = int(rng.integers(len(pool)))
                if i in seen:
                    continue
                seen.add(i)
                pid, p = pool[i]
            if q.matches(p):
                continue  # never a false negative
            cands.append((pid, p, False))
        order = rng.permutation(len(cands))
        split.append((qid, world.text(q, junk=junk and rng.random() < params.junk_prefix_rate), [cands[i] for i in order]))
    return split


def generate(out: Path, params: SynthParams, progress: bool = True) -> dict:
    """Write data/{train,valid,testA}/… and multimodal_labels.txt under `out`; return counts."""
    out = Path(out)
    rng = np.random.default_rng(params.seed)
    world = World(params, rng)
    counter = iter(range(100_000_000, 200_000_000))
    next_id = lambda: next(counter)  # noqa: E731

    (out).mkdir(parents=True, exist_ok=True)
    with open(out / "multimodal_labels.txt", "w") as f:
        f.write("category_id\tcategory_name\n")
        for i, name in enumerate(LABEL_NAMES):
            f.write(f"{i}\t{name}\n")

    # Train: positives only, several rows per query, rows shuffled.
    rows = []
    for qid in range(params.train_queries):
        q = world.random_query()
        text = world.text(q)
        for _ in range(1 + int(rng.poisson(params.rows_per_train_query - 1))):
            rows.append((next_id(), world.product_for(q), text, qid))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    writer = Writer(out / "train" / "train.tsv", world, {})
    for pid, p, text, qid in tqdm(rows, desc="synth train", disable=not show_bars(progress)):
        writer.write(pid, p, text, qid)
        writer.images.clear()  # train products are not reused
    writer.close()

    # Valid and testA share one pool of negatives (products recur, with identical features).
    n_eval = params.valid_queries + params.test_queries
    pool = [(next_id(), world.random_product()) for _ in range(int(params.neg_pool_per_query * n_eval))]
    images: dict[int, tuple] = {}
    counts = {"train_rows": len(rows), "train_queries": params.train_queries}
    for split, n in (("valid", params.valid_queries), ("testA", params.test_queries)):
        queries = _eval_split(world, n, params, pool, next_id, rng, junk=True)
        writer = Writer(out / split / f"{split}.tsv", world, images)
        answers = {}
        for qid, text, cands in tqdm(queries, desc=f"synth {split}", disable=not show_bars(progress)):
            for pid, p, is_answer in cands:
                writer.write(pid, p, text, qid)
            answers[str(qid)] = [pid for pid, _, a in cands if a]
        writer.close()
        # valid_answer.json as the organisers ship it; testA_answer.json exists for synthetic data only.
        with open(out / split / f"{split}_answer.json", "w") as f:
            json.dump(answers, f)
        counts[f"{split}_rows"] = sum(len(c) for _, _, c in queries)
        counts[f"{split}_queries"] = n
    return counts
