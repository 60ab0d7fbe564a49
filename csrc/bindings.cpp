// The one file that knows Python: exposes the native kernels as fastlrp._C.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cuda/elementwise_plan.h"
#include "fastlrp/build_info.h"
#include "fastlrp/lrp_kernels.h"

namespace py = pybind11;

#ifndef FASTLRP_VERSION
#define FASTLRP_VERSION "unknown"
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FASTLRP_VERSION;
  info["compiler"] = FASTLRP_CXX_COMPILER;
  const auto omp = fastlrp::openmp_info();
  info["openmp"] = omp.enabled;
  info["openmp_version"] = omp.version;
  info["openmp_max_threads"] = omp.max_threads;
#ifdef FASTLRP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_architectures"] = std::string(FASTLRP_CUDA_ARCHS);
  info["nvcc_version"] = std::string(FASTLRP_NVCC_VERSION);
#else
  info["cuda"] = false;
  info["cuda_architectures"] = std::string();
  info["nvcc_version"] = std::string();
#endif
  return info;
}


namespace fl = fastlrp;

// The CUDA element-wise kernels' launch plan and walk, on the host, so tests can check them without a GPU.
using Strides = std::tuple<int64_t, int64_t, int64_t>;

// (layout, 32-bit indices, elements per vector access, why vectors or not)
py::tuple elementwise_plan(int64_t N, int64_t C, int64_t S, const std::vector<Strides>& views, int64_t max_threads,
                           int64_t element_size, const std::vector<std::uintptr_t>& addresses) {
  std::vector<fl::plan::Strides3> v;
  for (const auto& t : views) v.push_back({std::get<0>(t), std::get<1>(t), std::get<2>(t)});
  const fl::plan::Plan p = fl::plan::choose(N, C, S, v, max_threads, element_size, addresses);
  return py::make_tuple(int(p.layout), p.index32, p.vector, std::string(fl::plan::vectors_reason(p.vectors)));
}

template <fl::plan::Layout L, typename I>
std::vector<int64_t> walk(int64_t C, int64_t S, const Strides& st, const std::vector<int64_t>& indices) {
  std::vector<int64_t> out;
  for (int64_t i : indices)
    out.push_back(int64_t(fl::plan::offset<L, I>(I(i), I(C), I(S), I(std::get<0>(st)), I(std::get<1>(st)),
                                                 I(std::get<2>(st)))));
  return out;
}

// With vector > 1 (flat only), indices are the walk's steps of ``total`` elements and each vector step
// gives its ``vector`` offsets.
std::vector<int64_t> elementwise_offsets(int layout, bool index32, int64_t C, int64_t S, const Strides& strides,
                                         const std::vector<int64_t>& indices, int vector, int64_t total) {
  using fl::plan::Layout;
  if (vector > 1 && Layout(layout) == Layout::Flat) {
    const int64_t steps = fl::plan::vector_steps(total, vector);
    std::vector<int64_t> out;
    for (int64_t j : indices)
      for (int64_t k = 0; k < (j < steps ? vector : 1); ++k) out.push_back(j < steps ? j * vector + k : j + steps * (vector - 1));
    return out;
  }
  switch (Layout(layout)) {
    case Layout::Flat:
      return index32 ? walk<Layout::Flat, int32_t>(C, S, strides, indices)
                     : walk<Layout::Flat, int64_t>(C, S, strides, indices);
    case Layout::ChannelsLast:
      return index32 ? walk<Layout::ChannelsLast, int32_t>(C, S, strides, indices)
                     : walk<Layout::ChannelsLast, int64_t>(C, S, strides, indices);
    case Layout::ChannelsFirst:
      return index32 ? walk<Layout::ChannelsFirst, int32_t>(C, S, strides, indices)
                     : walk<Layout::ChannelsFirst, int64_t>(C, S, strides, indices);
  }
  throw std::invalid_argument("elementwise_offsets: layout must be 0 (flat), 1 (channels-last) or 2 (channels-first)");
}

