#include <cuda_runtime.h>

#include "fastlrp/build_info.h"

namespace fastlrp {
namespace cuda {
namespace {
__global__ void write_marker_kernel(int* out) { *out = 0x1f2e; }
}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

bool probe_kernel() {
  if (device_count() == 0) return false;
  int* marker = nullptr;
  if (cudaMalloc(&marker, sizeof(int)) != cudaSuccess) return false;
  write_marker_kernel<<<1, 1>>>(marker);
  int host = 0;
  bool ok = cudaGetLastError() == cudaSuccess &&
            cudaMemcpy(&host, marker, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(marker);
  return ok && host == 0x1f2e;
}

}  // namespace cuda
}  // namespace fastlrp
