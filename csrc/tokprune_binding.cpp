// pybind11 bindings of tokprune._C (FlashInfer style: the binding file only converts arguments and
// checks them; kernels live in host_kernels.cpp and *.cu). No torch headers: tensors arrive as raw
// pointers (tensor.data_ptr()), shapes, element strides, dtype codes and a CUDA stream handle.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "tokprune/attention.h"
#include "tokprune/kernels.h"

namespace py = pybind11;
using namespace tokprune;

#ifndef TOKPRUNE_CUDA_ARCHS
#define TOKPRUNE_CUDA_ARCHS ""
#endif

namespace {

template <typename T>
T* ptr(uint64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
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
          std::string(op) + ": dtype code " + std::to_string(dtype) + " is not one of 0 (fp32), 1 (fp16), 2 (bf16)");
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
  d["ops"] = std::vector<std::string>{"verify_tree_greedy", "verify_tree_stochastic", "sparse_decode_attention",
                                      "select_tokens"};
  py::dict parts;
  parts["host"] = std::vector<std::string>{"verify_tree", "sparse_decode_attention", "topk_select"};
#ifdef TOKPRUNE_WITH_CUDA
  parts["cuda"] = std::vector<std::string>{"verify_tree.cu", "sparse_attention.cu", "topk.cu"};
#else
  parts["cuda"] = std::vector<std::string>{};
#endif
  d["parts"] = parts;
  d["compiler"] = std::string("g++ ") + __VERSION__;
  return d;
}

void verify_greedy(bool on_cuda, uint64_t stream, int64_t B, int64_t N, int64_t V, uint64_t tokens, uint64_t parents,
                   uint64_t logits, int dtype, int64_t l_sb, int64_t l_sn, uint64_t accept_index, uint64_t accept_len,
                   uint64_t next_token, uint64_t depth, uint64_t max_depth) {
  const char* op = "verify_tree_greedy";
  check_device(on_cuda, op);
  check_dtype(dtype, op);
  VerifyArgs a;
  a.B = B, a.N = N, a.V = V;
  a.tokens = ptr<const int64_t>(tokens), a.parents = ptr<const int32_t>(parents);
  a.logits = ptr<const void>(logits), a.dtype = dtype, a.l_sb = l_sb, a.l_sn = l_sn;
  a.accept_index = ptr<int64_t>(accept_index), a.accept_len = ptr<int64_t>(accept_len);
  a.next_token = ptr<int64_t>(next_token), a.depth = ptr<int32_t>(depth), a.max_depth = ptr<int32_t>(max_depth);
  check_tree(a, op);
  require(B == 0 || a.logits, std::string(op) + ": null target_logits pointer");
  if (B == 0) return;
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    verify_greedy_cuda(a, ptr<void>(stream));
    return;
  }
#endif
  py::gil_scoped_release nogil;
  verify_greedy_host(a);
}

void verify_stochastic(bool on_cuda, uint64_t stream, int64_t B, int64_t N, int64_t V, int rule, uint64_t tokens,
                       uint64_t parents, uint64_t target, int64_t t_sb, int64_t t_sn, uint64_t draft, int64_t d_sb,
                       int64_t d_sn, uint64_t uniforms, uint64_t workspace, uint64_t accept_index, uint64_t accept_len,
                       uint64_t next_token, uint64_t depth, uint64_t max_depth) {
  const char* op = "verify_tree_stochastic";
  check_device(on_cuda, op);
  require(rule == kSpecInfer || rule == kRSD || rule == kTargetOnly,
          std::string(op) + ": rule code " + std::to_string(rule) + " is not 0 (specinfer), 1 (rsd), 2 (target_only)");
  VerifyArgs a;
  a.B = B, a.N = N, a.V = V, a.rule = rule;
  a.tokens = ptr<const int64_t>(tokens), a.parents = ptr<const int32_t>(parents);
  a.target = ptr<const float>(target), a.t_sb = t_sb, a.t_sn = t_sn;
  a.draft = ptr<const float>(draft), a.d_sb = d_sb, a.d_sn = d_sn;
  a.uniforms = ptr<const float>(uniforms), a.workspace = ptr<float>(workspace);
  a.accept_index = ptr<int64_t>(accept_index), a.accept_len = ptr<int64_t>(accept_len);
  a.next_token = ptr<int64_t>(next_token), a.depth = ptr<int32_t>(depth), a.max_depth = ptr<int32_t>(max_depth);
  check_tree(a, op);
  require(B == 0 || (a.target && a.draft && a.uniforms), std::string(op) + ": null probs/uniforms pointer");
  if (B == 0) return;
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    require(a.workspace != nullptr, std::string(op) + ": CUDA launch needs a [B, 2, V] float32 workspace");
    verify_stochastic_cuda(a, ptr<void>(stream));
    return;
  }
#endif
  py::gil_scoped_release nogil;
  verify_stochastic_host(a);
}

