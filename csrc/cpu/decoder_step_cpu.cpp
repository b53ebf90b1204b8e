// One serving step of a whole SASRec or HSTU decoder in one call: every layer's norms,
// projections, activations, gating and residuals and its attention over the per-layer K/V
// cache (appending in place).  On the CPU a step of a few new events costs mostly per-op
// overhead; one call per step keeps that in C++.  A step of at most kMaxLoopRows rows runs
// as plain loops over the weights (decoder_step_rows.cpp), a larger one through ATen's
// matrix products with loops between them (decoder_step_matrices.cpp).
//
// The math is Decoder.step's exactly (rec2pm/backbones/{sasrec,hstu}.py); tests compare the two.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

#include "decoder_step_math.h"
#include "decoder_step_ops.h"
#include "input_checks.h"

namespace rec2pm {
namespace {

// A prefill's caches may come uninitialised (Decoder.prefill allocates them so): the slots
// after each user's rows are zeroed, as a scatter into zeroed caches would leave them.
void zero_unused_slots(const torch::Tensor& cache, const int64_t* cu, int64_t batch) {
  const int64_t capacity = cache.size(1), slot_values = cache.size(2) * cache.size(3);
  const bool slots_contiguous =
      cache.stride(3) == 1 && cache.stride(2) == cache.size(3) && cache.stride(1) == slot_values;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = std::min(cu[b + 1] - cu[b], capacity);
    if (used == capacity) continue;
    if (slots_contiguous) {
      const int64_t offset = b * cache.stride(0) + used * cache.stride(1);
      auto* first = static_cast<char*>(cache.data_ptr()) + offset * cache.element_size();
      std::memset(first, 0, (capacity - used) * slot_values * cache.element_size());  // 0.0 is all zero bits
    } else {
      cache.select(0, b).narrow(0, used, capacity - used).zero_();
    }
  }
}

// Every weight has the shape and device the loops read it with (through raw pointers on the
// row path): a block's weights in the order of rec2pm/backbones/fused_step.py.
void check_weights(Backbone kind, const std::vector<std::vector<torch::Tensor>>& layers, int64_t d, int64_t heads) {
  const auto vector = [&](const torch::Tensor& t, const char* name) { check_shape(t, {d}, name); };
  const auto square = [&](const torch::Tensor& t, const char* name) { check_shape(t, {d, d}, name); };
  for (const auto& w : layers) {
    for (const auto& t : w) TORCH_CHECK(t.device().is_cpu(), "every layer weight must be a CPU tensor");
    if (kind == Backbone::kHstu) {
      for (const int i : {kInputNormW, kInputNormB, kOutputNormW, kOutputNormB, kF2B}) vector(w[i], "an HSTU norm or f2 bias");
      check_shape(w[kF1W], {4 * d, d}, "HSTU's f1 weight");
      check_shape(w[kF1B], {4 * d}, "HSTU's f1 bias");
      square(w[kF2W], "HSTU's f2 weight");
      check_bias_table(w[kRelBias], heads, "HSTU's rel_bias");
    } else {
      for (const int i : {kAttnNormW, kAttnNormB, kQueryB, kValueB, kAttnOutB, kFfnNormW, kFfnNormB, kFfnInB, kFfnOutB}) {
        vector(w[i], "a SASRec norm or bias");
      }
      for (const int i : {kQueryW, kKeyW, kValueW, kAttnOutW, kFfnInW, kFfnOutW}) square(w[i], "a SASRec weight");
    }
  }
}

// A batch of caches (batch, capacity, heads, head_dim) per layer, on the CPU in x's dtype,
// with room for each user's new rows after its filled ones.
void check_batch_caches(const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                        const torch::Tensor& x, const int64_t* cu, const int64_t* filled, int64_t batch, int64_t heads,
                        int64_t head_dim) {
  for (size_t l = 0; l < k_caches.size(); ++l) {
    for (const auto& [cache, name] : {std::pair{&k_caches[l], "K"}, {&v_caches[l], "V"}}) {
      TORCH_CHECK(cache->device().is_cpu() && cache->dim() == 4 && cache->scalar_type() == x.scalar_type() &&
                      cache->size(0) == batch && cache->size(1) == k_caches[l].size(1) && cache->size(2) == heads &&
                      cache->size(3) == head_dim,
                  "layer ", l, ": the ", name, " cache must be a (batch = ", batch, ", capacity, ", heads, ", ", head_dim,
                  ") CPU tensor of x's dtype, K and V of one capacity; got ", cache->sizes());
    }
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(filled[b] >= 0 && filled[b] + cu[b + 1] - cu[b] <= k_caches[l].size(1), "user ", b, ": its ",
                  filled[b], " filled slots and ", cu[b + 1] - cu[b], " new rows must fit the caches (capacity ",
                  k_caches[l].size(1), ")");
    }
  }
}

