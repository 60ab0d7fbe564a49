// CUDA implementations of the fused LRP kernels; see fastlrp/lrp_kernels.h.
// float32, float64, float16 and bfloat16; half-precision inputs are computed in float32.
// Every kernel runs on the stream the caller passes and every launch is checked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "elementwise_plan.h"
#include "fast_divide.h"
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
template <plan::Layout L, typename I, typename T> __device__ inline T* element_at(const V3<T>& v, const Shape3& sh, I i) {
  return v.data + plan::offset<L, I>(i, I(sh.C), I(sh.S), I(v.n), I(v.c), I(v.s));
}
template <typename T> plan::Strides3 strides3(const V3<T>& v) { return plan::Strides3{v.n, v.c, v.s}; }

// W elements loaded or stored together: one 16-byte access (Vec) where W > 1, computed in A (Frag).
template <typename T> constexpr int kVector = int(plan::kVectorBytes / sizeof(T));
template <typename T, int W> struct alignas(sizeof(T) * W) Vec { T e[W]; };
template <typename A, int W> struct Frag { A e[W]; };

template <int W, typename T> __device__ __forceinline__ Frag<typename Acc<T>::type, W> load_frag(const T* p) {
  Frag<typename Acc<T>::type, W> f;
  if constexpr (W == 1) {
    f.e[0] = load(p);
  } else {
    const Vec<T, W> v = *reinterpret_cast<const Vec<T, W>*>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) f.e[k] = load(&v.e[k]);
  }
  return f;
}
template <int W, typename T, typename A> __device__ __forceinline__ void store_frag(T* p, const Frag<A, W>& f) {
  if constexpr (W == 1) {
    store(p, f.e[0]);
  } else {
    Vec<T, W> v;
#pragma unroll
    for (int k = 0; k < W; ++k) store(&v.e[k], f.e[k]);
    *reinterpret_cast<Vec<T, W>*>(p) = v;
  }
}

// A step of the walk: W consecutive elements at offset `off` of every (dense, alike) view, or the one
// element at walk index i of strided views.
template <typename I, int Width> struct DensePos {
  static constexpr int W = Width;
  I off;
  template <typename T> __device__ T* at(const V3<T>& v) const { return v.data + off; }
};
template <plan::Layout L, typename I> struct StridedPos {
  static constexpr int W = 1;
  I i;
  Shape3 shape;
  template <typename T> __device__ T* at(const V3<T>& v) const { return element_at<L>(v, shape, i); }
};

// Grid-stride walk in the plan's index type. Flat: W-element steps, then a scalar tail of total % W.
template <plan::Layout L, typename I, int W, typename Step>
__device__ __forceinline__ void walk(const Shape3& sh, const Step& step) {
  const I total = I(sh.N * sh.C * sh.S);
  const I first = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x), stride = I(gridDim.x) * I(blockDim.x);
  if constexpr (L == plan::Layout::Flat) {
    const I steps = plan::vector_steps(total, W);
    for (I j = first; j < steps; j += stride) step(DensePos<I, W>{j * I(W)});
    if constexpr (W > 1)
      for (I i = steps * I(W) + first; i < total; i += stride) step(DensePos<I, 1>{i});
  } else {
    static_assert(W == 1, "only flat walks read vectors");
    for (I i = first; i < total; i += stride) step(StridedPos<L, I>{i, sh});
  }
}

// Grid-stride loop over a walk in index type I (the pooling kernels).
#define FASTLRP_WALK(I, i, total)                                                          \
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < I(total); i += I(gridDim.x) * I(blockDim.x))

// Launch KERNEL<T, layout, index, vector width> for the plan (8 instantiations per kernel and dtype).
#define FASTLRP_LAUNCH_PLAN(pl, KERNEL, T, total, stream, params)                                               \
  do {                                                                                                           \
    using plan::Layout;                                                                                          \
    const int blocks_ = blocks_for(((total) + (pl).vector - 1) / (pl).vector);                                   \
    if ((pl).layout == Layout::Flat && (pl).vector > 1) {                                                        \
      if ((pl).index32) KERNEL<T, Layout::Flat, int32_t, kVector<T>><<<blocks_, kThreads, 0, stream>>>(params);  \
      else KERNEL<T, Layout::Flat, int64_t, kVector<T>><<<blocks_, kThreads, 0, stream>>>(params);               \
    } else if ((pl).layout == Layout::Flat) {                                                                    \
      if ((pl).index32) KERNEL<T, Layout::Flat, int32_t, 1><<<blocks_, kThreads, 0, stream>>>(params);           \
      else KERNEL<T, Layout::Flat, int64_t, 1><<<blocks_, kThreads, 0, stream>>>(params);                        \
    } else if ((pl).layout == Layout::ChannelsLast) {                                                            \
      if ((pl).index32) KERNEL<T, Layout::ChannelsLast, int32_t, 1><<<blocks_, kThreads, 0, stream>>>(params);   \
      else KERNEL<T, Layout::ChannelsLast, int64_t, 1><<<blocks_, kThreads, 0, stream>>>(params);                \
    } else {                                                                                                     \
      if ((pl).index32) KERNEL<T, Layout::ChannelsFirst, int32_t, 1><<<blocks_, kThreads, 0, stream>>>(params);  \
      else KERNEL<T, Layout::ChannelsFirst, int64_t, 1><<<blocks_, kThreads, 0, stream>>>(params);               \
    }                                                                                                            \
  } while (0)

