// CPU kernels of the sampler-step ops: the op bodies of step_ops.h on the
// CPU runner below, which evaluates the step's coefficient rows on the host
// (step_coef), runs the op's value checks on them, and runs the functor of
// fk::with_step_fn (the one the CUDA launcher and its simulator build) on
// the CPU lincomb engine (dispatch.h run_lincomb).

#include <vector>

#include "dispatch.h"
#include "step_ops.h"

namespace flowkern_cpu {
namespace {

template <class T, int N> fk::Ptrs<T, N> in_ptrs(const std::vector<Tensor>& v) {
  fk::Ptrs<T, N> p;
  for (int j = 0; j < N; ++j) p.p[j] = cptr<T>(v[size_t(j)]);
  return p;
}

template <class T, int N> fk::OutPtrs<T, N> out_ptrs(const std::vector<Tensor*>& v) {
  fk::OutPtrs<T, N> p;
  for (int j = 0; j < N; ++j) p.p[j] = mptr<T>(*v[size_t(j)]);
  return p;
}

struct CpuSteps {
  static bool values_read(bool check) { return check; }
  static Tensor empty(const Tensor& x) { return empty_output(x); }

  template <int OP, class Checks>
  static void run(const std::vector<Tensor>& in, const std::vector<Tensor*>& outs,
                  const StepTimes* coef, bool check, const fk::StepParams& p,
                  const StepNoise& noise, Checks&& checks) {
    const Tensor& x = in[0];
    dispatch_dtype(x, fk::step_name(OP), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = fk::acc_t<T>;
      fk::StepSrc<A> src;
      StepCoef<A> c;
      if (coef != nullptr) {
        c = step_coef<A>(coef->table, coef->t, coef->s, coef->t_prev, coef->times, coef->kind,
                          coef->params, x, check);
        if (check) checks(c);
        src = c.src;
      }
      fk::with_step_fn<OP>(src, p, [&](auto fn) {
        using Fn = decltype(fn);
        FK_CHECK(in.size() == size_t(Fn::NI) && outs.size() == size_t(Fn::NO),
                 "step op: wrong number of inputs or outputs for its functor");
        run_lincomb<T>(fn, rows_of(x), inner_of(x), in_ptrs<T, Fn::NI>(in),
                       out_ptrs<T, Fn::NO>(outs), noise_key(noise.seed, noise.offset, noise.seeds));
      });
    });
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(flowkern, CPU, m) { StepOps<CpuSteps>::register_all(m); }

}  // namespace flowkern_cpu
