// CPU (OpenMP) implementations of the fused LRP kernels; see fastlrp/lrp_kernels.h.
// Float32 and float64; the arithmetic is done in the tensor's own type, in the same order as
// the reference, so results agree to the last bits where the inputs do.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "fastlrp/lrp_kernels.h"

namespace fastlrp {
namespace cpu {
namespace {

template <typename T>
inline T stabilized(T z, T eps) {
  return z + (z >= T(0) ? eps : -eps);
}

// The element-wise kernels walk (N, C, S) rows; when the channel dimension is the dense one
// (channels-last), or there is no spatial extent (tokens and Linear outputs, (N, C) or (N*L, C)),
// C and S swap roles so the inner loop is still a long unit-stride one, not one of length 1.
template <typename T>
Strided<T, 3> row_view(const View& v, bool swap) {
  auto s = as_strided<T, 3>(v);
  if (swap) {
    std::swap(s.size[1], s.size[2]);
    std::swap(s.stride[1], s.stride[2]);
  }
  return s;
}

inline bool channels_inner(const View& v) {
  return (v.strides[2] != 1 || v.sizes[2] == 1) && v.strides[1] == 1 && v.sizes[1] > 1;
}

template <typename T>
inline T* row(const Strided<T, 3>& v, int64_t n, int64_t c) {
  return v.data + n * v.stride[0] + c * v.stride[1];
}

// Where every view of a call holds each sample densely (rows of S one after another: contiguous, or
// channels-last after the swap above), the walk may regroup k short rows into one long one: on 5x5
// maps (late MobileNet layers) the per-row cost was more than the rows' arithmetic. Samples keep
// their own strides (a part of a stacked tensor is dense per sample only).
template <typename T>
void regroup_short_rows(const std::vector<Strided<T, 3>*>& views) {
  const auto& f = *views[0];
  const int64_t C = f.size[1], S = f.size[2];
  constexpr int64_t kShort = 256, kLong = 4096;
  if (S >= kShort || C == 1) return;
  for (const auto* v : views)
    if (v->size[0] != f.size[0] || v->size[1] != C || v->size[2] != S || v->stride[1] != S ||
        (v->stride[2] != 1 && S > 1))
      return;
  int64_t k = std::max<int64_t>(1, std::min(C, kLong / std::max<int64_t>(S, 1)));
  while (C % k != 0) --k;
  for (auto* v : views) {
    v->size[1] = C / k;
    v->size[2] = S * k;
    v->stride[1] = S * k;
    v->stride[2] = 1;
  }
}

template <typename T>
void stabilize_divide_impl(const StabilizeDivideArgs& a) {
  const bool swap = channels_inner(a.relevance);
  auto R = row_view<T>(a.relevance, swap);
  const size_t G = a.z.size();
  std::vector<Strided<T, 3>> z, out;
  bool any_mask = false;
  for (size_t g = 0; g < G; ++g) {
    z.push_back(row_view<T>(a.z[g], swap));
    out.push_back(row_view<T>(a.out[g], swap));
    any_mask = any_mask || a.mask[g] != int(MaskMode::None);
  }
  auto y = any_mask ? row_view<T>(a.y, swap) : R;
  std::vector<Strided<T, 3>*> views = {&R, &y};
  for (size_t g = 0; g < G; ++g) views.insert(views.end(), {&z[g], &out[g]});
  regroup_short_rows<T>(views);
  const int64_t N = R.size[0], C = R.size[1], S = R.size[2];
  const T eps = T(a.epsilon);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const T* r = row(R, n, c);
      const T* yr = row(y, n, c);
      for (size_t g = 0; g < G; ++g) {
        const T* zr = row(z[g], n, c);
        T* o = row(out[g], n, c);
        const T coef = T(a.coefficient[g]);
        const int mask = a.mask[g];
        const int64_t rs = R.stride[2], zs = z[g].stride[2], os = out[g].stride[2], ys = y.stride[2];
        if (rs == 1 && zs == 1 && os == 1 && (mask == 0 || ys == 1)) {
          if (mask == 0 && coef == T(1)) {
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) o[s] = r[s] / stabilized(zr[s], eps);
          } else {
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) {
              const T m = mask == 0 ? T(1) : (mask == 1 ? T(yr[s] > T(0)) : T(yr[s] < T(0)));
              o[s] = coef * ((m * r[s]) / stabilized(zr[s], eps));
            }
          }
        } else {
          for (int64_t s = 0; s < S; ++s) {
            const T yv = mask == 0 ? T(0) : yr[s * ys];
            const T m = mask == 0 ? T(1) : (mask == 1 ? T(yv > T(0)) : T(yv < T(0)));
            o[s * os] = coef * ((m * r[s * rs]) / stabilized(zr[s * zs], eps));
          }
        }
      }
    }
  }
}

