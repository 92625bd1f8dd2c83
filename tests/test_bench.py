"""The make bench harness runs, and checks what it times, on a small batch (speed itself is measured by make bench,
never asserted in a unit test)."""

import io

import numpy as np

from flashdecode.bench import Scenario
from flashdecode.bench_report import (
    STORAGE_FORMATS,
    format_table,
    paged_against_contiguous,
    run_scenario,
    storage_formats,
    window_against_short_cache,
)

TINY = Scenario("tiny", [40, 7, 100], 8, 2, 16)
ROOF_DATA = np.ones(1 << 16, np.float32)


def no_flush():
    pass


def test_scenario_row_checks_every_method_and_formats():
    row = run_scenario(TINY, 2, True, no_flush, io.StringIO(), ROOF_DATA)
    assert row["err"] < 1e-4 and row["err_cython"] < 1e-4
    assert row["flashdecode_s"] > 0 and row["cython_s"] > 0 and row["roof_gbs"] > 0
    table = format_table([row])
    assert "tiny" in table and "simd ms" in table and "cython ms" in table


def test_storage_formats_paged_and_window_comparisons_run():
    rows = storage_formats(TINY, 2, no_flush, ROOF_DATA, repeats=1)
    assert [row["format"] for row in rows] == list(STORAGE_FORMATS)
    assert rows[0]["speedup"] == 1.0 and all(row["tokens_per_s"] > 0 for row in rows)
    # a roof measured earlier in the run and higher than this rotation's is the one the fractions use
    higher = storage_formats(TINY, 2, no_flush, ROOF_DATA, repeats=1, best_roof=1e15)
    assert all(row["roof_gbs"] == 1e6 and row["roof_frac"] < 1e-3 for row in higher)
    assert all(row["roof_gbs"] < 1e6 for row in rows)
    contiguous, paged = paged_against_contiguous(TINY, 2, no_flush, repeats=1)
    assert contiguous > 0 and paged > 0
    window = window_against_short_cache(2, no_flush, length=2048, window_left=64, repeats=1)
    assert len(window) == 3 and all(seconds > 0 for seconds in window.values())
