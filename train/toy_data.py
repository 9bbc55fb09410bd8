"""Generates the bundled toy dataset: runs of the alphabet ("Continue: c d e f" -> " g h i j").

The task is one a LoRA on the toy preset's random, frozen base learns to answer correctly in the default
150 steps (eval loss ~0.25; arithmetic progressions, the earlier task, stalled near 1.8 with every
continuation wrong), so the first run's adapter visibly works when served.

    python -m train.toy_data        # rewrites train/data/toy_{train,eval}.jsonl

Records use all three formats the data pipeline reads ({"text"}, {"prompt","completion"},
{"messages"}), so the default run exercises each of them.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


LETTERS = "abcdefghijklmnopqrstuvwxyz"
SHOWN = (3, 8)  # letters in a prompt; the answer is the next 4


def continuation(shown: str, n: int = 4) -> str:
    """The right answer to "Continue: <shown>": the next n letters, e.g. "c d e f" -> " g h i j"."""
    i = LETTERS.index(shown.split()[-1]) + 1
    return "".join(" " + c for c in LETTERS[i:i + n])


def record(rng: random.Random) -> dict:
    n = rng.randint(*SHOWN)
    start = rng.randint(0, len(LETTERS) - n - 4)
    seq = LETTERS[start:start + n + 4]
    shown, rest = " ".join(seq[:n]), " ".join(seq[n:])
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
