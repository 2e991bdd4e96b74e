"""recipes.common.data: JSONL -> Dataset of absolute paths; bad rows refused or skipped and counted."""

import json

import pytest
from PIL import Image

from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from data_tools.records import tasks_of_line
from data_tools.split import find_leaks
from recipes.common.captions import caption_eval_records
from recipes.common.data import BadRowsError, embedded_dataset, load_records
from recipes.common.run import load_data


def _write(tmp_path, rows):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    path = tmp_path / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_records_refuses_bad_rows_with_a_pointer_to_clean(tmp_path):
    path = _write(tmp_path, [{"image": "a.png", "captions": ["ok"]}, "{broken",
                             {"image": "a.png", "captions": []}])
    with pytest.raises(BadRowsError) as e:
        load_records(path, "caption")
    text = str(e.value)
    assert "2 invalid row(s)" in text and f"{path}:2:" in text and f"{path}:3: field 'captions'" in text
    assert "python -m data_tools clean --task caption" in text and "--skip_bad_rows" in text
    assert not text.endswith("]")  # each row's reason is on its row, not repeated after the advice


def test_one_bad_row_is_a_one_line_error_naming_its_line_and_field(tmp_path):
    path = _write(tmp_path, [{"image": "a.png", "captions": ["ok"]},
                             {"image": "a.png", "captions": []}])
    with pytest.raises(BadRowsError) as e:
        load_records(path, "caption")
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}:2: field 'captions': ")
    assert text.endswith("[empty_text]; fix it, drop it with `python -m data_tools clean --task caption "
                         f"{path} --out CLEAN --rejects REJECTS`, or pass --skip_bad_rows to skip and "
                         "count it.")


def test_load_records_skips_counts_and_writes_rejects(tmp_path):
    path = _write(tmp_path, [{"image": "a.png", "captions": ["ok"], "extra": 1}, "{broken",
                             {"image": "a.png", "text": "alias"}])
    ds = load_records(path, "caption", skip_bad_rows=True)
    assert ds.column_names == ["image", "captions", "line"]
    assert ds["captions"] == [["ok"], ["alias"]]
    assert ds["image"] == [str((tmp_path / "a.png").resolve())] * 2
    assert "2 rows, 1 skipped" in ds.info.description
    assert [(r["line"], r["reason"]) for r in read_jsonl(f"{path}.rejects.jsonl")] == [(2, "malformed_json")]
    # A run's rejects file (in its output_dir) goes once a rerun there finds none: it would belie it.
    rejects = tmp_path / "run" / "rejects" / "train.rejects.jsonl"
    load_records(path, "caption", skip_bad_rows=True, rejects_path=rejects)
    assert len(read_jsonl(rejects)) == 1
    fixed = _write(tmp_path, [{"image": "a.png", "captions": ["ok"]}])
    assert fixed == path and len(load_records(path, "caption", skip_bad_rows=True, rejects_path=rejects)) == 1
    assert not rejects.exists()


def test_a_file_of_another_task_says_which_task_its_rows_fit(tmp_path):
    caption = {"image": "a.png", "captions": ["a red square"]}
    conversation = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                        {"from": "gpt", "value": "A square."}]}
    assert tasks_of_line(json.dumps(caption).encode()) == ["caption", "retrieval"]
    assert tasks_of_line(json.dumps(conversation).encode()) == ["instruct"]
    assert tasks_of_line(b"{broken") == [] and tasks_of_line(b"[1]") == []
    hint = "Line 1 is a valid record for task caption, not instruct."
    path = _write(tmp_path, [caption, caption])
    with pytest.raises(BadRowsError, match=hint):
        load_records(path, "instruct")
    with pytest.raises(DataError, match=f"has no valid rows. {hint}"):
        load_records(path, "instruct", skip_bad_rows=True)
    # A recipe that reads both names its option (llava_instruct's --data_task), for the task the rows fit.
    flags = {"caption": "--data_task caption", "instruct": "--data_task instruct"}
    with pytest.raises(BadRowsError, match=f"{hint} Pass --data_task caption to read caption records."):
        load_records(path, "instruct", task_flags=flags)
    # Once any row fits the task, the bad ones are only bad rows.
    with pytest.raises(BadRowsError) as error:
        load_records(_write(tmp_path, [conversation, caption]), "instruct")
    assert "valid record for task" not in str(error.value)


