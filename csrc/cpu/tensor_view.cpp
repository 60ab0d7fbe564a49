#include "fastlrp/tensor_view.h"

namespace fastlrp {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
  }
  return "unknown";
}

namespace {
std::string shape(const View& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(v.sizes[i]);
  return s + (v.sizes.size() == 1 ? ",)" : ")");
}
std::string device(const View& v) {
  return v.device == DeviceType::CPU ? std::string("cpu") : "cuda:" + std::to_string(v.device_index);
}
}  // namespace

void check_rank(const View& v, size_t rank) {
  if (v.sizes.size() != rank || v.strides.size() != rank)
    throw std::invalid_argument(v.name + " must have " + std::to_string(rank) + " dimensions here, got shape " +
                                shape(v));
  for (size_t d = 0; d < rank; ++d)
    if (v.sizes[d] < 0) throw std::invalid_argument(v.name + " has a negative size");
}

void check_same_sizes(const View& a, const View& b) {
  if (a.sizes != b.sizes)
    throw std::invalid_argument(b.name + " has shape " + shape(b) + " but " + a.name + " has shape " + shape(a));
}

void check_same_dtype(const View& a, const View& b) {
  if (a.dtype != b.dtype)
    throw TypeErrorException(b.name + " is " + dtype_name(b.dtype) + " but " + a.name + " is " +
                             dtype_name(a.dtype));
}

void check_same_device(const View& a, const View& b) {
  if (a.device != b.device || a.device_index != b.device_index)
    throw std::invalid_argument(b.name + " is on " + device(b) + " but " + a.name + " is on " + device(a));
}

void check_like(const View& reference, const View& v) {
  check_same_device(reference, v);
  check_same_dtype(reference, v);
  check_same_sizes(reference, v);
}

}  // namespace fastlrp
