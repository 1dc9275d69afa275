"""The tables the docs show, copied from the files reproduce.py writes, never kept by hand.

A doc holds each table it shows as a generated block:

    <!-- generated from results/quick/table1.md: claims -->
    ...
    <!-- end of generated block -->

`python -m reproduction.docs` rewrites every block of the docs from its file, the part named after
the colon (PARTS) or the whole file; `--check` only names the blocks that differ, and the test
suite runs it, so a doc cannot show a table other than the one committed beside it.
"""
import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/RESULTS.md")
BLOCK = re.compile(r"(?P<open><!-- generated from (?P<source>\S+?)(?:: (?P<part>[\w-]+))? -->\n)(?P<body>.*?)"
                   r"(?P<close><!-- end of generated block -->)", re.S)


def between(lines: list, first: str, last: str | None) -> list:
    """The lines from the one starting with `first` to the one before the next starting with `last`
    (to the end without `last`)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next((i for i, line in enumerate(lines) if i > start and last and line.startswith(last)), len(lines))
    return lines[start:end]


# The parts of a table file (reproduction.tables.render) a doc may show on their own.
PARTS = {
    # Table 1's caption, then its claims and the contrasts beside them
    "claims": lambda lines: [lines[2], "\n", *between(lines, "The claims as the paper applies", "| | n |")],
    "headroom": lambda lines: between(lines, "How much of the headroom", "The refiner of each seed"),
    "refiners": lambda lines: between(lines, "The refiner of each seed", None),
}


def generated(source: Path, part: str | None) -> str:
    lines = source.read_text().splitlines(keepends=True)
    chosen = PARTS[part](lines) if part else lines
    return "".join(chosen).rstrip("\n") + "\n"


def refreshed(text: str, root: Path = REPO) -> str:
    """`text` with every generated block rewritten from its source under `root`."""
    return BLOCK.sub(lambda m: m["open"] + generated(root / m["source"], m["part"]) + m["close"], text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="name the docs whose blocks differ, change nothing")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = REPO / doc
        text = path.read_text()
        if refreshed(text) != text:
            stale.append(doc)
            if not args.check:
                path.write_text(refreshed(text))
    if args.check and stale:
        sys.exit(f"generated tables differ from their sources in {', '.join(stale)}; run python -m reproduction.docs")
    print("rewritten: " + ", ".join(stale) if stale else "every generated table is up to date")


if __name__ == "__main__":
    main()
