"""Rewrite an official-layout dataset with variations the format allows but this project's generators never make.

    python bench/legal_variants.py SRC_DATA DST_DATA [--seed 0]

SRC_DATA is a `data/` folder (train/train.tsv, valid/valid.tsv + valid_answer.json, testA/testA.tsv +
testA_answer.json, multimodal_labels.txt). DST_DATA gets the same rows and answers, with:

- product ids moved above 2^32 (p -> 2^33 + p), in every file and in the answers;
- valid and testA rows in a shuffled order (a query's candidates no longer sit together);
- testA with Windows line endings (CRLF), valid without a newline after its last row;
- one query text in ten upper-cased, in every split (the same text gets the same case).

Same rows, same answers: a pipeline that reads the format should score about as on SRC_DATA. (Not exactly:
row order moves batch composition, and so the floats.) BENCHMARKS.md has what `make repro` gave on both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path

SHIFT = 1 << 33


def new_id(product: bytes) -> bytes:
    return str(SHIFT + int(product)).encode()


def upper(query: bytes) -> bool:
    return hashlib.md5(query).digest()[0] < 26  # about one text in ten, the same in every split


def rewrite(line: bytes) -> bytes:
    fields = line.rstrip(b"\r\n").split(b"\t")
    fields[0] = new_id(fields[0])
    if upper(fields[7]):
        fields[7] = fields[7].upper()
    return b"\t".join(fields)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="row shuffle of valid and testA")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    shutil.rmtree(args.dst, ignore_errors=True)
    for split in ("train", "valid", "testA"):
        (args.dst / split).mkdir(parents=True)
        with open(args.src / split / f"{split}.tsv", "rb") as f:
            header, rows = f.readline().rstrip(b"\r\n"), [rewrite(line) for line in f if line.strip()]
        if split != "train":
            rng.shuffle(rows)
        end = b"\r\n" if split == "testA" else b"\n"
        body = end.join([header, *rows]) + (b"" if split == "valid" else end)
        (args.dst / split / f"{split}.tsv").write_bytes(body)
        answers = args.src / split / f"{split}_answer.json"
        if answers.exists():
            moved = {q: [SHIFT + p for p in ps] for q, ps in json.loads(answers.read_text()).items()}
            (args.dst / split / answers.name).write_text(json.dumps(moved))
        print(f"{split}: {len(rows)} rows -> {args.dst / split}")
    labels = args.src / "multimodal_labels.txt"
    if labels.exists():
        shutil.copy(labels, args.dst / labels.name)


if __name__ == "__main__":
    main()
