// Python bindings for the native core.  Everything crosses as plain integers (addresses, counts,
// dtype codes, file descriptors) so the core links against neither torch nor numpy; the Python
// layer (mergealign_fast/kernels/cpu.py) validates dtypes, sizes and lifetimes before calling.
// The module is assembled here from its parts, one file per family bound (bindings.h).
#include <pybind11/pybind11.h>

#include <errno.h>

#include "bindings.h"
#include "mapped_file.h"
#include "operands_from_python.h"

namespace py = pybind11;
using namespace mergealign;

PYBIND11_MODULE(_native, m) {
  m.doc() = "mergealign-fast native CPU core (torch-free)";

  // A failed open()/mmap() surfaces as Python's OSError with errno and file name, so callers can
  // report "base/model.safetensors: Permission denied" without parsing strings.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileError& e) {
      errno = e.err;
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.path.c_str());
    }
  });

  bind_operands(m);

  bind_merges(m);
  bind_reductions(m);
  bind_io(m);
}
