"""--hashes without --image-root: the stored relative paths are under the consumer's default image root
(the JSONL's folder), wherever the data folder now is; where the data has not moved, a JSONL in another
folder still finds them where they were hashed."""

from __future__ import annotations

import shutil
from pathlib import Path

from data_tools import dedup, hashes, split
from tests.test_dedup import read, write_lines
from tests.test_data_scale_hash import photo

NO_CACHE = ["--workers", "1", "--no-hash-cache"]


def make_data(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    for k in range(8):
        photo(700 + k, 160, 120).save(folder / f"img/{k}.jpg", quality=90)
    photo(700, 160, 120).save(folder / "img/0_near.jpg", quality=70)  # a near duplicate of 0.jpg
    write_lines(folder / "all.jsonl", [{"image": f"img/{k}.jpg", "captions": [f"c{k}"]} for k in range(8)]
                + [{"image": "img/0_near.jpg", "captions": ["near"]}])
    return folder / "all.jsonl"


def hash_shards(jsonl: Path, out: Path) -> None:
    for i in range(2):
        shard = ["--shard", f"{i}/2", "--out", str(out / f"h-{i}.npz")]
        assert hashes.main([str(jsonl), *shard, *NO_CACHE]) == 0


def test_moved_data_folder_merges_its_hash_files(tmp_path, capsys):
    hash_shards(make_data(tmp_path / "d"), tmp_path / "d/h")
    shutil.move(tmp_path / "d", tmp_path / "d2")  # the data, with its hash files, moves elsewhere
    data = tmp_path / "d2"
    base = ["--task", "caption", str(data / "all.jsonl")]
    assert dedup.main(base + ["--out", str(data / "plain.jsonl")] + NO_CACHE) == 0
    # Was: not_in_hashes, the stored paths being joined with the old folder /.../d.
    assert dedup.main(base + ["--out", str(data / "sharded.jsonl"), "--hashes", str(data / "h/h-*.npz")]) == 0
    assert read(data / "sharded.jsonl") == read(data / "plain.jsonl") and len(read(data / "plain.jsonl")) == 8
    assert split.main_check_leakage([str(data / "all.jsonl"), str(data / "plain.jsonl"),
                                     "--hashes", str(data / "h/h-*.npz")]) == 1


def test_jsonl_in_another_folder_still_finds_hashes_where_they_were_made(tmp_path, capsys):
    jsonl = make_data(tmp_path / "data/raw")
    hash_shards(jsonl, tmp_path / "h")
    # The dedup output in data/ names raw/img/N.jpg: not under data/ as stored, but where it was hashed.
    assert dedup.main(["--task", "caption", str(jsonl), "--out", str(tmp_path / "data/d.jsonl"),
                       "--hashes", str(tmp_path / "h/h-*.npz")]) == 0
    out = {}
    for name, extra in (("plain", NO_CACHE), ("sharded", ["--hashes", str(tmp_path / "h/h-*.npz")])):
        assert split.main_split([str(tmp_path / "data/d.jsonl"), "--out-dir", str(tmp_path / "data"),
                                 "--seed", "0", "--names", f"{name}_a,{name}_b", "--ratios", "0.5,0.5"]
                                + extra) == 0
        out[name] = [read(tmp_path / f"data/{name}_{s}.jsonl") for s in "ab"]
    assert out["plain"] == out["sharded"] and sum(map(len, out["plain"])) == 8
