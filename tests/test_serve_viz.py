"""The engine explorer (chapter 11), driven as a reader drives it: move the step slider, read back what is drawn.

The timeline image must be the engine's timeline, recomputed here from the step records; the cursors must sit
on the chosen step; the readout must list that step's rows; the pool panel must plot the blocks in use."""

import numpy as np
import pytest
from conftest import require_module

require_module("ipywidgets")
require_module("matplotlib")

from flashdecode.serve import (  # noqa: E402
    DECODE,
    PREFILL,
    WAITING,
    Engine,
    ModelConfig,
    notable_steps,
    random_weights,
    spread_workload,
    step_summary,
)
from flashdecode.viz import EngineExplorer, engine_frames, figure_png  # noqa: E402

TINY = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16
)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(random_weights(TINY, seed=3), num_blocks=10, block_size=4, token_budget=12, max_running=3)
    engine.run(spread_workload(6, TINY.vocab_size, seed=4, prompt_median=8, output_median=6, longest=20))
    return engine


@pytest.fixture(scope="module")
def explorer(engine):
    return EngineExplorer(engine, dpi=30)


def expected_grid(engine):
    """From the step records alone: waiting until admitted, prefill or decode where the request has rows."""
    grid = np.zeros((len(engine.outputs), len(engine.history)), np.int8)
    for rid in engine.outputs:
        grid[rid, : engine.admitted[rid]] = WAITING
    for record in engine.history:
        for rid, _, kind, _ in record.rows:
            grid[rid, record.step] = max(grid[rid, record.step], DECODE if kind == "decode" else PREFILL)
    return grid


def test_the_timeline_drawn_is_the_engine_s(engine, explorer):
    image = explorer.panels.grid
    np.testing.assert_array_equal(image, expected_grid(engine))
    drawn = explorer.figure.axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(drawn), expected_grid(engine))
    assert (image == WAITING).any() and (image == PREFILL).any() and (image == DECODE).any()
    in_use = explorer.figure.axes[1].lines[0].get_ydata()
    assert list(in_use) == [record.blocks_in_use for record in engine.history]


def test_every_step_moves_the_cursors_and_the_readout(engine, explorer):
    assert explorer.step.max == explorer.play.max == len(engine.history) - 1
    renders = explorer.renders
    steps = list(range(len(engine.history))) + [2, 0]
    for step in steps:
        explorer.step.value = step  # as the slider does
        assert explorer.artists["cursor"].get_xdata()[0] == step
        assert explorer.artists["pool_cursor"].get_xdata()[0] == step
        assert f"step {step} of {len(engine.history) - 1}" in explorer.readout.value
        assert step_summary(engine.history[step], 10) in explorer.readout.value
    assert explorer.renders - renders == len(steps) - 1  # step 0 was already shown
    assert bytes(explorer.image.value).startswith(b"\x89PNG")


def test_static_frames(engine, explorer):
    steps = notable_steps(engine)
    assert steps[0] == 0 and steps[-1] == len(engine.history) - 1
    figure = engine_frames(explorer, steps)
    assert len(figure.axes) == 2 * len(steps)
    assert [ax.lines[-1].get_xdata()[0] for ax in figure.axes[::2]] == steps
    assert figure_png(figure, colours=32).startswith(b"\x89PNG")
