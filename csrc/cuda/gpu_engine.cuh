// The GPU engine of launch_ops.h: its three grids on the CUDA kernels of
// lincomb_kernel.cuh and rowsum_kernel.cuh. Each .cu that includes it gets
// its own kernel instantiations (internal linkage, see lincomb_kernel.cuh).
#pragma once

#include "lincomb_kernel.cuh"
#include "rowsum_kernel.cuh"

namespace fk_cuda {
namespace {

struct GpuEngine {
  template <class T, class Fn>
  static int lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                     fk::OutPtrs<T, Fn::NO> out, uintptr_t stream, i64 max_blocks,
                     fk::NoiseKey key) {
    return launch_lincomb<T>(fn, rows, inner, in, out, stream, max_blocks, key);
  }
  template <class T, bool STORE = false, class Fn>
  static int rowsum(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                    fk::acc_t<T>* partial, i64 chunk_len, uintptr_t stream,
                    fk::RowStore<T> st = {}) {
    return launch_rowsum<T, STORE>(fn, rows, inner, in, partial, chunk_len, stream, st);
  }
  template <class T> static int finish(const fk::LossFinish<T>& f, uintptr_t stream) {
    return launch_loss_finish<T>(f, stream);
  }
};

}  // namespace
}  // namespace fk_cuda