template <typename T>
inline T modified(int modifier, T x, T bound) {
  switch (modifier) {
    case int(InputModifier::Identity): return x;
    case int(InputModifier::Positive): return x > T(0) ? x : T(0);
    case int(InputModifier::Negative): return x < T(0) ? x : T(0);
    case int(InputModifier::One): return T(1);
    default: return bound;
  }
}

// o[s] (+)= m(x[s]) * g[s] over one row. The modifier is a template parameter so every sweep is a
// branch-free, vectorizable loop (with the modifier switched per element, gcc kept the loop scalar
// with a data-dependent branch: 10-50x slower than a torch multiply on random signs).
template <typename T, int Mod>
inline void combine_row(T* o, const T* xr, const T* gr, const T* br, int64_t bs, int64_t S, bool first) {
  auto term = [&](int64_t s) {
    if constexpr (Mod == int(InputModifier::Identity)) return xr[s] * gr[s];
    else if constexpr (Mod == int(InputModifier::Positive)) return (xr[s] > T(0) ? xr[s] : T(0)) * gr[s];
    else if constexpr (Mod == int(InputModifier::Negative)) return (xr[s] < T(0) ? xr[s] : T(0)) * gr[s];
    else if constexpr (Mod == int(InputModifier::One)) return T(1) * gr[s];
    else return br[s * bs] * gr[s];
  };
  if (first) {
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) o[s] = term(s);
  } else {
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) o[s] = o[s] + term(s);
  }
}

template <typename T>
void combine_row_any(int mod, T* o, const T* xr, const T* gr, const T* br, int64_t bs, int64_t S, bool first) {
  switch (mod) {
    case int(InputModifier::Identity): return combine_row<T, int(InputModifier::Identity)>(o, xr, gr, br, bs, S, first);
    case int(InputModifier::Positive): return combine_row<T, int(InputModifier::Positive)>(o, xr, gr, br, bs, S, first);
    case int(InputModifier::Negative): return combine_row<T, int(InputModifier::Negative)>(o, xr, gr, br, bs, S, first);
    case int(InputModifier::One): return combine_row<T, int(InputModifier::One)>(o, xr, gr, br, bs, S, first);
    default: return combine_row<T, int(InputModifier::Tensor)>(o, xr, gr, br, bs, S, first);
  }
}

