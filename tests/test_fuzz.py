"""Run the fuzzer (fuzz_kernel.py) in a subprocess, so a segfault fails this test instead of killing pytest."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = 150  # per entry point; about 20 s on the 2-core CI machine


def test_fuzz_compiled_entry_points():
    script = Path(__file__).with_name("fuzz_kernel.py")
    run = subprocess.run(
        [sys.executable, str(script), "--examples", str(EXAMPLES)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, (
        f"fuzzer exited with {run.returncode} (negative: killed by a signal)\n"
        f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    )
    summary = re.search(
        r"fuzz: (\d+) inputs, (\d+) AttentionError, (\d+) MemoryError, (\d+) correct answers", run.stdout
    )
    assert summary, run.stdout
    total, errors, memory, answers = map(int, summary.groups())
    print(summary.group(0))
    assert total >= 3 * EXAMPLES * 0.9
    assert errors > 0 and answers > 0  # both kinds of outcome were actually exercised
