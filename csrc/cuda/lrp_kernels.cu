// CUDA implementations of the fused LRP kernels; see fastlrp/lrp_kernels.h.
// float32, float64, float16 and bfloat16; half-precision inputs are computed in float32.
// Every kernel runs on the stream the caller passes and every launch is checked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "elementwise_plan.h"
#include "fastlrp/lrp_kernels.h"

namespace fastlrp {
namespace cuda {
namespace {

constexpr int kMaxParts = 8;  // rule parts / groups / summands per launch
constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ inline typename Acc<T>::type load(const T* p) { return static_cast<typename Acc<T>::type>(*p); }
template <> __device__ inline float load<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ inline float load<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T, typename A> __device__ inline void store(T* p, A v) { *p = static_cast<T>(v); }
template <> __device__ inline void store<__half, float>(__half* p, float v) { *p = __float2half(v); }
template <> __device__ inline void store<__nv_bfloat16, float>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename A> __device__ inline A stabilized(A z, A eps) { return z + (z >= A(0) ? eps : -eps); }

// A 3-D strided view (N, C, S) and the element at walk index i of a launch plan (elementwise_plan.h):
// Flat (offset i), channels-last (c fastest) or channels-first (s fastest), in I = int32_t or int64_t.
template <typename T> struct V3 {
  T* data;
  int64_t n, c, s;  // strides
};
struct Shape3 {
  int64_t N, C, S;
};
template <plan::Layout L, typename I, typename T> __device__ inline T* at(const V3<T>& v, const Shape3& sh, I i) {
  return v.data + plan::offset<L, I>(i, I(sh.C), I(sh.S), I(v.n), I(v.c), I(v.s));
}
template <typename T> plan::Strides3 strides3(const V3<T>& v) { return plan::Strides3{v.n, v.c, v.s}; }

// Grid-stride loop over the walk in the plan's index type.
#define FASTLRP_WALK(I, i, total)                                                          \
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < I(total); i += I(gridDim.x) * I(blockDim.x))

// Launch KERNEL<T, layout, index> for the plan (6 instantiations per kernel and dtype).
#define FASTLRP_LAUNCH_PLAN(pl, KERNEL, T, blocks, stream, params)                                         \
  do {                                                                                                      \
    using plan::Layout;                                                                                     \
    if ((pl).layout == Layout::Flat) {                                                                      \
      if ((pl).index32) KERNEL<T, Layout::Flat, int32_t><<<blocks, kThreads, 0, stream>>>(params);          \
      else KERNEL<T, Layout::Flat, int64_t><<<blocks, kThreads, 0, stream>>>(params);                       \
    } else if ((pl).layout == Layout::ChannelsLast) {                                                       \
      if ((pl).index32) KERNEL<T, Layout::ChannelsLast, int32_t><<<blocks, kThreads, 0, stream>>>(params);  \
      else KERNEL<T, Layout::ChannelsLast, int64_t><<<blocks, kThreads, 0, stream>>>(params);               \
    } else {                                                                                                \
      if ((pl).index32) KERNEL<T, Layout::ChannelsFirst, int32_t><<<blocks, kThreads, 0, stream>>>(params); \
      else KERNEL<T, Layout::ChannelsFirst, int64_t><<<blocks, kThreads, 0, stream>>>(params);              \
    }                                                                                                       \
  } while (0)
template <typename T> V3<T> v3(const View& v) {
  return V3<T>{static_cast<T*>(v.data), v.strides[0], v.strides[1], v.strides[2]};
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

// Runs on the view's device and restores the caller's current device afterwards; a device that
// cannot be selected is an error naming it, not a launch on the wrong device.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int index) {
    cudaError_t err = cudaGetDevice(&previous);
    if (err == cudaSuccess && index >= 0 && index != previous) err = cudaSetDevice(index);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("fastlrp: cannot select CUDA device " + std::to_string(index) + ": " +
                               cudaGetErrorString(err));
    }
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);  // a destructor cannot throw; the next call reports errors
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 32)); }

template <typename T> struct DivideParams {
  V3<T> r, y, z[kMaxParts], out[kMaxParts];
  double coef[kMaxParts];
  int mask[kMaxParts];
  int groups;
  Shape3 shape;
  double eps;
};