// The views of one launch, for the plan: strides and base addresses in the same order.
struct LaunchViews {
  std::vector<plan::Strides3> strides;
  std::vector<uintptr_t> addresses;
  template <typename T> void add(const V3<T>& v) {
    strides.push_back(strides3(v));
    addresses.push_back(reinterpret_cast<uintptr_t>(v.data));
  }
  template <typename T> plan::Plan choose(const Shape3& sh, int64_t max_threads) const {
    return plan::choose(sh.N, sh.C, sh.S, strides, max_threads, int64_t(sizeof(T)), addresses);
  }
};

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

template <typename T, typename Pos> __device__ __forceinline__ void divide_step(const DivideParams<T>& p, const Pos& pos) {
  using A = typename Acc<T>::type;
  constexpr int W = Pos::W;
  const auto r = load_frag<W>(pos.at(p.r));
  for (int g = 0; g < p.groups; ++g) {
    Frag<A, W> m;
    if (p.mask[g] != 0) {
      const auto y = load_frag<W>(pos.at(p.y));
#pragma unroll
      for (int k = 0; k < W; ++k) m.e[k] = p.mask[g] == 1 ? A(y.e[k] > A(0)) : A(y.e[k] < A(0));
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) m.e[k] = A(1);
    }
    const auto z = load_frag<W>(pos.at(p.z[g]));
    Frag<A, W> out;
#pragma unroll
    for (int k = 0; k < W; ++k) out.e[k] = A(p.coef[g]) * ((m.e[k] * r.e[k]) / stabilized(z.e[k], A(p.eps)));
    store_frag<W>(pos.at(p.out[g]), out);
  }
}

template <typename T, plan::Layout L, typename I, int W> __global__ void stabilize_divide_kernel(DivideParams<T> p) {
  walk<L, I, W>(p.shape, [&](const auto& pos) { divide_step(p, pos); });
}

template <typename T> struct CombineParams {
  V3<T> x, out, g[kMaxParts], bound[kMaxParts];
  int modifier[kMaxParts];
  int parts;
  Shape3 shape;
};

template <typename T, typename Pos> __device__ __forceinline__ void combine_step(const CombineParams<T>& p, const Pos& pos) {
  using A = typename Acc<T>::type;
  constexpr int W = Pos::W;
  const auto x = load_frag<W>(pos.at(p.x));
  Frag<A, W> acc;
#pragma unroll
  for (int e = 0; e < W; ++e) acc.e[e] = A(0);
  for (int k = 0; k < p.parts; ++k) {
    Frag<A, W> m;
    const int modifier = p.modifier[k];
    if (modifier == int(InputModifier::Tensor)) {
      m = load_frag<W>(pos.at(p.bound[k]));
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const A v = x.e[e];
        m.e[e] = modifier == 0 ? v : modifier == 1 ? (v > A(0) ? v : A(0)) : modifier == 2 ? (v < A(0) ? v : A(0)) : A(1);
      }
    }
    const auto g = load_frag<W>(pos.at(p.g[k]));
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const A term = m.e[e] * g.e[e];
      acc.e[e] = k == 0 ? term : acc.e[e] + term;
    }
  }
  store_frag<W>(pos.at(p.out), acc);
}

template <typename T, plan::Layout L, typename I, int W> __global__ void combine_kernel(CombineParams<T> p) {
  walk<L, I, W>(p.shape, [&](const auto& pos) { combine_step(p, pos); });
}

