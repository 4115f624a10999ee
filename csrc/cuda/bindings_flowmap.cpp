// flowkern._cuda's flow-map loss launchers (launchers.h, flowmap.cu) as
// Python functions of plain ints (bindings.cpp calls bind_flowmap). Absent
// optional gradients are passed as 0.
#include <pybind11/pybind11.h>

#include "launchers.h"

namespace py = pybind11;

namespace fk_cuda {

void bind_flowmap(py::module_& m) {
  // Launches can block while the launch queue is full: let other threads run.
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("flowmap_loss_partial", &flowmap_loss_partial, nogil, py::arg("dtype"),
        py::arg("rows"), py::arg("inner"), py::arg("x"), py::arg("pred"), py::arg("target"),
        py::arg("coef"), py::arg("coef_rows"), py::arg("prediction"), py::arg("form"),
        py::arg("partial"), py::arg("chunk_len"), py::arg("stream"));
  m.def("flowmap_loss_backward", &flowmap_loss_backward, nogil, py::arg("dtype"),
        py::arg("rows"), py::arg("inner"), py::arg("grad_rows"), py::arg("x"), py::arg("pred"),
        py::arg("target"), py::arg("coef"), py::arg("coef_rows"), py::arg("prediction"),
        py::arg("form"), py::arg("g_pred"), py::arg("g_x"), py::arg("g_target"),
        py::arg("stream"), py::arg("max_blocks") = 0);
}

}  // namespace fk_cuda