template <typename T>
void combine_impl(const CombineArgs& a) {
  const bool swap = channels_inner(a.x);
  auto x = row_view<T>(a.x, swap);
  auto out = row_view<T>(a.out, swap);
  const size_t K = a.g.size();
  std::vector<Strided<T, 3>> g, bound;
  for (size_t k = 0; k < K; ++k) {
    g.push_back(row_view<T>(a.g[k], swap));
    bound.push_back(row_view<T>(a.modifier[k] == int(InputModifier::Tensor) ? a.bound[k] : a.x, swap));
  }
  std::vector<Strided<T, 3>*> views = {&x, &out};
  for (size_t k = 0; k < K; ++k) views.insert(views.end(), {&g[k], &bound[k]});
  regroup_short_rows<T>(views);
  const int64_t N = x.size[0], C = x.size[1], S = x.size[2];
  bool unit_stride = x.stride[2] == 1 && out.stride[2] == 1;
  for (size_t k = 0; k < K; ++k) unit_stride = unit_stride && g[k].stride[2] == 1;
  const bool split_signs = K == 2 && a.modifier[0] == int(InputModifier::Positive) &&
                           a.modifier[1] == int(InputModifier::Negative);
  // Rows are swept in blocks that stay in L1 while every part accumulates into them.
  constexpr int64_t kBlock = 2048;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const T* xr = row(x, n, c);
      T* o = row(out, n, c);
      if (unit_stride && split_signs) {  // x+ g0 + x- g1, the common signed-input case, in one sweep
        const T* g0 = row(g[0], n, c);
        const T* g1 = row(g[1], n, c);
#pragma omp simd
        for (int64_t s = 0; s < S; ++s)
          o[s] = (xr[s] > T(0) ? xr[s] : T(0)) * g0[s] + (xr[s] < T(0) ? xr[s] : T(0)) * g1[s];
        continue;
      }
      if (unit_stride) {
        for (int64_t b = 0; b < S; b += kBlock) {
          const int64_t len = std::min(kBlock, S - b);
          for (size_t k = 0; k < K; ++k) {
            const bool tensor = a.modifier[k] == int(InputModifier::Tensor);
            const int64_t bs = tensor ? bound[k].stride[2] : 0;
            const T* br = tensor ? row(bound[k], n, c) + b * bs : xr;
            combine_row_any<T>(a.modifier[k], o + b, xr + b, row(g[k], n, c) + b, br, bs, len, k == 0);
          }
        }
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        const T xv = xr[s * x.stride[2]];
        T acc = T(0);
        for (size_t k = 0; k < K; ++k) {
          const T b = a.modifier[k] == int(InputModifier::Tensor) ? row(bound[k], n, c)[s * bound[k].stride[2]] : T(0);
          const T term = modified<T>(a.modifier[k], xv, b) * row(g[k], n, c)[s * g[k].stride[2]];
          acc = k == 0 ? term : acc + term;
        }
        o[s * out.stride[2]] = acc;
      }
    }
  }
}

template <typename T>
inline T& at5(const Strided<T, 5>& v, int64_t n, int64_t c, int64_t d, int64_t h, int64_t w) {
  return v.data[n * v.stride[0] + c * v.stride[1] + d * v.stride[2] + h * v.stride[3] + w * v.stride[4]];
}

