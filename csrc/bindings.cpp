// The one file that knows Python: exposes the native kernels as fastlrp._C.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "fastlrp/build_info.h"

namespace py = pybind11;

#ifndef FASTLRP_VERSION
#define FASTLRP_VERSION "unknown"
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FASTLRP_VERSION;
  info["compiler"] = FASTLRP_CXX_COMPILER;
  const auto omp = fastlrp::openmp_info();
  info["openmp"] = omp.enabled;
  info["openmp_version"] = omp.version;
  info["openmp_max_threads"] = omp.max_threads;
#ifdef FASTLRP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_architectures"] = std::string(FASTLRP_CUDA_ARCHS);
  info["nvcc_version"] = std::string(FASTLRP_NVCC_VERSION);
#else
  info["cuda"] = false;
  info["cuda_architectures"] = std::string();
  info["nvcc_version"] = std::string();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlrp native kernels (C++/OpenMP and CUDA); no libtorch linked";
  m.def("build_info", &build_info, "How this extension was compiled: version, OpenMP, CUDA");
#ifdef FASTLRP_WITH_CUDA
  m.def("cuda_device_count", &fastlrp::cuda::device_count,
        "CUDA devices the runtime sees (0 without a driver)");
  m.def("cuda_probe_kernel", &fastlrp::cuda::probe_kernel,
        "Launch a one-thread kernel on device 0; True if it ran");
#endif
}
