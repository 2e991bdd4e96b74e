"""Write two caption baselines for a split, to show the metrics' range until a trained model exists.

constant: every image gets the training set's most common caption (a floor).
human:    each image's first reference is the prediction, scored against the others (a ceiling).
"""

import argparse
from collections import Counter
from pathlib import Path

from data_tools.jsonl import read_jsonl, write_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out-dir", required=True)
    args = p.parse_args()
    out = Path(args.out_dir)
    common = Counter(c for r in read_jsonl(args.train) for c in r["captions"]).most_common(1)[0][0]
    test = read_jsonl(args.test)
    write_jsonl(out / "constant_predictions.jsonl", ({"image": r["image"], "prediction": common} for r in test))
    write_jsonl(out / "human_predictions.jsonl", ({"image": r["image"], "prediction": r["captions"][0]} for r in test))
    write_jsonl(out / "human_references.jsonl", ({"image": r["image"], "captions": r["captions"][1:]} for r in test))
    print(f"constant baseline caption: {common!r}")


if __name__ == "__main__":
    main()
