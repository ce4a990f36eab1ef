"""Benchmark serving: `mlflow models serve` of the registered champion, one 30-candidate query per request.

    .venv/bin/python bench/bench_serve.py                 # after `make repro` (the store and champion it made)
    .venv/bin/python bench/bench_serve.py --requests 200 --model-uri models:/mmrecall-ranker@champion

Starts the server on 127.0.0.1 (a free port; stopped at the end), waits until it answers, sends a few warm-up
requests, then `--requests` requests one after the other, each one whole testA query (its ~30 candidate rows
in the official columns, as `dataframe_split` JSON), cycling over the queries. Reports p50 / p90 / p99 latency
(client side: request sent to answer read) and queries/s, and checks that a request with a malformed row gets
HTTP 400 naming the row. Results: a markdown line on stdout and bench/results/serve.json.

`--floor` serves a pyfunc that only answers zeros (no decoding, no model) to the same requests instead:
what `mlflow models serve` itself costs for a 30-candidate body, a floor under any ranker's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def bad_message(body: str) -> str:
    """The ranker's own error line inside MLflow's 400 answer (its stack trace), else the answer's start."""
    at = body.find("candidate table row")
    return body[at:at + 200].split("\\n")[0] if at >= 0 else body[:300]


def query_bodies(tsv: Path) -> list[bytes]:
    """One request body per query of the candidate file (its rows in file order)."""
    from mmrecall.ranking.ranker import read_candidates

    table = read_candidates(tsv)
    return [json.dumps({"dataframe_split": json.loads(group.to_json(orient="split", index=False))}).encode()
            for _, group in table.groupby("query_id", sort=False)]


def save_floor_model(path: Path, body: bytes) -> str:
    """A pyfunc that reads nothing and answers one 0.0 per row: the server's own cost, with no ranker.

    Its signature is inferred from a request (`body`), so the server parses and checks the columns as it
    does for the ranker's.
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    split = json.loads(body)["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])

    class Zeros(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.zeros(len(model_input))

    mlflow.pyfunc.save_model(str(path), python_model=Zeros(), signature=infer_signature(frame, np.zeros(len(frame))))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default="models:/mmrecall-ranker@champion")
    parser.add_argument("--candidates", type=Path, default=ROOT / "data" / "testA" / "testA.tsv")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--floor", action="store_true",
                        help="serve a model that answers zeros instead of --model-uri (the server's own cost)")
    args = parser.parse_args(argv)

    from mmrecall import tracking

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    bodies = query_bodies(args.candidates)
    if args.floor:
        args.model_uri = save_floor_model(Path(tempfile.mkdtemp(prefix="mmrecall-floor-")) / "model", bodies[0])
    port = free_port()
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", args.model_uri, "-p", str(port), "-h", "127.0.0.1",
                               "--env-manager", "local"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while True:  # the server loads the model before it answers
            try:
                status, _ = post(port, bodies[0])
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server did not answer: {server.stderr.read().decode()[-2000:]}")
                time.sleep(1)
        assert status == 200, status
        for i in range(args.warmup):
            post(port, bodies[i % len(bodies)])
        latencies = []
        started = time.perf_counter()
        for i in range(args.requests):
            t0 = time.perf_counter()
            status, out = post(port, bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)
            assert status == 200, (status, out[:500])
        wall = time.perf_counter() - started

        bad = json.loads(bodies[0])  # row 2's features cut short: HTTP 400 naming the row
        features = bad["dataframe_split"]["columns"].index("features")
        bad["dataframe_split"]["data"][2][features] = bad["dataframe_split"]["data"][2][features][:-8] + "!!!!!!!!"
        bad_status, bad_out = post(port, json.dumps(bad).encode())
    finally:
        server.terminate()
        server.wait(timeout=30)

    ms = np.array(latencies) * 1000
    result = {
        "model_uri": args.model_uri,
        "requests": args.requests,
        "candidates_per_request": round(float(np.mean([len(json.loads(b)["dataframe_split"]["data"]) for b in bodies])), 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "queries_per_s": round(args.requests / wall, 1),
        "bad_row_status": bad_status,
        "bad_row_message": bad_message(bad_out.decode()),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / ("serve_floor.json" if args.floor else "serve.json")).write_text(json.dumps(result, indent=2) + "\n")
    print("| requests | candidates/request | p50 ms | p90 ms | p99 ms | queries/s | bad row |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['requests']} | {result['candidates_per_request']} | {result['p50_ms']} | {result['p90_ms']} | "
          f"{result['p99_ms']} | {result['queries_per_s']} | HTTP {bad_status} |")
    if not args.floor and (bad_status != 400 or "candidate table row 2" not in result["bad_row_message"]):
        print(f"bad row: expected HTTP 400 naming row 2, got {bad_status}: {result['bad_row_message']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