// Pooling views are 5-D (N, C, D, H, W). A walk index splits into (n, c, d, h, w), w fastest, with one
// launch-invariant division per dimension (fast_divide.h: multiply-high and shift in 32 bits); the window
// loops advance pointers by strides, so no division or 5-term offset sum per tap.
template <typename I> struct Strides5 {
  I s[5];
  __device__ I at(I n, I c, I d, I h, I w) const { return n * s[0] + c * s[1] + d * s[2] + h * s[3] + w * s[4]; }
};
template <typename I> struct Box5 {
  plan::Divider<I> C, D, H, W;
  __device__ void split(I i, I* idx) const {
    i = plan::divmod(W, i, idx[4]);
    i = plan::divmod(H, i, idx[3]);
    i = plan::divmod(D, i, idx[2]);
    idx[0] = plan::divmod(C, i, idx[1]);
  }
};
template <typename I> Strides5<I> strides5(const View& v) {
  Strides5<I> out;
  for (int d = 0; d < 5; ++d) out.s[d] = I(v.strides[d]);
  return out;
}
template <typename I> Box5<I> box5(const View& v) {
  return Box5<I>{plan::Divider<I>::make(v.sizes[1]), plan::Divider<I>::make(v.sizes[2]),
                 plan::Divider<I>::make(v.sizes[3]), plan::Divider<I>::make(v.sizes[4])};
}
int64_t numel5(const View& v) { return v.sizes[0] * v.sizes[1] * v.sizes[2] * v.sizes[3] * v.sizes[4]; }
int64_t last_offset5(const View& v) {
  int64_t last = 0;
  for (int d = 0; d < 5; ++d) last += (v.sizes[d] - 1) * (v.strides[d] < 0 ? -v.strides[d] : v.strides[d]);
  return last;
}

template <typename T, typename I> struct PoolParams {
  const T *x, *r, *y;
  T *s, *out;
  Strides5<I> xv, rv, yv, sv, ov;
  Box5<I> windows_box, inputs_box;  // the walks over relevance (windows) and x (inputs)
  I windows, inputs;
  const int64_t* table;  // (3, 4, L): per dim, window start / end and input's first / last window
  const double* scale;   // (3, L)
  I L;
  bool window_sum;
  double scale_all, eps;
};

template <typename T, typename I> __global__ void pool_windows_kernel(PoolParams<T, I> p) {
  using A = typename Acc<T>::type;
  const int64_t* t = p.table;
  const I L = p.L;
  FASTLRP_WALK(I, i, p.windows) {
    I o[5];
    p.windows_box.split(i, o);
    A z = A(0);
    if (p.window_sum) {
      const T* x_nc = p.x + (o[0] * p.xv.s[0] + o[1] * p.xv.s[1]);
      const I d_end = I(t[1 * L + o[2]]), h_start = I(t[4 * L + o[3]]), h_end = I(t[5 * L + o[3]]);
      const I w_start = I(t[8 * L + o[4]]), w_end = I(t[9 * L + o[4]]);
      for (I d = I(t[0 * L + o[2]]); d < d_end; ++d)
        for (I h = h_start; h < h_end; ++h) {
          const T* row = x_nc + d * p.xv.s[2] + h * p.xv.s[3];
          for (I w = w_start; w < w_end; ++w) z += load(row + w * p.xv.s[4]);
        }
    } else {
      z = load(p.y + p.yv.at(o[0], o[1], o[2], o[3], o[4]));
    }
    const A factor = A(p.scale[o[2]] * p.scale[L + o[3]] * p.scale[2 * L + o[4]] * p.scale_all);
    const A r = load(p.r + p.rv.at(o[0], o[1], o[2], o[3], o[4]));
    store(p.s + p.sv.at(o[0], o[1], o[2], o[3], o[4]), r / stabilized(z, A(p.eps)) * factor);
  }
}

template <typename T, typename I> __global__ void pool_inputs_kernel(PoolParams<T, I> p) {
  using A = typename Acc<T>::type;
  const int64_t* t = p.table;
  const I L = p.L;
  FASTLRP_WALK(I, i, p.inputs) {
    I q[5];
    p.inputs_box.split(i, q);
    const T* s_nc = p.s + (q[0] * p.sv.s[0] + q[1] * p.sv.s[1]);
    const I od_end = I(t[3 * L + q[2]]), oh_start = I(t[6 * L + q[3]]), oh_end = I(t[7 * L + q[3]]);
    const I ow_start = I(t[10 * L + q[4]]), ow_end = I(t[11 * L + q[4]]);
    A acc = A(0);
    for (I od = I(t[2 * L + q[2]]); od < od_end; ++od)
      for (I oh = oh_start; oh < oh_end; ++oh) {
        const T* row = s_nc + od * p.sv.s[2] + oh * p.sv.s[3];
        for (I ow = ow_start; ow < ow_end; ++ow) acc += load(row + ow * p.sv.s[4]);
      }
    const A x = load(p.x + p.xv.at(q[0], q[1], q[2], q[3], q[4]));
    store(p.out + p.ov.at(q[0], q[1], q[2], q[3], q[4]), x * acc);
  }
}

