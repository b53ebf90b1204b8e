// Python bindings of rec2pm_kernels._C.
#include "cpu/patterns_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of rec2pm_kernels (optional; the library runs without them).";
  m.def("visibility_mask", &rec2pm::visibility_mask_cpu, "Dense (n, n) bool mask of a pattern on the CPU",
        pybind11::arg("pattern"), pybind11::arg("n"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"));
  m.def("bias_positions", &rec2pm::bias_positions_cpu, "Positions λ(p) of the relative bias, (n,) int64",
        pybind11::arg("pattern"), pybind11::arg("n"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"));
#ifdef REC2PM_WITH_CUDA
  m.def("visibility_mask_cuda", &rec2pm::visibility_mask_cuda, "Dense (n, n) bool mask of a pattern on a GPU",
        pybind11::arg("pattern"), pybind11::arg("n"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"), pybind11::arg("device_index"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
