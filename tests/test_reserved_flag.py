"""`--reserved` of data_tools validate/clean: an empty string, which every text holds (an unset shell
variable: `--reserved "$TOKEN"`), is refused on the command line instead of rejecting every row."""

import json
import subprocess
import sys

import pytest
from PIL import Image


@pytest.mark.parametrize("command", ["validate", "clean"])
def test_an_empty_reserved_string_is_refused(tmp_path, command):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"image": "a.png", "captions": ["a red square"]}) + "\n")
    outputs = ["--out", str(tmp_path / "o.jsonl"), "--rejects", str(tmp_path / "r.jsonl")]
    argv = [sys.executable, "-m", "data_tools", command, "--task", "caption", "--reserved", "</s>",
            "--reserved", "", str(data), *(outputs if command == "clean" else [])]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].endswith("argument --reserved: an empty string, which every text "
                                                "holds; give the string to refuse, e.g. '</s>'")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "r.jsonl").exists()


def test_reserved_strings_with_quotes_and_spaces_are_quoted_in_the_hint(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"image": "a.png", "captions": ["it's a <end of turn> here"]}) + "\n")
    out = subprocess.run([sys.executable, "-m", "data_tools", "validate", "--task", "caption", "--reserved",
                          "<end of turn>", str(data)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "clean --task caption --reserved '<end of turn>' IN --out" in out.stderr
