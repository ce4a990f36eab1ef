"""An official-format dataset from a second generator that shares no code, vocabulary or feature process
with `mmrecall synth` (src/mmrecall/data/synth.py), to check that the pipeline runs unchanged and keeps its
acceptance lines on data it was not shaped on.

    .venv/bin/python bench/other_generator.py --out /tmp/other/data            # then, in a fresh clone:
    cp -r /tmp/other/data <clone>/data && cd <clone> && make repro

How it differs from `mmrecall synth`:
- words: its own categories (multi-word nouns, "straw heavy-bottomed sandals") and facets (season, fit,
  pattern, colour, fabric), named in varying order, sometimes joined by "and";
- features: a product's latent (category + its values, each value's look mixed with a per-category term)
  goes through a random two-layer ReLU network, then per-box noise and a random per-box gain: the
  attributes are non-linear in the features;
- images: 1 to 45 boxes (a few over the 30 that prepare keeps); the product's box is anywhere in the list
  and of any size; clutter boxes are other products' looks or background;
- valid / testA: 9 to 30 candidates (mostly 30) and 1 to 6 answers per query; about half the negatives
  are near-misses (same category, one named value wrong); negatives recur across queries and splits,
  answers occur once;
- query ids: train ids up to ~10^6, valid / testA ids 0..~300 with gaps.

Writes data/{train/train.tsv, valid/valid.tsv, valid/valid_answer.json, testA/testA.tsv,
testA/testA_answer.json, multimodal_labels.txt} under --out. One seed gives the same files.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

FEAT = 2048
LATENT = 64
COLUMNS = "product_id\timage_h\timage_w\tnum_boxes\tboxes\tfeatures\tclass_labels\tquery\tquery_id\n"
# noun phrase, class id (0..27)
NOUNS = [
    ("straw heavy-bottomed sandals", 4), ("running shoes", 4), ("ankle boots", 4), ("slippers", 4),
    ("maxi dress", 1), ("pleated skirt", 1), ("hoodie", 0), ("down jacket", 0), ("polo shirt", 0),
    ("cardigan", 0), ("cargo pants", 2), ("shorts", 2), ("leggings", 2), ("tote bag", 3),
    ("suitcase", 3), ("belt", 5), ("earrings", 5), ("bucket hat", 5), ("wooden file cabinet", 9),
    ("bookshelf", 9), ("office chair", 9), ("desk lamp", 19), ("ceiling light", 19), ("rice cooker", 11),
    ("electric kettle", 11), ("throw pillow", 13), ("duvet cover", 23), ("teapot", 14), ("cutting board", 14),
    ("laundry basket", 16), ("building blocks", 20), ("doll", 20), ("camping chair", 18),
    ("badminton racket", 26), ("phone holder", 22), ("earphones", 22), ("face cream", 7), ("nail polish", 7),
    ("green tea", 6), ("mixed nuts", 6), ("baby bottle", 24), ("razor", 25),
]
FACETS = [
    ("season", ["summer", "winter", "spring and autumn", "all-season"]),
    ("fit", ["loose", "slim", "oversized", "high-waisted", "compact", "large-capacity"]),
    ("pattern", ["striped", "plaid", "floral", "solid color", "polka dot", "printed", "embroidered"]),
    ("colour", ["navy", "khaki", "rose", "off-white", "charcoal", "mint", "burgundy", "mustard", "lilac"]),
    ("fabric", ["linen", "wool", "suede", "canvas", "acrylic", "stainless steel", "rattan", "velvet"]),
]
EXTRA = ["breathable", "comfortable", "new", "hot sale", "fashion", "simple", "ins"]
JUNK = ["is", "'s", "and", "-"]
SIZES = [(800, 800), (1000, 1000), (750, 1000), (338, 209), (640, 640), (480, 720), (120, 90), (1200, 900)]


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


class Generator:
    def __init__(self, seed: int, noise: float, look: float):
        self.rng = np.random.default_rng(seed)
        r = self.rng
        self.noise, self.look = noise, look
        self.cat = r.normal(0, 1.0, (len(NOUNS), LATENT))
        self.value = [r.normal(0, 0.8, (len(v), LATENT)) for _, v in FACETS]
        # a value's look also depends on the category: its own random term per (category, value)
        self.value_by_cat = [r.normal(0, 0.8, (len(NOUNS), len(v), LATENT)) for _, v in FACETS]
        self.w1 = r.normal(0, 1 / np.sqrt(LATENT), (LATENT, 512))
        self.w2 = r.normal(0, 1 / np.sqrt(512), (512, FEAT))
        self.background = r.normal(0, 1.0, (12, LATENT))

    def product(self, category: int | None = None) -> tuple[int, tuple[int, ...]]:
        c = int(self.rng.integers(len(NOUNS))) if category is None else category
        return c, tuple(int(self.rng.integers(len(v))) for _, v in FACETS)

    def latent(self, p: tuple[int, tuple[int, ...]]) -> np.ndarray:
        c, values = p
        z = self.cat[c].copy()
        for f, v in enumerate(values):
            z += (1 - self.look) * self.value[f][v] + self.look * self.value_by_cat[f][c, v]
        return z

    def features(self, latents: np.ndarray) -> np.ndarray:
        z = latents + self.rng.normal(0, self.noise, latents.shape)
        h = np.maximum(z @ self.w1, 0)
        a = h @ self.w2  # (B, FEAT)
        scale = a.std(1, keepdims=True) + 1e-6
        x = np.maximum(a / scale - 0.5, 0)  # about 30% of the units on, ReLU-like
        gain = self.rng.uniform(0.5, 2.0, (len(x), 1))
        return (x * gain).astype(np.float32)

    def image(self, p) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        r = self.rng
        h, w = SIZES[int(r.integers(len(SIZES)))]
        n = int(min(1 + r.geometric(0.35) - 1 + (r.random() < 0.01) * r.integers(30, 45), 45))
        n = max(n, 1)
        main = int(r.integers(n))
        latents, labels, boxes = [], [], []
        for b in range(n):
            if b == main:
                latents.append(self.latent(p))
                labels.append(NOUNS[p[0]][1])
                side = r.uniform(0.3, 1.0)
            elif r.random() < 0.4:
                latents.append(self.latent(self.product()))
                labels.append(int(r.integers(28)))
                side = r.uniform(0.2, 0.9)
            else:
                latents.append(self.background[int(r.integers(len(self.background)))] * 1.5)
                labels.append(int(r.choice([28, 28, 28, 29, 30, 31, 32])))
                side = r.uniform(0.1, 0.7)
            bh, bw = side * h, side * w * r.uniform(0.6, 1.0)
            top, left = r.uniform(0, h - bh), r.uniform(0, w - bw)
            boxes.append((top, left, top + bh, left + bw))
        feats = self.features(np.array(latents))
        return h, w, np.array(boxes, np.float32), feats, np.array(labels, np.int64)

    def query(self, p, junk: bool) -> tuple[str, tuple[tuple[int, int], ...]]:
        r = self.rng
        k = int(r.choice([1, 1, 2, 2, 2, 3]))
        named = tuple(sorted((int(f), p[1][f]) for f in r.choice(len(FACETS), k, replace=False)))
        words = [FACETS[f][1][v] for f, v in named]
        r.shuffle(words)
        if r.random() < 0.2:
            words.insert(int(r.integers(len(words) + 1)), str(r.choice(EXTRA)))
        if len(words) > 1 and r.random() < 0.2:
            words.insert(len(words) - 1, "and")
        text = " ".join(words + [NOUNS[p[0]][0]])
        if junk:
            text = f"{r.choice(JUNK)} {text}"
        return text, named

    def matching(self, c: int, named) -> tuple[int, tuple[int, ...]]:
        c, values = self.product(c)
        values = list(values)
        for f, v in named:
            values[f] = v
        return c, tuple(values)


def row(f, pid: int, img, text: str, qid: int) -> None:
    h, w, boxes, feats, labels = img
    f.write(f"{pid}\t{h}\t{w}\t{len(labels)}\t{b64(boxes)}\t{b64(feats)}\t{b64(labels)}\t{text}\t{qid}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the data/ folder to write")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-queries", type=int, default=1500)
    ap.add_argument("--rows-per-query", type=float, default=3.5)
    ap.add_argument("--eval-queries", type=int, default=120)
    ap.add_argument("--noise", type=float, default=0.6, help="latent noise per box")
    ap.add_argument("--look", type=float, default=0.6, help="share of a value's look that depends on the category")
    ap.add_argument("--near-miss", type=float, default=0.5, help="share of negatives with one named value wrong")
    args = ap.parse_args(argv)
    g = Generator(args.seed, args.noise, args.look)
    r = g.rng
    out = args.out
    for split in ("train", "valid", "testA"):
        (out / split).mkdir(parents=True, exist_ok=True)
    with open(out / "multimodal_labels.txt", "w") as f:
        f.write("category_id\tcategory_name\n" + "".join(f"{i}\tclass {i}\n" for i in range(33)))

    next_pid = [101_000_000]

    def new_pid() -> int:
        next_pid[0] += int(r.integers(1, 50))
        return next_pid[0]

    rows = 0
    with open(out / "train" / "train.tsv", "w") as f:
        f.write(COLUMNS)
        for qid in np.sort(r.choice(1_000_000, args.train_queries, replace=False)):
            p = g.product()
            text, named = g.query(p, junk=False)
            for _ in range(max(1, int(r.poisson(args.rows_per_query - 1)) + 1)):
                row(f, new_pid(), g.image(g.matching(p[0], named)), text, int(qid))
                rows += 1
    print(f"train: {args.train_queries} queries, {rows} rows", flush=True)

    shared = [(new_pid(), g.product()) for _ in range(600)]  # negatives that recur across queries and splits
    shared_images = {pid: g.image(p) for pid, p in shared}
    for split in ("valid", "testA"):
        answers = {}
        qids = np.sort(r.choice(3 * args.eval_queries, args.eval_queries, replace=False))
        with open(out / split / f"{split}.tsv", "w") as f:
            f.write(COLUMNS)
            for qid in qids:
                p = g.product()
                while True:
                    text, named = g.query(p, junk=r.random() < 0.05)
                    if named:
                        break
                n = 30 if r.random() < 0.95 else int(r.integers(9, 30))
                n_ans = 6 if r.random() < 0.95 else int(r.integers(1, 6))
                cands = [(new_pid(), g.image(g.matching(p[0], named)), True) for _ in range(n_ans)]
                while len(cands) < n:
                    u = r.random()
                    if u < args.near_miss:  # same category, one named value wrong
                        c, values = g.matching(p[0], named)
                        f_idx, v = named[int(r.integers(len(named)))]
                        values = list(values)
                        values[f_idx] = int((v + r.integers(1, len(FACETS[f_idx][1]))) % len(FACETS[f_idx][1]))
                        cands.append((new_pid(), g.image((c, tuple(values))), False))
                    elif u < args.near_miss + 0.2:
                        pid, sp = shared[int(r.integers(len(shared)))]
                        if sp[0] == p[0] and all(sp[1][fi] == v for fi, v in named):
                            continue
                        if any(pid == c[0] for c in cands):
                            continue
                        cands.append((pid, shared_images[pid], False))
                    else:  # same category or any, not matching
                        c, values = g.product(p[0] if r.random() < 0.5 else None)
                        if c == p[0] and all(values[fi] == v for fi, v in named):
                            continue
                        cands.append((new_pid(), g.image((c, values)), False))
                for i in r.permutation(len(cands)):
                    pid, img, _ = cands[i]
                    row(f, pid, img, text, int(qid))
                answers[str(int(qid))] = [pid for pid, _, a in cands if a]
        with open(out / split / f"{split}_answer.json", "w") as f:
            json.dump(answers, f)
        print(f"{split}: {len(qids)} queries", flush=True)


if __name__ == "__main__":
    main()
