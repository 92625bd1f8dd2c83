"""The book's shape: cells a reader can take in, and chapters that end with exercises the reader can check."""

import re
from pathlib import Path

import nbformat
import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
MAX_CELL_LINES = 80
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def code_cells(path):
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_no_code_cell_is_longer_than_80_lines(path):
    offenders = [
        (i, cell.source.count("\n") + 1, cell.source.split("\n", 1)[0][:60])
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells)
        if cell.cell_type == "code" and cell.source.count("\n") + 1 > MAX_CELL_LINES
    ]
    assert not offenders, f"{path.name}: code cells over {MAX_CELL_LINES} lines (index, lines, first line): {offenders}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name)
def test_every_chapter_ends_with_checked_exercises(path):
    cells = nbformat.read(path, as_version=4).cells
    has_heading = any(
        cell.cell_type == "markdown" and re.search(r"^#+\s*Exercises", cell.source, re.M) for cell in cells
    )
    solutions = [
        cell
        for cell in cells
        if cell.cell_type == "code"
        and cell.metadata.get("jupyter", {}).get("source_hidden")
        and "assert" in cell.source
    ]
    problems = ([] if has_heading else ["no 'Exercises' heading"]) + (
        [] if len(solutions) >= 2 else [f"{len(solutions)} hidden solution cells with an assert (want >= 2)"]
    )
    assert not problems, f"{path.name}: {'; '.join(problems)}"


def test_the_book_never_says_the_seed():
    """The design comes from oxillama's batched_attention.rs, named once in chapter 01; 'the seed' is private."""
    for path in NOTEBOOKS + [BOOK.parent / "README.md"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bthe seed'?s?\b(?! of)", text, re.I), path.name
