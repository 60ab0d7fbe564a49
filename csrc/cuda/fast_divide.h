// Integer division by a divisor fixed for a whole launch, for the CUDA kernels' index math.
// Plain C++ (no CUDA) so the host checks it at compile time (the static_asserts below).
//
// 32-bit: a multiply-high, an add and a shift instead of a division (Granlund & Montgomery, "Division by
// invariant integers using multiplication", PLDI 1994, section 4): with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1, n / d = (mulhi(n, m) + n) >> s for 0 <= n < 2^31, the range of
// every 32-bit index plan (fits_index32). 64-bit: plain division, for the rare walks beyond 2^31.
#pragma once
#include <cstdint>
#include <initializer_list>

#ifndef FASTLRP_HOST_DEVICE
#ifdef __CUDACC__
#define FASTLRP_HOST_DEVICE __host__ __device__
#else
#define FASTLRP_HOST_DEVICE
#endif
#endif

namespace fastlrp {
namespace plan {

template <typename I> struct Divider;

template <> struct Divider<int32_t> {
  uint32_t divisor = 1, magic = 1, shift = 0;

  // d in [1, 2^31); an empty dimension (d = 0, no walk) divides by 1
  static constexpr Divider make(int64_t d) {
    Divider out;
    if (d < 1) d = 1;
    out.divisor = uint32_t(d);
    while ((uint64_t(1) << out.shift) < uint64_t(d)) ++out.shift;
    out.magic = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << out.shift) - uint64_t(d))) / uint64_t(d) + 1);
    return out;
  }
  FASTLRP_HOST_DEVICE constexpr int32_t quotient(int32_t n) const {
    const uint32_t high = uint32_t((uint64_t(uint32_t(n)) * magic) >> 32);  // one IMAD.HI on the GPU
    return int32_t((high + uint32_t(n)) >> shift);  // high <= n < 2^31: the sum does not wrap
  }
  FASTLRP_HOST_DEVICE constexpr int32_t size() const { return int32_t(divisor); }
};

template <> struct Divider<int64_t> {
  int64_t divisor = 1;
  static constexpr Divider make(int64_t d) {
    Divider out;
    out.divisor = d < 1 ? 1 : d;
    return out;
  }
  FASTLRP_HOST_DEVICE constexpr int64_t quotient(int64_t n) const { return n / divisor; }
  FASTLRP_HOST_DEVICE constexpr int64_t size() const { return divisor; }
};

// n = q * d + r: returns q and sets r.
template <typename I> FASTLRP_HOST_DEVICE constexpr I divmod(const Divider<I>& d, I n, I& r) {
  const I q = d.quotient(n);
  r = n - q * d.size();
  return q;
}

namespace check {
constexpr bool exact(int64_t d, int64_t n) { return Divider<int32_t>::make(d).quotient(int32_t(n)) == n / d; }
constexpr bool exact_around(int64_t d) {  // multiples of d and their neighbours, up to the largest dividend
  for (int64_t k : {int64_t(0), int64_t(1), int64_t(2), int64_t(3), 2147483647 / d - 1, 2147483647 / d}) {
    for (int64_t n : {k * d - 1, k * d, k * d + 1})
      if (n >= 0 && n <= 2147483647 && !exact(d, n)) return false;
  }
  return exact(d, 2147483647) && exact(d, 2147483646);
}
static_assert(exact_around(1) && exact_around(2) && exact_around(3) && exact_around(7) && exact_around(56) &&
                  exact_around(112) && exact_around(641) && exact_around(1 << 20) && exact_around((1 << 20) + 1) &&
                  exact_around(2147483646) && exact_around(2147483647),
              "32-bit divider disagrees with division");
}  // namespace check

}  // namespace plan
}  // namespace fastlrp
