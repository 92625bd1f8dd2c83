"""flashdecode.trace is numpy only: what the explorers plot can be computed where no widget library exists."""

import subprocess
import sys
import textwrap


def test_trace_imports_without_ipywidgets_or_matplotlib():
    code = textwrap.dedent("""
        import sys
        for name in ("ipywidgets", "matplotlib", "matplotlib.pyplot", "PIL"):
            sys.modules[name] = None            # any import of these now raises ImportError
        from flashdecode.trace import SoftmaxTrace, batch_work, ragged_lengths, random_scores, tile_spans
        trace = SoftmaxTrace(*random_scores(1000, 3.0, 0), 64)
        assert trace.n_tiles == 16 and trace.errors[-1] < 1e-12
        assert trace.events() == {"first": 1, "largest rescale": 10, "halfway": 8, "last": 16}
        lengths = ragged_lengths("skewed", 16, 512, 0)
        slots, starts, stops, _ = tile_spans(lengths, 64)
        assert (stops - starts).sum() == batch_work(lengths)["ragged"] == lengths.sum()
        try:
            import flashdecode.viz                # the widgets do need them
        except ImportError:
            print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