// The decoder over `x`'s rows (cu: each user's rows) after filled[b] rows in user b's
// caches; without caches (k_caches empty: a forward pass) every user starts empty.
torch::Tensor run_decoder(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                          const std::optional<torch::Tensor>& input_norm_weight,
                          const std::optional<torch::Tensor>& input_norm_bias, const torch::Tensor& cu_seqlens,
                          const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                          const torch::Tensor& filled_rows, const std::vector<std::vector<torch::Tensor>>& layers,
                          int64_t backbone, int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                          const torch::Tensor& final_norm_bias, double eps,
                          bool last_rows_only, const std::vector<std::vector<void*>>* k_users = nullptr,
                          const std::vector<std::vector<void*>>* v_users = nullptr,
                          const std::function<void()>& prepare_caches = {}) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a (tokens, d_model) CPU tensor");
  TORCH_CHECK(backbone == static_cast<int64_t>(Backbone::kSasrec) || backbone == static_cast<int64_t>(Backbone::kHstu),
              "backbone must be 0 (SASRec) or 1 (HSTU), got ", backbone);
  TORCH_CHECK(input_norm_weight.has_value() == input_norm_bias.has_value(),
              "input_norm_weight and input_norm_bias go together");
  TORCH_CHECK(num_heads >= 1 && x.size(1) % num_heads == 0, "num_heads must be >= 1 and divide d_model = ",
              x.size(1), ", got ", num_heads);
  c10::InferenceMode guard;
  const int64_t tokens = x.size(0), d = x.size(1), head_dim = d / num_heads;
  const auto kind = static_cast<Backbone>(backbone);
  const int64_t expected_weights =
      kind == Backbone::kSasrec ? static_cast<int64_t>(kSasrecWeights) : static_cast<int64_t>(kHstuWeights);
  for (const auto& w : layers) {
    TORCH_CHECK(static_cast<int64_t>(w.size()) == expected_weights, "a ",
                kind == Backbone::kSasrec ? "SASRec" : "HSTU", " layer needs ", expected_weights, " weights, got ",
                w.size());
  }
  const auto cu = cu_seqlens.to(torch::kLong).contiguous();
  const auto filled = filled_rows.to(torch::kLong).contiguous();
  TORCH_CHECK(cu_seqlens.device().is_cpu() && filled_rows.device().is_cpu(), "cu_seqlens and the filled rows must ",
              "be CPU tensors");
  TORCH_CHECK(cu.dim() == 1 && filled.dim() == 1 && cu.numel() == filled.numel() + 1,
              "cu_seqlens must have one more entry than there are users");
  check_offsets(cu.data_ptr<int64_t>(), filled.numel(), tokens, "cu_seqlens");
  check_weights(kind, layers, d, num_heads);
  for (const auto* t : {&final_norm_weight, &final_norm_bias}) check_shape(*t, {d}, "final_norm's weight and bias");
  TORCH_CHECK(final_norm_weight.device().is_cpu() && final_norm_bias.device().is_cpu(), "final_norm must be on the CPU");
  if (position_rows) check_shape(*position_rows, {tokens, d}, "position_rows");
  if (input_norm_weight) {
    check_shape(*input_norm_weight, {d}, "input_norm_weight");
    check_shape(*input_norm_bias, {d}, "input_norm_bias");
  }
  if (last_rows_only) {
    for (int64_t b = 0; b < filled.numel(); ++b) {
      TORCH_CHECK(cu.data_ptr<int64_t>()[b + 1] > cu.data_ptr<int64_t>()[b], "last_rows_only: user ", b,
                  " has no new rows, so no last row to return");
    }
  }
  if (k_users == nullptr) {  // caches held per user were checked by decoder_step_users_cpu
    check_batch_caches(k_caches, v_caches, x, cu.data_ptr<int64_t>(), filled.data_ptr<int64_t>(), filled.numel(),
                       num_heads, head_dim);
  }
  if (position_rows) x = x + *position_rows;
  if (input_norm_weight) x = at::layer_norm(x, {d}, *input_norm_weight, *input_norm_bias, eps);
  x = x.contiguous().clone();  // the residual stream, updated in place
  const int64_t* filled_counts = filled.data_ptr<int64_t>();
  DecoderStep step{kind,
                         tokens,
                         d,
                         num_heads,
                         head_dim,
                         filled.numel(),
                         cu.data_ptr<int64_t>(),
                         filled_counts,
                         std::all_of(filled_counts, filled_counts + filled.numel(), [](int64_t n) { return n == 0; }),
                         1.0 / std::sqrt(static_cast<double>(head_dim)),
                         silu_norm,
                         eps,
                         &k_caches,
                         &v_caches,
                         &layers,
                         &final_norm_weight,
                         &final_norm_bias,
                         k_users,
                         v_users};
  step.last_rows_only = last_rows_only;
  // Every check has passed: only now are the caches written (a refused call leaves them).
  if (prepare_caches) prepare_caches();
  if (step.prefill && k_users == nullptr) {  // caches held per user are zeroed by prepare_caches
    for (size_t l = 0; l < k_caches.size(); ++l) {
      zero_unused_slots(k_caches[l], step.cu, step.batch);
      zero_unused_slots(v_caches[l], step.cu, step.batch);
    }
  }
  if (rows_path_applies(step, x)) {  // a few rows: the loops run them all, and the last are picked
    auto out = torch::empty_like(x);
    decoder_step_rows(step, x, out);
    if (!last_rows_only) return out;
    auto last = cu.narrow(0, 1, step.batch) - 1;
    return out.index_select(0, last);
  }
  auto out = last_rows_only ? torch::empty({step.batch, d}, x.options()) : torch::empty_like(x);
  decoder_step_matrices(step, x, out);
  return out;
}

}  // namespace

