"""Builds the native extensions of mergealign_fast from csrc/.

  mergealign_fast._native  CPU kernel, memory maps, merge-to-file (always built)
  mergealign_fast._cuda    CUDA kernel (built when nvcc is found)

No torch here: the cores are torch-free and link against nothing but libstdc++, pthreads and (for
_cuda) the static CUDA runtime, so the build works in an isolated build environment, the wheel fits
any torch the user has, and users need only an NVIDIA driver.  No -march=native either: the CPU
loop is compiled for several instruction sets and chosen at run time (csrc/tiles.h).

Build knobs (environment variables, one prefix):
  MERGEALIGN_SKIP_CUDA=1        do not build _cuda even when nvcc is present
  MERGEALIGN_FORCE_CUDA=1       fail the build if _cuda cannot be built
  MERGEALIGN_CUDA_ARCHS="80;90" GPU architectures (default 80;90: A100 and H100/H200; PTX of the
                                last one is embedded too, for newer GPUs)
  MERGEALIGN_DEBUG=1            build without optimisation and with debug info
"""

import os
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

DEBUG = os.environ.get("MERGEALIGN_DEBUG") == "1"
# -ffp-contract=off: GCC would otherwise fuse a*b+c into an FMA in some clones and not in others,
# and the same element could round differently on different CPUs or code paths.
# -fno-trapping-math: we never read FP exception flags; it lets GCC compute both arms of a select
# and vectorise the methods' masked loops (they stayed scalar without it).  Results are unchanged:
# it changes no rounding, only what may be evaluated speculatively.
COMMON_FLAGS = ["-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                "-Wall", "-Wextra"]
OPT_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]
HEADERS = ["csrc/merge_math.h", "csrc/merge_operands.h", "csrc/tiles.h", "csrc/direct_path.h", "csrc/parallel.h",
           "csrc/cpu_merge.h", "csrc/reductions.h", "csrc/crc32c.h", "csrc/mapped_file.h",
           "csrc/cuda_merge.h", "csrc/operands_from_python.h", "csrc/read_ahead.h",
           "csrc/write_behind.h", "csrc/model_set.h", "csrc/host_pipeline.h",
           "csrc/file_io.h", "csrc/bindings.h", "csrc/low_rank.h"]


def find_cuda_home():
    """The first CUDA toolkit with nvcc and the static runtime: $CUDA_HOME, $CUDA_PATH, the
    folder above `nvcc` on PATH, /usr/local/cuda (where a wrapper script on PATH points)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for folder in filter(None, candidates):
        home = Path(folder)
        if (home / "bin" / "nvcc").exists() and (home / "lib64" / "libcudart_static.a").exists():
            return home
    return None


def cuda_arch_flags():
    archs = [a.strip() for a in os.environ.get("MERGEALIGN_CUDA_ARCHS", "80;90").split(";")
             if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags, " ".join(f"sm_{a}" for a in archs)


class BuildExt(build_ext):
    """build_ext that first compiles .cu sources with nvcc into objects linked into the module."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = [self._nvcc(src, ext) for src in cu_sources]
        super().build_extension(ext)

    def _nvcc(self, source, ext):
        cuda_home = Path(ext.cuda_home)
        obj = Path(self.build_temp) / (Path(source).stem + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        arch_flags, arch_names = cuda_arch_flags()
        cmd = [str(cuda_home / "bin" / "nvcc"), "-c", source, "-o", str(obj), "-std=c++17",
               "-Icsrc", "-Xcompiler", "-fPIC", "--fmad=false", *arch_flags,
               f'-DMA_CUDA_ARCH_LIST="{arch_names}"', *(["-G", "-g"] if DEBUG else ["-O3"])]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        return str(obj)


def cuda_extension():
    if os.environ.get("MERGEALIGN_SKIP_CUDA") == "1":
        return None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if os.environ.get("MERGEALIGN_FORCE_CUDA") == "1":
            raise RuntimeError("MERGEALIGN_FORCE_CUDA=1 but no CUDA toolkit (nvcc and "
                               "lib64/libcudart_static.a) was found; set CUDA_HOME")
        return None
    ext = Pybind11Extension(
        "mergealign_fast._cuda",
        ["csrc/cuda_bindings.cpp", "csrc/cuda_merge.cu"],
        include_dirs=["csrc"],
        extra_compile_args=COMMON_FLAGS + OPT_FLAGS,
        # Static runtime: the module needs only the driver (libcuda.so, loaded at first use).
        extra_link_args=[str(cuda_home / "lib64" / "libcudart_static.a"), "-ldl", "-lrt",
                         "-pthread"],
        depends=HEADERS,
    )
    ext.cuda_home = str(cuda_home)
    return ext


native = Pybind11Extension(
    "mergealign_fast._native",
    ["csrc/bindings.cpp", "csrc/bind_merges.cpp", "csrc/bind_reductions.cpp", "csrc/bind_io.cpp",
     "csrc/cpu_merge.cpp", "csrc/direct_path.cpp", "csrc/low_rank.cpp", "csrc/model_set.cpp",
     "csrc/reductions.cpp", "csrc/parallel.cpp",
     "csrc/crc32c.cpp", "csrc/mapped_file.cpp", "csrc/read_ahead.cpp",
     "csrc/write_behind.cpp", "csrc/host_pipeline.cpp"],
    include_dirs=["csrc"],
    extra_compile_args=COMMON_FLAGS + OPT_FLAGS,
    extra_link_args=["-pthread"],
    depends=HEADERS,
)

extensions = [native] + [e for e in [cuda_extension()] if e is not None]
setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
