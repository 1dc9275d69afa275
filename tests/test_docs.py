"""The docs show the committed tables, never a copy kept by hand."""
import re
import subprocess

import pytest

from reproduction.docs import BLOCK, DOCS, REPO, refreshed

# A cell as reproduction.tables formats it: "0.7830 ± 0.0069" or "+0.95 [+0.27, +1.64]".
TABLE_CELL = re.compile(r"\d\.\d+ ± \d|[+-]\d+\.\d+ \[[+-]\d")
BLOCKS = re.compile(r"<!-- generated from .*?<!-- end of generated block -->", re.S)


def committed_sources(text: str, root):
    """`root` holding, as committed, every table file a doc's blocks are generated from (the files
    on disk if this is no git checkout): `python reproduce.py --profile quick` rewrites them, with
    its own captions, before a new user runs the tests."""
    for source in {m["source"] for m in BLOCK.finditer(text)}:
        shown = subprocess.run(["git", "show", f"HEAD:{source}"], cwd=REPO, capture_output=True, text=True)
        (root / source).parent.mkdir(parents=True, exist_ok=True)
        (root / source).write_text(shown.stdout if shown.returncode == 0 else (REPO / source).read_text())
    return root


@pytest.mark.parametrize("doc", DOCS)
def test_every_generated_table_is_the_committed_one(doc, tmp_path):
    text = (REPO / doc).read_text()
    assert "<!-- generated from results/quick/" in text
    assert refreshed(text) == text or refreshed(text, committed_sources(text, tmp_path)) == text, \
        f"run python -m reproduction.docs: {doc} shows another table"


@pytest.mark.parametrize("doc", DOCS)
def test_no_table_cell_is_kept_by_hand(doc):
    by_hand = [line for line in BLOCKS.sub("", (REPO / doc).read_text()).splitlines()
               if line.startswith("|") and TABLE_CELL.search(line)]
    assert not by_hand, by_hand


def test_a_stale_block_is_rewritten_and_the_rest_kept(tmp_path):
    (tmp_path / "t.md").write_text("### T\n\ncaption\n\nThe claims as the paper applies x\n| c |\n\n| | n |\n| r |\n")
    text = ("before\n<!-- generated from t.md: claims -->\nold\n<!-- end of generated block -->\n"
            "<!-- generated from t.md -->\n<!-- end of generated block -->\nafter\n")
    assert refreshed(text, tmp_path) == (
        "before\n<!-- generated from t.md: claims -->\ncaption\n\nThe claims as the paper applies x\n| c |\n"
        "<!-- end of generated block -->\n<!-- generated from t.md -->\n### T\n\ncaption\n\n"
        "The claims as the paper applies x\n| c |\n\n| | n |\n| r |\n<!-- end of generated block -->\nafter\n")
