"""Building the compiled kernel from the book's cells: `%load_ext booktools` in a chapter.

The kernel is one Cython module (`flashdecode/_kernels.pyx`) plus C headers, but a chapter explains it a
piece at a time, one short cell per idea. A cell that starts with

    %%kernel_source NAME
    #| export _kernels.pyx        (or a header: #| export _simd.h)

records its text as piece NAME of that file (running the cell again replaces the piece) and prints
nothing. `build_kernel()` compiles every piece recorded so far, in order, into a fresh extension module
and returns it; `load_kernel_sources(notebook)` records the pieces another chapter wrote, so chapter 06
starts from the kernel chapter 05 finished. book/export.py writes the same pieces, in the same order,
into the package, so the module a chapter compiles is the one `make build` compiles.

Not part of the package: only the notebooks use it (they run in book/, so `import booktools` finds it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import export

# the flags setup.py uses on a compiler with OpenMP (no -ffast-math: it breaks inf and NaN; see setup.py)
COMPILE_ARGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-fopenmp"]
LINK_ARGS = ["-fopenmp"]

SOURCES: dict[str, dict[str, str]] = {}  # file name -> {piece name: text}, in the order first recorded


def record(target: str, name: str, text: str) -> None:
    """Store `text` as piece `name` of the generated file `target` (replacing an older version of it)."""
    SOURCES.setdefault(target, {})[name] = text.strip("\n")


def kernel_source(line: str, cell: str) -> None:
    """The `%%kernel_source NAME` cell magic: record the cell as a piece of the file its export mark names."""
    name = line.strip()
    lines = cell.strip("\n").splitlines()
    mark = lines[0].strip() if lines else ""
    target = mark[len(export.EXPORT_MARK) :].strip()
    if not name or not mark.startswith(export.EXPORT_MARK) or "." not in target:
        raise ValueError("a kernel_source cell is `%%kernel_source NAME` then `#| export FILE` (e.g. _simd.h)")
    record(target, name, "\n".join(lines[1:]))


def load_kernel_sources(notebook: str) -> list[str]:
    """Record the kernel pieces of another chapter, as export.py reads them; returns the files touched."""
    touched = []
    for target, cell_id, code in export.exported_cells(Path(notebook)):
        if target.endswith((".pyx", ".h")):
            record(target, cell_id, code)
            touched.append(target)
    return sorted(set(touched))


def build_kernel(extra_compile_args: tuple = (), quiet: bool = True):
    """Compile the recorded pieces into a new extension module and return it.

    extra_compile_args are added to setup.py's flags (e.g. "-DFD_NO_CLONES" for the plain SSE2 build).

    Each build gets a module name from a hash of its sources (an extension module cannot be reloaded
    under the same name), in a temporary folder with the headers next to the .pyx.
    """
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    pyx = "\n\n\n".join(SOURCES.get(export.CYTHON_TARGET, {}).values()) + "\n"
    headers = {name: "\n\n".join(pieces.values()) + "\n" for name, pieces in SOURCES.items() if name.endswith(".h")}
    compile_args = COMPILE_ARGS + list(extra_compile_args)
    digest = hashlib.sha1(repr((pyx, sorted(headers.items()), compile_args)).encode()).hexdigest()[:12]
    module_name = f"book_kernel_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    folder = Path(tempfile.mkdtemp(prefix="flashdecode-book-"))
    (folder / f"{module_name}.pyx").write_text(pyx, encoding="utf-8")
    for name, text in headers.items():
        (folder / name).write_text(text, encoding="utf-8")
    extension = Extension(
        module_name,
        [str(folder / f"{module_name}.pyx")],
        include_dirs=[str(folder)],
        extra_compile_args=compile_args,
        extra_link_args=LINK_ARGS,
    )
    log = io.StringIO()
    with redirect_stdout(log), redirect_stderr(log):
        try:
            dist = Distribution({"ext_modules": cythonize([extension], quiet=True, build_dir=str(folder))})
            build = dist.get_command_obj("build_ext")
            build.build_lib = build.build_temp = str(folder)
            build.ensure_finalized()
            build.run()
        except Exception as error:
            raise RuntimeError(f"the kernel did not build:\n{log.getvalue()}") from error
    if not quiet:
        print(log.getvalue())
    spec = importlib.util.spec_from_file_location(module_name, build.get_ext_fullpath(module_name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def load_ipython_extension(ipython) -> None:
    ipython.register_magic_function(kernel_source, "cell")


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import flashdecode` does: see its __init__
