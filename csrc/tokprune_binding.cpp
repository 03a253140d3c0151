// pybind11 bindings of tokprune._C (FlashInfer style: the binding file only converts arguments; kernels
// live in host_kernels.cpp and *.cu). No torch headers: tensors arrive as raw pointers (tensor.data_ptr()),
// shapes and element strides inside bound argument structs (VerifyArgs, AttentionArgs, TopkArgs, see
// include/tokprune/kernels.h), plus a CUDA stream handle.
//
// Validation: the public op in tokprune.ops validates inputs once (shapes, dtypes, devices; index ranges
// in debug mode); tokprune/kernels/cuda.py and this file trust it. The checks below are the cheap ones
// that keep a wrong call from touching memory it does not own (sizes, codes, null pointers, workspace).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tokprune/attention.h"
#include "tokprune/kernels.h"
#include "tokprune/linear.h"

namespace py = pybind11;
using namespace tokprune;

#ifndef TOKPRUNE_CUDA_ARCHS
#define TOKPRUNE_CUDA_ARCHS ""
#endif

namespace {

uint64_t addr(const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); }

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Names of the kernels bound below, in the order they were bound (build_info()["ops"]).
std::vector<std::string>& op_names() {
  static std::vector<std::string> names;
  return names;
}

void check_device(bool on_cuda, const char* op) {
#ifndef TOKPRUNE_WITH_CUDA
  require(!on_cuda, std::string(op) + ": tokprune._C was built without nvcc; CUDA tensors are not supported");
#else
  (void)on_cuda;
  (void)op;
#endif
}

void check_dtype(int dtype, const char* op) {
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
          std::string(op) + ": dtype code " + std::to_string(dtype) + " is not one of " + std::to_string(kFloat32) +
              " (fp32), " + std::to_string(kFloat16) + " (fp16), " + std::to_string(kBFloat16) + " (bf16)");
}

void check_tree(const VerifyArgs& a, const char* op) {
  require(a.B >= 0 && a.N >= 1 && a.V >= 1,
          std::string(op) + ": expected B >= 0, N >= 1 nodes, V >= 1, got B=" + std::to_string(a.B) +
              " N=" + std::to_string(a.N) + " V=" + std::to_string(a.V));
  require(a.B == 0 || (a.tokens && a.parents && a.accept_index && a.accept_len && a.next_token && a.depth && a.max_depth),
          std::string(op) + ": null pointer among tokens/parents/outputs");
}

py::dict build_info() {
  py::dict d;
#ifdef TOKPRUNE_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  std::vector<std::string> archs;
  std::string s = TOKPRUNE_CUDA_ARCHS, cur;
  for (char c : s) {
    if (c == ';' || c == ',') {
      if (!cur.empty()) archs.push_back("sm_" + cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) archs.push_back("sm_" + cur);
  d["archs"] = archs;
  d["ops"] = op_names();
  py::dict parts;
  parts["host"] = std::vector<std::string>{"verify_tree", "sparse_decode_attention", "topk_select", "paged_fasa_decode",
                                          "small_m_linear"};
#ifdef TOKPRUNE_WITH_CUDA
  parts["cuda"] = std::vector<std::string>{"verify_tree.cu", "sparse_attention.cu", "topk.cu"};
#else
  parts["cuda"] = std::vector<std::string>{};
#endif
  d["parts"] = parts;
  d["compiler"] = std::string("g++ ") + __VERSION__;
  d["openmp"] = host_has_openmp();
  // The codes compiled into this binary (from codes.h); tests compare them with tokprune/_codes.py.
  py::dict codes, dtypes, rules;
  dtypes["float32"] = int(kFloat32), dtypes["float16"] = int(kFloat16), dtypes["bfloat16"] = int(kBFloat16);
  dtypes["int8"] = int(kInt8);
  rules["specinfer"] = int(kSpecInfer), rules["rsd"] = int(kRSD), rules["target_only"] = int(kTargetOnly);
  codes["dtypes"] = dtypes, codes["rules"] = rules, codes["attn_max_head_dim"] = int(kAttnMaxHeadDim);
  d["codes"] = codes;
  return d;
}

void verify_greedy(const VerifyArgs& a, bool on_cuda, uint64_t stream, bool sync) {
  const char* op = "verify_tree_greedy";
  check_device(on_cuda, op);
  check_dtype(a.dtype, op);
  check_tree(a, op);
  require(a.B == 0 || a.logits, std::string(op) + ": null target_logits pointer");
  if (a.B == 0) return;
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    verify_greedy_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)), sync);
    return;
  }
#endif
  (void)stream, (void)sync;
  py::gil_scoped_release nogil;
  verify_greedy_host(a);
}