void sparse_attention(bool on_cuda, uint64_t stream, int64_t B, int64_t H, int64_t Hkv, int64_t Hi, int64_t K,
                      int64_t D, int dtype, float scale, uint64_t q, int64_t q_sb, int64_t q_sh, uint64_t k,
                      int64_t k_sb, int64_t k_sh, int64_t k_st, uint64_t v, int64_t v_sb, int64_t v_sh, int64_t v_st,
                      uint64_t indices, uint64_t out, int splits, uint64_t workspace) {
  const char* op = "sparse_decode_attention";
  check_device(on_cuda, op);
  check_dtype(dtype, op);
  require(B >= 0 && H >= 1 && Hkv >= 1 && K >= 0, std::string(op) + ": expected B >= 0, H >= 1, Hkv >= 1, K >= 0");
  require(H % Hkv == 0, std::string(op) + ": H=" + std::to_string(H) + " is not a multiple of Hkv=" + std::to_string(Hkv));
  require(Hi == H || Hi == Hkv, std::string(op) + ": index heads Hi=" + std::to_string(Hi) + " must equal H=" +
                                    std::to_string(H) + " or Hkv=" + std::to_string(Hkv));
  require(D >= 1 && D <= kAttnMaxHeadDim,
          std::string(op) + ": head_dim D=" + std::to_string(D) + " must be in [1, " + std::to_string(kAttnMaxHeadDim) + "]");
  require(splits >= 1, std::string(op) + ": splits must be >= 1");
  AttentionArgs a;
  a.B = B, a.H = H, a.Hkv = Hkv, a.Hi = Hi, a.K = K, a.D = D, a.dtype = dtype, a.scale = scale;
  a.q = ptr<const void>(q), a.q_sb = q_sb, a.q_sh = q_sh;
  a.k = ptr<const void>(k), a.k_sb = k_sb, a.k_sh = k_sh, a.k_st = k_st;
  a.v = ptr<const void>(v), a.v_sb = v_sb, a.v_sh = v_sh, a.v_st = v_st;
  a.indices = ptr<const int32_t>(indices), a.out = ptr<void>(out), a.splits = splits, a.workspace = ptr<float>(workspace);
  if (B == 0) return;
  require(a.q && a.k && a.v && a.out && (K == 0 || a.indices), std::string(op) + ": null tensor pointer");
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    require(a.workspace != nullptr, std::string(op) + ": CUDA launch needs a float32 workspace");
    sparse_attention_cuda(a, ptr<void>(stream));
    return;
  }
#endif
  py::gil_scoped_release nogil;
  sparse_attention_host(a);
}

void topk(bool on_cuda, uint64_t stream, int64_t R, int64_t N, int64_t keep, uint64_t scores, uint64_t out) {
  const char* op = "select_tokens";
  check_device(on_cuda, op);
  require(R >= 0 && N >= 0, std::string(op) + ": expected R >= 0 rows and N >= 0 tokens");
  require(keep >= 0 && keep <= N,
          std::string(op) + ": keep=" + std::to_string(keep) + " must lie in [0, N=" + std::to_string(N) + "]");
  if (R == 0 || keep == 0) return;
  TopkArgs a;
  a.R = R, a.N = N, a.keep = keep, a.scores = ptr<const float>(scores), a.out = ptr<int64_t>(out);
  require(a.scores && a.out, std::string(op) + ": null tensor pointer");
#ifdef TOKPRUNE_WITH_CUDA
  if (on_cuda) {
    topk_cuda(a, ptr<void>(stream));
    return;
  }
#endif
  py::gil_scoped_release nogil;
  topk_host(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tokprune compiled kernels (host build + optional CUDA kernels); see tokprune/kernels/cuda.py";
  m.def("build_info", &build_info, "What this build contains: cuda, archs, ops, parts, compiler.");
  m.def("verify_tree_greedy", &verify_greedy, py::arg("on_cuda"), py::arg("stream"), py::arg("B"), py::arg("N"),
        py::arg("V"), py::arg("tokens"), py::arg("parents"), py::arg("logits"), py::arg("dtype"), py::arg("l_sb"),
        py::arg("l_sn"), py::arg("accept_index"), py::arg("accept_len"), py::arg("next_token"), py::arg("depth"),
        py::arg("max_depth"));
  m.def("verify_tree_stochastic", &verify_stochastic, py::arg("on_cuda"), py::arg("stream"), py::arg("B"),
        py::arg("N"), py::arg("V"), py::arg("rule"), py::arg("tokens"), py::arg("parents"), py::arg("target"),
        py::arg("t_sb"), py::arg("t_sn"), py::arg("draft"), py::arg("d_sb"), py::arg("d_sn"), py::arg("uniforms"),
        py::arg("workspace"), py::arg("accept_index"), py::arg("accept_len"), py::arg("next_token"), py::arg("depth"),
        py::arg("max_depth"));
  m.def("sparse_decode_attention", &sparse_attention, py::arg("on_cuda"), py::arg("stream"), py::arg("B"),
        py::arg("H"), py::arg("Hkv"), py::arg("Hi"), py::arg("K"), py::arg("D"), py::arg("dtype"), py::arg("scale"),
        py::arg("q"), py::arg("q_sb"), py::arg("q_sh"), py::arg("k"), py::arg("k_sb"), py::arg("k_sh"), py::arg("k_st"),
        py::arg("v"), py::arg("v_sb"), py::arg("v_sh"), py::arg("v_st"), py::arg("indices"), py::arg("out"),
        py::arg("splits"), py::arg("workspace"));
  m.def("select_tokens", &topk, py::arg("on_cuda"), py::arg("stream"), py::arg("R"), py::arg("N"), py::arg("keep"),
        py::arg("scores"), py::arg("out"));
}
