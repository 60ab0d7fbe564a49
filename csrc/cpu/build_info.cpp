#include "fastlrp/build_info.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlrp {

OpenMPInfo openmp_info() {
#ifdef _OPENMP
  return {true, _OPENMP, omp_get_max_threads()};
#else
  return {false, 0, 1};
#endif
}

}  // namespace fastlrp