template <typename T> struct SumParams {
  V3<T> r, y, x[kMaxParts], out[kMaxParts];
  double alpha[kMaxParts];
  int parts;
  Shape3 shape;
  double eps;
};

template <typename T, typename Pos> __device__ __forceinline__ void sum_step(const SumParams<T>& p, const Pos& pos) {
  using A = typename Acc<T>::type;
  constexpr int W = Pos::W;
  const auto r = load_frag<W>(pos.at(p.r));
  const auto y = load_frag<W>(pos.at(p.y));
  Frag<A, W> ratio;
#pragma unroll
  for (int e = 0; e < W; ++e) ratio.e[e] = r.e[e] / stabilized(y.e[e], A(p.eps));
  for (int k = 0; k < p.parts; ++k) {
    const auto x = load_frag<W>(pos.at(p.x[k]));
    Frag<A, W> out;
#pragma unroll
    for (int e = 0; e < W; ++e) out.e[e] = x.e[e] * (A(p.alpha[k]) * ratio.e[e]);
    store_frag<W>(pos.at(p.out[k]), out);
  }
}

template <typename T, plan::Layout L, typename I, int W> __global__ void sum_kernel(SumParams<T> p) {
  walk<L, I, W>(p.shape, [&](const auto& pos) { sum_step(p, pos); });
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
  LaunchViews views;
  views.add(p.r);
  if (a.y.data) views.add(p.y);
  for (int g = 0; g < p.groups; ++g) {
    views.add(p.z[g]);
    views.add(p.out[g]);
  }
  const plan::Plan pl = views.choose<T>(p.shape, int64_t(blocks_for(total)) * kThreads);
  DeviceGuard guard(a.relevance.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTLRP_LAUNCH_PLAN(pl, stabilize_divide_kernel, T, total, stream, p);
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
  LaunchViews views;
  views.add(p.x);
  views.add(p.out);
  for (int k = 0; k < p.parts; ++k) {
    views.add(p.g[k]);
    if (a.modifier[k] == int(InputModifier::Tensor)) views.add(p.bound[k]);
  }
  const plan::Plan pl = views.choose<T>(p.shape, int64_t(blocks_for(total)) * kThreads);
  DeviceGuard guard(a.x.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTLRP_LAUNCH_PLAN(pl, combine_kernel, T, total, stream, p);
  check_launch("combine");
}

template <typename T, typename I> void pool_launch(const PoolArgs& a, int64_t windows, int64_t inputs) {
  PoolParams<T, I> p{};
  p.x = static_cast<const T*>(a.x.data);
  p.r = static_cast<const T*>(a.relevance.data);
  p.y = a.window_sum ? p.r : static_cast<const T*>(a.y.data);
  p.s = static_cast<T*>(a.workspace.data);
  p.out = static_cast<T*>(a.out.data);
  p.xv = strides5<I>(a.x);
  p.rv = strides5<I>(a.relevance);
  p.yv = a.window_sum ? p.rv : strides5<I>(a.y);
  p.sv = strides5<I>(a.workspace);
  p.ov = strides5<I>(a.out);
  p.windows_box = box5<I>(a.relevance);
  p.inputs_box = box5<I>(a.x);
  p.windows = I(windows);
  p.inputs = I(inputs);
  p.table = static_cast<const int64_t*>(a.index_table.data);
  p.scale = static_cast<const double*>(a.scale_table.data);
  p.L = I(a.index_table.sizes[2]);
  p.window_sum = a.window_sum;
  p.scale_all = a.scale_all;
  p.eps = a.epsilon;
  DeviceGuard guard(a.x.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (windows > 0) {
    pool_windows_kernel<T, I><<<blocks_for(windows), kThreads, 0, stream>>>(p);
    check_launch("pool (windows)");
  }
  if (inputs > 0) {
    pool_inputs_kernel<T, I><<<blocks_for(inputs), kThreads, 0, stream>>>(p);
    check_launch("pool (inputs)");
  }
}

template <typename T> void pool_t(const PoolArgs& a) {
  const int64_t windows = numel5(a.relevance), inputs = numel5(a.x);
  // 32-bit indices by the element-wise plan's rule: both walks with their overshoot, every view's offsets
  int64_t last = std::max(last_offset5(a.x), last_offset5(a.relevance));
  last = std::max({last, last_offset5(a.workspace), last_offset5(a.out), a.window_sum ? 0 : last_offset5(a.y)});
  const int64_t max_threads = int64_t(blocks_for(std::max(windows, inputs))) * kThreads;
  const int64_t L = a.index_table.sizes[2];
  if (plan::fits_index32(std::max(windows, inputs), max_threads, std::max(last, 12 * L)))
    pool_launch<T, int32_t>(a, windows, inputs);
  else
    pool_launch<T, int64_t>(a, windows, inputs);
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
  LaunchViews views;
  views.add(p.r);
  views.add(p.y);
  for (int k = 0; k < p.parts; ++k) {
    views.add(p.x[k]);
    views.add(p.out[k]);
  }
  const plan::Plan pl = views.choose<T>(p.shape, int64_t(blocks_for(total)) * kThreads);
  DeviceGuard guard(a.relevance.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  FASTLRP_LAUNCH_PLAN(pl, sum_kernel, T, total, stream, p);
  check_launch("sum");
}

// The softmax rule: one warp per row (rows are softmax rows: attention scores, often thousands long),
// its lanes striding along the row; the row's sum is a warp reduction, then each lane writes its share.
template <typename T> struct SoftmaxParams {
  const T *x, *s, *r, *g;
  T* out;
  int64_t rows, L, xs, ss, rs, gs, os;  // row strides
};

template <typename T, bool HasR, bool HasG>
__device__ __forceinline__ typename Acc<T>::type softmax_total(const T* r, const T* s, const T* g, int64_t i) {
  using A = typename Acc<T>::type;
  if constexpr (HasR && HasG) return load(r + i) + load(s + i) * load(g + i);
  else if constexpr (HasR) return load(r + i);
  else return A(load(s + i) * load(g + i));
}

template <typename T, bool HasR, bool HasG> __global__ void softmax_rule_kernel(SoftmaxParams<T> p) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;  // whole warps: a row's lanes leave together
  const T* x = p.x + row * p.xs;
  const T* s = p.s + row * p.ss;
  const T* r = HasR ? p.r + row * p.rs : nullptr;
  const T* g = HasG ? p.g + row * p.gs : nullptr;
  T* o = p.out + row * p.os;
  A total = A(0);
  for (int64_t i = lane; i < p.L; i += 32) total += softmax_total<T, HasR, HasG>(r, s, g, i);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  for (int64_t i = lane; i < p.L; i += 32) {
    const A xv = load(x + i);
    const A v = xv * (softmax_total<T, HasR, HasG>(r, s, g, i) - load(s + i) * total);
    store(o + i, (isinf(xv) && xv < A(0)) ? A(0) : v);
  }
}

template <typename T> void softmax_rule_t(const SoftmaxRuleArgs& a) {
  SoftmaxParams<T> p{};
  p.x = static_cast<const T*>(a.x.data);
  p.s = static_cast<const T*>(a.s.data);
  p.r = a.has_relevance ? static_cast<const T*>(a.relevance.data) : nullptr;
  p.g = a.has_gradient ? static_cast<const T*>(a.gradient.data) : nullptr;
  p.out = static_cast<T*>(a.out.data);
  p.rows = a.x.sizes[0];
  p.L = a.x.sizes[1];
  p.xs = a.x.strides[0];
  p.ss = a.s.strides[0];
  p.rs = a.has_relevance ? a.relevance.strides[0] : 0;
  p.gs = a.has_gradient ? a.gradient.strides[0] : 0;
  p.os = a.out.strides[0];
  if (p.rows == 0 || p.L == 0) return;
  constexpr int kRowsPerBlock = kThreads / 32;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > int64_t(2147483647)) throw std::invalid_argument("softmax_rule: too many rows for one launch");
  DeviceGuard guard(a.x.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (a.has_relevance && a.has_gradient)
    softmax_rule_kernel<T, true, true><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  else if (a.has_relevance)
    softmax_rule_kernel<T, true, false><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  else
    softmax_rule_kernel<T, false, true><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  check_launch("softmax_rule");
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
template <typename T> struct SoftmaxRule { static void run(const SoftmaxRuleArgs& a) { softmax_rule_t<T>(a); } };

}  // namespace

void stabilize_divide(const StabilizeDivideArgs& a) { dispatch<StabilizeDivide>(a.relevance.dtype, a); }
void combine(const CombineArgs& a) { dispatch<Combine>(a.x.dtype, a); }
void pool(const PoolArgs& a) { dispatch<Pool>(a.x.dtype, a); }
void sum(const SumArgs& a) { dispatch<Sum>(a.relevance.dtype, a); }
void softmax_rule(const SoftmaxRuleArgs& a) { dispatch<SoftmaxRule>(a.x.dtype, a); }

}  // namespace cuda
}  // namespace fastlrp
