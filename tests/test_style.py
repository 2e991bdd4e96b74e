"""House style that a reader meets in every file: lines of code and prose at most 110 columns."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COLUMNS = 110
TEXT = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".js", ".html", ".css", ".jinja"}
NAMED = {"Makefile", "run"}  # .ci/run
GENERATED = "recipes/common/tiny/bases/"  # saved tokenizers and chat templates of the shipped tiny models


def text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    # tracked files and new ones git does not ignore
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    return [ROOT / n for n in names.splitlines()
            if not n.startswith(GENERATED) and (Path(n).suffix in TEXT or Path(n).name in NAMED)
            and (ROOT / n).is_file()]  # not one deleted but not yet committed


def test_lines_at_most_110_columns():
    files = text_files()
    assert len(files) > 100  # the listing worked
    long = [f"{path.relative_to(ROOT)}:{i}: {len(line)} columns"
            for path in files
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > MAX_COLUMNS]
    assert not long, "lines over 110 columns:\n" + "\n".join(long)
