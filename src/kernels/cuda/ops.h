// CUDA kernels of the MoE runtime (the device half of src/cuda). Every function launches on
// `stream`, takes device pointers, and returns the launch's cudaError_t; the caller turns it
// into a Status (CUDA_RETURN_IF_ERROR in src/cuda/cuda_util.h). Math mirrors the CPU reference
// (src/kernels/cpu/ops.h) op for op; tests/cuda/ops_gpu_test.cc checks each against it.
//
// Activations are f32. GEMM inputs are BF16 because the weights are stored BF16 and cuBLAS
// wants both operands in one type; to keep f32-level accuracy an activation row may be
// *split* into hi = bf16(x) and lo = bf16(x - hi) rows ("splits" = 1 or 2). A GEMM over the
// 2·T rows reads each weight once, and summing the two halves of its output recovers x·Wᵀ to
// about 2^-16 relative, against 2^-8 for plain BF16.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eep::cuda {

using bf16_t = uint16_t;  // raw BF16 bits, as stored in checkpoints

// x[t,:] = f32(table[ids[t],:]); sums_out (may be null): sums_out[t] = Σ x[t,:]² (f64, for a
// Gemv's norm_sums). A negative id -1-r stands for prev_ids[r] (a token the previous step left
// on the device: decode steps queued before the host has read it). zero/zero_count: f64
// accumulators the step's later kernels add into, cleared here instead of by a memset node.
cudaError_t Embed(const bf16_t* table, const int32_t* ids, int64_t num_tokens, int64_t dim, float* x,
                  cudaStream_t stream, double* sums_out = nullptr, const int32_t* prev_ids = nullptr,
                  double* zero = nullptr, int64_t zero_count = 0);

// Row-wise RMSNorm: y = w ⊙ x / sqrt(mean(x²) + eps) over `dim` values of each of `rows` rows
// (row r of x at x + r·x_stride). Writes f32 rows to y (stride y_stride; may be null) and/or
// the split BF16 form to y16 ([splits·rows, dim], hi rows first; may be null). y may alias x.
cudaError_t RmsNorm(const float* x, int64_t x_stride, const float* weight, int64_t rows, int64_t dim, float eps,
                    float* y, int64_t y_stride, bf16_t* y16, int splits, cudaStream_t stream);

// Split f32 rows [rows, dim] into BF16 [splits·rows, dim] (hi rows, then lo rows when splits = 2).
cudaError_t SplitBf16(const float* x, int64_t rows, int64_t dim, int splits, bf16_t* out, cudaStream_t stream);

// y[r,c] = Σ_s in[s·rows + r, c] (+ bias[c]); undoes the split after a GEMM.
cudaError_t SumSplits(const float* in, int64_t rows, int64_t cols, int splits, const float* bias, float* y,
                      cudaStream_t stream);

// x[i] += y[i].
cudaError_t Add(float* x, const float* y, int64_t n, cudaStream_t stream);

// gate_up: [splits·rows, 2·inter] GEMM output (gate columns, then up columns, per split row).
// out = silu(gate)·up per row, written as f32 (may be null) and/or split BF16 (may be null).
cudaError_t SiluMul(const float* gate_up, int64_t rows, int64_t inter, int splits, float* out, bf16_t* out16,
                    cudaStream_t stream);

// RoPE in place on `heads` vectors per token: vector h of token t starts at
// x + t·token_stride + h·head_stride + offset and has `rope_dim` values. The angle of pair i
// is positions[t]·inv_freq[i], in double like the CPU reference; cos/sin are scaled by
// `attention_factor`. interleaved: pairs (2i, 2i+1) written de-interleaved (DeepSeek).
cudaError_t Rope(float* x, int64_t num_tokens, int64_t heads, int64_t token_stride, int64_t head_stride,
                 int64_t offset, int64_t rope_dim, const int32_t* positions, const float* inv_freq,
                 float attention_factor, bool interleaved, cudaStream_t stream);