// A view arrives from python/fastlrp/ops as (name, data_ptr, dtype, device_type, device_index,
// sizes, strides); dtype 0..4 = float32, float64, float16, bfloat16, int64; device_type 0 = cpu, 1 = cuda.
fl::View to_view(const py::tuple& t) {
  if (t.size() != 7) throw std::invalid_argument("a tensor view is a 7-tuple; use fastlrp.ops to call _C");
  fl::View v;
  v.name = t[0].cast<std::string>();
  v.data = reinterpret_cast<void*>(t[1].cast<std::uintptr_t>());
  const int dtype = t[2].cast<int>();
  if (dtype < 0 || dtype > 4) throw fl::TypeErrorException(v.name + " has an unsupported dtype code");
  v.dtype = static_cast<fl::DType>(dtype);
  v.device = t[3].cast<int>() == 1 ? fl::DeviceType::CUDA : fl::DeviceType::CPU;
  v.device_index = t[4].cast<int>();
  v.sizes = t[5].cast<std::vector<int64_t>>();
  v.strides = t[6].cast<std::vector<int64_t>>();
  int64_t numel = 1;
  for (auto s : v.sizes) numel *= s;
  if (numel > 0 && v.data == nullptr) throw std::invalid_argument(v.name + " has no data");
  return v;
}

std::vector<fl::View> to_views(const py::list& list) {
  std::vector<fl::View> out;
  for (auto item : list) out.push_back(to_view(item.cast<py::tuple>()));
  return out;
}

void check_all_like(const fl::View& ref, const std::vector<fl::View>& views, size_t rank) {
  for (const auto& v : views) {
    fl::check_rank(v, rank);
    fl::check_like(ref, v);
  }
}

template <typename Args>
void run_on_device(const fl::View& ref, const Args& args, void (*cpu_fn)(const Args&),
                   void (*cuda_fn)(const Args&)) {
  if (ref.device == fl::DeviceType::CPU) {
    py::gil_scoped_release release;
    cpu_fn(args);
    return;
  }
  if (cuda_fn == nullptr)
    throw std::invalid_argument(ref.name + " is on a CUDA device but this build of fastlrp._C has no CUDA kernels");
  cuda_fn(args);
}

#ifdef FASTLRP_WITH_CUDA
#define FASTLRP_CUDA_FN(name) &fl::cuda::name
#else
#define FASTLRP_CUDA_FN(name) static_cast<decltype(&fl::cpu::name)>(nullptr)
#endif

void stabilize_divide(const py::tuple& relevance, const py::list& z, const py::object& y,
                      const std::vector<double>& coefficient, const std::vector<int>& mask, const py::list& out,
                      double epsilon, int64_t stream) {
  fl::StabilizeDivideArgs a;
  a.relevance = to_view(relevance);
  fl::check_rank(a.relevance, 3);
  a.z = to_views(z);
  a.out = to_views(out);
  if (a.z.empty() || a.z.size() != a.out.size() || a.z.size() != coefficient.size() || a.z.size() != mask.size())
    throw std::invalid_argument("z, out, coefficient and mask must have one entry per group (and at least one)");
  check_all_like(a.relevance, a.z, 3);
  check_all_like(a.relevance, a.out, 3);
  bool any_mask = false;
  for (int m : mask) {
    if (m < 0 || m > 2) throw std::invalid_argument("mask must be 0 (none), 1 (y > 0) or 2 (y < 0)");
    any_mask = any_mask || m != 0;
  }
  if (any_mask) {
    if (y.is_none()) throw std::invalid_argument("y (the layer output) is needed where a mask is used");
    a.y = to_view(y.cast<py::tuple>());
    check_all_like(a.relevance, {a.y}, 3);
  }
  a.coefficient = coefficient;
  a.mask = mask;
  a.epsilon = epsilon;
  a.stream = stream;
  run_on_device(a.relevance, a, &fl::cpu::stabilize_divide, FASTLRP_CUDA_FN(stabilize_divide));
}