template <typename T, plan::Layout L, typename I> __global__ void stabilize_divide_kernel(DivideParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t total = p.shape.N * p.shape.C * p.shape.S;
  FASTLRP_WALK(I, i, total) {
    const A r = load(at<L>(p.r, p.shape, i));
    for (int g = 0; g < p.groups; ++g) {
      A m = A(1);
      if (p.mask[g] != 0) {
        const A y = load(at<L>(p.y, p.shape, i));
        m = p.mask[g] == 1 ? A(y > A(0)) : A(y < A(0));
      }
      const A z = load(at<L>(p.z[g], p.shape, i));
      store(at<L>(p.out[g], p.shape, i), A(p.coef[g]) * ((m * r) / stabilized(z, A(p.eps))));
    }
  }
}

template <typename T> struct CombineParams {
  V3<T> x, out, g[kMaxParts], bound[kMaxParts];
  int modifier[kMaxParts];
  int parts;
  Shape3 shape;
};

template <typename T, plan::Layout L, typename I> __global__ void combine_kernel(CombineParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t total = p.shape.N * p.shape.C * p.shape.S;
  FASTLRP_WALK(I, i, total) {
    const A x = load(at<L>(p.x, p.shape, i));
    A acc = A(0);
    for (int k = 0; k < p.parts; ++k) {
      A m;
      switch (p.modifier[k]) {
        case 0: m = x; break;
        case 1: m = x > A(0) ? x : A(0); break;
        case 2: m = x < A(0) ? x : A(0); break;
        case 3: m = A(1); break;
        default: m = load(at<L>(p.bound[k], p.shape, i));
      }
      const A term = m * load(at<L>(p.g[k], p.shape, i));
      acc = k == 0 ? term : acc + term;
    }
    store(at<L>(p.out, p.shape, i), acc);
  }
}

struct V5 {
  int64_t size[5], stride[5];
};
__device__ inline int64_t offset5(const V5& v, int64_t i, int64_t* idx) {
  int64_t off = 0;
  for (int d = 4; d >= 0; --d) {
    idx[d] = i % v.size[d];
    i /= v.size[d];
    off += idx[d] * v.stride[d];
  }
  return off;
}
V5 v5(const View& v) {
  V5 out;
  for (int d = 0; d < 5; ++d) {
    out.size[d] = v.sizes[d];
    out.stride[d] = v.strides[d];
  }
  return out;
}
__device__ inline int64_t off5(const V5& v, int64_t n, int64_t c, int64_t d, int64_t h, int64_t w) {
  return n * v.stride[0] + c * v.stride[1] + d * v.stride[2] + h * v.stride[3] + w * v.stride[4];
}

template <typename T> struct PoolParams {
  const T *x, *r, *y;
  T *s, *out;
  V5 xv, rv, yv, sv, ov;
  const int64_t* table;  // (3, 4, L)
  const double* scale;   // (3, L)
  int64_t L;
  bool window_sum;
  double scale_all, eps;
};

template <typename T> __global__ void pool_windows_kernel(PoolParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t total = p.rv.size[0] * p.rv.size[1] * p.rv.size[2] * p.rv.size[3] * p.rv.size[4];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t o[5];
    const int64_t roff = offset5(p.rv, i, o);
    A z = A(0);
    if (p.window_sum) {
      const int64_t* t = p.table;
      for (int64_t d = t[0 * p.L + o[2]]; d < t[1 * p.L + o[2]]; ++d)
        for (int64_t h = t[4 * p.L + o[3]]; h < t[5 * p.L + o[3]]; ++h)
          for (int64_t w = t[8 * p.L + o[4]]; w < t[9 * p.L + o[4]]; ++w) z += load(p.x + off5(p.xv, o[0], o[1], d, h, w));
    } else {
      z = load(p.y + off5(p.yv, o[0], o[1], o[2], o[3], o[4]));
    }
    const A factor = A(p.scale[o[2]] * p.scale[p.L + o[3]] * p.scale[2 * p.L + o[4]] * p.scale_all);
    store(p.s + off5(p.sv, o[0], o[1], o[2], o[3], o[4]), load(p.r + roff) / stabilized(z, A(p.eps)) * factor);
  }
}