def test_a_row_of_its_own_task_with_a_bad_image_gets_no_task_hint(tmp_path):
    # {"image", "captions"} fits retrieval too: a missing image is not a record of another task.
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"image": "missing.png", "captions": ["a cat"]}) + "\n")
    with pytest.raises(BadRowsError) as error:
        load_records(path, "caption")
    assert "[missing_image]" in str(error.value) and "valid record for task" not in str(error.value)


def test_vqa_mixed_question_id_types_become_strings(tmp_path):
    rows = [{"image": "a.png", "question_id": 1, "question": "q?", "answers": ["a"]},
            {"image": "a.png", "question_id": "x2", "question": "q?", "answer": "b"}]
    ds = load_records(_write(tmp_path, rows), "vqa")
    assert (ds["question_id"] == ["1", "x2"] and ds["answers"] == [["a"], ["b"]]
            and ds["answer_type"] == [None, None])


def test_embedded_dataset_is_built_once_split_by_image_without_leakage(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path))
    splits = embedded_dataset("caption", n=60, seed=3)
    sizes = {k: len(read_jsonl(p)) for k, p in splits.items()}
    assert sum(sizes.values()) == 60 and sizes["train"] >= 45
    assert find_leaks([splits["train"], splits["val"], splits["test"]]) == []
    mtime = splits["train"].stat().st_mtime_ns
    assert embedded_dataset("caption", n=60, seed=3) == splits and splits["train"].stat().st_mtime_ns == mtime
    ds = load_records(splits["train"], "caption", check_images="decode")
    assert len(ds) == sizes["train"]


