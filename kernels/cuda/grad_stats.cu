// Multi-tensor gradient statistics: the sum of squares of the (unscaled) gradients and the count of
// their non-finite values, optionally unscaling them in place (what a loss scaler's unscale_ and
// gradient-norm clipping need), in two launches for any number of tensors.
//
// Design record (newest last):
// 2026-12-01  Pass 1: one block per chunk of the launch table (table.cuh) writes its partial sum (fp32)
//             and non-finite count; pass 2, one block, adds the partials in a fixed order (in fp64) and
//             writes two 0-d fp32 results.  No float atomics and no host sync: the same inputs give
//             the same bits, and the results stay on the device.
// 2026-12-01  Non-finite values are counted on the raw gradient, before unscaling, as GradScaler does;
//             16-byte vectors where the chunk is aligned, element by element otherwise.
#include "numeric.cuh"
#include "table.cuh"

namespace {

struct Partial {
    float sumsq;
    unsigned int nonfinite;
};

__device__ __forceinline__ void accumulate(Partial& p, float& g, float unscale) {
    p.nonfinite += is_finite(g) ? 0u : 1u;
    g = __fmul_rn(g, unscale);
    p.sumsq = __fmaf_rn(g, g, p.sumsq);
}

template <typename G>
__device__ Partial grad_stats_chunk(const TensorRow& row, long long start, long long count, float unscale,
                                    bool unscale_in_place) {
    G* grad = address<G>(row.grad) + start;
    Partial p = {0.0f, 0u};
    const long long vector_end = row.vectorized ? count / kVec * kVec : 0;
    for (long long i = threadIdx.x * kVec; i < vector_end; i += kThreads * kVec) {
        float g[kVec];
        load_vec(grad + i, g);
#pragma unroll
        for (int j = 0; j < kVec; ++j) accumulate(p, g[j], unscale);
        if (unscale_in_place) store_vec(grad + i, g);
    }
    for (long long i = vector_end + threadIdx.x; i < count; i += kThreads) {
        float g = load(grad + i);
        accumulate(p, g, unscale);
        if (unscale_in_place) store(grad + i, g);
    }
    return p;
}

// Sum over the block's kThreads threads in a fixed tree order; every thread gets the total.
template <typename T>
__device__ T block_sum(T value, T (&scratch)[kThreads]) {
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (unsigned int half = kThreads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) scratch[threadIdx.x] += scratch[threadIdx.x + half];
        __syncthreads();
    }
    return scratch[0];
}

}  // namespace

// Grid: one block per ChunkRow; writes partial_sumsq[blockIdx.x] and partial_nonfinite[blockIdx.x].
// inv_scale may be null (no unscaling); unscale_in_place needs it.
extern "C" __global__ void __launch_bounds__(kThreads) opt_core_grad_stats_partials(
    const TensorRow* rows, const ChunkRow* chunks, long long chunk_elems, const float* inv_scale,
    int unscale_in_place, float* partial_sumsq, unsigned int* partial_nonfinite) {
    __shared__ float sumsq_scratch[kThreads];
    __shared__ unsigned int nonfinite_scratch[kThreads];
    const ChunkRow chunk = chunks[blockIdx.x];
    const TensorRow row = rows[chunk.tensor];
    const long long count = chunk_count(row, chunk, chunk_elems);
    const float unscale = inv_scale != nullptr ? *inv_scale : 1.0f;
    const bool in_place = unscale_in_place != 0 && inv_scale != nullptr;
    Partial p = {0.0f, 0u};
    switch (row.grad_dtype) {
        case kFloat32: p = grad_stats_chunk<float>(row, chunk.start, count, unscale, in_place); break;
        case kFloat16: p = grad_stats_chunk<Half>(row, chunk.start, count, unscale, in_place); break;
        case kBFloat16: p = grad_stats_chunk<BFloat16>(row, chunk.start, count, unscale, in_place); break;
    }
    const float sumsq = block_sum(p.sumsq, sumsq_scratch);
    const unsigned int nonfinite = block_sum(p.nonfinite, nonfinite_scratch);
    if (threadIdx.x == 0) {
        partial_sumsq[blockIdx.x] = sumsq;
        partial_nonfinite[blockIdx.x] = nonfinite;
    }
}

// Grid: one block.  Writes the 0-d fp32 results (zero for zero partials).
extern "C" __global__ void __launch_bounds__(kThreads) opt_core_grad_stats_finish(
    const float* partial_sumsq, const unsigned int* partial_nonfinite, long long num_partials,
    float* sumsq, float* nonfinite) {
    __shared__ double sumsq_scratch[kThreads];
    __shared__ unsigned long long nonfinite_scratch[kThreads];
    double s = 0.0;
    unsigned long long n = 0;
    for (long long i = threadIdx.x; i < num_partials; i += kThreads) {
        s += static_cast<double>(partial_sumsq[i]);
        n += partial_nonfinite[i];
    }
    s = block_sum(s, sumsq_scratch);
    n = block_sum(n, nonfinite_scratch);
    if (threadIdx.x == 0) {
        *sumsq = static_cast<float>(s);
        *nonfinite = static_cast<float>(n);
    }
}

#ifndef __CUDACC_RTC__
#include "launch.cuh"

OPT_CORE_EXPORT int opt_core_grad_stats_partials_launch(
    int device, cudaStream_t stream, unsigned int grid,
    const TensorRow* rows, const ChunkRow* chunks, long long chunk_elems, const float* inv_scale,
    int unscale_in_place, float* partial_sumsq, unsigned int* partial_nonfinite) {
    return launch_on(device, grid, [&] {
        opt_core_grad_stats_partials<<<grid, kThreads, 0, stream>>>(
            rows, chunks, chunk_elems, inv_scale, unscale_in_place, partial_sumsq, partial_nonfinite);
    });
}

OPT_CORE_EXPORT int opt_core_grad_stats_finish_launch(
    int device, cudaStream_t stream, unsigned int grid,
    const float* partial_sumsq, const unsigned int* partial_nonfinite, long long num_partials,
    float* sumsq, float* nonfinite) {
    return launch_on(device, grid, [&] {
        opt_core_grad_stats_finish<<<grid, kThreads, 0, stream>>>(
            partial_sumsq, partial_nonfinite, num_partials, sumsq, nonfinite);
    });
}
#endif
