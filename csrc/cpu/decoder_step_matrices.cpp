// The fused decoder step for many new rows (a prefill of [M ; recent], a step of a batch
// of users): ATen's matrix products, written into buffers allocated once per call, and
// loops for everything else (norms, activations, gating, residuals, cache writes).  With
// one ATen call per norm, split, copy and add, a 200-row HSTU layer made some twenty calls
// of several microseconds each: about half of a cold request's time outside attention.
// The loops split over threads by rows once a call has enough of them.
//
// The math is Decoder.step's exactly (rec2pm/backbones/{sasrec,hstu}.py); tests compare the two.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

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

// The row-wise ops between the matrix products.  Each row is computed alone, so they split
// over threads by rows with the same bits for any thread count: a forward pass over a batch
// of users has tens of thousands of rows, which ATen's ops would have spread over the cores.
enum class RowOp { kLayerNorm, kSplitSilu, kGate, kAddBias };

// Operands of one op, (rows, d) each unless said: kLayerNorm out = LN(in); kSplitSilu
// silu in place over uvqk (rows, 4d), V, Q, K copied out to v, q, k; kGate out = LN(in) * U
// (U the first d of each uvqk row); kAddBias out += bias.
struct RowArgs {
  int64_t d;
  const void* in;
  void* out;
  const void* weight;
  const void* bias;
  double eps;
  void* uvqk;
  void* v;
  void* q;
  void* k;
};

template <typename T>
__attribute__((always_inline)) inline void row_op(RowOp op, const RowArgs& a, int64_t first, int64_t last) {
  const int64_t d = a.d, n = last - first;
  const auto rows_of = [&](const void* base, int64_t width) { return static_cast<const T*>(base) + first * width; };
  const auto mutable_rows_of = [&](void* base, int64_t width) { return static_cast<T*>(base) + first * width; };
  const T *weight = static_cast<const T*>(a.weight), *bias = static_cast<const T*>(a.bias);
  switch (op) {
    case RowOp::kLayerNorm:
      layer_norm_rows(rows_of(a.in, d), n, d, weight, bias, a.eps, mutable_rows_of(a.out, d));
      return;
    case RowOp::kSplitSilu:
      split_silu_rows(mutable_rows_of(a.uvqk, 4 * d), n, d, mutable_rows_of(a.v, d), mutable_rows_of(a.q, d),
                      mutable_rows_of(a.k, d));
      return;
    case RowOp::kGate:
      gate_rows(rows_of(a.in, d), rows_of(a.uvqk, 4 * d), n, d, weight, bias, a.eps, mutable_rows_of(a.out, d));
      return;
    case RowOp::kAddBias:
      add_bias_rows(mutable_rows_of(a.out, d), n, d, bias);
      return;
  }
}

// Compiled per instruction set (templates cannot be cloned): the loops vectorise with the
// widest vectors the machine has.
REC2PM_VECTOR_CLONES void row_op_f32(RowOp op, const RowArgs& a, int64_t first, int64_t last) {
  row_op<float>(op, a, first, last);
}
REC2PM_VECTOR_CLONES void row_op_f64(RowOp op, const RowArgs& a, int64_t first, int64_t last) {
  row_op<double>(op, a, first, last);
}

// Values a thread should get before the rows are split: a serving prefill of 200 rows
// stays on the calling thread, as the attention kernels' small problems do.
constexpr int64_t kMinValuesPerThread = 1 << 16;

template <typename T>
void for_rows(RowOp op, const RowArgs& a, int64_t rows) {
  const int64_t grain = std::max<int64_t>(1, kMinValuesPerThread / (4 * std::max<int64_t>(a.d, 1)));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    if constexpr (std::is_same_v<T, float>) {
      row_op_f32(op, a, first, last);
    } else {
      row_op_f64(op, a, first, last);
    }
  });
}

template <typename T>
void layer_norm(const DecoderStep& s, const T* in, const torch::Tensor& weight, const torch::Tensor& bias, T* out) {
  for_rows<T>(RowOp::kLayerNorm, {s.d, in, out, ptr<T>(weight), ptr<T>(bias), s.eps}, s.rows);
}

