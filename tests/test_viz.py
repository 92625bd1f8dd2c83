"""The widgets, driven from Python exactly as a reader drives them: set a control's value, read the figure back.

Every assertion on what is drawn compares the figure's artists with the online-softmax state computed here,
independently, by `online_softmax_tiles` — so a plot that is one tile behind (or ahead) fails.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import require_module

require_module("ipywidgets")
require_module("matplotlib")

from flashdecode.naive import softmax_safe  # noqa: E402
from flashdecode.online import finish_state, online_softmax_tiles  # noqa: E402
from flashdecode.trace import SoftmaxTrace, batch_work, random_scores  # noqa: E402
from flashdecode.viz import RaggedBatchExplorer, SoftmaxExplorer, explorer_frames, ragged_frames  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def expected_states(cache_len, spread, seed, tile_size, head_dim=16):
    scores, values = random_scores(cache_len, spread, seed, head_dim)
    return scores, values, list(online_softmax_tiles(scores, values, tile_size))


@pytest.fixture(scope="module")
def explorer():
    return SoftmaxExplorer(cache_len=200, tile_size=32, spread=3.0, seed=7, dpi=40)


def drawn(explorer, name):
    return np.asarray(explorer.artists[name].get_ydata(), dtype=float)


def test_stepping_the_slider_draws_the_online_state_of_that_tile(explorer):
    explorer.tile_size.value, explorer.spread.value, explorer.cache_len.value = 32, 3.0, 200
    scores, values, states = expected_states(200, 3.0, 7, 32)
    assert explorer.n_tiles == len(states) == 7 and explorer.tile.max == explorer.play.max == 7
    for tile in [1, 2, 3, 5, 7, 4, 1]:  # forwards and back, as a reader would
        before, moved = explorer.renders, explorer.tile.value != tile
        explorer.tile.value = tile
        assert explorer.renders == before + moved  # one re-render per step
        state = states[tile - 1]
        # the state the explorer reports is the package's online-softmax state after exactly `tile` tiles
        assert explorer.state.tile_stop == state.tile_stop
        assert explorer.state.row_max == state.row_max and explorer.state.row_sum == state.row_sum
        # ... and so is what the figure shows: one point per tile folded in, the last one equal to the state
        np.testing.assert_array_equal(drawn(explorer, "row_max"), [s.row_max for s in states[:tile]])
        np.testing.assert_array_equal(drawn(explorer, "row_sum"), [s.row_sum for s in states[:tile]])
        np.testing.assert_array_equal(drawn(explorer, "rescale"), [s.rescale for s in states[:tile]])
        np.testing.assert_array_equal(explorer.artists["row_max"].get_xdata(), np.arange(1, tile + 1))
        np.testing.assert_array_equal(drawn(explorer, "partial"), finish_state(state)[0])
        # the running max drawn over the scores ends at the keys seen, at the state's max
        assert drawn(explorer, "max_line")[-1] == state.row_max
        assert explorer.artists["max_line"].get_xdata()[-1] == pytest.approx(state.tile_stop - 0.5)
        # the current tile is highlighted, the keys not read yet are grey
        rect = explorer.artists["current_tile"]
        assert (rect.get_x() + 0.5, rect.get_x() + 0.5 + rect.get_width()) == (state.tile_start, state.tile_stop)
        colours = explorer.artists["scores"].get_facecolors()
        grey = colours[-1] if tile < len(states) else None
        if grey is not None:
            assert all(np.array_equal(c, grey) for c in colours[state.tile_stop :])
            assert not any(np.array_equal(c, grey) for c in colours[: state.tile_stop])
        assert f"tile {tile} of 7" in explorer.readout.value
        assert f"m = {float(state.row_max):.4f}" in explorer.readout.value


def test_an_off_by_one_tile_plot_would_be_caught(explorer):
    """The check above is not vacuous: the states one tile before and after differ in what is drawn."""
    explorer.tile.value = 3
    _, _, states = expected_states(200, 3.0, 7, 32)
    row_sums = drawn(explorer, "row_sum")
    assert not np.array_equal(row_sums, [s.row_sum for s in states[:2]])
    assert not np.array_equal(row_sums, [s.row_sum for s in states[:4]])
    assert len({float(s.row_sum) for s in states}) == len(states)  # every tile moves the sum


def test_last_tile_gives_the_exact_output(explorer):
    explorer.tile.value = explorer.n_tiles
    scores, values, _ = expected_states(200, 3.0, 7, 32)
    exact = softmax_safe(scores) @ values
    assert explorer.done
    np.testing.assert_allclose(explorer.partial, exact, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(drawn(explorer, "partial"), drawn(explorer, "exact"), rtol=1e-12, atol=1e-13)
    assert "partial output == exact output" in explorer.readout.value
    # before the last tile the partial output is not the exact one yet
    explorer.tile.value = explorer.n_tiles - 1
    assert explorer.error > 1e-6 and "==" not in explorer.readout.value


def test_tile_size_changes_the_number_of_steps(explorer):
    explorer.tile_size.value = 32
    explorer.tile.value = 4  # 128 keys seen
    explorer.tile_size.value = 8
    assert explorer.n_tiles == 25 and explorer.tile.max == 25 and explorer.play.max == 25
    assert explorer.tile.value == 16 and explorer.state.tile_stop == 128  # the same keys seen, in smaller tiles
    assert len(drawn(explorer, "row_max")) == 16
    explorer.tile_size.value = 200
    assert explorer.n_tiles == 1 and explorer.tile.value == 1 and explorer.done
    explorer.tile_size.value = 1
    assert explorer.n_tiles == 200
    explorer.tile_size.value = 32


def test_spread_and_cache_length_redraw_new_data(explorer):
    explorer.spread.value = 45.0
    explorer.tile.value = explorer.n_tiles
    scores, values, states = expected_states(200, 45.0, 7, 32)
    assert scores.max() > 88.7  # exp(s) would overflow float32 ...
    assert "overflows float32" in explorer.readout.value
    np.testing.assert_array_equal(drawn(explorer, "row_max"), [s.row_max for s in states])
    assert explorer.error < 1e-12  # ... the running max keeps it exact
    offsets = explorer.artists["scores"].get_offsets()
    np.testing.assert_array_equal(offsets[:, 1], scores)
    explorer.cache_len.value = 1000
    assert explorer.n_tiles == 32 and len(explorer.artists["scores"].get_offsets()) == 1000
    np.testing.assert_array_equal(explorer.trace.scores, random_scores(1000, 45.0, 7)[0])
    explorer.seed.value = 8
    np.testing.assert_array_equal(explorer.trace.scores, random_scores(1000, 45.0, 8)[0])
    explorer.spread.value, explorer.cache_len.value, explorer.seed.value = 3.0, 200, 7


def test_play_moves_the_slider():
    explorer = SoftmaxExplorer(cache_len=100, tile_size=10, dpi=30)
    assert explorer.play.max == 10
    explorer.play.value = 6  # what each tick of the play button does
    assert explorer.tile.value == 6 and "tile 6 of 10" in explorer.readout.value


def test_the_figure_is_updated_in_place_and_rendered():
    explorer = SoftmaxExplorer(cache_len=100, tile_size=10, dpi=30)
    figure, artists, first = explorer.figure, dict(explorer.artists), bytes(explorer.image.value)
    assert first.startswith(b"\x89PNG")
    explorer.tile.value = 5
    explorer.tile_size.value = 20
    assert explorer.figure is figure and explorer.artists == artists  # same figure, same artists
    assert bytes(explorer.image.value) != first and bytes(explorer.image.value).startswith(b"\x89PNG")
    assert len(figure.axes) == 6  # 5 panels + the sum's twin axis


def test_trace_uses_the_package_online_softmax():
    scores, values = random_scores(50, 5.0, 3)
    trace = SoftmaxTrace(scores, values, 16)
    for mine, theirs in zip(trace.states, online_softmax_tiles(scores, values, 16)):
        assert mine.tile_stop == theirs.tile_stop and mine.row_max == theirs.row_max
        assert mine.row_sum == theirs.row_sum
    assert trace.n_tiles == 4 and trace.errors[-1] < 1e-12
    with pytest.raises(ValueError):
        SoftmaxTrace(scores, values, 0)


def test_static_frames_have_a_row_per_tile():
    explorer = SoftmaxExplorer(cache_len=100, tile_size=25, dpi=30)
    figure = explorer_frames(explorer, tiles=[1, 4])
    assert len([ax for ax in figure.axes if ax.get_title().startswith("tile ")]) == 2
    assert re.search(r"tile 4 of 4", " ".join(ax.get_title() for ax in figure.axes))


def test_ragged_view_draws_keys_tiles_and_padding():
    ragged = RaggedBatchExplorer(distribution="skewed", num_slots=12, typical=300, tile_size=64, dpi=30)
    for distribution in ["skewed", "uniform", "equal", "one long, many short"]:
        ragged.distribution.value = distribution
        for tile_size in [16, 64]:
            ragged.tile_size.value = tile_size
            lengths = ragged.lengths
            assert len(lengths) == 12 and lengths.min() >= 1
            assert ragged.work == batch_work(lengths, tile_size)
            widths = lambda name: [np.ptp(p.vertices[:, 0]) for p in ragged.artists[name].get_paths()]
            assert round(sum(widths("tiles"))) == lengths.sum()
            assert len(widths("tiles")) == (-(-lengths // tile_size)).sum()  # one rectangle per tile
            assert round(sum(widths("padding"))) == ragged.work["padded"] - ragged.work["ragged"]
            assert round(sum(widths("rounding"))) == ragged.work["ragged_tiles"] - ragged.work["ragged"]
    ragged.num_slots.value = 3
    assert len(ragged.lengths) == 3
    assert "padding" in ragged.readout.value
    assert len(ragged_frames(num_slots=4, typical=50).axes) == 4


def test_readme_figures_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert "book/figures/softmax_explorer_frames.png" in images
    for image in images:
        assert (ROOT / image).is_file(), image


def test_widgets_display_as_widgets_with_a_readable_text_fallback():
    for widget in (SoftmaxExplorer(cache_len=100, tile_size=10, dpi=30), RaggedBatchExplorer(num_slots=4, dpi=30)):
        bundle = widget._repr_mimebundle_()
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.widget.model_id
        assert "live widget" in bundle["text/plain"]


def test_blitted_frames_look_like_a_full_redraw():
    """Each step redraws only the moving artists over a cached background; after any change the picture must
    match drawing the whole figure from scratch (up to a few pixels where lines cross the axes' spines)."""
    import io

    from PIL import Image

    explorer = SoftmaxExplorer(cache_len=300, tile_size=32, dpi=40)

    def differing_pixels():
        shown = np.asarray(Image.open(io.BytesIO(bytes(explorer.image.value)))).astype(int)
        for artist in explorer.panels.moving:
            artist.set_animated(False)
        try:
            explorer.canvas.draw()
            full = np.asarray(explorer.canvas.buffer_rgba()).astype(int)
        finally:
            for artist in explorer.panels.moving:  # the cached background is a copy: left as it was
                artist.set_animated(True)
        return (np.abs(shown - full).max(axis=-1) > 0).mean()

    for change in [
        lambda: None,
        lambda: setattr(explorer.tile, "value", 5),
        lambda: setattr(explorer.tile_size, "value", 20),
        lambda: setattr(explorer.spread, "value", 30.0),
        lambda: setattr(explorer.tile, "value", 1),
        lambda: setattr(explorer.cache_len, "value", 500),
    ]:
        change()
        explorer.tile.value = max(1, explorer.tile.value - 1) if explorer.tile.value > 1 else 2  # one more step
        assert differing_pixels() < 0.005


def test_the_chapter_explorer_as_a_reader_drives_it():
    """Chapter 03's explorer (1,000 keys, tiles of 64): every tile drawn is the online state, the last is exact,
    logits that overflow a naive float32 exp are flagged and still exact, and a smaller tile means more steps."""
    check = SoftmaxExplorer(cache_len=1000, tile_size=64, spread=3.0, seed=0, dpi=30)
    _, _, reference = expected_states(1000, 3.0, 0, 64)
    assert check.n_tiles == len(reference) == 16
    for tile in range(1, check.n_tiles + 1):
        check.tile.value = tile  # as the slider does
        drawn_max, drawn_sum = drawn(check, "row_max"), drawn(check, "row_sum")
        assert len(drawn_max) == tile and drawn_max[-1] == reference[tile - 1].row_max
        assert drawn_sum[-1] == reference[tile - 1].row_sum
        assert f"tile {tile} of 16" in check.readout.value
    assert check.done and check.error < 1e-12 and "partial output == exact output" in check.readout.value
    check.spread.value = 40.0  # logits up to about 130
    check.tile.value = check.n_tiles
    assert check.trace.scores.max() > 88.7 and "overflows float32" in check.readout.value
    assert check.error < 1e-12
    check.tile_size.value = 8
    assert check.n_tiles == 125 and check.tile.max == 125


def test_the_chapter_ragged_explorer_draws_what_batch_work_counts():
    check = RaggedBatchExplorer(distribution="equal", num_slots=8, typical=100, tile_size=64, dpi=30)
    assert check.work == {"padded": 800, "ragged": 800, "ragged_tiles": 1024}
    for distribution in ["skewed", "uniform", "one long, many short"]:
        check.distribution.value = distribution  # as the dropdown does
        lengths, work = check.lengths, check.work
        keys = sum(np.ptp(p.vertices[:, 0]) for p in check.artists["tiles"].get_paths())
        padding = sum(np.ptp(p.vertices[:, 0]) for p in check.artists["padding"].get_paths())
        assert round(keys) == work["ragged"] == lengths.sum() and round(padding) == work["padded"] - work["ragged"]


def test_static_frames_are_chosen_by_event():
    """By default the frames are the trace's events: first tile, largest rescale, halfway, last — with the error
    panel, each row saying which event it shows."""
    trace = SoftmaxTrace(*random_scores(1000, 3.0, 0), 64)
    events = trace.events()
    rescale = trace.column("rescale")
    assert events["first"] == 1 and events["last"] == 16 and events["halfway"] == 8
    assert rescale[events["largest rescale"] - 1] == rescale[1:].min()
    figure = explorer_frames(trace)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title().startswith("tile ")]
    assert len(titles) == len(set(events.values()))
    assert any(f"tile {events['largest rescale']} of 16 (largest rescale)" in t for t in titles)
    assert sum(ax.get_title() == "max |partial − exact|" for ax in figure.axes) == len(titles)
