"""Benchmark `prepare` throughput and peak memory against two references (see BENCHMARKS.md).

    .venv/bin/python bench/bench_prepare.py                      # ~1 GB file, all methods, workers 1 and 2
    .venv/bin/python bench/bench_prepare.py --size-gb 0.2 --only prepare floor --workers 2

Methods, each run in its own subprocess (so its peak RSS is its own):
- naive:   the competition repositories' way: pandas `read_csv` of the whole file, per-row base64
           decode + np.frombuffer + reshape of features/boxes/labels, np.concatenate, astype(float16);
- floor:   a bare floor: stream lines in binary, split on tab, a2b_base64 the features field,
           np.frombuffer(...).astype(float16); no validation, nothing written;
- prepare: `mmrecall.data.ingest.ingest_tsv` (validation on, the store written) with N workers.

The TSV is generated once with the project's synth (train split, train_queries scaled to reach the
size) under --workdir and reused. Results: a markdown table on stdout and in bench/results/prepare.md,
and bench/results/prepare.json. The file is read once before timing so that every method reads it
from the page cache (the numbers measure decoding, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BYTES_PER_TRAIN_QUERY = 98_000  # synth defaults: 3000 train queries -> ~294 MB of TSV
NAIVE_MEMORY_FACTOR = 3.5  # the naive way peaks at ~3.4x the file size


# ---------------------------------------------------------------------------------------------
# memory measurement (runs inside each child)
# ---------------------------------------------------------------------------------------------
def _proc_kib(pid: int, file: str, key: str) -> int:
    """A kB field of /proc/<pid>/<file> (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out.extend(kids)
        stack.extend(kids)
    return out


class TreeRssSampler:
    """Samples the summed RSS (and PSS) of this process and its descendants (pool workers).

    The RSS sum counts pages shared by the forked workers (libraries, copy-on-write) once per
    process, so it is an upper bound; the PSS sum splits shared pages between the processes.
    """

    def __init__(self, period: float = 0.02):
        self.period, self.peak_kib, self.peak_pss_kib, self._stop = period, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            pids = [me, *_descendants(me)]
            self.peak_kib = max(self.peak_kib, sum(_proc_kib(p, "status", "VmRSS:") for p in pids))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(_proc_kib(p, "smaps_rollup", "Pss:") for p in pids))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# the three methods (each called in a child process)
# ---------------------------------------------------------------------------------------------
def run_naive(tsv: Path, out: Path, workers: int, chunk_bytes: int) -> int:
    import base64
    import csv

    import numpy as np
    import pandas as pd

    df = pd.read_csv(tsv, sep="\t", quoting=csv.QUOTE_NONE)
    feats, boxes, labels = [], [], []
    for n, b, f, lab in zip(df["num_boxes"], df["boxes"], df["features"], df["class_labels"]):
        n = int(n)
        feats.append(np.frombuffer(base64.b64decode(f), dtype=np.float32).reshape(n, 2048))
        boxes.append(np.frombuffer(base64.b64decode(b), dtype=np.float32).reshape(n, 4))
        labels.append(np.frombuffer(base64.b64decode(lab), dtype=np.int64).reshape(n))
    features = np.concatenate(feats).astype(np.float16)
    boxes_all, labels_all = np.concatenate(boxes), np.concatenate(labels)
    assert len(features) == len(boxes_all) == len(labels_all)
    return len(df)


def run_floor(tsv: Path, out: Path, workers: int, chunk_bytes: int) -> int:
    from binascii import a2b_base64

    import numpy as np

    rows = 0
    with open(tsv, "rb", buffering=1 << 20) as f:
        f.readline()  # header
        for line in f:
            parts = line.split(b"\t")
            np.frombuffer(a2b_base64(parts[5]), dtype=np.float32).astype(np.float16)
            rows += 1
    return rows


def run_prepare(tsv: Path, out: Path, workers: int, chunk_bytes: int) -> int:
    from mmrecall.config import PrepareParams
    from mmrecall.data.ingest import ingest_tsv

    params = PrepareParams(workers=workers)
    if chunk_bytes:
        params.chunk_bytes = chunk_bytes
    summary = ingest_tsv(tsv, out, params, train=True, progress=False)  # the train path: the 124 GB file
    return int(summary["rows_kept"])


METHODS = {"naive": run_naive, "floor": run_floor, "prepare": run_prepare}


