// The launch table: how the host hands a list of tensors to one kernel launch.
//
// One int64 device buffer holds a TensorRow per tensor, then a ChunkRow per chunk of CHUNK elements;
// a block of a kernel takes one chunk.  kernels/cuda_backend.py builds this buffer (ROW_FIELDS,
// CHUNK_FIELDS, DTYPE_CODES, THREADS there); tests/test_cuda_backend.py reads this file and checks
// that both sides name the same fields in the same order.
#pragma once

// Threads per block of every kernel (the block reductions assume exactly this many).
constexpr int kThreads = 512;

// Storage dtypes of params and grads.
enum DType : long long { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct TensorRow {
    long long param;           // device addresses; 0 where the tensor is absent
    long long grad;
    long long exp_avg;         // fp32
    long long exp_avg_sq;      // fp32
    long long max_exp_avg_sq;  // fp32, AMSGrad only
    long long master;          // fp32 master weights only
    long long step;            // 0-d fp32 step count before this step
    long long numel;
    long long param_dtype;     // a DType, -1 without a param
    long long grad_dtype;      // a DType
    long long vectorized;      // 1: every address is 16-byte aligned, so whole chunks move in 16-byte vectors
};

struct ChunkRow {
    long long tensor;          // index of its TensorRow
    long long start;           // first element; a multiple of CHUNK, itself a multiple of kVec
};

template <typename T>
__device__ __forceinline__ T* address(long long a) {
    return reinterpret_cast<T*>(a);
}

// Elements of a chunk: CHUNK, less at the end of its tensor.
__device__ __forceinline__ long long chunk_count(const TensorRow& row, const ChunkRow& chunk, long long chunk_elems) {
    const long long left = row.numel - chunk.start;
    return left < chunk_elems ? left : chunk_elems;
}