template <typename T>
void add_bias(const DecoderStep& s, const torch::Tensor& bias, T* x) {
  for_rows<T>(RowOp::kAddBias, {s.d, nullptr, x, nullptr, ptr<T>(bias)}, s.rows);
}

// Layer `layer`'s attention of b.q over b.k / b.v into b.a: a prefill writes the rows into
// the empty caches (a forward pass has none) and attends over the rows themselves (the
// segment kernel reads them where they are; the cached step would gather them back from the
// caches); a step attends over each user's cache, appending first (with many rows per user,
// through the same lane kernel: cached_step in attention_cpu.cpp).  `last_block_only`: a
// prefill's attention writes only the block holding each user's last row (the last layer
// when only the last rows are read); a step computes every new row.
template <typename T>
__attribute__((always_inline)) inline void attend(const DecoderStep& s, size_t layer, Buffers& b, Score score,
                                                  const T* bias, int64_t buckets, T silu_norm, bool last_block_only) {
  const T *q = ptr<T>(b.q), *k = ptr<T>(b.k), *v = ptr<T>(b.v);
  if (s.prefill) {
    if (!s.k_caches->empty()) {  // a forward pass has none
      const auto kc = cache_arg<T>(*s.k_caches, s.k_users, layer);
      const auto vc = cache_arg<T>(*s.v_caches, s.v_users, layer);
      append_cache_rows(k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, kc.data, kc.layout, vc.data,
                        vc.layout);
    }
    causal_attention_rows(q, k, v, s.cu, s.batch, s.rows, s.heads, s.head_dim, s.head_dim, score, T(s.scale), bias,
                          buckets, silu_norm, b.a.data_ptr<T>(), last_block_only);
  } else {
    const auto kc = cache_arg<T>(*s.k_caches, s.k_users, layer);
    const auto vc = cache_arg<T>(*s.v_caches, s.v_users, layer);
    cached_step_rows(q, k, v, s.cu, s.filled, s.batch, s.heads, s.head_dim, s.head_dim, kc.data, kc.layout, vc.data,
                     vc.layout, score, T(s.scale), bias, buckets, silu_norm, b.a.data_ptr<T>());
  }
}

// The rows a layer's work after attention runs over: all of them, or (the last layer when
// only the last rows are read) each user's last row, gathered into their own tensors.
template <typename T>
struct TailRows {
  DecoderStep step;  // `rows` is the tail's row count
  torch::Tensor a, wide, h, residual;
};

// The tail's rows of `b` and of the residual stream `x`: every row in place, or each user's
// last row copied out (`out` then receives them, final-normed, in user order); `wide_in`:
// the tail reads `wide` (HSTU's U) rather than only writing it (SASRec's hidden layer).
template <typename T>
TailRows<T> tail_rows(const DecoderStep& s, Buffers& b, torch::Tensor& x, bool last_rows, bool wide_in) {
  if (!last_rows) return {s, b.a, b.wide, b.h, x};
  auto last = at::empty({s.batch}, x.options().dtype(at::kLong));
  for (int64_t u = 0; u < s.batch; ++u) last.data_ptr<int64_t>()[u] = s.cu[u + 1] - 1;
  DecoderStep step = s;
  step.rows = s.batch;
  const auto rows = [&](int64_t width) { return at::empty({s.batch, width}, x.options()); };
  return {step, b.a.index_select(0, last), wide_in ? b.wide.index_select(0, last) : rows(b.wide.size(1)), rows(s.d),
          x.index_select(0, last)};
}

