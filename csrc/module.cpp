// The Python module fastsae._C. Ops are registered with TORCH_LIBRARY in the other
// files of csrc/ and reached through torch.ops.fastsae.*; this file only exposes
// facts about the build.
#include <pybind11/pybind11.h>

namespace {

bool cuda_built() {
#ifdef FASTSAE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsae native ops (registered under torch.ops.fastsae)";
  m.def("cuda_built", &cuda_built, "True when the CUDA sources of csrc/ were compiled in.");
}
