// The fused decoder step for a few new rows (a serving step of a few users): plain loops
// over the weights, no ATen op per layer at all.  A row's matrix-vector products are a few
// thousand multiply-adds, less than one ATen call costs.
//
// The math is Decoder.step's exactly (rec2pm/backbones/{sasrec,hstu}.py); tests compare the two.
#include "decoder_step_math.h"

namespace rec2pm {
namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;  // GELU's erf(x / sqrt(2))

// y = x W^T + b for rows of x (in) and W (out, in); b may be null.  Each output is a dot
// of two contiguous rows, in a fixed order.
template <typename T>
__attribute__((always_inline)) inline void linear_rows(const T* x, int64_t rows, int64_t in, const T* weight,
                                                       const T* bias, int64_t out_dim, T* y) {
  for (int64_t r = 0; r < rows; ++r, x += in, y += out_dim) {
    for (int64_t o = 0; o < out_dim; ++o) y[o] = lane_dot(weight + o * in, x, in) + (bias ? bias[o] : T(0));
  }
}

// One HSTU layer: x += f2(LN(A V) * U) with U, V, Q, K = split(silu(f1(LN(x)))).
template <typename T>
__attribute__((always_inline)) inline void hstu_layer(const DecoderStep& s, const std::vector<torch::Tensor>& w,
                                                      const CacheArg<T>& k_cache, const CacheArg<T>& v_cache,
                                                      T* x, T* work) {
  const int64_t rows = s.rows, d = s.d;
  T *h = work, *uvqk = h + rows * d, *q = uvqk + rows * 4 * d, *k = q + rows * d, *v = k + rows * d,
    *a = v + rows * d;
  layer_norm_rows(x, rows, d, ptr<T>(w[kInputNormW]), ptr<T>(w[kInputNormB]), s.eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kF1W]), ptr<T>(w[kF1B]), 4 * d, uvqk);
  split_silu_rows(uvqk, rows, d, v, q, k);
  const auto& rel = w[kRelBias];
  cached_step_rows(q, k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, k_cache.data, k_cache.layout,
                   v_cache.data, v_cache.layout, Score::kSilu, T(s.scale),
                   ptr<T>(rel), rel.size(1), T(s.silu_norm), a);
  gate_rows(a, uvqk, rows, d, ptr<T>(w[kOutputNormW]), ptr<T>(w[kOutputNormB]), s.eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kF2W]), ptr<T>(w[kF2B]), d, a);
  for (int64_t i = 0; i < rows * d; ++i) x[i] += a[i];
}

// One SASRec layer: x += out(attention(LN(x))); x += ffn(LN(x)) with a GELU (erf) between.
template <typename T>
__attribute__((always_inline)) inline void sasrec_layer(const DecoderStep& s, const std::vector<torch::Tensor>& w,
                                                        const CacheArg<T>& k_cache, const CacheArg<T>& v_cache,
                                                        T* x, T* work) {
  const int64_t rows = s.rows, d = s.d;
  T *h = work, *q = h + rows * d, *k = q + rows * d, *v = k + rows * d, *a = v + rows * d, *f = a + rows * d;
  layer_norm_rows(x, rows, d, ptr<T>(w[kAttnNormW]), ptr<T>(w[kAttnNormB]), s.eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kQueryW]), ptr<T>(w[kQueryB]), d, q);
  linear_rows(h, rows, d, ptr<T>(w[kKeyW]), static_cast<const T*>(nullptr), d, k);
  linear_rows(h, rows, d, ptr<T>(w[kValueW]), ptr<T>(w[kValueB]), d, v);
  cached_step_rows(q, k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, k_cache.data, k_cache.layout,
                   v_cache.data, v_cache.layout, Score::kSoftmax, T(s.scale),
                   static_cast<const T*>(nullptr), 1, T(1), a);
  linear_rows(a, rows, d, ptr<T>(w[kAttnOutW]), ptr<T>(w[kAttnOutB]), d, f);
  for (int64_t i = 0; i < rows * d; ++i) x[i] += f[i];
  layer_norm_rows(x, rows, d, ptr<T>(w[kFfnNormW]), ptr<T>(w[kFfnNormB]), s.eps, h);
  linear_rows(h, rows, d, ptr<T>(w[kFfnInW]), ptr<T>(w[kFfnInB]), d, f);
  for (int64_t i = 0; i < rows * d; ++i) f[i] = T(0.5) * f[i] * (T(1) + std::erf(f[i] * T(kSqrtHalf)));
  linear_rows(f, rows, d, ptr<T>(w[kFfnOutW]), ptr<T>(w[kFfnOutB]), d, a);
  for (int64_t i = 0; i < rows * d; ++i) x[i] += a[i];
}

// Scratch values per row the layers above use (HSTU's: h, uvqk, q, k, v, a).
constexpr int64_t kWorkPerRowAndWidth = 9;

template <typename T>
void decoder_rows(const DecoderStep& s, T* x, T* out) {
  std::vector<T> work(kWorkPerRowAndWidth * s.rows * s.d);
  const auto& layers = *s.layers;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto kc = cache_arg<T>(*s.k_caches, s.k_users, l);
    const auto vc = cache_arg<T>(*s.v_caches, s.v_users, l);
    if (s.backbone == Backbone::kSasrec) {
      sasrec_layer<T>(s, layers[l], kc, vc, x, work.data());
    } else {
      hstu_layer<T>(s, layers[l], kc, vc, x, work.data());
    }
  }
  layer_norm_rows(x, s.rows, s.d, ptr<T>(*s.final_weight), ptr<T>(*s.final_bias), s.eps, out);
}

// Compiled per instruction set (templates cannot be cloned).
REC2PM_VECTOR_CLONES void decoder_rows_f32(const DecoderStep& s, float* x, float* out) {
  decoder_rows<float>(s, x, out);
}
REC2PM_VECTOR_CLONES void decoder_rows_f64(const DecoderStep& s, double* x, double* out) {
  decoder_rows<double>(s, x, out);
}

}  // namespace

// Few rows over caches, every weight a contiguous tensor of x's dtype (read through raw
// pointers), caches of x's dtype (read through their strides).
bool rows_path_applies(const DecoderStep& s, const torch::Tensor& x) {
  if (s.rows > kMaxLoopRows || (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kDouble)) {
    return false;
  }
  if (s.k_caches->size() != s.layers->size()) return false;  // a forward pass: the loops attend over caches
  const auto fits = [&](const torch::Tensor& t) { return t.scalar_type() == x.scalar_type() && t.is_contiguous(); };
  for (const auto& layer : *s.layers) {
    for (const auto& w : layer) {
      if (!fits(w)) return false;
    }
  }
  for (size_t l = 0; l < s.k_caches->size(); ++l) {
    if ((*s.k_caches)[l].scalar_type() != x.scalar_type() || (*s.v_caches)[l].scalar_type() != x.scalar_type()) {
      return false;
    }
  }
  return fits(*s.final_weight) && fits(*s.final_bias);
}

void decoder_step_rows(const DecoderStep& s, torch::Tensor& x, torch::Tensor& out) {
  if (x.scalar_type() == torch::kFloat) {
    decoder_rows_f32(s, x.data_ptr<float>(), out.data_ptr<float>());
  } else {
    decoder_rows_f64(s, x.data_ptr<double>(), out.data_ptr<double>());
  }
}

}  // namespace rec2pm
