// How the CUDA element-wise kernels walk their (N, C, S) views: the launch plan, chosen on the host.
// Plain C++ (no CUDA) so the choice can be tested where no GPU or nvcc is (bindings.cpp exposes it).
//
// * Flat: every view is dense with the same strides (contiguous, or channels-last, alike): element i of
//   the walk is memory offset i of every view; no division at all, consecutive threads read consecutive
//   addresses.
// * ChannelsLast: the first view's channel stride is its smallest (NHWC-like): the walk runs c fastest,
//   so a warp reads consecutive channels of one pixel.
// * ChannelsFirst: otherwise (NCHW-like, broadcast bounds): the walk runs s fastest.
// Indices are 32-bit where the walk (including the grid-stride overshoot) and every offset fit; 64-bit
// otherwise.
// A flat walk reads 16-byte vectors (4 float32, 2 float64, 8 float16/bfloat16 per thread and step, with a
// scalar tail) where every base pointer is 16-byte aligned and there is at least one whole vector.
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define FASTLRP_HOST_DEVICE __host__ __device__
#else
#define FASTLRP_HOST_DEVICE
#endif

namespace fastlrp {
namespace plan {

enum class Layout : int { Flat = 0, ChannelsLast = 1, ChannelsFirst = 2 };

struct Strides3 {
  int64_t n, c, s;
};

// Why a walk reads 16-byte vectors or not (the first reason that applies).
enum class Vectors : int { Yes = 0, NotFlat = 1, ElementSize = 2, Misaligned = 3, TooFew = 4 };

inline const char* vectors_reason(Vectors v) {
  switch (v) {
    case Vectors::Yes: return "16-byte vectors";
    case Vectors::NotFlat: return "not flat";
    case Vectors::ElementSize: return "element size unknown or not a divisor of 16 bytes";
    case Vectors::Misaligned: return "a base pointer is not 16-byte aligned";
    case Vectors::TooFew: return "fewer elements than one vector";
  }
  return "unknown";
}

struct Plan {
  Layout layout;
  bool index32;
  int vector;       // elements per load and store: 16 / element size with vectors, else 1
  Vectors vectors;  // why (not)
};

constexpr int64_t kIndex32Limit = 2147483647;  // INT32_MAX
constexpr int64_t kVectorBytes = 16;

// 32-bit indices are safe where the walk's last index plus the grid-stride overshoot and the largest
// memory offset all fit (the rule of every CUDA kernel here, pooling included).
inline bool fits_index32(int64_t total, int64_t max_threads, int64_t last_offset) {
  return total + max_threads <= kIndex32Limit && last_offset <= kIndex32Limit;
}

// Dense: the three strides are a permutation of (1, A, A*B) for the sizes in stride order (size-1
// dims do not matter), so the view covers exactly N*C*S consecutive elements.
inline bool dense(int64_t N, int64_t C, int64_t S, const Strides3& v) {
  struct Dim {
    int64_t size, stride;
  };
  Dim dims[3] = {{N, v.n}, {C, v.c}, {S, v.s}};
  std::sort(dims, dims + 3, [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t expected = 1;
  for (const Dim& d : dims) {
    if (d.size == 1) continue;
    if (d.stride != expected) return false;
    expected *= d.size;
  }
  return true;
}

inline int64_t magnitude(int64_t v) { return v < 0 ? -v : v; }

inline bool same_walk(int64_t N, int64_t C, int64_t S, const Strides3& a, const Strides3& b) {
  return (N == 1 || a.n == b.n) && (C == 1 || a.c == b.c) && (S == 1 || a.s == b.s);
}

// ``max_threads``: the most threads one launch runs (grid x block), the overshoot of a grid-stride loop.
// ``element_size`` (bytes) and ``addresses`` (each view's base pointer, in the order of ``views``) decide
// the 16-byte vectors; element_size 0 means scalar loads.
inline Plan choose(int64_t N, int64_t C, int64_t S, const std::vector<Strides3>& views, int64_t max_threads,
                   int64_t element_size = 0, const std::vector<uintptr_t>& addresses = {}) {
  Plan p{Layout::ChannelsFirst, false, 1, Vectors::NotFlat};
  if (element_size > 0 && addresses.size() != views.size())
    throw std::invalid_argument("elementwise plan: " + std::to_string(addresses.size()) + " addresses for " +
                                std::to_string(views.size()) + " views");
  if (views.empty()) return p;
  bool flat = true;
  int64_t last = 0;
  for (const Strides3& v : views) {
    flat = flat && dense(N, C, S, v) && same_walk(N, C, S, v, views[0]);
    last = std::max(last, (N - 1) * magnitude(v.n) + (C - 1) * magnitude(v.c) + (S - 1) * magnitude(v.s));
  }
  const Strides3& first = views[0];
  if (flat)
    p.layout = Layout::Flat;
  else if (C > 1 && S > 1 && magnitude(first.c) < magnitude(first.s))
    p.layout = Layout::ChannelsLast;
  const int64_t total = N * C * S;
  p.index32 = fits_index32(total, max_threads, last);
  if (p.layout != Layout::Flat) return p;
  if (element_size <= 0 || element_size > kVectorBytes || kVectorBytes % element_size != 0) {
    p.vectors = Vectors::ElementSize;
    return p;
  }
  for (uintptr_t a : addresses)
    if (a % kVectorBytes != 0) {
      p.vectors = Vectors::Misaligned;
      return p;
    }
  const int width = int(kVectorBytes / element_size);
  if (total < width) {
    p.vectors = Vectors::TooFew;
    return p;
  }
  p.vector = width;
  p.vectors = Vectors::Yes;
  return p;
}

// A flat walk with W-element vectors: vector step j < vector_steps covers offsets [j W, j W + W) (one
// 16-byte access per view), then one scalar step per element from vector_steps * W to total.
template <typename I> FASTLRP_HOST_DEVICE inline I vector_steps(I total, int W) { return total / I(W); }

// The memory offset of walk index i in a view (I: int32_t or int64_t, as the plan says).
template <Layout L, typename I>
FASTLRP_HOST_DEVICE inline I offset(I i, I C, I S, I sn, I sc, I ss) {
  if (L == Layout::Flat) return i;
  if (L == Layout::ChannelsLast) {
    const I c = i % C, rest = i / C;
    return (rest / S) * sn + c * sc + (rest % S) * ss;
  }
  const I s = i % S, rest = i / S;
  return (rest / C) * sn + (rest % C) * sc + s * ss;
}

}  // namespace plan
}  // namespace fastlrp