template <typename T>
void pool_impl(const PoolArgs& a) {
  const auto x = as_strided<T, 5>(a.x);
  const auto R = as_strided<T, 5>(a.relevance);
  const auto y = a.window_sum ? R : as_strided<T, 5>(a.y);
  const auto s = as_strided<T, 5>(a.workspace);
  const auto out = as_strided<T, 5>(a.out);
  const int64_t N = x.size[0], C = x.size[1];
  const T eps = T(a.epsilon), scale_all = T(a.scale_all);
  const auto* table = static_cast<const int64_t*>(a.index_table.data);
  const auto* scales = static_cast<const double*>(a.scale_table.data);
  const int64_t L = a.index_table.sizes[2];
  // row r (0 start, 1 end, 2 first, 3 last) of dim d
  auto tab = [&](int d, int r) { return table + (d * 4 + r) * L; };
  const int64_t *start[3] = {tab(0, 0), tab(1, 0), tab(2, 0)}, *end[3] = {tab(0, 1), tab(1, 1), tab(2, 1)};
  const int64_t *first[3] = {tab(0, 2), tab(1, 2), tab(2, 2)}, *last[3] = {tab(0, 3), tab(1, 3), tab(2, 3)};
  const double* scale[3] = {scales, scales + L, scales + 2 * L};
  // Pass 1: per window.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t od = 0; od < R.size[2]; ++od)
        for (int64_t oh = 0; oh < R.size[3]; ++oh)
          for (int64_t ow = 0; ow < R.size[4]; ++ow) {
            T z;
            if (a.window_sum) {
              z = T(0);
              for (int64_t d = start[0][od]; d < end[0][od]; ++d)
                for (int64_t h = start[1][oh]; h < end[1][oh]; ++h)
                  for (int64_t w = start[2][ow]; w < end[2][ow]; ++w) z += at5(x, n, c, d, h, w);
            } else {
              z = at5(y, n, c, od, oh, ow);
            }
            const T factor = T(scale[0][od] * scale[1][oh] * scale[2][ow]) * scale_all;
            at5(s, n, c, od, oh, ow) = at5(R, n, c, od, oh, ow) / stabilized(z, eps) * factor;
          }
    }
  }
  // Pass 2: per input, gathering the windows that contain it. One input row (n, c, d, h, :) at a time:
  // the windows' sums accumulate in a row buffer, in the same order (od, oh, ow) as an element-wise
  // walk, and the row is multiplied by x in one sweep (element by element through at5, the pass ran
  // 20-40x slower than torch's pooling backward).
  const int64_t W = x.size[4];
  bool w_single = true;
  for (int64_t w = 0; w < W; ++w) w_single = w_single && last[2][w] - first[2][w] == 1;
  const bool w_global = w_single && R.size[4] == 1;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      std::vector<T> acc(W);
      for (int64_t d = 0; d < x.size[2]; ++d)
        for (int64_t h = 0; h < x.size[3]; ++h) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t od = first[0][d]; od < last[0][d]; ++od)
            for (int64_t oh = first[1][h]; oh < last[1][h]; ++oh) {
              const T* sr = &at5(s, n, c, od, oh, 0);
              const int64_t ss = s.stride[4];
              if (w_global) {  // one window spans the row (global and adaptive-to-1 pooling)
                const T v = sr[0];
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) acc[w] += v;
              } else if (w_single) {  // windows that do not overlap along w
                for (int64_t w = 0; w < W; ++w) acc[w] += sr[first[2][w] * ss];
              } else {
                for (int64_t w = 0; w < W; ++w)
                  for (int64_t ow = first[2][w]; ow < last[2][w]; ++ow) acc[w] += sr[ow * ss];
              }
            }
          const T* xr = &at5(x, n, c, d, h, 0);
          T* o = &at5(out, n, c, d, h, 0);
          const int64_t xs = x.stride[4], os = out.stride[4];
          if (xs == 1 && os == 1) {
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) o[w] = xr[w] * acc[w];
          } else {
            for (int64_t w = 0; w < W; ++w) o[w * os] = xr[w * xs] * acc[w];
          }
        }
    }
  }
}

template <typename T>
void sum_impl(const SumArgs& a) {
  const bool swap = channels_inner(a.relevance);
  auto R = row_view<T>(a.relevance, swap);
  auto y = row_view<T>(a.y, swap);
  const size_t K = a.x.size();
  std::vector<Strided<T, 3>> x, out;
  for (size_t k = 0; k < K; ++k) {
    x.push_back(row_view<T>(a.x[k], swap));
    out.push_back(row_view<T>(a.out[k], swap));
  }
  std::vector<Strided<T, 3>*> views = {&R, &y};
  for (size_t k = 0; k < K; ++k) views.insert(views.end(), {&x[k], &out[k]});
  regroup_short_rows<T>(views);
  const int64_t N = R.size[0], C = R.size[1], S = R.size[2];
  const T eps = T(a.epsilon);
  bool unit_stride = R.stride[2] == 1 && y.stride[2] == 1;
  for (size_t k = 0; k < K; ++k) unit_stride = unit_stride && x[k].stride[2] == 1 && out[k].stride[2] == 1;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const T* r = row(R, n, c);
      const T* yr = row(y, n, c);
      if (unit_stride) {  // one vectorizable sweep per summand; the ratio is recomputed, not stored
        for (size_t k = 0; k < K; ++k) {
          const T* xr = row(x[k], n, c);
          T* o = row(out[k], n, c);
          const T alpha = T(a.alpha[k]);
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) o[s] = xr[s] * (alpha * (r[s] / stabilized(yr[s], eps)));
        }
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        const T ratio = r[s * R.stride[2]] / stabilized(yr[s * y.stride[2]], eps);
        for (size_t k = 0; k < K; ++k)
          row(out[k], n, c)[s * out[k].stride[2]] = row(x[k], n, c)[s * x[k].stride[2]] * (T(a.alpha[k]) * ratio);
      }
    }
  }
}

