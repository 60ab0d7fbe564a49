// Facts about how fastlrp._C was compiled, reported to Python by bindings.cpp.
#pragma once
#include <string>

namespace fastlrp {

struct OpenMPInfo {
  bool enabled;
  int version;      // the _OPENMP date macro, 0 when disabled
  int max_threads;  // omp_get_max_threads(), 1 when disabled
};

OpenMPInfo openmp_info();

#ifdef FASTLRP_WITH_CUDA
namespace cuda {
// Number of CUDA devices the runtime sees; 0 where there is no driver or device.
int device_count();
// Runs a one-thread kernel on ``device`` and returns true if it wrote its marker: proves the
// compiled architectures load there (fastlrp._native probes each device once before using it).
bool probe_kernel(int device);
}  // namespace cuda
#endif

}  // namespace fastlrp
