// The fused decoder step for many new rows (a prefill of [M ; recent], a step of a batch
// of users): ATen's matrix products, written into buffers allocated once per call, and
// loops for everything else (norms, activations, gating, residuals, cache writes).  With
// one ATen call per norm, split, copy and add, a 200-row HSTU layer made some twenty calls
// of several microseconds each: about half of a cold request's time outside attention.
//
// The math is Decoder.step's exactly (rec2pm/backbones/{sasrec,hstu}.py); tests compare the two.
#include "decoder_step_math.h"

namespace rec2pm {
namespace {

// What one call reuses for every layer: (rows, d) each, `wide` (rows, 4d) for HSTU's
// U, V, Q, K and (rows, d) for SASRec's feed-forward hidden layer.
struct Buffers {
  torch::Tensor h, wide, q, k, v, a;
};

// x[r] += bias for every row (a linear layer's bias, before its product is added in place).
template <typename T>
__attribute__((always_inline)) inline void add_bias_rows(T* x, int64_t rows, int64_t d, const T* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d; ++i) x[r * d + i] += bias[i];
  }
}

// Layer `layer`'s attention of b.q over b.k / b.v into b.a: a prefill writes the rows into
// the empty caches (a forward pass has none) and attends over the rows themselves (the
// segment kernel, tiled over rows and keys: the cached step would rescan each row's prefix
// on its own, 2x the time on a 200-row block); a step attends over each user's cache,
// appending first.
template <typename T>
__attribute__((always_inline)) inline void attend(const DecoderStep& s, size_t layer, Buffers& b, Score score,
                                                  const T* bias, int64_t buckets, T silu_norm) {
  const T *q = ptr<T>(b.q), *k = ptr<T>(b.k), *v = ptr<T>(b.v);
  if (s.prefill) {
    if (!s.k_caches->empty()) {  // a forward pass has none
      const auto& kc = (*s.k_caches)[layer];
      const auto& vc = (*s.v_caches)[layer];
      append_cache_rows(k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, kc.data_ptr<T>(),
                        layout_of(kc), vc.data_ptr<T>(), layout_of(vc));
    }
    causal_attention_rows(q, k, v, s.cu, s.batch, s.rows, s.heads, s.head_dim, s.head_dim, score, T(s.scale), bias,
                          buckets, silu_norm, b.a.data_ptr<T>());
  } else {
    const auto& kc = (*s.k_caches)[layer];
    const auto& vc = (*s.v_caches)[layer];
    cached_step_rows(q, k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, kc.data_ptr<T>(),
                     layout_of(kc), vc.data_ptr<T>(), layout_of(vc), score, T(s.scale), bias, buckets, silu_norm,
                     b.a.data_ptr<T>());
  }
}

// One HSTU layer: x += f2(LN(A V) * U) with U, V, Q, K = split(silu(f1(LN(x)))).
template <typename T>
__attribute__((always_inline)) inline void hstu_layer(const DecoderStep& s, size_t layer,
                                                      const std::vector<torch::Tensor>& w, Buffers& b,
                                                      torch::Tensor& x) {
  const int64_t rows = s.rows, d = s.d;
  T* residual = x.data_ptr<T>();
  T* uvqk = b.wide.data_ptr<T>();
  layer_norm_rows(residual, rows, d, ptr<T>(w[kInputNormW]), ptr<T>(w[kInputNormB]), s.eps, b.h.data_ptr<T>());
  at::addmm_out(b.wide, w[kF1B], b.h, w[kF1W].t());
  split_silu_rows(uvqk, rows, d, b.v.data_ptr<T>(), b.q.data_ptr<T>(), b.k.data_ptr<T>());
  const auto& rel = w[kRelBias];
  attend<T>(s, layer, b, Score::kSilu, ptr<T>(rel), rel.size(1), T(s.silu_norm));
  gate_rows(ptr<T>(b.a), uvqk, rows, d, ptr<T>(w[kOutputNormW]), ptr<T>(w[kOutputNormB]), s.eps,
            b.h.data_ptr<T>());
  add_bias_rows(residual, rows, d, ptr<T>(w[kF2B]));
  x.addmm_(b.h, w[kF2W].t());
}