def _images_apart(tmp_path):
    """A user's layout: annotations in data/, images in images/ (one whole, one cut off, one missing)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "data").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "images" / "good.jpg")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "images" / "cut.jpg")
    data = (tmp_path / "images" / "cut.jpg").read_bytes()
    (tmp_path / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    rows = [{"image": "good.jpg", "captions": ["red"]}, {"image": "cut.jpg", "captions": ["blue"]},
            {"image": "gone.jpg", "captions": ["none"]}, {"image": "good.jpg", "captions": ["again"]}]
    path = tmp_path / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_root_resolves_paths_and_every_image_is_checked_before_training(tmp_path):
    path = _images_apart(tmp_path)
    with pytest.raises(BadRowsError) as e:  # without the root, the images are not next to the file
        load_records(path, "caption")
    assert "4 invalid row(s)" in str(e.value) and "missing_image" in str(e.value)
    with pytest.raises(BadRowsError) as e:
        load_records(path, "caption", image_root=tmp_path / "images")
    text = str(e.value)
    assert "2 invalid row(s)" in text and f"{path}:2: field 'image'" in text and "truncated_image" in text
    assert f"{path}:3: field 'image'" in text and "missing_image" in text
    assert f"data_tools clean --task caption --image-root {tmp_path / 'images'} {path}" in text
    rejects = tmp_path / "run" / "rejects" / "train.rejects.jsonl"
    ds = load_records(path, "caption", image_root=tmp_path / "images", skip_bad_rows=True,
                      rejects_path=rejects)
    assert ds["captions"] == [["red"], ["again"]] and "2 rows, 2 skipped" in ds.info.description
    assert [(r["line"], r["reason"]) for r in read_jsonl(rejects)] == [(2, "truncated_image"),
                                                                       (3, "missing_image")]
    # nothing written into the user's data folder
    assert not list((tmp_path / "data").glob("*.rejects.jsonl"))
    ds = load_records(path, "caption", image_root=tmp_path / "images", check_images="none",
                      skip_bad_rows=True)
    assert len(ds) == 4  # unchecked: the collator would meet the bad images


def test_image_root_is_a_guard_too(tmp_path):
    _images_apart(tmp_path)  # data/ and images/ side by side
    (tmp_path / "data" / "up.jsonl").write_text(
        json.dumps({"image": "../good.jpg", "captions": ["x"]}) + "\n")
    with pytest.raises(DataError, match="not a folder|does not exist|no such"):  # a root that is not there
        load_records(tmp_path / "data" / "up.jsonl", "caption", image_root=tmp_path / "images" / "sub")
    (tmp_path / "images" / "sub").mkdir()
    with pytest.raises(BadRowsError) as e:
        load_records(tmp_path / "data" / "up.jsonl", "caption", image_root=tmp_path / "images" / "sub")
    assert "path_outside_root" in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_check_image_finds_a_cut_off_file_without_decoding_it(tmp_path, fmt):
    import numpy as np

    from data_tools.images import check_image

    path = tmp_path / f"a.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, fmt)
    check_image(path)  # whole: no error
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        check_image(path)
    assert e.value.reason in ("truncated_image", "unreadable_image") and str(path) in str(e.value)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        check_image(path)


def _data_args(**files):
    from types import SimpleNamespace

    return SimpleNamespace(**{"train_file": None, "eval_file": None, "test_file": None, "image_root": None,
                              "check_images": "header", "skip_bad_rows": True, "max_train_samples": None,
                              "max_eval_samples": None, **files})


def test_a_test_file_without_a_validation_file_or_a_training_file_is_refused():
    args = _data_args(train_file="train.jsonl", test_file="test.jsonl")
    with pytest.raises(ValueError, match="--test_file needs an --eval_file"):
        load_data(args, "caption", embedded=lambda: {}, output_dir="out")
    # Else the embedded synthetic set would train, and the user's file only be scored.
    for files in ({"eval_file": "val.jsonl"}, {"eval_file": "val.jsonl", "test_file": "test.jsonl"}):
        with pytest.raises(ValueError, match="without --train_file"):
            load_data(_data_args(**files), "caption", embedded=lambda: {}, output_dir="out")


def test_rejects_of_files_with_one_name_in_two_folders_are_kept_apart(tmp_path):
    # e.g. train/metadata.jsonl and val/metadata.jsonl
    for split, n_bad in (("train", 2), ("val", 1)):
        (tmp_path / split).mkdir()
        _write(tmp_path / split, [{"image": "a.png", "captions": ["ok"]}] + ["{broken"] * n_bad).rename(
            tmp_path / split / "metadata.jsonl")
    args = _data_args(train_file=str(tmp_path / "train" / "metadata.jsonl"),
                      eval_file=str(tmp_path / "val" / "metadata.jsonl"))
    load_data(args, "caption", embedded=lambda: {}, output_dir=tmp_path / "run")
    assert [r["line"] for r in read_jsonl(tmp_path / "run" / "rejects" / "train.rejects.jsonl")] == [2, 3]
    assert [r["line"] for r in read_jsonl(tmp_path / "run" / "rejects" / "eval.rejects.jsonl")] == [2]


def test_max_eval_samples_keeps_every_caption_row_of_the_images_it_keeps(tmp_path):
    for name in ("b.png", "c.png"):
        Image.new("RGB", (16, 16), "blue").save(tmp_path / name)
    rows = [{"image": "a.png", "captions": ["a1"]}, {"image": "b.png", "captions": ["b1"]},
            {"image": "a.png", "captions": ["a2"]}, {"image": "c.png", "captions": ["c1"]},
            {"image": "b.png", "captions": ["b2"]}]
    val = _write(tmp_path, rows).rename(tmp_path / "val.jsonl")
    train = _write(tmp_path, rows)
    args = _data_args(train_file=str(train), eval_file=str(val), max_eval_samples=2)
    for task in ("caption", "retrieval"):
        _, held_out, _ = load_data(args, task, embedded=lambda: {}, output_dir=tmp_path / "run")
        assert held_out["captions"] == [["a1"], ["b1"], ["a2"], ["b2"]]  # 2 images, all their rows
    _, held_out, _ = load_data(args, "caption", embedded=lambda: {}, output_dir=tmp_path / "run")
    assert caption_eval_records(held_out)["captions"] == [["a1", "a2"], ["b1", "b2"]]


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_a_resume_needs_the_same_settings(tmp_path):
    from recipes.common.run import check_output_dir, check_same_run

    out = tmp_path / "run"
    check_output_dir(out, None)  # no folder yet
    (out / "vision_features").mkdir(parents=True)
    check_output_dir(out, None)  # no checkpoint: a fresh run may write there
    for step in (2, 10):
        (out / f"checkpoint-{step}").mkdir()
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(checkpoint-10, 2 checkpoint\(s\)\)"):
        check_output_dir(out, None)
    check_output_dir(out, "last")  # resuming it is what the folder is for

    started = {"train_file": "/d/a.jsonl", "model": "tiny:blip2-opt", "labels": ("x", "y")}
    check_same_run(out, None, started)
    assert json.loads((out / "run.json").read_text())["labels"] == ["x", "y"]
    check_same_run(out, str(out / "checkpoint-10"), dict(started))  # the same settings
    with pytest.raises(ValueError, match="train_file '/d/a.jsonl' -> '/d/b.jsonl'"):
        check_same_run(out, str(out / "checkpoint-10"), {**started, "train_file": "/d/b.jsonl"})
    assert json.loads((out / "run.json").read_text())["train_file"] == "/d/a.jsonl"  # kept as it was
