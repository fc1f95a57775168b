// The attention_ext._C Python module: loading it registers every op (ops.cpp and the
// per-device implementations); the functions here only choose the CPU kernel build.
#include <torch/extension.h>

#include "cpu/isa.h"

namespace {

bool set_cpu_kernels(py::capsule cap) {
  auto* table = static_cast<const attention_ext::cpu::KernelTable*>(cap.get_pointer());
  return attention_ext::cpu::set_active_kernels(table);
}

void reset_cpu_kernels() { attention_ext::cpu::set_active_kernels(nullptr); }

std::string cpu_isa() { return attention_ext::cpu::active_kernels().isa; }

// A vector function of the active CPU build over a float32 tensor (tests bound its error).
using UnaryFn = void (*)(const float*, float*, int64_t);
at::Tensor apply_unary(UnaryFn fn, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  fn(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

at::Tensor exp2_poly(const at::Tensor& x) { return apply_unary(attention_ext::cpu::active_kernels().exp2, x); }
at::Tensor tanh_fast(const at::Tensor& x) { return apply_unary(attention_ext::cpu::active_kernels().tanh, x); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("_set_cpu_kernels", &set_cpu_kernels, "Use the CPU kernel table in this capsule (from an ISA module)");
  m.def("_reset_cpu_kernels", &reset_cpu_kernels, "Go back to the portable CPU kernels built into _C");
  m.def("_exp2_poly", &exp2_poly, "The CPU kernels' vectorised exp2 (for tests)");
  m.def("_tanh_fast", &tanh_fast, "The CPU kernels' vectorised tanh of the softcap (for tests)");
  m.def("_cpu_isa", &cpu_isa, "Name of the ISA build the CPU ops currently run");
  m.attr("cuda_built") = py::bool_(
#ifdef AE_WITH_CUDA
      true
#else
      false
#endif
  );
}
