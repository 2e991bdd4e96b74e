"""`python -m eval report` on retrieval runs: Recall@K again from the saved embeddings, checked against the
eval file."""

import json

import numpy as np
import pytest

from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl
from data_tools.synth import make_synthetic
from eval.report import report_run


def _run(folder, eval_file, name, image_keys, texts, text_to_image, text_embeds):
    (folder / "predictions").mkdir(parents=True, exist_ok=True)
    np.savez(folder / "predictions" / f"{name}.npz", image_embeds=np.eye(len(image_keys), dtype=np.float32),
             text_embeds=np.asarray(text_embeds, dtype=np.float32), image_keys=np.asarray(image_keys),
             texts=np.asarray(texts), text_to_image=np.asarray(text_to_image))
    (folder / "metrics.json").write_text(json.dumps({"recipe": "clip_retrieval", "task": "retrieval",
                                                     "eval_file": str(eval_file), "global_step": 7}))
    return folder


def test_retrieval_run_is_rescored_from_its_embeddings(tmp_path):
    path = make_synthetic("retrieval", 3, tmp_path / "data", seed=5, progress=False)
    rows = read_jsonl(path)
    keys = [str(path.parent / r["image"]) for r in rows]
    texts = [rows[0]["captions"][0], rows[0]["captions"][1], rows[1]["captions"][0], rows[2]["captions"][0]]
    # Images are the unit vectors; texts 0, 2, 3 point at their own image, text 1 (of image 0) at image 2.
    embeds = [[1, 0, 0], [0, 0.2, 0.9], [0, 1, 0], [0, 0, 1]]
    run = _run(tmp_path / "run", path, "step-3", keys, texts, [0, 0, 1, 2], embeds)
    row = report_run(run, gallery_size=2)
    # text -> image: ranks 1, 3, 1, 1; image -> text: image 0's best own text (text 0) ranks 1,
    # image 1's and 2's too.
    assert (row["final"]["text_to_image_R@1"] == pytest.approx(0.75)
            and row["final"]["text_to_image_mean_rank"] == pytest.approx(1.5))
    assert row["final"]["image_to_text_R@1"] == pytest.approx(1.0)
    # The step is the scored file's (step-3), not the run's last (7).
    assert (row["n"], row["n_eval"], row["step"]) == (3, 3, 3) and row["final_file"].endswith("step-3.npz")
    gallery = (run / "gallery.html").read_text()
    # 2 worst queries
    assert gallery.count("data:image/png;base64,") + gallery.count("data:image/jpeg;base64,") == 2 * 4
    assert gallery.index(texts[1]) < gallery.index("rank 1")  # the worst query first
    assert "| text_to_image_R@1 | - | 0.750 |" in (run / "report.md").read_text()

    wrong = _run(tmp_path / "wrong", path, "final", keys,
                 [texts[0], rows[1]["captions"][1], texts[2], texts[3]], [0, 0, 1, 2], embeds)
    with pytest.raises(DataError, match="text 1 .* is not a caption of .* in the eval file"):
        report_run(wrong)
    stranger = _run(tmp_path / "stranger", path, "final", [keys[0], keys[1], "/elsewhere.png"], texts,
                    [0, 0, 1, 2], embeds)
    with pytest.raises(DataError, match="1 image\\(s\\) are not in the eval file"):
        report_run(stranger)


def test_an_eval_file_with_a_row_per_caption_holds_every_caption_of_the_image(tmp_path):
    path = make_synthetic("retrieval", 2, tmp_path / "data", seed=5, progress=False)
    rows = read_jsonl(path)
    by_caption = tmp_path / "data" / "by_caption.jsonl"
    by_caption.write_text("".join(json.dumps({"image": r["image"], "caption": c}) + "\n"
                                  for r in rows for c in r["captions"][:2]))
    keys = [str(path.parent / r["image"]) for r in rows]
    texts = [c for r in rows for c in r["captions"][:2]]
    run = _run(tmp_path / "run", by_caption, "final", keys, texts, [0, 0, 1, 1],
               [[1, 0], [1, 0], [0, 1], [0, 1]])
    row = report_run(run)
    assert row["n_eval"] == 2 and row["final"]["text_to_image_R@1"] == 1.0