// The relevance at s of the softmax rule, T_i = R_i + s_i g_i, with absent parts left out at compile time.
template <typename T, bool HasR, bool HasG>
inline T softmax_total(const T* r, const T* s, const T* g, int64_t i) {
  if constexpr (HasR && HasG) return r[i] + s[i] * g[i];
  else if constexpr (HasR) return r[i];
  else return s[i] * g[i];
}

template <typename T, bool HasR, bool HasG>
void softmax_rule_rows(const SoftmaxRuleArgs& a) {
  const int64_t rows = a.x.sizes[0], L = a.x.sizes[1];
  const auto at = [](const View& v, int64_t r) { return static_cast<T*>(v.data) + r * v.strides[0]; };
  constexpr T kMasked = -std::numeric_limits<T>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = at(a.x, r);
    const T* s = at(a.s, r);
    const T* R = HasR ? at(a.relevance, r) : nullptr;
    const T* g = HasG ? at(a.gradient, r) : nullptr;
    T* o = at(a.out, r);
    T total = T(0);
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < L; ++i) total += softmax_total<T, HasR, HasG>(R, s, g, i);
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) {
      const T v = x[i] * (softmax_total<T, HasR, HasG>(R, s, g, i) - s[i] * total);
      o[i] = x[i] == kMasked ? T(0) : v;
    }
  }
}

template <typename T>
void softmax_rule_impl(const SoftmaxRuleArgs& a) {
  if (a.has_relevance && a.has_gradient) softmax_rule_rows<T, true, true>(a);
  else if (a.has_relevance) softmax_rule_rows<T, true, false>(a);
  else softmax_rule_rows<T, false, true>(a);
}

template <template <typename> class Fn, typename Args>
void dispatch(DType dtype, const Args& a) {
  switch (dtype) {
    case DType::Float32: Fn<float>::run(a); return;
    case DType::Float64: Fn<double>::run(a); return;
    default:
      throw TypeErrorException(std::string("the CPU kernels take float32 or float64, got ") + dtype_name(dtype));
  }
}

template <typename T> struct StabilizeDivide { static void run(const StabilizeDivideArgs& a) { stabilize_divide_impl<T>(a); } };
template <typename T> struct Combine { static void run(const CombineArgs& a) { combine_impl<T>(a); } };
template <typename T> struct Pool { static void run(const PoolArgs& a) { pool_impl<T>(a); } };
template <typename T> struct Sum { static void run(const SumArgs& a) { sum_impl<T>(a); } };
template <typename T> struct SoftmaxRule { static void run(const SoftmaxRuleArgs& a) { softmax_rule_impl<T>(a); } };

}  // namespace

void stabilize_divide(const StabilizeDivideArgs& a) { dispatch<StabilizeDivide>(a.relevance.dtype, a); }
void combine(const CombineArgs& a) { dispatch<Combine>(a.x.dtype, a); }
void pool(const PoolArgs& a) { dispatch<Pool>(a.x.dtype, a); }
void sum(const SumArgs& a) { dispatch<Sum>(a.relevance.dtype, a); }
void softmax_rule(const SoftmaxRuleArgs& a) { dispatch<SoftmaxRule>(a.x.dtype, a); }

}  // namespace cpu
}  // namespace fastlrp
