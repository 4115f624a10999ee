// flowkern._cuda's sampler-step launchers (launchers.h, steps.cu) as Python
// functions of plain ints and floats (bindings.cpp calls bind_steps). Absent
// optional tensors are passed as 0.
#include <pybind11/pybind11.h>

#include "flowkern/steps.h"
#include "launchers.h"

namespace py = pybind11;

namespace fk_cuda {

void bind_steps(py::module_& m) {
  // Launches can block while the launch queue is full: let other threads run.
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("euler_step", &euler_step, nogil, py::arg("dtype"), py::arg("rows"), py::arg("inner"),
        py::arg("x"), py::arg("pred"), py::arg("pred_uncond"), py::arg("coef"),
        py::arg("coef_rows"), py::arg("prediction"), py::arg("guidance"), py::arg("out"),
        py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("heun_step", &heun_step, nogil, py::arg("dtype"), py::arg("rows"), py::arg("inner"),
        py::arg("x"), py::arg("pred"), py::arg("x_euler"), py::arg("pred_euler"),
        py::arg("pred_uncond"), py::arg("pred_euler_uncond"), py::arg("coef"),
        py::arg("coef_rows"), py::arg("prediction"), py::arg("guidance"), py::arg("out"),
        py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("ei_step", &ei_step, nogil, py::arg("dtype"), py::arg("rows"), py::arg("inner"),
        py::arg("x"), py::arg("pred"), py::arg("pred_uncond"), py::arg("coef"),
        py::arg("coef_rows"), py::arg("prediction"), py::arg("form"), py::arg("guidance"),
        py::arg("out"), py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("ei_step_backward", &ei_step_backward, nogil, py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("grad"), py::arg("coef"), py::arg("coef_rows"),
        py::arg("prediction"), py::arg("form"), py::arg("guidance"), py::arg("g_x"),
        py::arg("g_pred"), py::arg("g_pred_uncond"), py::arg("stream"),
        py::arg("max_blocks") = 0);
  m.def("dpmpp_2m_step", &dpmpp_2m_step, nogil, py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("x"), py::arg("pred"), py::arg("d_prev"),
        py::arg("pred_uncond"), py::arg("coef"), py::arg("coef_rows"), py::arg("prediction"),
        py::arg("guidance"), py::arg("out"), py::arg("d_out"), py::arg("stream"),
        py::arg("max_blocks") = 0);
  m.def("em_step", &em_step, nogil, py::arg("dtype"), py::arg("rows"), py::arg("inner"),
        py::arg("x"), py::arg("pred"), py::arg("pred_uncond"), py::arg("coef"),
        py::arg("coef_rows"), py::arg("prediction"), py::arg("guidance"), py::arg("seed"),
        py::arg("offset"), py::arg("out"), py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("churn", &churn, nogil, py::arg("dtype"), py::arg("rows"), py::arg("inner"),
        py::arg("x"), py::arg("coef"), py::arg("coef_rows"), py::arg("seed"), py::arg("offset"),
        py::arg("out"), py::arg("stream"), py::arg("max_blocks") = 0);
  m.attr("STEP_COLS") = fk::STEP_COLS;
}

}  // namespace fk_cuda
