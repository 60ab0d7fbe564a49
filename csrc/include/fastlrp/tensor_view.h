// Tensor views: what _C receives instead of torch tensors (docs/design.md, section 7).
// A view is a data pointer, a dtype, a device and sizes/strides in elements. torch allocates
// every buffer in Python; the kernels only read and write through these views.
#pragma once
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastlrp {

enum class DType { Float32, Float64, Float16, BFloat16, Int64 };
enum class DeviceType { CPU, CUDA };

struct View {
  void* data = nullptr;
  DType dtype = DType::Float32;
  DeviceType device = DeviceType::CPU;
  int device_index = -1;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  std::string name;  // the argument's name, for error messages
};

// A rank-R strided view with the element type fixed: what the kernels index.
template <typename T, int R>
struct Strided {
  T* data;
  std::array<int64_t, R> size;
  std::array<int64_t, R> stride;
};

template <typename T, int R>
Strided<T, R> as_strided(const View& v) {
  Strided<T, R> s{static_cast<T*>(v.data), {}, {}};
  for (int d = 0; d < R; ++d) {
    s.size[d] = v.sizes[d];
    s.stride[d] = v.strides[d];
  }
  return s;
}

const char* dtype_name(DType t);

// Argument checks shared by every kernel entry point; each throws std::invalid_argument
// (ValueError in Python) or TypeErrorException (TypeError) naming the argument.
struct TypeErrorException : std::runtime_error {
  using std::runtime_error::runtime_error;
};
void check_rank(const View& v, size_t rank);
void check_same_sizes(const View& a, const View& b);
void check_same_dtype(const View& a, const View& b);
void check_same_device(const View& a, const View& b);
void check_like(const View& reference, const View& v);  // same dtype, device and sizes

}  // namespace fastlrp