// Causal attention of one sequence's T new tokens (positions start..start+T-1) against its
// cache, which already holds their K/V: k_cache [pos][nkv][dk], v_cache [pos][nkv][dv].
// q [T][nh][dk], out [T][nh][dv]. window > 0: key j is visible from i only if i-j < window.
cudaError_t Attention(const float* q, const float* k_cache, const float* v_cache, int64_t num_tokens,
                      int64_t start, int64_t nh, int64_t nkv, int64_t dk, int64_t dv, int64_t window,
                      float scale, float* out, cudaStream_t stream);
// The longest context Attention takes (its scores live in shared memory).
int64_t MaxAttentionKeys();

// Router on logits [N, E] (f32): writes top_k expert ids and weights per token.
// Softmax mode (Qwen3, Mixtral): softmax over E, top-k, optional renormalisation.
// DeepSeek mode (bias != null): sigmoid, bias for selection, grouped top-k
// (n_group groups, best topk_group by the sum of their two best), w = s / (Σs + 1e-20) if
// norm, then × scaling. Ties pick the lower index, as the CPU TopK.
cudaError_t Route(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k, bool norm_topk,
                  const float* bias, int64_t n_group, int64_t topk_group, float scaling, int32_t* ids,
                  float* weights, cudaStream_t stream);

// out[r,:] = in[src[r],:] for r < rows (BF16 rows of `dim`): gathers tokens per expert.
cudaError_t GatherRows(const bf16_t* in, const int32_t* src, int64_t rows, int64_t dim, bf16_t* out,
                       cudaStream_t stream);

// out[r,:] = in[src[r],:] for r < rows (f32 rows of `dim`): picks the rows the LM head needs.
// out[r, :] = RMSNorm(in[src[r], :]) with weight w and eps (as RmsNorm): gather + norm in one launch.
cudaError_t GatherRmsNormF32(const float* in, const int32_t* src, int64_t rows, int64_t dim, const float* w, float eps,
                             float* out, cudaStream_t stream);
cudaError_t GatherRowsF32(const float* in, const int32_t* src, int64_t rows, int64_t dim, float* out,
                          cudaStream_t stream);

// counts[ids[i]] += 1 for i < n (one block; counts zeroed by the caller): routed experts counted
// on the device for load statistics.
cudaError_t CountRoutes(const int32_t* ids, int64_t n, int32_t* counts, cudaStream_t stream);

// out[r] = argmax of row r of x [rows, cols] (f32), the lowest index on ties, as
// std::max_element; NaN never wins over a number.
cudaError_t ArgmaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream);
// The same result spread over many blocks per row (rows as long as a vocabulary): each block
// reduces 4096 values and atomicMax-es a 64-bit (ordered value, inverted index) key into
// scratch[row], and the last block to finish (a counter in scratch[rows]) decodes out[row] from
// it. scratch: rows + 1 entries, zeroed here first unless the caller has (scratch_zeroed: one
// memset node less in a captured step).
cudaError_t ArgmaxRowsWide(const float* x, int64_t rows, int64_t cols, unsigned long long* scratch, int32_t* out,
                           cudaStream_t stream, bool scratch_zeroed = false);

// Weighted combine in top-k order: out[t,:] = Σ_j w[t,j]·Σ_s y[rows[(t·k + j)·splits + s],:],
// terms added in j order like the CPU LocalExperts.
cudaError_t MoeCombine(const float* y, const int32_t* rows, const float* weights, int64_t num_tokens,
                       int64_t top_k, int64_t dim, int splits, float* out, cudaStream_t stream);

// MLA: from kv [T][nh][nope+dv] and the compressed rows c [T][ca] (k_rope at c + t·ca + kvr),
// writes per-head k [T][nh][nope+rope] and v [T][nh][dv] (expanded as the CPU backend does).
cudaError_t MlaExpandKv(const float* kv, const float* c, int64_t num_tokens, int64_t nh, int64_t nope,
                        int64_t rope, int64_t dv, int64_t ca, int64_t kvr, float* k, float* v, cudaStream_t stream);