void combine(const py::tuple& x, const py::list& g, const std::vector<int>& modifier, const py::list& bound,
             const py::tuple& out, int64_t stream) {
  fl::CombineArgs a;
  a.x = to_view(x);
  fl::check_rank(a.x, 3);
  a.g = to_views(g);
  a.out = to_view(out);
  if (a.g.empty() || a.g.size() != modifier.size() || a.g.size() != static_cast<size_t>(py::len(bound)))
    throw std::invalid_argument("g, modifier and bound must have one entry per part (and at least one)");
  check_all_like(a.x, a.g, 3);
  check_all_like(a.x, {a.out}, 3);
  a.bound.resize(a.g.size());
  for (size_t k = 0; k < a.g.size(); ++k) {
    if (modifier[k] < 0 || modifier[k] > 4) throw std::invalid_argument("modifier must be in 0..4");
    if (modifier[k] == int(fl::InputModifier::Tensor)) {
      if (bound[k].is_none()) throw std::invalid_argument("a Tensor modifier needs its bound tensor");
      a.bound[k] = to_view(bound[k].cast<py::tuple>());
      check_all_like(a.x, {a.bound[k]}, 3);
    }
  }
  a.modifier = modifier;
  a.stream = stream;
  run_on_device(a.x, a, &fl::cpu::combine, FASTLRP_CUDA_FN(combine));
}

void pool(const py::tuple& x, const py::tuple& relevance, const py::object& y, bool window_sum,
          const py::tuple& index_table, const py::tuple& scale_table, double scale_all, const py::tuple& workspace,
          const py::tuple& out, double epsilon, int64_t stream) {
  fl::PoolArgs a;
  a.x = to_view(x);
  a.relevance = to_view(relevance);
  a.workspace = to_view(workspace);
  a.out = to_view(out);
  a.index_table = to_view(index_table);
  a.scale_table = to_view(scale_table);
  fl::check_rank(a.x, 5);
  fl::check_rank(a.relevance, 5);
  check_all_like(a.x, {a.out}, 5);
  check_all_like(a.relevance, {a.workspace}, 5);
  fl::check_same_dtype(a.x, a.relevance);
  fl::check_same_device(a.x, a.relevance);
  if (a.x.sizes[0] != a.relevance.sizes[0] || a.x.sizes[1] != a.relevance.sizes[1])
    throw std::invalid_argument("relevance must have the batch and channel sizes of x");
  a.window_sum = window_sum;
  if (!window_sum) {
    if (y.is_none()) throw std::invalid_argument("y (the pooled output) is needed for average pooling");
    a.y = to_view(y.cast<py::tuple>());
    check_all_like(a.relevance, {a.y}, 5);
  }
  // The tables are built by fastlrp.ops (contiguous, on x's device); check their shape here.
  fl::check_rank(a.index_table, 3);
  fl::check_rank(a.scale_table, 2);
  fl::check_same_device(a.x, a.index_table);
  fl::check_same_device(a.x, a.scale_table);
  int64_t longest = 0;
  for (int d = 0; d < 3; ++d) longest = std::max({longest, a.x.sizes[2 + d], a.relevance.sizes[2 + d]});
  if (a.index_table.dtype != fl::DType::Int64 || a.scale_table.dtype != fl::DType::Float64 ||
      a.index_table.sizes != std::vector<int64_t>{3, 4, longest} ||
      a.scale_table.sizes != std::vector<int64_t>{3, longest} || a.index_table.strides[2] != 1 ||
      a.index_table.strides[1] != longest || a.index_table.strides[0] != 4 * longest ||
      a.scale_table.strides[1] != 1 || a.scale_table.strides[0] != longest)
    throw std::invalid_argument("the window tables must be contiguous int64 (3, 4, L) and float64 (3, L) with L = " +
                                std::to_string(longest));
  a.scale_all = scale_all;
  a.epsilon = epsilon;
  a.stream = stream;
  run_on_device(a.x, a, &fl::cpu::pool, FASTLRP_CUDA_FN(pool));
}