void verify_stochastic(const VerifyArgs& a, bool on_cuda, uint64_t stream, bool sync) {
  const char* op = "verify_tree_stochastic";
  check_device(on_cuda, op);
  require(a.rule == kSpecInfer || a.rule == kRSD || a.rule == kTargetOnly,
          std::string(op) + ": rule code " + std::to_string(a.rule) + " is not " + std::to_string(kSpecInfer) +
              " (specinfer), " + std::to_string(kRSD) + " (rsd), " + std::to_string(kTargetOnly) + " (target_only)");
  check_tree(a, op);
  require(a.B == 0 || (a.target && a.draft && a.uniforms), std::string(op) + ": null probs/uniforms pointer");
  if (a.B == 0) return;
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    require(a.workspace != nullptr, std::string(op) + ": CUDA launch needs a [B, 2, V] float32 workspace");
    verify_stochastic_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)), sync);
    return;
  }
#endif
  (void)stream, (void)sync;
  py::gil_scoped_release nogil;
  verify_stochastic_host(a);
}

void sparse_attention(const AttentionArgs& a, bool on_cuda, uint64_t stream, bool sync) {
  const char* op = "sparse_decode_attention";
  check_device(on_cuda, op);
  check_dtype(a.dtype, op);
  require(a.B >= 0 && a.H >= 1 && a.Hkv >= 1 && a.K >= 0, std::string(op) + ": expected B >= 0, H >= 1, Hkv >= 1, K >= 0");
  require(a.H % a.Hkv == 0,
          std::string(op) + ": H=" + std::to_string(a.H) + " is not a multiple of Hkv=" + std::to_string(a.Hkv));
  require(a.Hi == a.H || a.Hi == a.Hkv, std::string(op) + ": index heads Hi=" + std::to_string(a.Hi) +
                                           " must equal H=" + std::to_string(a.H) + " or Hkv=" + std::to_string(a.Hkv));
  require(a.D >= 1 && a.D <= kAttnMaxHeadDim, std::string(op) + ": head_dim D=" + std::to_string(a.D) +
                                                  " must be in [1, " + std::to_string(kAttnMaxHeadDim) + "]");
  require(a.splits >= 1, std::string(op) + ": splits must be >= 1");
  if (a.B == 0) return;
  require(a.q && a.k && a.v && a.out && (a.K == 0 || a.indices), std::string(op) + ": null tensor pointer");
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    require(a.workspace != nullptr, std::string(op) + ": CUDA launch needs a float32 workspace");
    sparse_attention_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)), sync);
    return;
  }
#endif
  (void)stream, (void)sync;
  py::gil_scoped_release nogil;
  sparse_attention_host(a);
}

void topk(const TopkArgs& a, bool on_cuda, uint64_t stream, bool sync) {
  const char* op = "select_tokens";
  check_device(on_cuda, op);
  require(a.R >= 0 && a.N >= 0, std::string(op) + ": expected R >= 0 rows and N >= 0 tokens");
  require(a.keep >= 0 && a.keep <= a.N,
          std::string(op) + ": keep=" + std::to_string(a.keep) + " must lie in [0, N=" + std::to_string(a.N) + "]");
  if (a.R == 0 || a.keep == 0) return;
  require(a.scores && a.out, std::string(op) + ": null tensor pointer");
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    topk_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)), sync);
    return;
  }
#endif
  (void)stream, (void)sync;
  py::gil_scoped_release nogil;
  topk_host(a);
}

void paged_fasa(const PagedFasaArgs& a, bool on_cuda, uint64_t stream, bool sync) {
  const char* op = "paged_fasa_decode";
  require(!on_cuda, std::string(op) + ": host (CPU) kernel only; CUDA tensors are not supported");
  check_dtype(a.dtype, op);
  require(a.fc_dtype == kInt8 || a.fc_dtype == kFloat32 || a.fc_dtype == kFloat16 || a.fc_dtype == kBFloat16,
          std::string(op) + ": fc_dtype code " + std::to_string(a.fc_dtype) + " is not a float code or " +
              std::to_string(kInt8) + " (int8)");
  check_dtype(a.out_dtype, op);
  require(a.R >= 0 && a.H >= 1 && a.Hkv >= 1 && a.H % a.Hkv == 0,
          std::string(op) + ": expected R >= 0 and H a positive multiple of Hkv, got H=" + std::to_string(a.H) +
              " Hkv=" + std::to_string(a.Hkv));
  require(a.D >= 1 && a.nd >= 0 && a.budget >= 0 && a.sink >= 0 && a.window >= 0 && a.block_size >= 1,
          std::string(op) + ": expected D >= 1, nd >= 0, budget/sink/window >= 0, block_size >= 1");
  require(a.threads >= 1, std::string(op) + ": threads must be >= 1");
  if (a.R == 0) return;
  require(a.q && a.k && a.v && a.out && a.block_table && a.seq_lens && (a.nd == 0 || (a.fc && a.fc_dims)),
          std::string(op) + ": null tensor pointer");
  require(a.fc_dtype != kInt8 || a.nd == 0 || a.fc_scale, std::string(op) + ": int8 FC keys need fc_scale");
  (void)stream, (void)sync;
  py::gil_scoped_release nogil;
  paged_fasa_host(a);
}

