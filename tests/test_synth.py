"""synth: schema, determinism, texts that match the stored attributes, and pixels that match them too."""

import hashlib
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_tools.images import load_image
from data_tools.jsonl import read_jsonl
from data_tools.records import TASKS, normalize_record
from data_tools.synth import COLORS, POSITIONS, SHAPES, ZH, main, make_synthetic

REPO = Path(__file__).resolve().parents[1]
EN_SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Every task in both languages, 60 images each, one folder per language (images are shared)."""
    root = tmp_path_factory.mktemp("synth")
    return {
        (task, lang): make_synthetic(task, 60, root / lang, lang=lang, seed=3, progress=False)
        for task in TASKS
        for lang in ("en", "zh")
    }


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("task", TASKS)
def test_records_valid_and_counted(sets, task, lang):
    path = sets[task, lang]
    assert path.name == f"{task}.jsonl"
    rows = read_jsonl(path)
    expected = {"caption": 60, "retrieval": 60, "vqa": 180, "instruct": 60}[task]
    assert len(rows) == expected
    for row in rows:
        assert normalize_record(row, task) == row  # already canonical
        if "image" in row:
            assert re.fullmatch(r"images/\d{6}\.png", row["image"])
            assert (path.parent / row["image"]).is_file()
            assert 1 <= len(row["objects"]) <= 3
        if lang == "zh":  # every text is Chinese: no English word slipped through
            texts = [row["question"]] if "question" in row else []
            texts += row.get("captions", []) + row.get("neg_captions", []) + row.get("answers", [])
            texts += [t["value"].replace("<image>", "") for t in row.get("conversations", [])]
            text = " ".join(texts)
            assert re.search(r"[\u4e00-\u9fff]", text) and not re.search(r"[A-Za-z]", text), text


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for task in ("caption", "vqa", "instruct"):
        make_synthetic(task, 40, tmp_path / "a", seed=7, progress=False)
        make_synthetic(task, 40, tmp_path / "b", seed=7, progress=False)
        make_synthetic(task, 40, tmp_path / "c", seed=8, progress=False)
    a, b, c = (_tree_digest(tmp_path / d) for d in "abc")
    assert a == b and len(a) == 44  # 40 images, their settings stamp, 3 JSONL files
    assert a["caption.jsonl"] != c["caption.jsonl"]
    assert (a["images/000000.png"] != c["images/000000.png"]
            or a["images/000001.png"] != c["images/000001.png"])


def test_record_does_not_depend_on_n(tmp_path):
    """Per-index RNG: the first 10 records of a 10- and a 30-image set are the same."""
    short = read_jsonl(make_synthetic("caption", 10, tmp_path / "short", seed=1, progress=False))
    long = read_jsonl(make_synthetic("caption", 30, tmp_path / "long", seed=1, progress=False))
    assert long[:10] == short
    assert ((tmp_path / "short/images/000009.png").read_bytes()
            == (tmp_path / "long/images/000009.png").read_bytes())


@pytest.mark.parametrize("task", ["caption", "retrieval"])
def test_captions_name_every_object(sets, task):
    for row in read_jsonl(sets[task, "en"]):
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
        for cap in row["captions"]:
            for o in row["objects"]:
                assert re.search(rf"\b{o['color']}\b", cap), (cap, o)
                assert any(w in cap for w in EN_SHAPE_WORDS[o["shape"]]), (cap, o)
            # No colour that is not in the image.
            for color in set(COLORS) - {o["color"] for o in row["objects"]}:
                assert not re.search(rf"\b{color}\b", cap), (cap, row["objects"])
    for row in read_jsonl(sets[task, "zh"]):
        for cap in row["captions"]:
            for o in row["objects"]:
                assert (ZH["color"][o["color"]][0] in cap
                        and any(w in cap for w in ZH["shape"][o["shape"]])), (cap, o)


def test_retrieval_negatives_describe_something_else(sets):
    for row in read_jsonl(sets["retrieval", "en"]):
        assert len(row["neg_captions"]) == 3
        assert not set(row["neg_captions"]) & set(row["captions"])
        # Exactly one attribute of one object differs from the image: the negatives are hard.
        truth = {(o["color"], o["shape"], o["position"]) for o in row["objects"]}
        for neg in row["neg_captions"]:
            described = set(
                re.findall(
                    rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) (?:in the |on the |at the )"
                    rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})",
                    neg,
                )
            )
            assert len(described) == len(truth) and len(described - truth) == 1, (neg, truth)


def _expected_answer(question: str, objects: list[dict]) -> str:
    """Answer an English synth question from the ground-truth objects, independently of the generator."""
    pos_re = "|".join(sorted(POSITIONS, key=len, reverse=True))
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)

    def find(color=None, shape=None, position=None):
        hits = [
            o
            for o in objects
            if ((color in (None, o["color"])) and (shape in (None, o["shape"]))
                and (position in (None, o["position"])))
        ]
        assert len(hits) == 1, (question, objects)
        return hits[0]

    if m := re.fullmatch(rf"what color is the ({shapes})(?: (?:in the|on the|at the) ({pos_re}))?\?",
                         question):
        return find(shape=m[1], position=m[2])["color"]
    if m := re.fullmatch(rf"what shape is the ({colors}) object(?: (?:in the|on the|at the) ({pos_re}))?\?",
                         question):
        return find(color=m[1], position=m[2])["shape"]
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(rf"how many ({colors}) shapes are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+?)e?s are there\?", question):
        return str(sum(o["shape"] == m[1] or o["shape"] == m[1] + "e" for o in objects))
    if m := re.fullmatch(rf"is there an? ({colors}) ({shapes})\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(rf"where is the ({colors}) ({shapes})\?", question):
        return find(color=m[1], shape=m[2])["position"]
    if m := re.fullmatch(rf"is the ({colors}) ({shapes}) (?:in the|on the|at the) ({pos_re})\?", question):
        return "yes" if find(color=m[1], shape=m[2])["position"] == m[3] else "no"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_vqa_answers_majority_is_truth(sets, lang):
    rows = read_jsonl(sets["vqa", lang])
    assert len({r["question_id"] for r in rows}) == len(rows)
    types = Counter()
    disagreement = 0
    for row in rows:
        answers = row["answers"]
        assert len(answers) == 10
        (top, n_top), *rest = Counter(answers).most_common()
        assert top == row["multiple_choice_answer"] and (not rest or rest[0][1] < n_top)
        disagreement += bool(rest)
        assert row["answer_type"] in ("yes/no", "number", "other")
        if row["answer_type"] == "number":
            assert top.isdigit()
        if lang == "en":
            assert top == _expected_answer(row["question"], row["objects"])
        types[row["question_type"]] += 1
    assert set(types) == {"what color is the", "what shape is the", "how many", "is there a", "where is the",
                          "is the"}
    assert 0.2 < disagreement / len(rows) < 0.9  # realistic: some rows unanimous, many not


def test_instruct_conversations(tmp_path):
    rows = read_jsonl(make_synthetic("instruct", 200, tmp_path, seed=0, progress=False))
    text_only = [r for r in rows if "image" not in r]
    assert 2 <= len(text_only) <= 25
    assert all("objects" not in r and "<image>" not in str(r["conversations"]) for r in text_only)
    n_images = len(list((tmp_path / "images").glob("*.png")))
    assert n_images == len(rows) - len(text_only)
    for r in rows:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        if "image" in r:
            assert 2 <= len(turns) // 2 <= 3
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1


def _classify(mask: np.ndarray) -> str:
    """Shape of a filled binary mask, from how much of its bounding box it fills and its row widths."""
    ys, xs = np.nonzero(mask)
    m = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill, top, bottom = m.mean(), m[0].mean(), m[-1].mean()
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    if bottom > 0.9:
        return "triangle"
    return "cross" if top > 0.2 else "diamond"


@pytest.mark.parametrize("image_size", [48, 64, 96])
def test_pixels_match_attributes(tmp_path, image_size):
    rows = read_jsonl(make_synthetic("caption", 100, tmp_path, seed=5, image_size=image_size, progress=False))
    palette = np.array(list(COLORS.values()))
    for row in rows:
        im = np.asarray(load_image(tmp_path / row["image"])).astype(int)
        assert im.shape == (image_size, image_size, 3)
        # Pixels in a palette colour: exactly the drawn shapes, nowhere else.
        is_shape = (im[:, :, None, :] == palette[None, None]).all(-1).any(-1)
        covered = np.zeros_like(is_shape)
        for o in row["objects"]:
            mask = (im == COLORS[o["color"]]).all(-1)
            x0, y0, x1, y1 = o["bbox"]
            inside = np.zeros_like(mask)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            covered |= inside
            mask &= inside
            ys, xs = np.nonzero(mask)
            assert len(ys), (row["id"], o)
            row_, col = int(ys.mean() * 3 // image_size), int(xs.mean() * 3 // image_size)
            assert POSITIONS[row_ * 3 + col] == o["position"], (row["id"], o)
            extent = xs.max() - xs.min() + 1
            assert (extent > image_size * 0.22) == (o["size"] == "large"), (row["id"], o, extent)
            assert _classify(mask) == o["shape"], (row["id"], o)
        assert not (is_shape & ~covered).any(), row["id"]


def test_cli(tmp_path):
    assert main(["--task", "vqa", "--n", "5", "--out-dir", str(tmp_path / "a"), "--lang", "zh",
                 "--no-progress"]) == 0
    assert len(read_jsonl(tmp_path / "a" / "vqa.jsonl")) == 15
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "synth", "--task", "caption", "--n", "3",
         "--out-dir", str(tmp_path / "b"), "--image-size", "80"],
        check=False, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert load_image(tmp_path / "b" / "images" / "000002.png").size == (80, 80)
    # A user error: one line on stderr and exit code 2.
    assert main(["--task", "caption", "--n", "3", "--out-dir", str(tmp_path / "c"),
                 "--image-size", "16"]) == 2
    # Images of another seed already there: refuse to overwrite them.
    assert main(["--task", "vqa", "--n", "3", "--out-dir", str(tmp_path / "a"), "--seed", "1"]) == 2
