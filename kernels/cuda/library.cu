// The shared library's own entry points, beside each kernel's launcher (adamw.cu, grad_stats.cu).
#include "launch.cuh"
#include "table.cuh"

// int64 words of a TensorRow and of a ChunkRow: the loader refuses a library whose table layout is not
// the one it builds (a stale build).
OPT_CORE_EXPORT int opt_core_cuda_row_words() { return static_cast<int>(sizeof(TensorRow) / sizeof(long long)); }
OPT_CORE_EXPORT int opt_core_cuda_chunk_words() { return static_cast<int>(sizeof(ChunkRow) / sizeof(long long)); }

OPT_CORE_EXPORT const char* opt_core_cuda_error_string(int error) {
    return cudaGetErrorString(static_cast<cudaError_t>(error));
}