// ---------------------------------------------------------------------------------------
// Decode-regime kernels: few tokens per step, so every weight is read once and the work is
// spread over output rows (a warp per row, 16-byte loads, f32 activations and accumulation).
// They take f32 activations directly (no split): x·Wᵀ is accumulated in f32 from BF16 weights.

// One output segment of Gemv: rows [previous segments' rows, + rows) of the output space read
// weight rows of `w` ([rows, in] row-major) and land in y [num_tokens, rows] (+ bias[rows]).
struct GemvSegment {
  const void* w = nullptr;  // bf16_t (Gemv) or float (GemvF32) rows
  float* y = nullptr;
  const float* bias = nullptr;  // may be null
  int64_t rows = 0;
};
constexpr int kMaxGemvSegments = 3;
struct GemvSegments {
  GemvSegment seg[kMaxGemvSegments];
  int count = 0;
  // Percent of each weight row a block pulls into L2 before its PDL wait. Gemv and GemvF32 set it
  // from EEP_CUDA_GEMV_PREFETCH (default 0); RouterPlan's router rows keep this default.
  int prefetch_pct = 100;
  // Set by the launch (EEP_CUDA_GEMV_PRELOAD): one-token GEMVs of two rows per warp (large
  // matrices: q/k/v, the LM head) issue the first loads of each row before the wait.
  bool preload = false;
  // One token: take each block's rows into shared memory before the PDL wait (GemvStagedKernel),
  // where they fit. For GEMVs that follow a latency-bound kernel (the attention), whose weights
  // then stream while it runs; see SetGemvStage.
  bool stage = false;
};
// y_s[t, r] (+)= Σ_i w_s[r, i]·x[t·x_stride + i] (+ bias_s[r]) for every segment s, token
// t < num_tokens; accumulate: added to y (one writer per element, so y may be a residual).
// `in` must be a multiple of 8 and weights 16-byte aligned (GemvSupported).
// norm_w (may be null): x rows are first RMSNorm-ed with weight norm_w and eps (as RmsNorm,
// inside every block; GemvNormFusable says for which sizes), and written to norm_out
// [num_tokens, in] (may be null) as RmsNorm would.
//   norm_sums (with norm_w; may be null): Σ x² of each row [num_tokens], already summed by the
//   kernel that wrote x, so that the blocks skip the reduction.
// sums_out (may be null): Σ y² of each updated row [num_tokens] (f64) is added there (atomics;
// one output segment, zeroed before), for the norm of the next kernel to read.
cudaError_t Gemv(const GemvSegments& segs, int64_t in, const float* x, int64_t x_stride, int64_t num_tokens,
                 bool accumulate, cudaStream_t stream, const float* norm_w = nullptr, float eps = 0,
                 float* norm_out = nullptr, const double* norm_sums = nullptr, double* sums_out = nullptr);
cudaError_t GemvF32(const GemvSegments& segs, int64_t in, const float* x, int64_t x_stride, int64_t num_tokens,
                    bool accumulate, cudaStream_t stream, const float* norm_w = nullptr, float eps = 0,
                    float* norm_out = nullptr, const double* norm_sums = nullptr, double* sums_out = nullptr);
