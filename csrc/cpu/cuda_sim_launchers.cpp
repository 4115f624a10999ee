// The CUDA launchers (csrc/cuda/launchers.h) on the CPU grid simulator:
// fk_sim:: runs the launchers' own bodies (csrc/cuda/launch_ops.h) with an
// engine that sweeps fk::lincomb_thread / fk::rowsum_thread over every block
// and thread of the plan the GPU launch would use (cuda_sim.h). "Device"
// pointers are host pointers here. The CUDA glue instantiated on fk_sim
// (cuda_sim_glue.cpp) is what tests/test_cuda_glue.py runs.
#include "../cuda/launch_ops.h"
#include "cuda_sim.h"

namespace fk_sim {
namespace {

using fk::i64;

struct SimEngine {
  template <class T, class Fn>
  static int lincomb(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                     fk::OutPtrs<T, Fn::NO> out, uintptr_t, i64 max_blocks, fk::NoiseKey key) {
    flowkern_cpu::sim::sweep_lincomb<T>(fn, rows, inner, in, out, max_blocks, key);
    return 0;
  }
  template <class T, bool STORE = false, class Fn>
  static int rowsum(const Fn& fn, i64 rows, i64 inner, fk::Ptrs<T, Fn::NI> in,
                    fk::acc_t<T>* partial, i64 chunk_len, uintptr_t, fk::RowStore<T> st = {}) {
    if (fk::plan_rowsum(rows, inner, chunk_len).blocks > fk::kMaxGridX)
      return fk_cuda::kGridTooLarge;
    flowkern_cpu::sim::sweep_rowsum<T, Fn, STORE>(fn, rows, inner, in, partial, chunk_len, st);
    return 0;
  }
  template <class T> static int finish(const fk::LossFinish<T>& f, uintptr_t) {
    flowkern_cpu::sim::sweep_finish<T>(f);
    return 0;
  }
};

}  // namespace

using namespace fk_cuda;  // dptr, i64 and the bodies' namespace ops
#define FK_ENGINE SimEngine
FK_TRAINING_LAUNCHERS(FK_DEFINE_LAUNCHER)
FK_STEP_LAUNCHERS(FK_DEFINE_LAUNCHER)
FK_FLOWMAP_LAUNCHERS(FK_DEFINE_LAUNCHER)

}  // namespace fk_sim
