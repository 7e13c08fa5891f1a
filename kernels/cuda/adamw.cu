// Multi-tensor AdamW step: torch.optim.AdamW's maths over every tensor of a call in one launch.
//
// Design record (newest last):
// 2026-12-01  One block per chunk of the launch table (table.cuh); each block reads its tensor's row,
//             so params, grads, moments, masters and steps of any sizes and any of the storage dtypes
//             (a runtime switch per block, uniform within it) go through one launch.  One read and one
//             write of each param, moment and master, one read of each grad.
// 2026-12-01  Chunks whose addresses are all 16-byte aligned move kVec elements per thread in 16-byte
//             vectors (128-bit LDG/STG, with the streaming hint: each byte is touched once); the tail of
//             a chunk and unaligned tensors go element by element.
// 2026-12-01  Bias corrections as torch computes them (float64 powers of the betas from the step count,
//             rounded to fp32), on the device from each tensor's own step tensor: no host sync.  lr and
//             the betas come as numbers or as 0-d device tensors (the host computes the coefficients
//             derived from a tensor at its precision, as torch and the Triton path do).  The update rounds
//             where torch's separate kernels round (explicit __f*_rn intrinsics), so the nvcc build and
//             the NVRTC build give the same bits.
// 2026-12-01  found_inf (0-d fp32 on the device) makes every block return before touching anything.
#include "numeric.cuh"
#include "table.cuh"

namespace {

// The per-tensor constants of one step, in fp32 as torch's kernels apply its Python-number arguments.
struct Coefficients {
    float unscale, clip;            // multiply the gradient first; 1 when absent (exact)
    bool maximize;
    float decay;                    // 1 - lr * weight_decay
    float one_minus_beta1;          // the lerp weight
    float lerp_complement;          // torch's lerp: 1 - weight, rounded in fp32
    bool lerp_from_start;           // torch's lerp: |weight| < 0.5 picks start + weight * (end - start)
    float beta2, one_minus_beta2;
    float step_size;                // lr / (1 - beta1^step)
    float bias_correction2_sqrt;    // sqrt(1 - beta2^step)
    float eps;
};

// One element of torch.optim.AdamW's single-tensor step.
__device__ __forceinline__ float adamw_update(float w, float g, float& m, float& v, float& vmax, bool amsgrad,
                                              const Coefficients& c) {
    g = __fmul_rn(__fmul_rn(g, c.unscale), c.clip);
    if (c.maximize) g = -g;
    w = __fmul_rn(w, c.decay);                                       // param.mul_(1 - lr * weight_decay)
    const float diff = __fsub_rn(g, m);                              // exp_avg.lerp_(grad, 1 - beta1)
    m = c.lerp_from_start ? __fmaf_rn(c.one_minus_beta1, diff, m) : __fmaf_rn(-diff, c.lerp_complement, g);
    v = __fmaf_rn(__fmul_rn(c.one_minus_beta2, g), g, __fmul_rn(v, c.beta2));  // mul_(beta2).addcmul_(g, g)
    if (amsgrad) vmax = nan_max(vmax, v);                            // torch.maximum(max_exp_avg_sq, v)
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(amsgrad ? vmax : v), c.bias_correction2_sqrt), c.eps);
    return __fmaf_rn(-c.step_size, __fdiv_rn(m, denom), w);         // param.addcdiv_(m, denom, -step_size)
}

// One chunk: `count` elements from `start`.  With a master the update runs on it and the param gets
// its rounded copy; without, the param is upcast, stepped in fp32 and rounded back.
template <typename P, typename G>
__device__ void adamw_chunk(const TensorRow& row, long long start, long long count, const Coefficients& c) {
    P* param = address<P>(row.param) + start;
    const G* grad = address<const G>(row.grad) + start;
    float* exp_avg = address<float>(row.exp_avg) + start;
    float* exp_avg_sq = address<float>(row.exp_avg_sq) + start;
    float* max_exp_avg_sq = row.max_exp_avg_sq != 0 ? address<float>(row.max_exp_avg_sq) + start : nullptr;
    float* master = row.master != 0 ? address<float>(row.master) + start : nullptr;
    const bool amsgrad = max_exp_avg_sq != nullptr;

    const long long vector_end = row.vectorized ? count / kVec * kVec : 0;
    for (long long i = threadIdx.x * kVec; i < vector_end; i += kThreads * kVec) {
        float w[kVec], g[kVec], m[kVec], v[kVec], vmax[kVec] = {};
        if (master != nullptr) load_vec(master + i, w); else load_vec(param + i, w);
        load_vec(grad + i, g);
        load_vec(exp_avg + i, m);
        load_vec(exp_avg_sq + i, v);
        if (amsgrad) load_vec(max_exp_avg_sq + i, vmax);
#pragma unroll
        for (int j = 0; j < kVec; ++j) w[j] = adamw_update(w[j], g[j], m[j], v[j], vmax[j], amsgrad, c);
        store_vec(exp_avg + i, m);
        store_vec(exp_avg_sq + i, v);
        if (amsgrad) store_vec(max_exp_avg_sq + i, vmax);
        if (master != nullptr) store_vec(master + i, w);
        store_vec(param + i, w);
    }
    for (long long i = vector_end + threadIdx.x; i < count; i += kThreads) {
        float m = load(exp_avg + i), v = load(exp_avg_sq + i), vmax = amsgrad ? load(max_exp_avg_sq + i) : 0.0f;
        const float w = master != nullptr ? load(master + i) : load(param + i);
        const float stepped = adamw_update(w, load(grad + i), m, v, vmax, amsgrad, c);
        store(exp_avg + i, m);
        store(exp_avg_sq + i, v);
        if (amsgrad) store(max_exp_avg_sq + i, vmax);
        if (master != nullptr) store(master + i, stepped);
        store(param + i, stepped);
    }
}

