"""Generates the bundled toy dataset: arithmetic progressions a toy model visibly learns to continue.

    python -m train.toy_data        # rewrites train/data/toy_{train,eval}.jsonl

Records use all three formats the data pipeline reads ({"text"}, {"prompt","completion"},
{"messages"}), so the default run exercises each of them.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def record(rng: random.Random) -> dict:
    start, step, n = rng.randint(0, 50), rng.randint(1, 9), rng.randint(4, 7)
    seq = [start + step * i for i in range(n + 4)]
    shown, rest = " ".join(map(str, seq[:n])), " ".join(map(str, seq[n:]))
    kind = rng.random()
    if kind < 0.4:
        return {"prompt": f"Continue: {shown}", "completion": f" {rest}"}
    if kind < 0.8:
        return {"messages": [{"role": "user", "content": f"Continue: {shown}"},
                             {"role": "assistant", "content": rest}]}
    return {"text": f"Continue: {shown} {rest}"}


def write(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps(record(rng)) + "\n")


if __name__ == "__main__":
    DATA_DIR.mkdir(exist_ok=True)
    write(DATA_DIR / "toy_train.jsonl", 4000, seed=0)
    write(DATA_DIR / "toy_eval.jsonl", 200, seed=1)
    print(f"wrote {DATA_DIR}/toy_train.jsonl and toy_eval.jsonl")