bool GemvNormFusable(int64_t num_tokens, int64_t in);
// Whether Gemv takes rows of `in` values (in % 8 == 0).
bool GemvSupported(int64_t in);
// Output rows per warp of Gemv/GemvF32 (without split rows): 0 chooses (2 where that makes a large
// matrix fit in one wave of blocks, else 1), 1 or 2 forces it (tests, measurements; the
// environment variable EEP_CUDA_GEMV_ROWS sets it at the first launch).
void SetGemvRowsPerWarp(int rows);
// One-token GEMVs (num_tokens 1, without the in-block norm pass) whose rows fit one block per SM
// may take each block's rows into shared memory with one bulk copy before the PDL wait (sm_90),
// so that the weights stream in while the previous kernel still runs. mode 0: never; 1: the
// GEMVs that ask for it (GemvSegments::stage; the default); 2: every one-token GEMV; -1: from
// the environment variable EEP_CUDA_GEMV_STAGE (0, 1 or 2) at the next launch.
void SetGemvStage(int mode);
// Streaming multiprocessors of the GPU current at the first call (0 if unknown): the kernels'
// one-wave launch shapes.
int SmCount();
// Whether a decode attention of num_tokens tokens releases its successor (the staged output
// projection) only once q, k and v are on chip instead of at its start: one token with staging on,
// unless EEP_CUDA_ATTN_LATE_TRIGGER=0.
bool AttnLateTrigger(int64_t num_tokens);
#ifdef EEP_PDL_TRACE
// Measurement builds: where the kernels of ops.cu record their timeline (pdl.h); null: nowhere.
cudaError_t PdlTraceSet(unsigned long long* events, unsigned* count, unsigned cap);
#endif

// Where each logical expert of one MoE layer lives: expert e has rep_count[e] replicas,
// physical slots rep_slot[e·max_replicas + r]; token t's choice of e goes to replica
// t mod rep_count[e] (the fixed spread of LocalExperts). slot_ptr[slot] is the slot's device
// base ([gate (I×H) | up (I×H) | down (H×I)] BF16).
struct MoeSlotTable {
  const int32_t* rep_count = nullptr;  // [E]
  const int32_t* rep_slot = nullptr;   // [E][max_replicas]
  int64_t max_replicas = 1;
  const bf16_t* const* slot_ptr = nullptr;  // [num_slots]
  int64_t num_slots = 0;
};
// The grouping of a step's N·k assignments (a = t·k + j) by physical slot, made on the device:
// groups g < *num_groups, each slot group_slot[g] with assignments order[group_off[g] ..
// + group_cnt[g]). Arrays of MoeMaxGroups(N·k, slots) (order: N·k) entries.
struct MoePlan {
  int32_t* num_groups = nullptr;
  int32_t* group_slot = nullptr;
  int32_t* group_off = nullptr;
  int32_t* group_cnt = nullptr;
  int32_t* order = nullptr;
};
int64_t MoeMaxGroups(int64_t assignments, int64_t num_slots);
// A MoePlan laid out in one int32 buffer of MoePlanInts(max_groups, assignments) entries:
// [num_groups, 3 spare][group_slot][group_off][group_cnt] (max_groups each)[order] (assignments).
int64_t MoePlanInts(int64_t max_groups, int64_t assignments);
MoePlan MoePlanIn(int32_t* base, int64_t max_groups);
// Whether MoeRoutePlan takes this shape (one block: slots and assignments bounded).
bool MoeRoutePlanSupported(int64_t num_tokens, int64_t num_experts, int64_t top_k, int64_t num_slots);
// Route (as Route above, same ids and weights) and group the assignments by slot, in one launch.
cudaError_t MoeRoutePlan(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                         bool norm_topk, const float* bias, int64_t n_group, int64_t topk_group, float scaling,
                         const MoeSlotTable& table, int32_t* ids, float* weights, const MoePlan& plan,
                         cudaStream_t stream);
// MoeRoutePlan for many tokens (the one-block routing is serial per warp): a warp per token over
// many blocks, then the grouping in one block; two launches, the same ids, weights and plan.
// slot_scratch: device int32 [num_tokens·top_k].
cudaError_t MoeRoutePlanWide(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                             bool norm_topk, const float* bias, int64_t n_group, int64_t topk_group, float scaling,
                             const MoeSlotTable& table, int32_t* ids, float* weights, const MoePlan& plan,
                             int32_t* slot_scratch, cudaStream_t stream);
// act[a, i] = silu(gate_s[i]·x_t)·(up_s[i]·x_t) for every assignment a (token t = a / top_k,
// slot s of its group): one launch for all groups, each group's weights read once per 8 tokens.
// x [N, hidden] f32, act [N·k, inter] f32. one_token: the step has one token (every group one
// assignment): a kernel for that case, in one wave of blocks.
cudaError_t MoeGateUp(const float* x, int64_t hidden, int64_t inter, int64_t top_k, const MoeSlotTable& table,
                      const MoePlan& plan, int64_t max_groups, float* act, cudaStream_t stream,
                      bool one_token = false);
