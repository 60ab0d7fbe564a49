// The fused LRP kernels. Every kernel has a CPU (OpenMP) and a CUDA implementation with
// the same arguments; bindings.cpp checks the views and dispatches on the device.
//
// Layouts: element-wise kernels see 3-D views (N, C, S) where S is the flattened spatial
// extent, so contiguous (NCHW) and channels-last (NHWC) tensors are both accepted;
// pooling kernels see 5-D views (N, C, D, H, W). Strides are in elements and may be zero
// (broadcast bounds).
#pragma once
#include <cstdint>
#include <vector>

#include "fastlrp/tensor_view.h"

namespace fastlrp {

// How a rule part's output mask is formed from the layer's true output y (Gamma rule).
enum class MaskMode : int { None = 0, Positive = 1, Negative = 2 };

// How a rule part's input is formed from x: the m_p(x) of docs/design.md, section 3.
enum class InputModifier : int { Identity = 0, Positive = 1, Negative = 2, One = 3, Tensor = 4 };

// s_g = c_g * mask_g(y) * R / stab(z_g) for every group g, reading R once per element.
// stab(z) = z + eps * sign(z), sign(0) = +1.
struct StabilizeDivideArgs {
  View relevance;               // R, (N, C, S)
  std::vector<View> z;          // G views, each like R
  View y;                       // the layer output, like R; read only where a mask is used
  std::vector<double> coefficient;
  std::vector<int> mask;        // MaskMode per group
  std::vector<View> out;        // G views, each like R
  double epsilon;
  int64_t stream;               // cudaStream_t as an integer; 0 on the CPU
};

// R_in = sum_k m_k(x) * g_k.
struct CombineArgs {
  View x;                       // (N, C, S)
  std::vector<View> g;          // K views, each like x
  std::vector<int> modifier;    // InputModifier per part
  std::vector<View> bound;      // K views; used where the modifier is Tensor (else ignored)
  View out;                     // like x
  int64_t stream;
};

// Pooling relevance over separable windows (average, adaptive average, max as proportional).
// Pass 1 (per window w): s_w = R_w * scale_w / stab(z_w), z_w = y_w (average) or the window
// sum of x (proportional). Pass 2 (per input i): R_in_i = x_i * sum_{w containing i} s_w.
// Window w along dim d covers inputs [start_d[w], end_d[w]) (already clipped to the input);
// input i along dim d lies in windows [first_d[i], last_d[i]).
struct PoolArgs {
  View x;                       // (N, C, D, H, W)
  View relevance;               // (N, C, oD, oH, oW)
  View y;                       // like relevance; the pooled output (average) or ignored
  bool window_sum;              // true: z is the window sum of x (proportional max pooling)
  View index_table;             // int64 (3, 4, L): per dim d, rows start, end (per window), first, last (per input)
  View scale_table;             // float64 (3, L): per dim d, the factor of scale_w for each window
  double scale_all;             // global factor of scale_w (1/divisor_override, or 1)
  View workspace;               // like relevance: holds s_w between the passes
  View out;                     // like x
  double epsilon;
  int64_t stream;
};

// N-ary sum y = sum_i a_i x_i (residual connections): R_i = a_i x_i * R / stab(y), one pass.
struct SumArgs {
  std::vector<View> x;          // K views (N, C, S)
  std::vector<double> alpha;    // a_i
  View y;                       // like x[0]: the sum computed in the forward pass
  View relevance;               // like x[0]
  std::vector<View> out;        // K views like x[0]
  double epsilon;
  int64_t stream;
};

// AttnLRP's softmax rule for s = softmax(x) along rows: T = R + s * g (the relevance at s given as
// relevance R, as a gradient g standing for s * g, or both), R_x = x * (T - s * sum_row(T)), and 0 where
// x = -inf (a masked logit). One pass over each row (its sum, then the output, while it is in cache).
struct SoftmaxRuleArgs {
  View x;                       // (rows, L), unit stride along L
  View s;                       // like x
  View relevance;               // like x, where has_relevance
  View gradient;                // like x, where has_gradient
  bool has_relevance;
  bool has_gradient;
  View out;                     // like x
  int64_t stream;
};

namespace cpu {
void stabilize_divide(const StabilizeDivideArgs& a);
void combine(const CombineArgs& a);
void pool(const PoolArgs& a);
void sum(const SumArgs& a);
void softmax_rule(const SoftmaxRuleArgs& a);
}  // namespace cpu

#ifdef FASTLRP_WITH_CUDA
namespace cuda {
void stabilize_divide(const StabilizeDivideArgs& a);
void combine(const CombineArgs& a);
void pool(const PoolArgs& a);
void sum(const SumArgs& a);
void softmax_rule(const SoftmaxRuleArgs& a);
}  // namespace cuda
#endif

}  // namespace fastlrp
