"""Break rows of an official-layout dataset in place, to see what bad input costs the pipeline.

    python bench/break_rows.py DATA [--share 0.03] [--seed 0]

A broken row keeps every column, but its features are no longer base64, so `prepare` rejects it. Broken: a share
of the rows of every split, drawn at random; and in valid and testA, every row of their first 2 queries and all
but 2 rows of the next 2. BENCHMARKS.md ("The same dataset with bad rows") has what `dvc repro` gave.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def break_row(line: str) -> str:
    fields = line.split("\t")
    fields[5] = "!!!!" + fields[5][4:]  # features
    return "\t".join(fields)


def break_split(path: Path, share: float, rng: random.Random, whole: int = 2, most: int = 2) -> dict:
    lines = path.read_text().splitlines()
    queries = list(dict.fromkeys(line.rsplit("\t", 1)[1] for line in lines[1:]))
    lost, short = set(queries[:whole]), set(queries[whole:whole + most])
    seen: dict[str, int] = {}
    broken = 0
    for i, line in enumerate(lines[1:], 1):
        query = line.rsplit("\t", 1)[1]
        seen[query] = seen.get(query, 0) + 1
        if query in lost or (query in short and seen[query] > 2) or rng.random() < share:
            lines[i] = break_row(line)
            broken += 1
    path.write_text("\n".join(lines) + "\n")
    return {"rows": len(lines) - 1, "broken": broken, "queries_without_rows": sorted(lost),
            "queries_with_2_rows": sorted(short)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a data/ folder in the official layout (changed in place)")
    parser.add_argument("--share", type=float, default=0.03, help="share of rows broken at random in every split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    for split in ("train", "valid", "testA"):
        whole = 0 if split == "train" else 2
        print(split, break_split(args.data / split / f"{split}.tsv", args.share, rng, whole, whole))


if __name__ == "__main__":
    main()
