"""flashdecode.dist's tests (tests/dist_cases.py), run by pytest in a Python process of their own.

Two reasons. Importing Ray changes how this process's memory grows: test_memory's leak check (RSS growth
over 10,000 kernel calls) measured 532 KiB without `import ray` and 940 KiB with it, in the same script,
against a limit of 1,024 KiB — in one process with the other tests it failed. And a local Ray is a dozen
processes that share their fate with the process that started it: when that process exits, they go too.
"""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_sharded_cache_over_a_local_ray():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "dist_cases.py"), "-q", "-rfEs", "-p", "no:cacheprovider"],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(summary)
    assert run.returncode == 0, f"tests/dist_cases.py failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    assert " passed" in summary and not any(word in summary for word in ("failed", "error", "skipped")), summary
