"""The make bench harness runs, and checks what it times, on a small batch (speed itself is measured by make bench,
never asserted in a unit test)."""

import io

import numpy as np

from flashdecode.bench import Scenario
from flashdecode.bench_report import (
    STORAGE_FORMATS,
    against_best_roof,
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
    # every fraction of the roof, in both tables, is taken against the best roof measured in the run
    scenario_row = run_scenario(TINY, 2, True, no_flush, io.StringIO(), ROOF_DATA)
    best = max(row["roof_gbs"] for row in rows + [scenario_row])
    own_fraction = rows[2]["roof_frac"] * rows[2]["roof_gbs"] / best  # the same bytes/s over the best roof
    assert against_best_roof([scenario_row], rows) == best
    assert all(row["roof_gbs"] == best for row in rows + [scenario_row])
    assert np.isclose(rows[2]["roof_frac"], own_fraction)
    assert np.isclose(scenario_row["roof_frac"], scenario_row["flashdecode_gbs"] / best)
    contiguous, paged = paged_against_contiguous(TINY, 2, no_flush, repeats=1)
    assert contiguous > 0 and paged > 0
    window = window_against_short_cache(2, no_flush, length=2048, window_left=64, repeats=1)
    assert len(window) == 3 and all(seconds > 0 for seconds in window.values())
