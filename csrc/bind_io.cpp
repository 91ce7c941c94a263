// Bindings of the machine and the files: CRC-32C, the dispatcher's choices, guarded copies,
// mapped files, read-ahead, write-behind, pinned host buffers and the staged writer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <errno.h>
#include <cstring>
#include <fcntl.h>

#include <thread>
#include <tuple>
#include <vector>

#include "cpu_merge.h"
#include "direct_path.h"
#include "reductions.h"
#include "crc32c.h"
#include "host_pipeline.h"
#include "mapped_file.h"
#include "read_ahead.h"
#include "write_behind.h"
#include "merge_math.h"
#include "model_set.h"
#include "parallel.h"
#include "operands_from_python.h"

#include "bindings.h"

namespace py = pybind11;
using namespace mergealign;


void mergealign::bind_io(py::module_& m) {
  m.def(
      "crc32c",
      [](uintptr_t address, int64_t length, uint32_t crc) {
        py::gil_scoped_release no_gil;
        return crc32c_update(crc, reinterpret_cast<const unsigned char*>(address), size_t(length));
      },
      py::arg("address"), py::arg("length"), py::arg("crc") = 0,
      "CRC-32C of `length` bytes at `address`, continuing from `crc`.");
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"),
        py::arg("length_b"), "CRC-32C of A+B from crc(A), crc(B) and len(B).");


  m.def("cpu_isa", &cpu_isa, "Instruction set the kernel dispatcher selected on this CPU.");
  m.def("cpu_uses_f16c", &cpu_uses_f16c, "Whether fp16 converts with F16C instructions here.");
  m.def("cpu_uses_direct_path", &direct_path_available,
        "Whether same-dtype task arithmetic runs the AVX2 direct path here.");
  m.def(
      "copy_threads",
      [](uintptr_t dst, uintptr_t src, int64_t bytes, int threads) {
        py::gil_scoped_release no_gil;
        copy_threads(reinterpret_cast<unsigned char*>(dst),
                     reinterpret_cast<const unsigned char*>(src), bytes, threads);
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("threads"),
      "memcpy split over `threads` threads (the floor the bench compares the kernel with).");
  m.def(
      "copy_guarded",
      [](uintptr_t dst, uintptr_t src, int64_t bytes) {
        py::gil_scoped_release no_gil;
        return copy_guarded(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                            bytes);
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"),
      "memcpy from a mapped input with the kernel's SIGBUS guard: 0, or EFAULT when an input "
      "page vanished (the file was truncated under the mapping).");
  m.def(
      "gather_rows_guarded",
      [](uintptr_t dst, uintptr_t src, int64_t row_bytes, uintptr_t index, int64_t count) {
        py::gil_scoped_release no_gil;
        const int64_t* rows = reinterpret_cast<const int64_t*>(index);
        auto gather = [&]() __attribute__((noinline)) {
          for (int64_t i = 0; i < count; ++i) {
            std::memcpy(reinterpret_cast<unsigned char*>(dst) + i * row_bytes,
                        reinterpret_cast<const unsigned char*>(src) + rows[i] * row_bytes,
                        size_t(row_bytes));
          }
        };
        return run_guarded(gather) ? 0 : EFAULT;
      },
      py::arg("dst"), py::arg("src"), py::arg("row_bytes"), py::arg("index"), py::arg("count"),
      "Rows index[0..count) (an int64 array's address) of a mapped input copied to dst in "
      "order, with the kernel's SIGBUS guard: 0, or EFAULT when an input page vanished.");
  m.def("hardware_threads", [] { return int(std::thread::hardware_concurrency()); });

  py::class_<MappedFile>(m, "MappedFile")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("address", &MappedFile::address)
      .def_property_readonly("size", &MappedFile::size)
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("closed", &MappedFile::closed)
      .def("prefetch", &MappedFile::prefetch, py::arg("offset"), py::arg("length"))
      .def("release", &MappedFile::release, py::arg("offset"), py::arg("length"))
      .def("close", &MappedFile::close)
      .def_property_readonly("fd", &MappedFile::fd);

  py::class_<WriteBehind>(m, "WriteBehind")
      .def(py::init<>())
      .def("submit", &WriteBehind::submit, py::arg("fd"), py::arg("offset"), py::arg("length"))
      .def("drain", &WriteBehind::drain, py::call_guard<py::gil_scoped_release>())
      .def("stop", &WriteBehind::stop, py::call_guard<py::gil_scoped_release>());

  py::class_<HostBuffer>(m, "HostBuffer")
      .def(py::init<int64_t>(), py::arg("bytes"))
      .def_property_readonly("address", &HostBuffer::address)
      .def_property_readonly("size", &HostBuffer::size)
      .def("release", &HostBuffer::release);
  m.def(
      "fill_staging",
      [](const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t, int, int64_t>>& pieces,
         int threads) {
        std::vector<StagePiece> native_pieces;
        for (const auto& [src, dst, bytes, fd, offset] : pieces) {
          native_pieces.push_back({src, dst, bytes, fd, offset});
        }
        py::gil_scoped_release no_gil;
        return fill_staging(native_pieces, threads);
      },
      py::arg("pieces"), py::arg("threads"),
      "Copy (src, dst, bytes, fd, file_offset) pieces on `threads` threads: pread from fd when "
      "fd >= 0, else memory at src with the input fault guard.  0, EFAULT when an input ended "
      "early or a page vanished, or a read's errno.");
  py::class_<StagedWriter>(m, "StagedWriter")
      .def(py::init<>())
      .def(
          "submit",
          [](StagedWriter& w, int fd, int64_t file_offset, uintptr_t data, int64_t count,
             int dtype, int64_t delay_us) {
            check_dtype(dtype);
            return w.submit({fd, file_offset, data, count, dtype, delay_us});
          },
          py::arg("fd"), py::arg("file_offset"), py::arg("data"), py::arg("count"),
          py::arg("dtype"), py::arg("delay_us") = 0)
      .def(
          "wait",
          [](StagedWriter& w, int64_t ticket) {
            StagedWriter::Done done;
            {
              py::gil_scoped_release no_gil;
              done = w.wait(ticket);
            }
            return py::make_tuple(done.error, done.crc, done.nonfinite);
          },
          py::arg("ticket"), "(errno or 0, CRC-32C, NaN/inf count) of a submitted job.")
      .def("stop", &StagedWriter::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("busy_seconds", &StagedWriter::busy_seconds);

  py::class_<ReadAhead::Range>(m, "ReadAheadRange")
      .def(py::init([](int file, int64_t offset, int64_t length, int64_t position) {
             return ReadAhead::Range{file, offset, length, position};
           }),
           py::arg("file"), py::arg("offset"), py::arg("length"), py::arg("position"));
  py::class_<ReadAhead>(m, "ReadAhead")
      .def(py::init<const std::vector<int>&, std::vector<ReadAhead::Range>, int64_t, int>(),
           py::arg("fds"), py::arg("ranges"), py::arg("depth"), py::arg("mode"))
      .def("reached", &ReadAhead::reached, py::arg("position"))
      .def_property_readonly("requested", &ReadAhead::requested)
      .def("stop", &ReadAhead::stop, py::call_guard<py::gil_scoped_release>());
}
