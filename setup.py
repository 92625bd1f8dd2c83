"""Build the compiled kernel (flashdecode/_kernels.pyx).

Metadata lives in pyproject.toml; this file only decides the compiler flags:
OpenMP when the compiler has it (falls back to one thread, e.g. Apple clang),
`-march=native` only when FLASHDECODE_NATIVE=1, never `-ffast-math` (it breaks
inf/NaN handling and sets flush-to-zero for the whole process). `-fno-trapping-math`
only tells the compiler that nobody traps on floating-point exceptions (clang's default
already), so the vectorised exp's clamps become vector selects; inf and NaN are untouched.
Without -march=native the kernel still uses AVX/FMA on CPUs that have them: its SIMD tile
kernels (flashdecode/_simd.h) carry `target_clones` (chosen at load time), see
book/06_to_the_roof.ipynb. FLASHDECODE_NO_CLONES=1 builds only their plain x86-64 (SSE2) version.
"""

import os
import subprocess
import sys
import sysconfig
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup


def compiler_accepts(flags):
    """True when the C compiler builds and links a small OpenMP program with `flags`."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file = os.path.join(tmp, "probe.c")
        with open(c_file, "w") as f:
            f.write(src)
        cmd = cc.split() + [c_file, "-o", os.path.join(tmp, "probe")] + flags
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


compile_args = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
link_args = []
if os.environ.get("FLASHDECODE_NO_OPENMP") != "1" and compiler_accepts(["-fopenmp"]):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
else:
    print("flashdecode: building WITHOUT OpenMP (one thread per call)", file=sys.stderr)
if os.environ.get("FLASHDECODE_NATIVE") == "1":
    compile_args.append("-march=native")
macros = [("FD_NO_CLONES", "1")] if os.environ.get("FLASHDECODE_NO_CLONES") == "1" else []

extension = Extension(
    "flashdecode._kernels",
    ["flashdecode/_kernels.pyx"],
    include_dirs=["flashdecode"],  # the C headers exported from the book
    depends=["flashdecode/_openmp.h", "flashdecode/_simd.h"],
    define_macros=macros,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)
setup(ext_modules=cythonize([extension], annotate=os.environ.get("FLASHDECODE_ANNOTATE") == "1"))