template <typename T> __global__ void pool_inputs_kernel(PoolParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t total = p.xv.size[0] * p.xv.size[1] * p.xv.size[2] * p.xv.size[3] * p.xv.size[4];
  const int64_t* t = p.table;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t q[5];
    const int64_t xoff = offset5(p.xv, i, q);
    A acc = A(0);
    for (int64_t od = t[2 * p.L + q[2]]; od < t[3 * p.L + q[2]]; ++od)
      for (int64_t oh = t[6 * p.L + q[3]]; oh < t[7 * p.L + q[3]]; ++oh)
        for (int64_t ow = t[10 * p.L + q[4]]; ow < t[11 * p.L + q[4]]; ++ow)
          acc += load(p.s + off5(p.sv, q[0], q[1], od, oh, ow));
    store(p.out + off5(p.ov, q[0], q[1], q[2], q[3], q[4]), load(p.x + xoff) * acc);
  }
}

template <typename T> struct SumParams {
  V3<T> r, y, x[kMaxParts], out[kMaxParts];
  double alpha[kMaxParts];
  int parts;
  Shape3 shape;
  double eps;
};

template <typename T, plan::Layout L, typename I> __global__ void sum_kernel(SumParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t total = p.shape.N * p.shape.C * p.shape.S;
  FASTLRP_WALK(I, i, total) {
    const A ratio = load(at<L>(p.r, p.shape, i)) / stabilized(load(at<L>(p.y, p.shape, i)), A(p.eps));
    for (int k = 0; k < p.parts; ++k)
      store(at<L>(p.out[k], p.shape, i), load(at<L>(p.x[k], p.shape, i)) * (A(p.alpha[k]) * ratio));
  }
}

void check_parts(size_t n, const char* what) {
  if (n > size_t(kMaxParts))
    throw std::invalid_argument(std::string(what) + ": at most " + std::to_string(kMaxParts) + " per call on CUDA");
}

Shape3 shape3(const View& v) { return Shape3{v.sizes[0], v.sizes[1], v.sizes[2]}; }

