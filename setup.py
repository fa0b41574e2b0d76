"""Builds the VMM mechanism (csrc/) into ``replica._vmm``.

The CUDA backend is compiled against ``cuda.h`` when the CUDA headers are found; the driver itself
is loaded at run time (dlopen ``libcuda.so.1``), so the same build imports on machines with no GPU.
"""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _cuda_include_dir() -> str | None:
    candidates = [
        os.environ.get("CUDA_HOME", ""),
        os.environ.get("CUDA_PATH", ""),
        "/usr/local/cuda",
    ]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda.h")):
            return os.path.join(root, "include")
    return None


cuda_include = _cuda_include_dir()
macros = [("VATTN_WITH_CUDA", "1")] if cuda_include else []

ext = Pybind11Extension(
    "replica._vmm",
    sorted(glob.glob("csrc/*.cpp")),
    depends=sorted(glob.glob("csrc/*.h")),  # a changed header rebuilds what includes it
    include_dirs=["csrc"] + ([cuda_include] if cuda_include else []),
    define_macros=macros,
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
    libraries=["dl"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