// One HSTU layer: x += f2(LN(A V) * U) with U, V, Q, K = split(silu(f1(LN(x)))).  Returns the
// rows its tail ran over (the last rows' residual stream when `last_rows`).
template <typename T>
torch::Tensor hstu_layer(const DecoderStep& s, size_t layer, const std::vector<torch::Tensor>& w, Buffers& b,
                         torch::Tensor& x, bool last_rows) {
  layer_norm<T>(s, x.data_ptr<T>(), w[kInputNormW], w[kInputNormB], b.h.data_ptr<T>());
  at::addmm_out(b.wide, w[kF1B], b.h, w[kF1W].t());
  RowArgs split{s.d};
  split.uvqk = b.wide.data_ptr<T>();
  split.v = b.v.data_ptr<T>();
  split.q = b.q.data_ptr<T>();
  split.k = b.k.data_ptr<T>();
  for_rows<T>(RowOp::kSplitSilu, split, s.rows);
  const auto& rel = w[kRelBias];
  attend<T>(s, layer, b, Score::kSilu, ptr<T>(rel), rel.size(1), T(s.silu_norm), last_rows);
  auto t = tail_rows<T>(s, b, x, last_rows, /*wide_in=*/true);
  RowArgs gate{s.d, ptr<T>(t.a), t.h.template data_ptr<T>(), ptr<T>(w[kOutputNormW]), ptr<T>(w[kOutputNormB]), s.eps};
  gate.uvqk = t.wide.template data_ptr<T>();
  for_rows<T>(RowOp::kGate, gate, t.step.rows);
  add_bias<T>(t.step, w[kF2B], t.residual.template data_ptr<T>());
  t.residual.addmm_(t.h, w[kF2W].t());
  return t.residual;
}

// One SASRec layer: x += out(attention(LN(x))); x += ffn(LN(x)) with a GELU (erf) between.
template <typename T>
torch::Tensor sasrec_layer(const DecoderStep& s, size_t layer, const std::vector<torch::Tensor>& w, Buffers& b,
                           torch::Tensor& x, bool last_rows) {
  layer_norm<T>(s, x.data_ptr<T>(), w[kAttnNormW], w[kAttnNormB], b.h.data_ptr<T>());
  at::addmm_out(b.q, w[kQueryB], b.h, w[kQueryW].t());
  at::mm_out(b.k, b.h, w[kKeyW].t());
  at::addmm_out(b.v, w[kValueB], b.h, w[kValueW].t());
  attend<T>(s, layer, b, Score::kSoftmax, static_cast<const T*>(nullptr), 1, T(1), last_rows);
  auto t = tail_rows<T>(s, b, x, last_rows, /*wide_in=*/false);
  T* residual = t.residual.template data_ptr<T>();
  add_bias<T>(t.step, w[kAttnOutB], residual);
  t.residual.addmm_(t.a, w[kAttnOutW].t());
  layer_norm<T>(t.step, residual, w[kFfnNormW], w[kFfnNormB], t.h.template data_ptr<T>());
  // SASRec's hidden layer is d wide: the tail's `wide` rows are (rows, d) too.
  at::addmm_out(t.wide, w[kFfnInB], t.h, w[kFfnInW].t());
  at::gelu_(t.wide);  // ATen's erf vectorises; std::erf per value does not
  add_bias<T>(t.step, w[kFfnOutB], residual);
  t.residual.addmm_(t.wide, w[kFfnOutW].t());
  return t.residual;
}

template <typename T>
void decoder_matrices(const DecoderStep& s, torch::Tensor& x, torch::Tensor& out) {
  const auto empty = [&](int64_t width) { return at::empty({s.rows, width}, x.options()); };
  Buffers b{empty(s.d), empty(s.backbone == Backbone::kHstu ? 4 * s.d : s.d), empty(s.d), empty(s.d), empty(s.d),
            empty(s.d)};
  const auto& layers = *s.layers;
  torch::Tensor stream = x;  // the last layer's tail may hand back only the last rows
  DecoderStep final_rows = s;
  for (size_t l = 0; l < layers.size(); ++l) {
    const bool last_rows = s.last_rows_only && l + 1 == layers.size();
    stream = s.backbone == Backbone::kSasrec ? sasrec_layer<T>(s, l, layers[l], b, x, last_rows)
                                             : hstu_layer<T>(s, l, layers[l], b, x, last_rows);
    if (last_rows) final_rows.rows = s.batch;
  }
  if (s.last_rows_only && layers.empty()) {  // no layer to trim: the final norm of the last rows
    stream = tail_rows<T>(s, b, x, true, false).residual;
    final_rows.rows = s.batch;
  }
  layer_norm<T>(final_rows, ptr<T>(stream), *s.final_weight, *s.final_bias, out.data_ptr<T>());
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
    decoder_matrices<float>(s, x, out);
  } else {
    decoder_matrices<double>(s, x, out);
  }
}

}  // namespace rec2pm