template <typename T> void stabilize_divide_t(const StabilizeDivideArgs& a) {
  check_parts(a.z.size(), "groups");
  DivideParams<T> p{};
  p.r = v3<T>(a.relevance);
  p.y = a.y.data ? v3<T>(a.y) : p.r;
  p.groups = int(a.z.size());
  for (int g = 0; g < p.groups; ++g) {
    p.z[g] = v3<T>(a.z[g]);
    p.out[g] = v3<T>(a.out[g]);
    p.coef[g] = a.coefficient[g];
    p.mask[g] = a.mask[g];
  }
  p.shape = shape3(a.relevance);
  p.eps = a.epsilon;
  const int64_t total = p.shape.N * p.shape.C * p.shape.S;
  if (total == 0) return;
  std::vector<plan::Strides3> views{strides3(p.r)};
  if (a.y.data) views.push_back(strides3(p.y));
  for (int g = 0; g < p.groups; ++g) {
    views.push_back(strides3(p.z[g]));
    views.push_back(strides3(p.out[g]));
  }
  const int blocks = blocks_for(total);
  const plan::Plan pl = plan::choose(p.shape.N, p.shape.C, p.shape.S, views, int64_t(blocks) * kThreads);
  DeviceGuard guard(a.relevance.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTLRP_LAUNCH_PLAN(pl, stabilize_divide_kernel, T, blocks, stream, p);
  check_launch("stabilize_divide");
}

template <typename T> void combine_t(const CombineArgs& a) {
  check_parts(a.g.size(), "parts");
  CombineParams<T> p{};
  p.x = v3<T>(a.x);
  p.out = v3<T>(a.out);
  p.parts = int(a.g.size());
  for (int k = 0; k < p.parts; ++k) {
    p.g[k] = v3<T>(a.g[k]);
    p.modifier[k] = a.modifier[k];
    p.bound[k] = a.modifier[k] == int(InputModifier::Tensor) ? v3<T>(a.bound[k]) : p.x;
  }
  p.shape = shape3(a.x);
  const int64_t total = p.shape.N * p.shape.C * p.shape.S;
  if (total == 0) return;
  std::vector<plan::Strides3> views{strides3(p.x), strides3(p.out)};
  for (int k = 0; k < p.parts; ++k) {
    views.push_back(strides3(p.g[k]));
    if (a.modifier[k] == int(InputModifier::Tensor)) views.push_back(strides3(p.bound[k]));
  }
  const int blocks = blocks_for(total);
  const plan::Plan pl = plan::choose(p.shape.N, p.shape.C, p.shape.S, views, int64_t(blocks) * kThreads);
  DeviceGuard guard(a.x.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTLRP_LAUNCH_PLAN(pl, combine_kernel, T, blocks, stream, p);
  check_launch("combine");
}

template <typename T> void pool_t(const PoolArgs& a) {
  PoolParams<T> p{};
  p.x = static_cast<const T*>(a.x.data);
  p.r = static_cast<const T*>(a.relevance.data);
  p.y = a.window_sum ? p.r : static_cast<const T*>(a.y.data);
  p.s = static_cast<T*>(a.workspace.data);
  p.out = static_cast<T*>(a.out.data);
  p.xv = v5(a.x);
  p.rv = v5(a.relevance);
  p.yv = a.window_sum ? p.rv : v5(a.y);
  p.sv = v5(a.workspace);
  p.ov = v5(a.out);
  p.table = static_cast<const int64_t*>(a.index_table.data);
  p.scale = static_cast<const double*>(a.scale_table.data);
  p.L = a.index_table.sizes[2];
  p.window_sum = a.window_sum;
  p.scale_all = a.scale_all;
  p.eps = a.epsilon;
  int64_t windows = 1, inputs = 1;
  for (int d = 0; d < 5; ++d) {
    windows *= p.rv.size[d];
    inputs *= p.xv.size[d];
  }
  DeviceGuard guard(a.x.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (windows > 0) {
    pool_windows_kernel<T><<<blocks_for(windows), kThreads, 0, stream>>>(p);
    check_launch("pool (windows)");
  }
  if (inputs > 0) {
    pool_inputs_kernel<T><<<blocks_for(inputs), kThreads, 0, stream>>>(p);
    check_launch("pool (inputs)");
  }
}

template <typename T> void sum_t(const SumArgs& a) {
  check_parts(a.x.size(), "summands");
  SumParams<T> p{};
  p.r = v3<T>(a.relevance);
  p.y = v3<T>(a.y);
  p.parts = int(a.x.size());
  for (int k = 0; k < p.parts; ++k) {
    p.x[k] = v3<T>(a.x[k]);
    p.out[k] = v3<T>(a.out[k]);
    p.alpha[k] = a.alpha[k];
  }
  p.shape = shape3(a.relevance);
  p.eps = a.epsilon;
  const int64_t total = p.shape.N * p.shape.C * p.shape.S;
  if (total == 0) return;
  std::vector<plan::Strides3> views{strides3(p.r), strides3(p.y)};
  for (int k = 0; k < p.parts; ++k) {
    views.push_back(strides3(p.x[k]));
    views.push_back(strides3(p.out[k]));
  }
  const int blocks = blocks_for(total);
  const plan::Plan pl = plan::choose(p.shape.N, p.shape.C, p.shape.S, views, int64_t(blocks) * kThreads);
  DeviceGuard guard(a.relevance.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTLRP_LAUNCH_PLAN(pl, sum_kernel, T, blocks, stream, p);
  check_launch("sum");
}

template <template <typename> class Fn, typename Args> void dispatch(DType dtype, const Args& a) {
  switch (dtype) {
    case DType::Float32: Fn<float>::run(a); return;
    case DType::Float64: Fn<double>::run(a); return;
    case DType::Float16: Fn<__half>::run(a); return;
    case DType::BFloat16: Fn<__nv_bfloat16>::run(a); return;
    default: throw TypeErrorException(std::string("the CUDA kernels do not take ") + dtype_name(dtype));
  }
}

template <typename T> struct StabilizeDivide { static void run(const StabilizeDivideArgs& a) { stabilize_divide_t<T>(a); } };
template <typename T> struct Combine { static void run(const CombineArgs& a) { combine_t<T>(a); } };
template <typename T> struct Pool { static void run(const PoolArgs& a) { pool_t<T>(a); } };
template <typename T> struct Sum { static void run(const SumArgs& a) { sum_t<T>(a); } };

}  // namespace

void stabilize_divide(const StabilizeDivideArgs& a) { dispatch<StabilizeDivide>(a.relevance.dtype, a); }
void combine(const CombineArgs& a) { dispatch<Combine>(a.x.dtype, a); }
void pool(const PoolArgs& a) { dispatch<Pool>(a.x.dtype, a); }
void sum(const SumArgs& a) { dispatch<Sum>(a.relevance.dtype, a); }

}  // namespace cuda
}  // namespace fastlrp