def child_main(args: argparse.Namespace) -> int:
    import resource

    tsv = Path(args.tsv)
    with TreeRssSampler() as sampler:
        t0 = time.perf_counter()
        rows = METHODS[args.child](tsv, Path(args.out), args.workers, args.chunk_bytes)
        seconds = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    self_kib, kids_kib = me.ru_maxrss, kids.ru_maxrss  # kids: the largest single worker
    size = tsv.stat().st_size
    result = {
        "seconds": seconds,
        "rows": rows,
        "bytes": size,
        "mb_s": size / 1e6 / seconds,
        "rows_s": rows / seconds,
        "rss_main_mib": self_kib / 1024,
        "rss_worker_max_mib": kids_kib / 1024,
        "rss_total_mib": max(sampler.peak_kib, self_kib) / 1024,  # sampled sum over main + workers
        "pss_total_mib": sampler.peak_pss_kib / 1024,
        # CPU seconds (user + sys, main + workers; includes interpreter start-up and imports)
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "loadavg_before": os.getloadavg()[0],
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def make_tsv(workdir: Path, size_gb: float) -> Path:
    """Generate (once) a synth train TSV of about size_gb GB; return its path."""
    from mmrecall.config import SynthParams
    from mmrecall.data.synth import generate

    queries = max(10, round(size_gb * 1e9 / BYTES_PER_TRAIN_QUERY))
    data = workdir / f"synth_{queries}q"
    tsv, done = data / "train" / "train.tsv", data / "complete.json"
    if tsv.exists() and done.exists():
        print(f"reusing {tsv} ({tsv.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
        return tsv
    print(f"generating {tsv} ({queries} train queries, ~{size_gb:g} GB) ...", file=sys.stderr)
    t0 = time.perf_counter()
    counts = generate(data, SynthParams(train_queries=queries, valid_queries=2, test_queries=2), progress=True)
    done.write_text(json.dumps({**counts, "seconds": time.perf_counter() - t0}) + "\n")
    print(f"  {tsv.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return tsv


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def warm_cache(tsv: Path) -> None:
    with open(tsv, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def run_child(method: str, tsv: Path, out: Path, workers: int, chunk_bytes: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--tsv", str(tsv), "--out", str(out), "--workers", str(workers),
           "--chunk-bytes", str(chunk_bytes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def table(results: list[dict]) -> str:
    head = ("| method | MB/s | rows/s | seconds | CPU s | peak RSS main (MiB) | peak RSS main + workers (MiB) "
            "| peak PSS main + workers (MiB) | × naive | % of floor |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | skipped: {r['skipped']} |  |  |  |  |  |  |  |  |")
            continue
        vs_naive = f"{r['vs_naive']:.2f}×" if r.get("vs_naive") is not None else "n/a"
        vs_floor = f"{100 * r['vs_floor']:.0f} %" if r.get("vs_floor") is not None else "n/a"
        lines.append(
            f"| {r['label']} | {r['mb_s']:.1f} | {r['rows_s']:.0f} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['rss_main_mib']:.0f} "
            f"| {r['rss_total_mib']:.0f} | {r['pss_total_mib']:.0f} | {vs_naive} | {vs_floor} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the generated TSV (default 1.0)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work", help="TSV and stores (git-ignored)")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), help="run only these methods")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare workers to try (default 1 2)")
    parser.add_argument("--chunk-mib", type=int, default=0,
                        help="prepare.chunk_bytes in MiB (default: PrepareParams' default)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the fastest is reported (default 2)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where prepare.md/.json go")
    # internal: run one method in this process and print its RESULT line
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--tsv", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if len(args.workers) != 1:
            parser.error("--child takes one --workers value")
        args.workers = args.workers[0]
        return child_main(args)

    sys.path.insert(0, str(ROOT / "src"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    tsv = make_tsv(args.workdir, args.size_gb)
    size = tsv.stat().st_size
    warm_cache(tsv)
    methods = args.only or ["naive", "floor", "prepare"]
    runs = [(m, w) for m in ("naive", "floor") if m in methods for w in [1]]
    runs += [("prepare", w) for w in args.workers] if "prepare" in methods else []

    results = []
    for method, workers in runs:
        label = f"prepare (workers={workers})" if method == "prepare" else method
        if method == "prepare" and args.chunk_mib:
            label = f"prepare (workers={workers}, chunk {args.chunk_mib} MiB)"
        if method == "naive" and NAIVE_MEMORY_FACTOR * size > available_bytes():
            note = (f"needs ~{NAIVE_MEMORY_FACTOR * size / 2**30:.1f} GiB, "
                    f"{available_bytes() / 2**30:.1f} GiB available")
            print(f"{label}: skipped ({note})", file=sys.stderr)
            results.append({"method": method, "label": label, "workers": workers, "skipped": note})
            continue
        tries = []
        for i in range(args.repeat):
            r = run_child(method, tsv, args.workdir / "store", workers, args.chunk_mib << 20)
            print(f"{label} run {i + 1}: {r['seconds']:.1f} s (CPU {r['cpu_s']:.1f} s), {r['mb_s']:.1f} MB/s, "
                  f"RSS main {r['rss_main_mib']:.0f} MiB, total {r['rss_total_mib']:.0f} MiB (PSS {r['pss_total_mib']:.0f}), "
                  f"load before {r['loadavg_before']:.2f}", file=sys.stderr)
            tries.append(r)
        best = min(tries, key=lambda r: r["seconds"])
        # peak RSS: the worst over the runs (memory does not benefit from a lucky run)
        for k in ("rss_main_mib", "rss_worker_max_mib", "rss_total_mib", "pss_total_mib"):
            best[k] = max(t[k] for t in tries)
        results.append({"method": method, "label": label, "workers": workers, **best,
                        "runs_seconds": [round(t["seconds"], 2) for t in tries]})

    ok = {r["method"]: r for r in results if not r.get("skipped") and r["method"] != "prepare"}
    for r in results:
        if r.get("skipped"):
            continue
        r["vs_naive"] = r["mb_s"] / ok["naive"]["mb_s"] if "naive" in ok else None
        r["vs_floor"] = r["mb_s"] / ok["floor"]["mb_s"] if "floor" in ok else None

    md = table(results)
    info = {
        "tsv": str(tsv),
        "bytes": size,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "repeat": args.repeat,
        "chunk_mib": args.chunk_mib or None,
        "results": results,
    }
    print(md)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "prepare.md").write_text(
        f"TSV: {size / 1e9:.2f} GB, {os.cpu_count()} CPUs, best of {args.repeat} runs "
        f"(peak RSS: worst of the runs)\n\n{md}\n"
    )
    (args.results / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
