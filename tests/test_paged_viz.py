"""The pool explorer, driven from Python as a reader drives it: move the step slider, read the drawn grid back.

The expected picture is worked out here from a PagedKvCache that replays the scenario itself, so a grid
drawn from the wrong step, with the wrong owner of a shared block, or with the wrong fill, fails.
"""

import numpy as np
import pytest
from conftest import require_module

require_module("ipywidgets")
require_module("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402

from flashdecode import PagedKvCache  # noqa: E402
from flashdecode.paged import PAGED_SCENARIO, pool_history  # noqa: E402
from flashdecode.viz import PagedPoolExplorer, pool_frames  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE = 32, 4
PALETTE = [to_rgba(f"C{i}") for i in range(10) if i != 7]  # matplotlib's cycle without its grey
FREE = to_rgba("0.82")


def replay(steps):
    """The scenario's first `steps` operations on a fresh cache: (cache, {name: sequence id})."""
    cache, seqs = PagedKvCache(NUM_BLOCKS, BLOCK_SIZE, 1, 1), {}
    for op, name, arg in PAGED_SCENARIO[:steps]:
        if op == "new":
            seqs[name] = cache.new_sequence()
        if op in ("new", "append"):
            cache.append(seqs[name], np.zeros((arg, 1, 1)), np.zeros((arg, 1, 1)))
        if op == "fork":
            seqs[arg] = cache.fork(seqs[name])
        if op == "free":
            cache.free(seqs.pop(name))
    return cache, seqs


def expected_grid(steps):
    """Per block: the colour of the first-named sequence holding it, how many hold it, and its share in use."""
    names = list(dict.fromkeys(n for op, name, arg in PAGED_SCENARIO for n in (name, arg) if isinstance(n, str)))
    cache, seqs = replay(steps)
    colours, holders, share = [FREE] * NUM_BLOCKS, [0] * NUM_BLOCKS, [0.0] * NUM_BLOCKS
    for name in sorted(seqs, key=names.index, reverse=True):  # earliest name last: it owns the colour
        table, position = cache.block_table(seqs[name]), cache.position(seqs[name])
        for number, block in enumerate(table):
            colours[block] = PALETTE[names.index(name) % len(PALETTE)]
            holders[block] += 1
            share[block] = max(share[block], min(BLOCK_SIZE, position - number * BLOCK_SIZE) / BLOCK_SIZE)
    return np.array(colours), holders, np.array(share)


def drawn_grid(explorer):
    fill = explorer.artists["fill"]
    widths = np.array([np.ptp(path.vertices[:, 0]) for path in fill.get_paths()])
    labels = [text.get_text() for text in explorer.artists["shared"]]
    return fill.get_facecolors(), labels, widths / 0.92


@pytest.fixture(scope="module")
def explorer():
    return PagedPoolExplorer(dpi=30)


def test_every_step_draws_the_cache_after_that_step(explorer):
    assert explorer.step.max == explorer.play.max == len(PAGED_SCENARIO)
    for step in list(range(len(PAGED_SCENARIO) + 1)) + [3, 0]:  # forwards, then back
        explorer.step.value = step  # as the slider does
        colours, holders, share = expected_grid(step)
        drawn_colours, labels, drawn_share = drawn_grid(explorer)
        np.testing.assert_array_equal(drawn_colours, colours)
        assert labels == [f"×{n}" if n > 1 else "" for n in holders]
        np.testing.assert_allclose(drawn_share, share, atol=1e-12)
        assert f"step {step} of {len(PAGED_SCENARIO)}" in explorer.readout.value


def test_each_step_changes_the_picture(explorer):
    """The check above is not vacuous: a grid one step behind would differ from the right one."""
    for step in range(1, len(PAGED_SCENARIO) + 1):
        before, after = expected_grid(step - 1), expected_grid(step)
        assert not (
            np.array_equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
        ), step


def test_slider_drives_snapshot_readout_and_image(explorer):
    explorer.step.value = 0
    first = bytes(explorer.image.value)
    assert first.startswith(b"\x89PNG") and explorer.snapshot.label == "empty pool"
    explorer.step.value = 6
    cache, seqs = replay(6)
    assert explorer.snapshot.tables == {name: cache.block_table(seq).tolist() for name, seq in seqs.items()}
    assert explorer.snapshot.free_blocks == tuple(cache.free_blocks)
    assert "A2 appends 2 tokens" in explorer.readout.value and f"{list(cache.free_blocks)}" in explorer.readout.value
    assert bytes(explorer.image.value) != first
    explorer.play.value = 9  # each tick of play moves the slider
    assert explorer.step.value == 9 and "D arrives" in explorer.readout.value


def test_history_is_the_cache_after_each_step():
    history = pool_history(PAGED_SCENARIO, NUM_BLOCKS, BLOCK_SIZE)
    assert len(history) == len(PAGED_SCENARIO) + 1
    for step, snapshot in enumerate(history):
        cache, seqs = replay(step)
        np.testing.assert_array_equal(snapshot.ref_counts, cache.ref_counts)
        assert snapshot.positions == {name: cache.position(seq) for name, seq in seqs.items()}
    with pytest.raises(ValueError, match="unknown operation"):
        pool_history([("grow", "A", 1)])


def test_static_frames_show_the_chosen_steps(explorer):
    figure = pool_frames(explorer, steps=[5, 6, 9])
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert len(titles) == 3 and titles[0].startswith("step 5: fork A -> A2")
    assert titles[2].startswith("step 9: D arrives")


def test_displays_as_a_widget_with_a_text_fallback(explorer):
    bundle = explorer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    assert "live widget" in bundle["text/plain"]
