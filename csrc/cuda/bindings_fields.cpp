// flowkern._cuda's empirical-field launcher (launchers_fields.h, fields.cu)
// and its launch plan as Python functions of plain ints and floats
// (bindings.cpp calls bind_fields).
#include <pybind11/pybind11.h>

#include "flowkern/fields_block.h"
#include "launchers_fields.h"

namespace py = pybind11;

namespace fk_cuda {

void bind_fields(py::module_& m) {
  // Launches can block while the launch queue is full: let other threads run.
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("field_mean", &field_mean, nogil, py::arg("dtype"), py::arg("rows"), py::arg("inner"),
        py::arg("R"), py::arg("x"), py::arg("ref"), py::arg("qp"), py::arg("kind"),
        py::arg("p0"), py::arg("p1"), py::arg("mean"), py::arg("best"), py::arg("sumexp"),
        py::arg("workspace"), py::arg("workspace_size"), py::arg("splits"), py::arg("stream"));
  m.def(
      "plan_fields",
      [](fk::i64 B, fk::i64 R, fk::i64 N, int acc_size, fk::i64 splits, fk::i64 max_blocks) {
        const fk::FieldPlan p = acc_size == 8
                                    ? fk::plan_fields<double>(B, R, N, splits, max_blocks)
                                    : fk::plan_fields<float>(B, R, N, splits, max_blocks);
        return py::make_tuple(p.threads, p.bq, p.br, p.qblocks, p.splits, p.rchunk, p.workspace);
      },
      "(threads, bq, br, qblocks, splits, rchunk, workspace) of a field_mean launch; "
      "acc_size 4 (fp32 accumulation) or 8 (fp64)",
      py::arg("B"), py::arg("R"), py::arg("N"), py::arg("acc_size"), py::arg("splits") = 0,
      py::arg("max_blocks") = 0);
}

}  // namespace fk_cuda
