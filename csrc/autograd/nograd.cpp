// The Autograd-key kernel of the ops that have no derivative: every `.nograd`
// (and `.times_nograd`) overload (flowkern/ops/_registry.py register(nograd=True)) and every op that
// writes into a caller's buffer (interpolate_out and the in-place steps).
//
// - An argument that needs a gradient (grad mode on) is a clear error naming
//   it, not a silently detached result. The public functions call `.nograd`
//   only when nothing needs a gradient: it skips the Python autograd kernel
//   of the default overload (~10 us a call) and goes straight to the kernel.
// - Every buffer the op writes gets its version counter bumped, as PyTorch's
//   own in-place ops do: a tensor autograd saved and an op overwrote then
//   makes backward raise instead of returning a wrong gradient. Here, and in
//   inference mode (no Autograd key) at the ADInplaceOrView key, as PyTorch.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <string_view>

#include "../cpu/schemas.h"

namespace flowkern_cpu {
namespace {

// Whether a tensor's autograd metadata can hold a forward-mode tangent: a
// forward grad of its own, or, for a view (a sampler's table row), one on
// its base, from which _fw_grad would make the view's. Plain tensors have no
// metadata at all. Decided on pointers: _fw_grad takes a mutex per level.
bool may_have_tangent(const at::Tensor& t) {
  using torch::autograd::AutogradMeta;
  const auto* meta = static_cast<const AutogradMeta*>(t.unsafeGetTensorImpl()->autograd_meta());
  if (meta == nullptr) return false;
  if (meta->fw_grad_ != nullptr) return true;
  if (!meta->is_view_) return false;
  const auto* view = static_cast<const torch::autograd::DifferentiableViewMeta*>(meta);
  if (!view->has_fw_view()) return false;
  const at::Tensor& base = view->get_forward_view().base_;
  const auto* base_meta =
      static_cast<const AutogradMeta*>(base.unsafeGetTensorImpl()->autograd_meta());
  return base_meta != nullptr && base_meta->fw_grad_ != nullptr;
}

// Whether a tensor argument carries a forward-mode tangent (torch.func.jvp,
// torch.autograd.forward_ad) at any of the first dual levels.
bool has_tangent(const at::Tensor& t) {
  if (!t.defined() || !may_have_tangent(t)) return false;
  for (uint64_t level = 0; level < 8; ++level)
    if (t._fw_grad(level).defined()) return true;
  return false;
}

// (isList, an inline tag test, before isTensorList, a call into libtorch)
bool carries_tangent(const c10::IValue& v) {
  if (v.isTensor()) return has_tangent(v.toTensor());
  if (v.isList() && v.isTensorList())
    for (const at::Tensor& t : v.toTensorList()) if (has_tangent(t)) return true;
  return false;
}

bool needs_grad(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().requires_grad();
  if (v.isList() && v.isTensorList())
    for (const at::Tensor& t : v.toTensorList()) if (t.requires_grad()) return true;
  return false;
}

// Every buffer the op writes (Tensor(a!)) gets its version counter bumped,
// once per call, as PyTorch's in-place ops do.
void bump_written(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size(), base = stack->size() - n;
  for (size_t i = 0; i < n; ++i) {
    const auto* alias = args[i].alias_info();
    const c10::IValue& v = (*stack)[base + i];
    if (alias != nullptr && alias->isWrite() && v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

void no_autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                        torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size(), base = stack->size() - n;
  // a `.nograd` or `.times_nograd` overload (printed with its name), or an op
  // that writes a buffer
  const std::string& overload = op.schema().overload_name();
  const bool nograd = overload.ends_with("nograd");
  const auto suffix = [&] { return nograd ? "." + overload : std::string(); };  // errors only
  if (c10::GradMode::is_enabled()) {
    for (size_t i = 0; i < n; ++i) {
      if (!needs_grad((*stack)[base + i])) continue;
      const std::string& name = args[i].name();
      TORCH_CHECK(name != "t" && name != "s" && name != "t_prev" && name != "table",
                  op.schema().name(), ": argument '", name, "' requires grad, and the fused "
                  "ops do not differentiate in the times; detach it, or use backend='torch' "
                  "for derivatives in t");
      TORCH_CHECK(false, op.schema().name(),
                  suffix(), ": argument '", args[i].name(),
                  "' requires grad, and ",
                  nograd ? "this overload does not differentiate; call the one without "
                           "'nograd' (ei_step: default or .times), which does"
                         : "this op writes into a buffer and has no derivative; call it under "
                           "torch.no_grad() or on detached tensors (ei_step without out= is "
                           "the differentiable step)");
    }
  }
  // Forward-mode AD: the public functions send dual inputs of a
  // differentiable op to its autograd.Function, whose jvp formula runs the
  // op on the tangents (flowkern/ops/_registry.py DiffOp). A tangent that
  // reaches this kernel would come out zero or missing, so it is an error.
  for (size_t i = 0; i < n; ++i) {
    const c10::IValue& v = (*stack)[base + i];
    TORCH_CHECK(!carries_tangent(v), op.schema().name(),
                suffix(), ": argument '", args[i].name(),
                "' carries a forward-mode tangent (torch.func.jvp / forward_ad), and ",
                nograd ? "this overload has no forward-mode formula; call the public function "
                         "(flowkern.interpolate, convert, flow_matching_loss, ei_step), which has one"
                       : "this op writes into a buffer and has no forward-mode derivative; "
                         "ei_step without out= is the differentiable step");
  }
  bump_written(op, stack);
  // past ADInplaceOrView too: its kernel (below) would bump a second time
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

// In inference mode the Autograd key is excluded, so the kernel above never
// runs; a normal (non-inference) tensor still carries ADInplaceOrView, which
// is where PyTorch's own in-place ops bump it then (c10/core/InferenceMode.h):
// a tensor autograd saved before inference mode and a step overwrote inside
// it must still make backward raise. Inference tensors have no version.
void inplace_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                    torch::jit::Stack* stack) {
  bump_written(op, stack);
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

// The ops of the schema list (schemas.h) without a derivative: every
// `.nograd` and `.times_nograd` overload and every op with a written argument (Tensor(a!)).
TORCH_LIBRARY_IMPL(flowkern, Autograd, m) {
  for (const char* schema : kSchemas) {
    const std::string_view name = schema_name(schema);
    if (name.ends_with("nograd") || std::string_view(schema).find("!)") != std::string_view::npos)
      m.impl(std::string(name).c_str(),  // parsed into the op's name before the call returns
             torch::CppFunction::makeFromBoxedFunction<&no_autograd_kernel>());
  }
}

// The ops with a written argument: their bump in inference mode.
TORCH_LIBRARY_IMPL(flowkern, ADInplaceOrView, m) {
  for (const char* schema : kSchemas) {
    if (std::string_view(schema).find("!)") != std::string_view::npos)
      m.impl(std::string(schema_name(schema)).c_str(),
             torch::CppFunction::makeFromBoxedFunction<&inplace_kernel>());
  }
}

}  // namespace flowkern_cpu