// y[a, :] = down_s · act[a, :] for every assignment: y [N·k, hidden] f32.
// one_token: a step of one token after MoeGateUp(one_token) (every group one assignment; the same
// results, the weights loaded before the PDL wait).
cudaError_t MoeDown(const float* act, int64_t hidden, int64_t inter, const MoeSlotTable& table, const MoePlan& plan,
                    int64_t max_groups, float* y, cudaStream_t stream, bool one_token = false);
// MoeDown(one_token) then MoeCombineAdd without shared rows or a norm, of a one-token step after
// MoeGateUp(one_token), in one launch: x[0,:] += Σ_j weights[j]·(down_j · act[j,:]), bit-equal to
// the two launches; sums_out (may be null): Σ x² of the updated row added to sums_out[0]. Taken
// where MoeDownCombineSupported (top_k and max_groups <= 8, the one-token down kernel's rows;
// EEP_CUDA_DOWN_COMBINE=0 turns it off).
bool MoeDownCombineSupported(int64_t hidden, int64_t inter, int64_t top_k, int64_t max_groups);
cudaError_t MoeDownCombine(const float* act, int64_t hidden, int64_t inter, int64_t top_k, const MoeSlotTable& table,
                           const MoePlan& plan, int64_t max_groups, const float* weights, float* x, double* sums_out,
                           cudaStream_t stream);
// x[t,:] += Σ_j w[t,j]·y[t·k + j,:] (j in top-k order, like the CPU) (+ shared[t,:], added to
// the routed sum first, as the CPU does); shared may be null. With norm_w, the updated rows
// are also RMSNorm-ed into norm_out [num_tokens, dim] (as RmsNorm; the next layer's input
// norm) by the grid's last block: counter is a device word that is 0 between launches.
// sums_out (may be null): Σ x[t,:]² of the updated rows is added to sums_out[t] (zeroed before).
cudaError_t MoeCombineAdd(const float* y, const float* weights, int64_t num_tokens, int64_t top_k, int64_t dim,
                          const float* shared, float* x, cudaStream_t stream, const float* norm_w = nullptr,
                          float eps = 0, float* norm_out = nullptr, unsigned* counter = nullptr,
                          double* sums_out = nullptr);
// The router GEMV (logits [N, E] = x·routerᵀ, f32 weights [E, hidden]; with norm_w, x is first
// RMSNorm-ed as in Gemv and the normed rows written to norm_out) and MoeRoutePlan in one launch
// (the last block routes). counter: a device word that is 0 between launches. norm_sums (with
// norm_w; may be null): Σ x² per row, as Gemv's.
bool RouterPlanSupported(int64_t num_tokens, int64_t num_experts, int64_t top_k, int64_t num_slots, int64_t hidden,
                         bool fused_norm);
cudaError_t RouterPlan(const float* router, int64_t hidden, const float* x, int64_t num_tokens, const float* norm_w,
                       float eps, float* norm_out, float* logits, unsigned* counter, int64_t num_experts,
                       int64_t top_k, bool norm_topk, const float* bias, int64_t n_group, int64_t topk_group,
                       float scaling, const MoeSlotTable& table, int32_t* ids, float* weights, const MoePlan& plan,
                       cudaStream_t stream, const double* norm_sums = nullptr);