void sum(const py::list& x, const std::vector<double>& alpha, const py::tuple& y, const py::tuple& relevance,
         const py::list& out, double epsilon, int64_t stream) {
  fl::SumArgs a;
  a.relevance = to_view(relevance);
  fl::check_rank(a.relevance, 3);
  a.x = to_views(x);
  a.out = to_views(out);
  a.y = to_view(y);
  if (a.x.empty() || a.x.size() != a.out.size() || a.x.size() != alpha.size())
    throw std::invalid_argument("x, alpha and out must have one entry per summand (and at least one)");
  check_all_like(a.relevance, a.x, 3);
  check_all_like(a.relevance, a.out, 3);
  check_all_like(a.relevance, {a.y}, 3);
  a.alpha = alpha;
  a.epsilon = epsilon;
  a.stream = stream;
  run_on_device(a.relevance, a, &fl::cpu::sum, FASTLRP_CUDA_FN(sum));
}

void softmax_rule(const py::tuple& x, const py::tuple& s, const py::object& relevance, const py::object& gradient,
                  const py::tuple& out, int64_t stream) {
  fl::SoftmaxRuleArgs a;
  a.x = to_view(x);
  fl::check_rank(a.x, 2);
  a.s = to_view(s);
  a.out = to_view(out);
  check_all_like(a.x, {a.s, a.out}, 2);
  a.has_relevance = !relevance.is_none();
  a.has_gradient = !gradient.is_none();
  if (!a.has_relevance && !a.has_gradient)
    throw std::invalid_argument("softmax_rule needs the relevance at s, its gradient form, or both");
  if (a.has_relevance) {
    a.relevance = to_view(relevance.cast<py::tuple>());
    check_all_like(a.x, {a.relevance}, 2);
  }
  if (a.has_gradient) {
    a.gradient = to_view(gradient.cast<py::tuple>());
    check_all_like(a.x, {a.gradient}, 2);
  }
  for (const fl::View* v : {&a.x, &a.s, &a.out, &a.relevance, &a.gradient})
    if (!v->sizes.empty() && v->sizes[1] > 1 && v->strides[1] != 1)
      throw std::invalid_argument(v->name + " must have unit stride along the softmax dimension");
  a.stream = stream;
  run_on_device(a.x, a, &fl::cpu::softmax_rule, FASTLRP_CUDA_FN(softmax_rule));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlrp native kernels (C++/OpenMP and CUDA); no libtorch linked";
  m.def("build_info", &build_info, "How this extension was compiled: version, OpenMP, CUDA");
#ifdef FASTLRP_WITH_CUDA
  m.def("cuda_device_count", &fastlrp::cuda::device_count,
        "CUDA devices the runtime sees (0 without a driver)");
  m.def("cuda_probe_kernel", &fastlrp::cuda::probe_kernel, py::arg("device") = 0,
        "Launch a one-thread kernel on the device; True if it ran");
#endif
  m.def("elementwise_plan", &elementwise_plan, py::arg("N"), py::arg("C"), py::arg("S"), py::arg("views"),
        py::arg("max_threads"), py::arg("element_size") = 0, py::arg("addresses") = std::vector<std::uintptr_t>{},
        "The CUDA element-wise kernels' launch plan: (layout, 32-bit indices, elements per vector access, why)");
  m.def("elementwise_offsets", &elementwise_offsets, py::arg("layout"), py::arg("index32"), py::arg("C"),
        py::arg("S"), py::arg("strides"), py::arg("indices"), py::arg("vector") = 1, py::arg("total") = 0,
        "Memory offsets of walk indices, as the CUDA kernels form them");
  py::register_exception<fl::TypeErrorException>(m, "KernelTypeError", PyExc_TypeError);
  m.def("stabilize_divide", &stabilize_divide, "s_g = c_g * mask_g * R / stab(z_g) for every group, one pass");
  m.def("combine", &combine, "R_in = sum_k m_k(x) * g_k, one pass");
  m.def("pool", &pool, "average / proportional max pooling LRP over separable windows");
  m.def("sum", &sum, "N-ary sum LRP: R_i = a_i x_i R / stab(y), one pass");
  m.def("softmax_rule", &softmax_rule, "AttnLRP softmax rule R_x = x (T - s sum T), T = R + s g, one pass per row");
  m.attr("has_cuda_kernels") = py::bool_(
#ifdef FASTLRP_WITH_CUDA
      true
#else
      false
#endif
  );
}