void linear_small_m(const LinearArgs& a, bool on_cuda, uint64_t stream, bool sync) {
  const char* op = "small_m_linear";
  require(!on_cuda, std::string(op) + ": host (CPU) kernel only; CUDA tensors are not supported");
  require(a.M >= 0 && a.N >= 0 && a.K >= 0 && a.threads >= 1,
          std::string(op) + ": expected M, N, K >= 0 and threads >= 1, got M=" + std::to_string(a.M) +
              " N=" + std::to_string(a.N) + " K=" + std::to_string(a.K));
  if (a.M == 0 || a.N == 0) return;
  require(a.y && a.w && (a.K == 0 || a.x), std::string(op) + ": null tensor pointer");
  require(a.x_sm >= a.K && a.w_sn >= a.K && a.y_sm >= a.N,
          std::string(op) + ": row strides must be at least the row length");
  (void)stream, (void)sync;
  py::gil_scoped_release nogil;
  linear_small_m_host(a);
}

template <typename F>
void def_op(py::module_& m, const char* name, F&& f, const char* doc) {
  op_names().push_back(name);
  m.def(name, std::forward<F>(f), py::arg("args"), py::arg("on_cuda"), py::arg("stream") = 0, py::arg("sync") = false,
        doc);
}

}  // namespace

// A pointer member bound as an integer address (tensor.data_ptr()).
#define TP_PTR(Cls, field)                                                                \
  def_property(                                                                           \
      #field, [](const Cls& a) { return addr(a.field); },                                 \
      [](Cls& a, uint64_t p) { a.field = reinterpret_cast<decltype(a.field)>(static_cast<uintptr_t>(p)); })
#define TP_VAL(Cls, field) def_readwrite(#field, &Cls::field)

