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

bool probe_kernel(int device) {
  if (device < 0 || device >= device_count()) return false;
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // The marker kernel is compiled into the same fatbinary as the LRP kernels: it fails to launch
  // ("no kernel image") exactly where they would.
  int* marker = nullptr;
  bool ok = cudaMalloc(&marker, sizeof(int)) == cudaSuccess;
  int host = 0;
  if (ok) {
    write_marker_kernel<<<1, 1>>>(marker);
    ok = cudaGetLastError() == cudaSuccess &&
         cudaMemcpy(&host, marker, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
    cudaFree(marker);
  }
  cudaGetLastError();  // leave no error behind for the caller's next CUDA call
  cudaSetDevice(previous);
  return ok && host == 0x1f2e;
}

}  // namespace cuda
}  // namespace fastlrp
