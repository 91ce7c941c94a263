"""Builds the native extension mergealign_fast._native from csrc/.

No torch here: the core is torch-free and links against nothing but libstdc++ and pthreads, so
the build works in an isolated build environment and the wheel fits any torch the user has.
No -march=native either: the hot loop is compiled for several instruction sets and chosen at run
time (see csrc/cpu_merge.cpp), so a wheel built here runs on any x86-64 machine.

Build knobs (environment variables, one prefix):
  MERGEALIGN_DEBUG=1   build without optimisation and with assertions, for gdb/valgrind.
"""

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu_merge.cpp", "csrc/mapped_file.cpp"]

# -ffp-contract=off: GCC would otherwise fuse a*b+c into an FMA in some clones and not in others,
# and the same element could round differently on different CPUs or code paths.
COMMON_FLAGS = ["-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra"]
OPT_FLAGS = ["-O0", "-g"] if os.environ.get("MERGEALIGN_DEBUG") == "1" else ["-O3"]

native = Pybind11Extension(
    "mergealign_fast._native",
    CPU_SOURCES,
    include_dirs=["csrc"],
    extra_compile_args=COMMON_FLAGS + OPT_FLAGS,
    extra_link_args=["-pthread"],
    depends=["csrc/merge_math.h", "csrc/cpu_merge.h", "csrc/mapped_file.h"],
)

setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
