// Storage types, conversions to and from fp32, and 16-byte vector loads and stores.
//
// No CUDA header is included: the conversions are single PTX instructions (cvt, sm_80 and newer) and the
// rest are built-ins of both nvcc and NVRTC, so CuPy compiles these sources with no include path beyond
// this folder.
#pragma once

// Elements a thread moves per vector step: 16 bytes of a 16-bit type, two 16-byte words of fp32.
constexpr int kVec = 8;

// fp16 and bf16 as their bit patterns, wrapped so that overloads can tell them apart.
struct Half { unsigned short bits; };
struct BFloat16 { unsigned short bits; };

struct alignas(16) Bytes16 { unsigned int word[4]; };

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(Half x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

__device__ __forceinline__ float to_float(BFloat16 x) {
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

// Round to nearest even, as PyTorch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

template <>
__device__ __forceinline__ Half from_float<Half>(float x) {
    Half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}

template <>
__device__ __forceinline__ BFloat16 from_float<BFloat16>(float x) {
    BFloat16 b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(x));
    return b;
}

__device__ __forceinline__ bool is_finite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// torch.maximum: NaN when either side is NaN.
__device__ __forceinline__ float nan_max(float a, float b) {
    return (a > b || a != a) ? a : b;
}

// Memory: every element is read and written once per launch, so loads and stores carry the streaming
// (evict-first) hint.  The addresses come from the launch table as integers; these intrinsics also
// make the accesses global ones (LDG/STG) instead of generic ones.
__device__ __forceinline__ Bytes16 load16(const void* p) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    return Bytes16{{v.x, v.y, v.z, v.w}};
}

__device__ __forceinline__ void store16(void* p, const Bytes16& b) {
    __stcs(reinterpret_cast<uint4*>(p), make_uint4(b.word[0], b.word[1], b.word[2], b.word[3]));
}

__device__ __forceinline__ float load(const float* p) { return __ldcs(p); }
__device__ __forceinline__ float load(const Half* p) { return to_float(Half{__ldcs(&p->bits)}); }
__device__ __forceinline__ float load(const BFloat16* p) { return to_float(BFloat16{__ldcs(&p->bits)}); }

__device__ __forceinline__ void store(float* p, float x) { __stcs(p, x); }
__device__ __forceinline__ void store(Half* p, float x) { __stcs(&p->bits, from_float<Half>(x).bits); }
__device__ __forceinline__ void store(BFloat16* p, float x) { __stcs(&p->bits, from_float<BFloat16>(x).bits); }

// kVec elements at a 16-byte aligned address, as fp32.
__device__ __forceinline__ void load_vec(const float* p, float (&x)[kVec]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const Bytes16 b = load16(p + 4 * h);
#pragma unroll
        for (int j = 0; j < 4; ++j) x[4 * h + j] = __uint_as_float(b.word[j]);
    }
}

template <typename T16>
__device__ __forceinline__ void load_vec_16bit(const T16* p, float (&x)[kVec]) {
    const Bytes16 b = load16(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        x[2 * j] = to_float(T16{static_cast<unsigned short>(b.word[j] & 0xffffu)});
        x[2 * j + 1] = to_float(T16{static_cast<unsigned short>(b.word[j] >> 16)});
    }
}

__device__ __forceinline__ void load_vec(const Half* p, float (&x)[kVec]) { load_vec_16bit(p, x); }
__device__ __forceinline__ void load_vec(const BFloat16* p, float (&x)[kVec]) { load_vec_16bit(p, x); }

__device__ __forceinline__ void store_vec(float* p, const float (&x)[kVec]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        Bytes16 b;
#pragma unroll
        for (int j = 0; j < 4; ++j) b.word[j] = __float_as_uint(x[4 * h + j]);
        store16(p + 4 * h, b);
    }
}

template <typename T16>
__device__ __forceinline__ void store_vec_16bit(T16* p, const float (&x)[kVec]) {
    Bytes16 b;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned int lo = from_float<T16>(x[2 * j]).bits, hi = from_float<T16>(x[2 * j + 1]).bits;
        b.word[j] = lo | (hi << 16);
    }
    store16(p, b);
}

__device__ __forceinline__ void store_vec(Half* p, const float (&x)[kVec]) { store_vec_16bit(p, x); }
__device__ __forceinline__ void store_vec(BFloat16* p, const float (&x)[kVec]) { store_vec_16bit(p, x); }