// One SASRec layer: x += out(attention(LN(x))); x += ffn(LN(x)) with a GELU (erf) between.
template <typename T>
__attribute__((always_inline)) inline void sasrec_layer(const DecoderStep& s, size_t layer,
                                                        const std::vector<torch::Tensor>& w, Buffers& b,
                                                        torch::Tensor& x) {
  const int64_t rows = s.rows, d = s.d;
  T* residual = x.data_ptr<T>();
  layer_norm_rows(residual, rows, d, ptr<T>(w[kAttnNormW]), ptr<T>(w[kAttnNormB]), s.eps, b.h.data_ptr<T>());
  at::addmm_out(b.q, w[kQueryB], b.h, w[kQueryW].t());
  at::mm_out(b.k, b.h, w[kKeyW].t());
  at::addmm_out(b.v, w[kValueB], b.h, w[kValueW].t());
  attend<T>(s, layer, b, Score::kSoftmax, static_cast<const T*>(nullptr), 1, T(1));
  add_bias_rows(residual, rows, d, ptr<T>(w[kAttnOutB]));
  x.addmm_(b.a, w[kAttnOutW].t());
  layer_norm_rows(residual, rows, d, ptr<T>(w[kFfnNormW]), ptr<T>(w[kFfnNormB]), s.eps, b.h.data_ptr<T>());
  at::addmm_out(b.wide, w[kFfnInB], b.h, w[kFfnInW].t());
  at::gelu_(b.wide);  // ATen's erf vectorises; std::erf per value does not
  add_bias_rows(residual, rows, d, ptr<T>(w[kFfnOutB]));
  x.addmm_(b.wide, w[kFfnOutW].t());
}

template <typename T>
__attribute__((always_inline)) inline void decoder_matrices(const DecoderStep& s, torch::Tensor& x,
                                                            torch::Tensor& out) {
  const auto empty = [&](int64_t width) { return at::empty({s.rows, width}, x.options()); };
  Buffers b{empty(s.d), empty(s.backbone == Backbone::kHstu ? 4 * s.d : s.d), empty(s.d), empty(s.d), empty(s.d),
            empty(s.d)};
  const auto& layers = *s.layers;
  for (size_t l = 0; l < layers.size(); ++l) {
    if (s.backbone == Backbone::kSasrec) {
      sasrec_layer<T>(s, l, layers[l], b, x);
    } else {
      hstu_layer<T>(s, l, layers[l], b, x);
    }
  }
  layer_norm_rows(ptr<T>(x), s.rows, s.d, ptr<T>(*s.final_weight), ptr<T>(*s.final_bias), s.eps,
                  out.data_ptr<T>());
}

// Compiled per instruction set (templates cannot be cloned): the loops between the
// matrix products vectorise with the widest vectors the machine has.
REC2PM_VECTOR_CLONES void decoder_matrices_f32(const DecoderStep& s, torch::Tensor& x, torch::Tensor& out) {
  decoder_matrices<float>(s, x, out);
}
REC2PM_VECTOR_CLONES void decoder_matrices_f64(const DecoderStep& s, torch::Tensor& x, torch::Tensor& out) {
  decoder_matrices<double>(s, x, out);
}

}  // namespace

void decoder_step_matrices(const DecoderStep& step, torch::Tensor& x, torch::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
              "the decoder step runs in float32 or float64, got ", x.scalar_type());
  // The loops read weights and caches through raw pointers of x's dtype: a weight of
  // another layout is copied once for this call.
  const auto fits = [&](const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), what, " must have x's dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
    return t.is_contiguous();
  };
  std::vector<std::vector<torch::Tensor>> copies;
  bool all_fit = fits(*step.final_weight, "final_norm_weight") & fits(*step.final_bias, "final_norm_bias");
  for (const auto& layer : *step.layers) {
    for (const auto& w : layer) all_fit &= fits(w, "every layer weight");
  }
  for (size_t l = 0; l < step.k_caches->size(); ++l) {
    fits((*step.k_caches)[l], "k_caches");
    fits((*step.v_caches)[l], "v_caches");
  }
  DecoderStep s = step;
  torch::Tensor final_weight, final_bias;
  if (!all_fit) {
    for (const auto& layer : *step.layers) {
      copies.emplace_back();
      for (const auto& w : layer) copies.back().push_back(w.contiguous());
    }
    final_weight = step.final_weight->contiguous();
    final_bias = step.final_bias->contiguous();
    s.layers = &copies;
    s.final_weight = &final_weight;
    s.final_bias = &final_bias;
  }
  if (x.scalar_type() == torch::kFloat) {
    decoder_matrices_f32(s, x, out);
  } else {
    decoder_matrices_f64(s, x, out);
  }
}

}  // namespace rec2pm
