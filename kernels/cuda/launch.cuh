// Host side of the shared library's C ABI (nvcc only: NVRTC never sees this file).
//
// Every kernel has a launcher `<kernel>_launch(device, stream, grid, <the kernel's own arguments>)`
// returning a cudaError_t as int, so that kernels/cuda_backend.py drives the ctypes loader and the CuPy
// loader from one description of each launch.
#pragma once

#include <cuda_runtime.h>

#define OPT_CORE_EXPORT extern "C" __attribute__((visibility("default")))

// Runs `launch` with `device` current, then makes the caller's device current again.  The library
// carries its own (static) CUDA runtime, whose current device need not be the one PyTorch set.  An
// empty grid launches nothing.
template <typename Launch>
int launch_on(int device, unsigned int grid, Launch launch) {
    if (grid == 0) return static_cast<int>(cudaSuccess);
    int previous = -1;
    cudaError_t err = cudaGetDevice(&previous);
    if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
    if (err == cudaSuccess) {
        launch();
        err = cudaGetLastError();
    }
    if (previous >= 0 && previous != device) {
        const cudaError_t restored = cudaSetDevice(previous);
        if (err == cudaSuccess) err = restored;
    }
    return static_cast<int>(err);
}