PYBIND11_MODULE(_C, m) {
  m.doc() = "tokprune compiled kernels (host build + optional CUDA kernels); see tokprune/kernels/cuda.py";
  py::class_<VerifyArgs>(m, "VerifyArgs", "Arguments of verify_tree_greedy / verify_tree_stochastic (kernels.h).")
      .def(py::init<>())
      .TP_VAL(VerifyArgs, B).TP_VAL(VerifyArgs, N).TP_VAL(VerifyArgs, V)
      .TP_PTR(VerifyArgs, tokens).TP_PTR(VerifyArgs, parents)
      .TP_PTR(VerifyArgs, logits).TP_VAL(VerifyArgs, dtype).TP_VAL(VerifyArgs, l_sb).TP_VAL(VerifyArgs, l_sn)
      .TP_PTR(VerifyArgs, target).TP_VAL(VerifyArgs, t_sb).TP_VAL(VerifyArgs, t_sn)
      .TP_PTR(VerifyArgs, draft).TP_VAL(VerifyArgs, d_sb).TP_VAL(VerifyArgs, d_sn)
      .TP_PTR(VerifyArgs, uniforms).TP_VAL(VerifyArgs, rule).TP_PTR(VerifyArgs, workspace)
      .TP_PTR(VerifyArgs, accept_index).TP_PTR(VerifyArgs, accept_len).TP_PTR(VerifyArgs, next_token)
      .TP_PTR(VerifyArgs, depth).TP_PTR(VerifyArgs, max_depth);
  py::class_<AttentionArgs>(m, "AttentionArgs", "Arguments of sparse_decode_attention (kernels.h).")
      .def(py::init<>())
      .TP_VAL(AttentionArgs, B).TP_VAL(AttentionArgs, H).TP_VAL(AttentionArgs, Hkv).TP_VAL(AttentionArgs, Hi)
      .TP_VAL(AttentionArgs, K).TP_VAL(AttentionArgs, D).TP_VAL(AttentionArgs, dtype).TP_VAL(AttentionArgs, scale)
      .TP_PTR(AttentionArgs, q).TP_VAL(AttentionArgs, q_sb).TP_VAL(AttentionArgs, q_sh)
      .TP_PTR(AttentionArgs, k).TP_VAL(AttentionArgs, k_sb).TP_VAL(AttentionArgs, k_sh).TP_VAL(AttentionArgs, k_st)
      .TP_PTR(AttentionArgs, v).TP_VAL(AttentionArgs, v_sb).TP_VAL(AttentionArgs, v_sh).TP_VAL(AttentionArgs, v_st)
      .TP_PTR(AttentionArgs, indices).TP_PTR(AttentionArgs, out).TP_VAL(AttentionArgs, splits)
      .TP_PTR(AttentionArgs, workspace);
  py::class_<TopkArgs>(m, "TopkArgs", "Arguments of select_tokens (kernels.h).")
      .def(py::init<>())
      .TP_VAL(TopkArgs, R).TP_VAL(TopkArgs, N).TP_VAL(TopkArgs, keep)
      .TP_PTR(TopkArgs, scores).TP_PTR(TopkArgs, out);

  py::class_<PagedFasaArgs>(m, "PagedFasaArgs", "Arguments of paged_fasa_decode (kernels.h).")
      .def(py::init<>())
      .TP_VAL(PagedFasaArgs, R).TP_VAL(PagedFasaArgs, H).TP_VAL(PagedFasaArgs, Hkv).TP_VAL(PagedFasaArgs, D)
      .TP_VAL(PagedFasaArgs, nd).TP_VAL(PagedFasaArgs, budget).TP_VAL(PagedFasaArgs, sink)
      .TP_VAL(PagedFasaArgs, window).TP_VAL(PagedFasaArgs, block_size).TP_VAL(PagedFasaArgs, dtype)
      .TP_VAL(PagedFasaArgs, fc_dtype).TP_VAL(PagedFasaArgs, out_dtype).TP_VAL(PagedFasaArgs, scale)
      .TP_VAL(PagedFasaArgs, vote_scale)
      .TP_PTR(PagedFasaArgs, q).TP_VAL(PagedFasaArgs, q_sr).TP_VAL(PagedFasaArgs, q_sh)
      .TP_PTR(PagedFasaArgs, k).TP_VAL(PagedFasaArgs, k_sb).TP_VAL(PagedFasaArgs, k_sh)
      .TP_VAL(PagedFasaArgs, k_st).TP_VAL(PagedFasaArgs, k_sd)
      .TP_PTR(PagedFasaArgs, v).TP_VAL(PagedFasaArgs, v_sb).TP_VAL(PagedFasaArgs, v_sh)
      .TP_VAL(PagedFasaArgs, v_st).TP_VAL(PagedFasaArgs, v_sd)
      .TP_PTR(PagedFasaArgs, fc).TP_VAL(PagedFasaArgs, f_sb).TP_VAL(PagedFasaArgs, f_sh)
      .TP_VAL(PagedFasaArgs, f_st).TP_VAL(PagedFasaArgs, f_sd).TP_VAL(PagedFasaArgs, pack_from)
      .TP_PTR(PagedFasaArgs, fc_scale).TP_VAL(PagedFasaArgs, s_sb).TP_VAL(PagedFasaArgs, s_sh)
      .TP_VAL(PagedFasaArgs, s_st)
      .TP_PTR(PagedFasaArgs, fc_dims).TP_PTR(PagedFasaArgs, block_table).TP_VAL(PagedFasaArgs, bt_sr)
      .TP_PTR(PagedFasaArgs, seq_lens).TP_PTR(PagedFasaArgs, out).TP_VAL(PagedFasaArgs, o_sr)
      .TP_VAL(PagedFasaArgs, o_sh).TP_PTR(PagedFasaArgs, selected).TP_VAL(PagedFasaArgs, threads);

  py::class_<LinearArgs>(m, "LinearArgs", "Arguments of linear_small_m (linear.h).")
      .def(py::init<>())
      .TP_VAL(LinearArgs, M).TP_VAL(LinearArgs, N).TP_VAL(LinearArgs, K)
      .TP_PTR(LinearArgs, x).TP_VAL(LinearArgs, x_sm).TP_PTR(LinearArgs, w).TP_VAL(LinearArgs, w_sn)
      .TP_PTR(LinearArgs, bias).TP_PTR(LinearArgs, y).TP_VAL(LinearArgs, y_sm).TP_VAL(LinearArgs, threads);
  m.def("linear_small_m_isa", &linear_small_m_isa, "Instruction set linear_small_m uses here (avx512f, avx2, base).");

  m.def("build_info", &build_info, "What this build contains: cuda, archs, ops, parts, compiler, codes.");
  def_op(m, "verify_tree_greedy", &verify_greedy, "Greedy tree verification; args: VerifyArgs.");
  def_op(m, "verify_tree_stochastic", &verify_stochastic, "Stochastic tree verification; args: VerifyArgs.");
  def_op(m, "sparse_decode_attention", &sparse_attention, "Decode attention over gathered tokens; args: AttentionArgs.");
  def_op(m, "select_tokens", &topk, "Top-k token selection, indices ascending; args: TopkArgs.");
  def_op(m, "paged_fasa_decode", &paged_fasa, "Fused paged FASA decode step (host only); args: PagedFasaArgs.");
  def_op(m, "small_m_linear", &linear_small_m, "Small-M fp32 linear y = x W^T + b (host only); args: LinearArgs.");
}
