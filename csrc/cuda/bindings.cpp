// flowkern._cuda: the launchers and launch plans as Python functions of
// plain ints (pointers from tensor.data_ptr(), the stream from
// torch.cuda.current_stream().cuda_stream). Compiled by g++ without torch or
// CUDA headers; flowkern/cuda/ wraps it for tensors.
#include <pybind11/pybind11.h>

#include "launchers.h"

namespace py = pybind11;

namespace fk_cuda {
void bind_steps(py::module_& m);    // bindings_steps.cpp
void bind_flowmap(py::module_& m);  // bindings_flowmap.cpp
void bind_fields(py::module_& m);   // bindings_fields.cpp
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "flowkern CUDA kernels (raw-pointer launchers; use flowkern.cuda)";
  // Launches can block while the launch queue is full: let other threads run.
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("interpolate", &fk_cuda::interpolate, nogil, py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("x0"), py::arg("x1"), py::arg("coef"), py::arg("target"),
        py::arg("xt"), py::arg("y"), py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("interpolate_backward", &fk_cuda::interpolate_backward, nogil, py::arg("dtype"),
        py::arg("rows"), py::arg("inner"), py::arg("g_xt"), py::arg("g_y"), py::arg("coef"),
        py::arg("target"), py::arg("g_x0"), py::arg("g_x1"), py::arg("stream"),
        py::arg("max_blocks") = 0);
  m.def("convert", &fk_cuda::convert, nogil, py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("x"), py::arg("pred"), py::arg("coef"), py::arg("src"),
        py::arg("dst"), py::arg("out"), py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("convert_backward", &fk_cuda::convert_backward, nogil, py::arg("dtype"),
        py::arg("rows"), py::arg("inner"), py::arg("g"), py::arg("coef"), py::arg("src"),
        py::arg("dst"), py::arg("g_x"), py::arg("g_pred"), py::arg("stream"),
        py::arg("max_blocks") = 0);
  m.def("fm_loss_partial", &fk_cuda::fm_loss_partial, nogil, py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("pred"), py::arg("x0"), py::arg("x1"), py::arg("coef"),
        py::arg("target"), py::arg("partial"), py::arg("chunk_len"), py::arg("stream"));
  m.def("fm_loss_backward", &fk_cuda::fm_loss_backward, nogil, py::arg("dtype"),
        py::arg("rows"), py::arg("inner"), py::arg("grad_rows"), py::arg("pred"),
        py::arg("x0"), py::arg("x1"), py::arg("coef"), py::arg("target"), py::arg("g_pred"),
        py::arg("g_x0"), py::arg("g_x1"), py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("fm_loss_backward_pred", &fk_cuda::fm_loss_backward_pred, nogil, py::arg("dtype"),
        py::arg("rows"), py::arg("inner"), py::arg("grad_rows"), py::arg("pred"),
        py::arg("x0"), py::arg("x1"), py::arg("coef"), py::arg("target"), py::arg("g_pred"),
        py::arg("stream"), py::arg("max_blocks") = 0);
  m.def("error_string", &fk_cuda::error_string, py::arg("code"));

  m.def(
      "plan_lincomb",
      [](fk::i64 rows, fk::i64 inner, int elem_size, bool all_16B_aligned, fk::i64 max_blocks) {
        const fk::LincombPlan p =
            fk::plan_lincomb(rows, inner, elem_size, all_16B_aligned, max_blocks);
        return py::make_tuple(p.vec, p.threads, p.blocks);
      },
      "(vec, threads, blocks) of an elementwise launch", py::arg("rows"), py::arg("inner"),
      py::arg("elem_size"), py::arg("all_16B_aligned"), py::arg("max_blocks") = 0);
  m.def(
      "plan_rowsum",
      [](fk::i64 rows, fk::i64 inner, fk::i64 chunk_len) {
        const fk::RowsumPlan p = fk::plan_rowsum(rows, inner, chunk_len);
        return py::make_tuple(p.threads, p.chunk_len, p.nchunks, p.blocks);
      },
      "(threads, chunk_len, nchunks, blocks) of a row-sum launch", py::arg("rows"),
      py::arg("inner"), py::arg("chunk_len") = 0);
  m.attr("THREADS") = fk::kThreads;
  m.attr("DEFAULT_MAX_BLOCKS") = fk::kDefaultMaxBlocks;
  m.attr("ROWSUM_CHUNK") = fk::kRowsumChunk;
  fk_cuda::bind_steps(m);
  fk_cuda::bind_flowmap(m);
  fk_cuda::bind_fields(m);
}