// One token: the attention's output projection (x += W·in, as Gemv with accumulate, staged in
// shared memory) and RouterPlan on the new x (normed with norm_w and the Σ x² the projection adds
// into norm_sums, zeroed before) in one launch. Each block of the projection also takes its rows'
// share of every router dot product (the router weights' columns of those rows); the last block
// sums the shares (in a fixed order: the same logits every run), writes the logits and normed x
// (norm_out) and routes as RouterPlan. The logits differ from RouterPlan's by float rounding
// (another summation order). Softmax routing without bias only (Qwen3-MoE, Mixtral). partial:
// device float [GemvRouterBlocks(...) · num_experts]; counter: a device word that is 0 between
// launches.
struct GemvRouterArgs {
  const float* router = nullptr;  // [E, rows] f32
  const float* norm_w = nullptr;  // [rows]
  float eps = 0;
  double* norm_sums = nullptr;  // Σ x² (one token)
  float* norm_out = nullptr;    // [rows]
  float* logits = nullptr;      // [E]
  float* partial = nullptr;
  unsigned* counter = nullptr;
  int64_t num_experts = 0, top_k = 0;
  bool norm_topk = false;
  MoeSlotTable table;
  int32_t* ids = nullptr;
  float* weights = nullptr;
  MoePlan plan;
  // The residual x read before the PDL wait: only where the kernel before (the attention) releases
  // this one after its own wait (AttentionDecode at one token, AttnLateTrigger), so that x's
  // writer has completed.
  bool residual_early = false;
};
// Blocks of the launch; 0 where GemvRouter does not take the shape (one-token GEMVs not staged, or
// rows, experts or replicas beyond what its blocks hold in registers and staged shared memory).
int64_t GemvRouterBlocks(int64_t rows, int64_t in, int64_t num_experts, int64_t top_k, int64_t num_slots,
                         int64_t max_replicas);
cudaError_t GemvRouter(const bf16_t* w, const float* bias, int64_t rows, int64_t in, const float* input, float* x,
                       const GemvRouterArgs& r, cudaStream_t stream);

// Per token t (position positions[t]): q heads [t][nh][dk] get RMSNorm (q_norm, if not null)
// and RoPE in place; k heads [t][nkv][dk] get k_norm and RoPE and are written to
// k_cache[t] at [positions[t]][nkv][dk]; v heads are copied to v_cache[t] [pos][nkv][dv].
// RoPE as Rope above (rope_dim values at rope_offset of each head). One launch for the batch.
cudaError_t QkNormRopeKv(float* q, const float* k, const float* v, int64_t num_tokens, int64_t nh, int64_t nkv,
                         int64_t dk, int64_t dv, const float* q_norm, const float* k_norm, float eps,
                         int64_t rope_offset, int64_t rope_dim, const int32_t* positions, const float* inv_freq,
                         float attention_factor, bool interleaved, float* const* k_cache, float* const* v_cache,
                         cudaStream_t stream);
// Causal attention of every token of a batch against its own sequence's cache (k_cache[t],
// v_cache[t], keys 0..positions[t]; window as Attention), in one launch (online softmax: no
// limit on the context). q [N][nh][dk], out [N][nh][dv]; dk, dv <= 256.
cudaError_t AttentionBatched(const float* q, const float* const* k_cache, const float* const* v_cache,
                             const int32_t* positions, int64_t num_tokens, int64_t nh, int64_t nkv, int64_t dk,
                             int64_t dv, int64_t window, float scale, float* out, cudaStream_t stream);
constexpr int64_t kMaxBatchedHeadDim = 256;
// QkNormRopeKv + AttentionBatched in one launch for decode steps, where every token is the only
// new token of its sequence: each block norms and ropes its q head and its kv head's new k
// (q, k, v are the raw projections; q is not modified), attends to the cached keys before
// positions[t] plus the new key, and the first head of each kv group writes k and v to the
// cache. Same results as the two launches.
cudaError_t AttentionDecode(const float* q, const float* k, const float* v, int64_t num_tokens, int64_t nh,
                            int64_t nkv, int64_t dk, int64_t dv, const float* q_norm, const float* k_norm, float eps,
                            int64_t rope_offset, int64_t rope_dim, const int32_t* positions, const float* inv_freq,
                            float attention_factor, bool interleaved, float* const* k_cache, float* const* v_cache,
                            int64_t window, float scale, float* out, cudaStream_t stream);

}  // namespace eep::cuda