torch::Tensor decoder_step_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                               const std::optional<torch::Tensor>& input_norm_weight,
                               const std::optional<torch::Tensor>& input_norm_bias,
                               const torch::Tensor& cu_seqlens_new, const std::vector<torch::Tensor>& k_caches,
                               const std::vector<torch::Tensor>& v_caches, const torch::Tensor& cache_seqlens,
                               const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                               int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                               const torch::Tensor& final_norm_bias, double eps, bool last_rows_only) {
  TORCH_CHECK(k_caches.size() == layers.size() && v_caches.size() == layers.size(),
              "one K and one V cache per layer are required");
  return run_decoder(x, position_rows, input_norm_weight, input_norm_bias, cu_seqlens_new, k_caches, v_caches,
                     cache_seqlens, layers, backbone, num_heads, silu_norm, final_norm_weight, final_norm_bias, eps,
                     last_rows_only);
}

torch::Tensor decoder_step_users_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                                     const std::optional<torch::Tensor>& input_norm_weight,
                                     const std::optional<torch::Tensor>& input_norm_bias,
                                     const torch::Tensor& cu_seqlens_new,
                                     const std::vector<std::vector<torch::Tensor>>& user_k_caches,
                                     const std::vector<std::vector<torch::Tensor>>& user_v_caches,
                                     const torch::Tensor& cache_seqlens,
                                     const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                                     int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                                     const torch::Tensor& final_norm_bias, double eps, bool last_rows_only) {
  const int64_t batch = cache_seqlens.numel();
  const size_t num_layers = layers.size();
  TORCH_CHECK(batch >= 1 && static_cast<int64_t>(user_k_caches.size()) == batch &&
                  static_cast<int64_t>(user_v_caches.size()) == batch,
              "one list of K caches and one of V caches per user (cache_seqlens has ", batch, ") are required");
  TORCH_CHECK(x.dim() == 2 && num_heads >= 1 && x.size(1) % num_heads == 0, "x must be (tokens, d_model)");
  const int64_t head_dim = x.size(1) / num_heads;
  const auto cu = cu_seqlens_new.to(torch::kLong).contiguous();
  const auto filled = cache_seqlens.to(torch::kLong).contiguous();
  TORCH_CHECK(cu.dim() == 1 && cu.numel() == batch + 1, "cu_seqlens_new must have one more entry than there are users");
  const int64_t *cu_ptr = cu.data_ptr<int64_t>(), *filled_ptr = filled.data_ptr<int64_t>();
  check_offsets(cu_ptr, batch, x.size(0), "cu_seqlens_new");
  // The caches are written through raw pointers: every one is checked here.
  std::vector<std::vector<void*>> k_users(num_layers, std::vector<void*>(batch)),
      v_users(num_layers, std::vector<void*>(batch));
  bool all_empty = true;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(user_k_caches[b].size() == num_layers && user_v_caches[b].size() == num_layers, "user ", b,
                " needs one K and one V cache per layer (", num_layers, ")");
    const int64_t rows = cu_ptr[b + 1] - cu_ptr[b];
    TORCH_CHECK(filled_ptr[b] >= 0, "user ", b, ": cache_seqlens must be >= 0, got ", filled_ptr[b]);
    all_empty &= filled_ptr[b] == 0;
    for (size_t l = 0; l < num_layers; ++l) {
      const auto &k = user_k_caches[b][l], &v = user_v_caches[b][l];
      const auto &k0 = user_k_caches[0][l], &v0 = user_v_caches[0][l];
      for (const auto& [cache, first, name] : {std::tuple{&k, &k0, "K"}, std::tuple{&v, &v0, "V"}}) {
        TORCH_CHECK(cache->device().is_cpu() && cache->dim() == 3 && cache->scalar_type() == x.scalar_type() &&
                        cache->size(1) == num_heads && cache->size(2) == head_dim &&
                        cache->strides() == first->strides(),
                    "user ", b, ", layer ", l, ": the ", name, " cache must be a (capacity, ", num_heads, ", ",
                    head_dim, ") CPU tensor of x's dtype with the strides of user 0's");
      }
      TORCH_CHECK(k.size(0) == v.size(0), "user ", b, ", layer ", l, ": the K and V caches must have one capacity");
      TORCH_CHECK(filled_ptr[b] + rows <= k.size(0), "user ", b, ", layer ", l, ": its ", filled_ptr[b],
                  " filled slots and ", rows, " new rows must fit its caches (capacity ", k.size(0), ")");
      k_users[l][b] = k.data_ptr();
      v_users[l][b] = v.data_ptr();
    }
  }
  // No two caches of a layer may share memory: the step writes each user's slots in place.
  for (size_t l = 0; l < num_layers; ++l) {
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // [first byte, past the last byte) of each cache
    for (int64_t b = 0; b < batch; ++b) {
      for (const auto* cache : {&user_k_caches[b][l], &user_v_caches[b][l]}) {
        int64_t last = 0;  // the element farthest from the first, in elements
        for (int64_t i = 0; i < cache->dim(); ++i) last += (cache->size(i) - 1) * cache->stride(i);
        const auto first = reinterpret_cast<uintptr_t>(cache->data_ptr());
        if (cache->numel() > 0) spans.emplace_back(first, first + (last + 1) * cache->element_size());
      }
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) {
      TORCH_CHECK(spans[i].first >= spans[i - 1].second, "layer ", l,
                  ": two of the users' K and V caches share memory; each needs its own");
    }
  }
  // As a prefill of a batch leaves them: the slots after each user's rows are zeros (done by
  // run_decoder once its own checks have passed).
  const auto zero_after_rows = [&] {
    if (!all_empty) return;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t rows = cu_ptr[b + 1] - cu_ptr[b];
      for (size_t l = 0; l < num_layers; ++l) {
        for (const auto* cache : {&user_k_caches[b][l], &user_v_caches[b][l]}) {
          if (cache->size(0) > rows) cache->narrow(0, rows, cache->size(0) - rows).zero_();
        }
      }
    }
  };
  std::vector<torch::Tensor> k_first(num_layers), v_first(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    k_first[l] = user_k_caches[0][l];
    v_first[l] = user_v_caches[0][l];
  }
  return run_decoder(x, position_rows, input_norm_weight, input_norm_bias, cu, k_first, v_first, filled, layers,
                     backbone, num_heads, silu_norm, final_norm_weight, final_norm_bias, eps, last_rows_only, &k_users,
                     &v_users, zero_after_rows);
}

torch::Tensor decoder_forward_cpu(torch::Tensor x, const std::optional<torch::Tensor>& position_rows,
                                  const std::optional<torch::Tensor>& input_norm_weight,
                                  const std::optional<torch::Tensor>& input_norm_bias,
                                  const torch::Tensor& cu_seqlens,
                                  const std::vector<std::vector<torch::Tensor>>& layers, int64_t backbone,
                                  int64_t num_heads, double silu_norm, const torch::Tensor& final_norm_weight,
                                  const torch::Tensor& final_norm_bias, double eps, bool last_rows_only) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "cu_seqlens must be a (batch + 1,) tensor");
  const auto no_rows_before = torch::zeros({cu_seqlens.numel() - 1}, cu_seqlens.options().dtype(torch::kLong));
  return run_decoder(x, position_rows, input_norm_weight, input_norm_bias, cu_seqlens, {}, {}, no_rows_before, layers,
                     backbone, num_heads, silu_norm, final_norm_weight, final_norm_bias, eps, last_rows_only);
}

}  // namespace rec2pm
