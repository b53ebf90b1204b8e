// Python bindings of rec2pm_kernels._C.
#include <utility>
#include <vector>

#include "cpu/attention_ops.h"
#include "cpu/causal_lanes.h"
#include "cpu/decoder_step_ops.h"
#include "cpu/input_checks.h"
#include "cpu/patterns_ops.h"
#ifdef REC2PM_WITH_CUDA
#include "cuda/attention_cuda_ops.h"
#endif
#include "rec2pm/attention_math.h"
#include "rec2pm/hstu_masks.h"

namespace {

// The visible keys of one row as [begin, end) spans, for tests of the shared rule.
std::vector<std::pair<int64_t, int64_t>> key_spans(int64_t pattern, int64_t row, int64_t S, int64_t C) {
  rec2pm::check_pattern_codes(pattern, 0, S, C);
  TORCH_CHECK(row >= 0, "row must be >= 0, got ", row);
  const auto pat = static_cast<rec2pm::Pattern>(pattern);
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t i = 0; i < rec2pm::key_span_count(pat, row, S, C); ++i) {
    int64_t begin, end;
    rec2pm::key_span(pat, row, i, S, C, &begin, &end);
    spans.emplace_back(begin, end);
  }
  return spans;
}

// The same for HSTU's masks.
std::vector<std::pair<int64_t, int64_t>> hstu_spans(int64_t row, int64_t length, int64_t num_targets, int64_t X,
                                                    int64_t W, int64_t F, bool causal) {
  int64_t begin[rec2pm::kMaxHstuSpans], end[rec2pm::kMaxHstuSpans];
  const int64_t count =
      rec2pm::hstu_key_spans(rec2pm::HstuMask{X, W, F, causal}, row, length, num_targets, begin, end);
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t i = 0; i < count; ++i) spans.emplace_back(begin[i], end[i]);
  return spans;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of rec2pm_kernels (optional; the library runs without them).";
  m.def("visibility_mask", &rec2pm::visibility_mask_cpu, "Dense (n, n) bool mask of a pattern on the CPU",
        pybind11::arg("pattern"), pybind11::arg("n"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"));
  m.def("bias_positions", &rec2pm::bias_positions_cpu, "Positions λ(p) of the relative bias, (n,) int64",
        pybind11::arg("pattern"), pybind11::arg("n"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"));
  m.def("key_spans", &key_spans, "Visible keys of one row as [begin, end) spans (the kernels' rule)",
        pybind11::arg("pattern"), pybind11::arg("row"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"));
  m.def("segment_attention_forward", &rec2pm::segment_attention_forward_cpu,
        "segment_attention forward on the CPU (fp32/fp64, contiguous inputs, int64 cu_seqlens)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens"),
        pybind11::arg("pattern"), pybind11::arg("segment_len"), pybind11::arg("num_memory_tokens"),
        pybind11::arg("score"), pybind11::arg("scale"), pybind11::arg("rel_bias"), pybind11::arg("silu_norm"),
        pybind11::arg("num_targets") = std::nullopt, pybind11::arg("silu_norms") = std::nullopt,
        pybind11::arg("contextual_seq_len") = 0, pybind11::arg("max_attn_len") = 0,
        pybind11::arg("min_full_attn_seq_len") = 0, pybind11::arg("causal") = true,
        pybind11::arg("ts_bias") = std::nullopt,
        pybind11::arg("timestamps") = std::nullopt, pybind11::arg("query_timestamps") = std::nullopt);
  m.def("force_portable_causal_lanes", &rec2pm::force_portable_causal_lanes,
        "Run causal attention's lane kernel with the portable build even where AVX-512 is there (for tests); "
        "returns the previous setting",
        pybind11::arg("portable"));
  m.def("causal_lanes_use_avx512", &rec2pm::causal_lanes_use_avx512,
        "Whether causal attention's lane kernel (fp32) takes its AVX-512 build now");
  m.def("causal_lanes_support", &rec2pm::causal_lanes_support,
        "Whether causal attention's lane kernel is compiled for these query/key and value head dims "
        "(rec2pm_kernels.backends.cpp_row_lanes states the same rule)",
        pybind11::arg("dim"), pybind11::arg("dim_v"));
  m.def("hstu_key_spans", &hstu_spans, "Visible keys of one row under HSTU's masks as [begin, end) spans",
        pybind11::arg("row"), pybind11::arg("length"), pybind11::arg("num_targets"),
        pybind11::arg("contextual_seq_len"), pybind11::arg("max_attn_len"), pybind11::arg("min_full_attn_seq_len"),
        pybind11::arg("causal") = true);
  m.def("cached_step_forward", &rec2pm::cached_step_forward_cpu,
        "cached_step_attention on the CPU: appends to the caches in place, returns the new rows' outputs",
        pybind11::arg("q_new"), pybind11::arg("k_new"), pybind11::arg("v_new"), pybind11::arg("cu_seqlens_new"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("cache_seqlens"), pybind11::arg("append"),
        pybind11::arg("score"),
        pybind11::arg("scale"), pybind11::arg("rel_bias"), pybind11::arg("silu_norm"));
  m.def("decoder_step", &rec2pm::decoder_step_cpu,
        "One serving step of a whole SASRec or HSTU decoder over its per-layer caches (CPU, in place)",
        pybind11::arg("x"), pybind11::arg("position_rows"), pybind11::arg("input_norm_weight"),
        pybind11::arg("input_norm_bias"), pybind11::arg("cu_seqlens_new"),
        pybind11::arg("k_caches"), pybind11::arg("v_caches"), pybind11::arg("cache_seqlens"), pybind11::arg("layers"),
        pybind11::arg("backbone"), pybind11::arg("num_heads"), pybind11::arg("silu_norm"),
        pybind11::arg("final_norm_weight"), pybind11::arg("final_norm_bias"), pybind11::arg("eps"),
        pybind11::arg("last_rows_only") = false);
  m.def("decoder_step_users", &rec2pm::decoder_step_users_cpu,
        "decoder_step over caches held per user: user_k_caches[b][l] is user b's layer-l K cache "
        "(capacity_b, heads, head_dim); no stacking into one batch (CPU, in place)",
        pybind11::arg("x"), pybind11::arg("position_rows"), pybind11::arg("input_norm_weight"),
        pybind11::arg("input_norm_bias"), pybind11::arg("cu_seqlens_new"), pybind11::arg("user_k_caches"),
        pybind11::arg("user_v_caches"), pybind11::arg("cache_seqlens"), pybind11::arg("layers"),
        pybind11::arg("backbone"), pybind11::arg("num_heads"), pybind11::arg("silu_norm"),
        pybind11::arg("final_norm_weight"), pybind11::arg("final_norm_bias"), pybind11::arg("eps"),
        pybind11::arg("last_rows_only") = false);
  m.def("decoder_forward", &rec2pm::decoder_forward_cpu,
        "A whole SASRec or HSTU decoder as a causal forward pass over packed sequences (CPU, inference)",
        pybind11::arg("x"), pybind11::arg("position_rows"), pybind11::arg("input_norm_weight"),
        pybind11::arg("input_norm_bias"), pybind11::arg("cu_seqlens"), pybind11::arg("layers"),
        pybind11::arg("backbone"), pybind11::arg("num_heads"), pybind11::arg("silu_norm"),
        pybind11::arg("final_norm_weight"), pybind11::arg("final_norm_bias"), pybind11::arg("eps"),
        pybind11::arg("last_rows_only") = false);
#ifdef REC2PM_WITH_CUDA
  m.def("visibility_mask_cuda", &rec2pm::visibility_mask_cuda, "Dense (n, n) bool mask of a pattern on a GPU",
        pybind11::arg("pattern"), pybind11::arg("n"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"), pybind11::arg("device_index"));
  m.def("cached_step_forward_cuda", &rec2pm::cached_step_forward_cuda,
        "cached_step_attention on CUDA: appends to the caches in place, returns the new rows' outputs",
        pybind11::arg("q_new"), pybind11::arg("k_new"), pybind11::arg("v_new"), pybind11::arg("cu_seqlens_new"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("cache_seqlens"), pybind11::arg("score"),
        pybind11::arg("scale"), pybind11::arg("rel_bias"), pybind11::arg("silu_norm"));
  m.def("segment_attention_forward_cuda", &rec2pm::segment_attention_forward_cuda,
        "segment_attention forward on CUDA for short blocks (every pattern, both scores, the relative bias)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens"),
        pybind11::arg("max_seqlen"), pybind11::arg("pattern"), pybind11::arg("segment_len"),
        pybind11::arg("num_memory_tokens"), pybind11::arg("score"), pybind11::arg("scale"),
        pybind11::arg("rel_bias"), pybind11::arg("silu_norm"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
