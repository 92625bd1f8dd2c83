"""The notebooks are the source: the committed package must be exactly what they export."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("book_export", ROOT / "book" / "export.py")
export = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export)


def out_of_sync(package: Path):
    """Names of generated files that differ between `package` and a fresh export of book/."""
    return export.out_of_sync(export.render(ROOT / "book"), package)


def test_package_matches_notebooks():
    problems = out_of_sync(ROOT / "flashdecode")
    assert not problems, f"edited by hand or not exported, run `make export`: {problems}"


# the package's door, and the benchmark's harness (it teaches nothing: book/06_to_the_roof.ipynb says what it measures)
HAND_WRITTEN = {"__init__.py", "bench_report.py"}


def test_every_module_is_generated_except_init():
    for path in export.generated_candidates(ROOT / "flashdecode"):
        if path.name not in HAND_WRITTEN:
            assert export.is_generated(path), f"{path.name} was not written by book/export.py"
            header = path.read_text(encoding="utf-8").split("\n", 1)[0]
            assert "book/" in header and "make export" in header


@pytest.mark.parametrize("name", ["api.py", "_kernels.pyx", "_simd.h", "tiling.py"])
def test_deleting_a_line_is_detected(tmp_path, name):
    """The check above is not vacuous: remove one line from a copy and it must fail."""
    files = export.render(ROOT / "book")
    for file_name, text in files.items():
        (tmp_path / file_name).write_text(text, encoding="utf-8")
    assert out_of_sync(tmp_path) == []
    lines = files[name].splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith(("#", "//")) and i > 10)
    (tmp_path / name).write_text("".join(lines[:victim] + lines[victim + 1 :]), encoding="utf-8")
    assert out_of_sync(tmp_path) == [name]


def test_back_references_point_at_real_cells():
    import nbformat

    for name, text in export.render(ROOT / "book").items():
        for line in text.splitlines():
            if line.startswith(("# %% book/", "// %% book/")):
                notebook, cell_id = line.split(" %% ", 1)[1].split(" #")
                nb = nbformat.read(ROOT / notebook, as_version=4)
                cells = [cell for cell in nb.cells if cell.id == cell_id]
                assert len(cells) == 1, f"{line}: no cell (or several) with that id"
                assert "#| export" in cells[0].source or "#| default_exp" in cells[0].source


def test_notebooks_carry_no_execution_timestamps():
    """Stored outputs yes (they are the tutorial), run timestamps no (`make run` / `export.py --clean`)."""
    import nbformat

    for path in export.book_notebooks(ROOT / "book"):
        nb = nbformat.read(path, as_version=4)
        stamped = [i for i, cell in enumerate(nb.cells) if "execution" in cell.metadata]
        assert not stamped, f"{path.name} cells {stamped}: run `python book/export.py --clean`"