template <typename P>
__device__ void adamw_chunk_of_param(const TensorRow& row, long long start, long long count,
                                     const Coefficients& c) {
    switch (row.grad_dtype) {
        case kFloat32: adamw_chunk<P, float>(row, start, count, c); break;
        case kFloat16: adamw_chunk<P, Half>(row, start, count, c); break;
        case kBFloat16: adamw_chunk<P, BFloat16>(row, start, count, c); break;
    }
}

__device__ __forceinline__ double value_or(const double* tensor, double value) {
    return tensor != nullptr ? *tensor : value;
}

__device__ __forceinline__ float fp32_or(const float* tensor, double value) {
    return tensor != nullptr ? *tensor : static_cast<float>(value);
}

}  // namespace

// Grid: one block per ChunkRow.  inv_scale, clip_coef, found_inf and every *_tensor may be null (absent).
// lr and the betas are numbers, or 0-d fp64 device tensors (*_tensor, used instead of the number) for
// the bias corrections.  The fp32 coefficients of the update, decay = 1 - lr * weight_decay, 1 - beta1
// and 1 - beta2, come as 0-d fp32 device tensors where the host computed them at a tensor's precision
// (as torch does with a tensor lr or beta), else from the numbers here.
extern "C" __global__ void __launch_bounds__(kThreads) opt_core_adamw_step(
    const TensorRow* rows, const ChunkRow* chunks, long long chunk_elems,
    const float* found_inf, const float* inv_scale, const float* clip_coef,
    const double* lr_tensor, const double* beta1_tensor, const double* beta2_tensor,
    const float* decay_tensor, const float* one_minus_beta1_tensor, const float* one_minus_beta2_tensor,
    double lr, double beta1, double beta2, double eps, double weight_decay, int maximize) {
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // a skipped step changes nothing
    const ChunkRow chunk = chunks[blockIdx.x];
    const TensorRow row = rows[chunk.tensor];
    lr = value_or(lr_tensor, lr);
    beta1 = value_or(beta1_tensor, beta1);
    beta2 = value_or(beta2_tensor, beta2);
    const double step = static_cast<double>(*address<const float>(row.step)) + 1.0;

    Coefficients c;
    c.unscale = inv_scale != nullptr ? *inv_scale : 1.0f;
    c.clip = clip_coef != nullptr ? *clip_coef : 1.0f;
    c.maximize = maximize != 0;
    c.decay = fp32_or(decay_tensor, 1.0 - lr * weight_decay);
    c.one_minus_beta1 = fp32_or(one_minus_beta1_tensor, 1.0 - beta1);
    c.lerp_complement = __fsub_rn(1.0f, c.one_minus_beta1);
    c.lerp_from_start = fabsf(c.one_minus_beta1) < 0.5f;
    c.beta2 = static_cast<float>(beta2);
    c.one_minus_beta2 = fp32_or(one_minus_beta2_tensor, 1.0 - beta2);
    c.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
    c.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
    c.eps = static_cast<float>(eps);

    const long long count = chunk_count(row, chunk, chunk_elems);
    switch (row.param_dtype) {
        case kFloat32: adamw_chunk_of_param<float>(row, chunk.start, count, c); break;
        case kFloat16: adamw_chunk_of_param<Half>(row, chunk.start, count, c); break;
        case kBFloat16: adamw_chunk_of_param<BFloat16>(row, chunk.start, count, c); break;
    }
}

#ifndef __CUDACC_RTC__
#include "launch.cuh"

OPT_CORE_EXPORT int opt_core_adamw_step_launch(
    int device, cudaStream_t stream, unsigned int grid,
    const TensorRow* rows, const ChunkRow* chunks, long long chunk_elems,
    const float* found_inf, const float* inv_scale, const float* clip_coef,
    const double* lr_tensor, const double* beta1_tensor, const double* beta2_tensor,
    const float* decay_tensor, const float* one_minus_beta1_tensor, const float* one_minus_beta2_tensor,
    double lr, double beta1, double beta2, double eps, double weight_decay, int maximize) {
    return launch_on(device, grid, [&] {
        opt_core_adamw_step<<<grid, kThreads, 0, stream>>>(
            rows, chunks, chunk_elems, found_inf, inv_scale, clip_coef, lr_tensor, beta1_tensor, beta2_tensor,
            decay_tensor, one_minus_beta1_tensor, one_minus_beta2_tensor, lr, beta1, beta2, eps, weight_decay,
            maximize);
    });
}
#endif
