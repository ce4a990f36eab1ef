"""The data path at growing sizes: time and peak RSS per phase, the growth exponent, the real data's size.

    .venv/bin/python bench/bench_scale.py                                   # 50k, 100k, 200k train queries
    .venv/bin/python bench/bench_scale.py --phases pools 'rerank features' --queries 300 600 --eval-rows 300 600 --fused-dim 64

Phases, each run in its own subprocess (so its peak RSS is its own), at every size:
- prepare:  `ingest_tsv` of a train TSV (1 box per row, workers 1: the decoding is bench_prepare's subject);
- pools:    the `pools` stage (data/pools.py) on a train store of N queries, ~2 rows each;
- train set-up: `TrainData` (group, tokenise, read + pad the pools, the sampler) on that store;
- batches:  one epoch's triples (`sampler.sample`) and 20 batches of 128 assembled (`TrainBatches`);
- rerank features: PCA (fitted and applied one member at a time) + `build_features` on an evaluation
  store of E rows (30 candidates per query) with 2 members of fused dimension D.

Queries look like the real ones: 2-6 product words drawn from a Zipf(1) vocabulary that grows with the
data (Heaps' law, 30 n^0.6 words: ~150k words for 1.5M queries). The train store holds no features
(a sparse file of zeros: batch assembly reads them, pools and set-up never do). The growth exponent is
the log-log slope of the time (and of the memory the phase adds) over the sizes. The real data (3M rows,
1.5M queries, 72.5k evaluation rows): time from the largest size with that exponent (at least 1), peak
RSS as the RSS before the phase plus a straight-line fit of the memory it adds. Results: bench/results/scale.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
REAL = {"prepare": 3_000_000, "pools": 1_500_000, "train set-up": 1_500_000, "batches": 1_500_000, "rerank features": 72_500}
ROWS_PER_QUERY = 2.0  # 3M rows / 1.5M queries
LIMITS = {"pools": (30 * 60, 8 * 1024)}  # the acceptance: seconds, MiB at the real size


# --- synthetic inputs ---------------------------------------------------------------------------


def query_texts(n: int, seed: int = 0) -> list[str]:
    """n distinct product-like queries: 2-6 draws (repeats dropped) from a Zipf(1) vocabulary of 30 n^0.6 words."""
    rng = np.random.default_rng(seed)
    vocab = int(30 * n**0.6)
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    out: dict[str, None] = {}
    while len(out) < n:
        m = 2 * (n - len(out)) + 100
        lengths = rng.integers(2, 7, size=m)
        words = rng.choice(vocab, size=(m, 6), p=p)
        for row, k in zip(words.tolist(), lengths.tolist()):
            out.setdefault(" ".join(f"w{w}" for w in dict.fromkeys(row[:k])))
    return list(out)[:n]


def write_train_store(folder: Path, n_queries: int) -> int:
    """A train feature store of ~2 rows per query (1 box each, zero features in a sparse file); returns its rows."""
    from mmrecall.data import store

    rng = np.random.default_rng(1)
    texts = query_texts(n_queries)
    per_query = 1 + rng.poisson(ROWS_PER_QUERY - 1, size=n_queries)
    query = np.repeat(np.arange(n_queries), per_query)[rng.permutation(int(per_query.sum()))]
    rows = len(query)
    folder.mkdir(parents=True, exist_ok=True)
    text = np.array(texts, dtype=object)[query]
    pd.DataFrame({
        "product_id": np.arange(rows) + 100_000_000, "query_id": query, "query": text, "query_clean": text,
        "num_boxes": 1, "n_kept": 1, "offset": np.arange(rows), "image_h": 800, "image_w": 800, "line": np.arange(rows) + 2,
    }).to_parquet(folder / store.ROWS, index=False)
    with open(folder / store.FEATURES, "wb") as f:
        f.truncate(rows * 2048 * 2)  # float16 zeros, no disk blocks
    np.tile(np.array([0, 0, 1, 1, 1, 1], np.float32), (rows, 1)).tofile(folder / store.BOXES)
    np.full(rows, 28, np.uint8).tofile(folder / store.LABELS)
    (folder / store.META).write_text(json.dumps({"total_boxes": rows, "rows_kept": rows}))
    return rows


def write_train_tsv(path: Path, rows: int) -> None:
    from mmrecall.data.tsv import HEADER, encode_row

    rng = np.random.default_rng(2)
    texts = query_texts(max(rows // 2, 2))
    feats = rng.random((64, 1, 2048), dtype=np.float32)
    box = np.array([[0, 0, 700, 600]], np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(HEADER + "\n")
        for i in range(rows):
            q = i % len(texts)
            f.write(encode_row(100_000_000 + i, 800, 800, box, feats[i % 64], np.array([i % 33]), texts[q], q) + "\n")


def write_eval(root: Path, rows: int, dim: int, members: list[str]) -> None:
    """An evaluation store (30 candidates per query) and every member's score table + fused vectors."""
    from mmrecall.data import store
    from mmrecall.ranking import outputs

    rng = np.random.default_rng(3)
    folder = root / "features" / "valid"
    folder.mkdir(parents=True, exist_ok=True)
    boxes = rng.integers(1, 6, size=rows)
    pd.DataFrame({
        "product_id": rng.integers(0, rows * 2 // 3, size=rows) + 100_000_000, "query_id": np.arange(rows) // 30,
        "query": "w1 w2 w3", "query_clean": "w1 w2 w3", "num_boxes": boxes, "n_kept": boxes,
        "offset": np.concatenate([[0], np.cumsum(boxes)[:-1]]), "image_h": 800, "image_w": 600, "line": np.arange(rows) + 2,
    }).to_parquet(folder / store.ROWS, index=False)
    total = int(boxes.sum())
    b = rng.random((total, 6), dtype=np.float32)
    b.tofile(folder / store.BOXES)
    rng.integers(0, 33, size=total, dtype=np.uint8).tofile(folder / store.LABELS)
    with open(folder / store.FEATURES, "wb") as f:
        f.truncate(total * 2048 * 2)
    (folder / store.META).write_text(json.dumps({"total_boxes": total}))
    basis = rng.normal(size=(32, dim)).astype(np.float32) * np.geomspace(3, 0.1, 32, dtype=np.float32)[:, None]
    st = store.FeatureStore.open(folder)
    for m in members:
        fused = np.empty((rows, dim), np.float16)
        for s in range(0, rows, 8192):  # ReLU'd low-rank vectors, like a member's fused layer
            k = min(8192, rows - s)
            fused[s : s + k] = np.maximum(rng.normal(size=(k, 32)).astype(np.float32) @ basis, 0)
        outputs.write(root / "outputs", m, "valid", outputs.score_table(st, rng.normal(size=rows)), fused)


# --- phases (each in a child process) -------------------------------------------------------------


def _prepare(work: Path, size: int, fused_dim: int):
    from mmrecall.config import PrepareParams
    from mmrecall.data.ingest import ingest_tsv

    def run():
        summary = ingest_tsv(work / f"train{size}.tsv", work / f"prepared{size}", PrepareParams(workers=1), train=True,
                             progress=False)
        return {"rows_kept": summary["rows_kept"]}
    return run


def _pools(work: Path, size: int, fused_dim: int):
    from mmrecall.config import PoolsParams
    from mmrecall.data import pools

    def run():
        meta = pools.build(work / f"train{size}", work / f"pools{size}", PoolsParams().cap, PoolsParams().shard_queries)
        return {"rows": meta["rows"], "pool_size": meta["size"], "shards": meta["shards"], "short_pools": meta["short_pools"]}
    return run


def _train_data(work: Path, size: int):
    """A function that builds the TrainData of a size (the tokenizer loaded first)."""
    from mmrecall.config import TrainParams
    from mmrecall.data.batching import TrainData
    from mmrecall.data.store import FeatureStore
    from mmrecall.models.backbone import load_tokenizer

    tokenizer = load_tokenizer()
    return lambda: TrainData(FeatureStore.open(work / f"train{size}"), tokenizer, TrainParams(), seed=1, pairwise=False,
                             pools=work / f"pools{size}")


def _batches(work: Path, size: int, fused_dim: int):
    from mmrecall.data.batching import TrainBatches

    data = _train_data(work, size)()  # set up outside the timing

    def run():
        for _ in TrainBatches(data, epoch=0, n_batches=20):
            pass
        return {"triples": len(data.sampler)}
    return run


def _rerank_features(work: Path, size: int, fused_dim: int):
    from mmrecall.config import RerankParams
    from mmrecall.data.store import FeatureStore
    from mmrecall.ranking.features import build_features
    from mmrecall.ranking.reranker import feature_spec, read_members

    rp = RerankParams()  # the defaults: pca_dims 8, consensus [1, 3, 5, 10] in 2 rounds, density [3, 5]

    def run():
        root, names = work / f"eval{size}-{fused_dim}", ["m1", "m2"]
        stores = {"valid": FeatureStore.open(root / "features" / "valid")}
        spec = feature_spec(rp, names)
        outs, _ = read_members(root / "outputs", names, stores, spec)
        counts = stores["valid"].rows.product_id.value_counts()
        build_features(stores["valid"], outs["valid"], spec, counts)
        return {}
    return run


def _setup(work: Path, size: int, fused_dim: int):
    build = _train_data(work, size)
    return lambda: {"queries": len(build().tokens.ids)}


PHASES = {"prepare": _prepare, "pools": _pools, "train set-up": _setup, "batches": _batches,
          "rerank features": _rerank_features}


def phase(name: str, work: Path, size: int, fused_dim: int) -> dict:
    """Run one phase in this process (its imports and inputs first); its seconds and the RSS just before it."""
    import psutil

    run = PHASES[name](work, size, fused_dim)
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    extra = run() or {}
    return {"seconds": round(time.perf_counter() - started, 2), "rss_before_mib": round(before / 2**20), **extra}


def run_child(name: str, work: Path, size: int, fused_dim: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--size", str(size), "--fused-dim", str(fused_dim)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} at {size}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss, not inherited from the parent on fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def slope(sizes: list[int], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(seconds, 1e-3)), 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[50_000, 100_000, 200_000], help="train queries")
    parser.add_argument("--prepare-rows", type=int, nargs="+", default=[5_000, 10_000, 20_000], help="TSV rows")
    parser.add_argument("--eval-rows", type=int, nargs="+", default=[7_200, 24_000, 72_000], help="evaluation rows")
    parser.add_argument("--fused-dim", type=int, default=2048, help="members' fused dimension (> 1024: randomized PCA)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "scale")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--phases", nargs="+", default=list(REAL), choices=list(REAL), metavar="PHASE",
                        help=f"phases to run (default: all of {', '.join(REAL)})")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = phase(args.child, args.work, args.size, args.fused_dim)
        print(json.dumps({**result, "peak_rss_mib": round(peak_rss_kib() / 1024)}))
        return 0

    sizes = {"prepare": args.prepare_rows, "pools": args.queries, "train set-up": args.queries,
             "batches": args.queries, "rerank features": args.eval_rows}
    sizes = {name: values for name, values in sizes.items() if name in args.phases}
    if {"train set-up", "batches"} & set(sizes) and "pools" not in sizes:
        parser.error("train set-up and batches read the pools: run the pools phase too")
    args.work.mkdir(parents=True, exist_ok=True)
    for rows in sizes.get("prepare", []):  # inputs are written once per size (and kept under --work)
        if not (args.work / f"train{rows}.tsv").exists():
            write_train_tsv(args.work / f"train{rows}.tsv", rows)
    for n in sizes.get("pools", []):
        if not (args.work / f"train{n}" / "meta.json").exists():
            write_train_store(args.work / f"train{n}", n)
    for rows in sizes.get("rerank features", []):
        if not (args.work / f"eval{rows}-{args.fused_dim}" / "outputs").exists():
            write_eval(args.work / f"eval{rows}-{args.fused_dim}", rows, args.fused_dim, ["m1", "m2"])
    results: dict[str, list[dict]] = {}
    for name, values in sizes.items():
        results[name] = []
        for size in values:
            r = {"size": size, **run_child(name, args.work, size, args.fused_dim)}
            print(f"{name:16s} {size:>9,d}  {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mib']:6,d} MiB", file=sys.stderr)
            results[name].append(r)
    summary = {}
    for name, rs in results.items():
        n = [r["size"] for r in rs]
        work_mib = [max(r["peak_rss_mib"] - r["rss_before_mib"], 1) for r in rs]  # what the phase itself added
        k, k_mem = slope(n, [r["seconds"] for r in rs]), slope(n, work_mib)
        per_item, fixed = np.polyfit(n, work_mib, 1) if len(set(n)) > 1 else (work_mib[0] / n[0], 0.0)
        summary[name] = {"exponent": round(k, 2), "memory_exponent": round(k_mem, 2), "real_size": REAL[name],
                         "real_seconds": round(rs[-1]["seconds"] * (REAL[name] / n[-1]) ** max(k, 1.0), 1),
                         "real_peak_rss_mib": round(rs[-1]["rss_before_mib"] + max(fixed + per_item * REAL[name], work_mib[-1]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv[1:], "results": results, "summary": summary}, indent=2) + "\n")
    print(table(results, summary))
    return 0


def table(results: dict, summary: dict) -> str:
    lines = ["| phase | sizes | seconds | peak RSS MiB | exponent (time / memory) | real size | extrapolated s | "
             "extrapolated peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        s = summary[name]
        sizes = " / ".join(f"{r['size']:,}" for r in rs)
        seconds = " / ".join(f"{r['seconds']:.1f}" for r in rs)
        peaks = " / ".join(f"{r['peak_rss_mib']:,}" for r in rs)
        lines.append(f"| {name} | {sizes} | {seconds} | {peaks} | {s['exponent']:.2f} / {s['memory_exponent']:.2f} | {s['real_size']:,} | "
                     f"{s['real_seconds']:,.0f} | {s['real_peak_rss_mib']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
