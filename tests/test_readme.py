"""The README's usage examples run and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_print_what_their_comments_say():
    """Every python block, run in order in one namespace (the paged example reuses the first one's rng and q),
    prints what the comment on its print line starts with (up to a colon, after which the comment explains)."""
    namespace = {}
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "no python examples found in the README"
    for code in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), namespace)
        promised = re.search(r"print\(.*\)\s+# (.*)$", code, re.M).group(1)
        assert printed.getvalue().strip() == promised.split(": ")[0]
