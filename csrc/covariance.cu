// Covariance accumulation on the GPU: master += upper_triangle(x^T x).
//
// x is [M, d] (tokens x features) in bf16/fp16/fp32; master is [d, d] fp64 holding the upper
// triangle only (the strict lower part stays zero; lrcomp.calib symmetrises on read). Each
// thread block owns one tile (bi <= bj) of the upper triangle for the whole launch, sums its
// products over the rows in fp32 registers and then adds them into master in fp64, so no
// atomics are needed and the result does not depend on scheduling. The host splits M into
// chunks of kRowsPerFold rows, one launch each, which bounds the fp32 summation error by the
// chunk length whatever the batch size (the Python reference folds at the same boundaries).
//
// Two kernels:
//   * bf16/fp16 on sm_80+: tensor cores (WMMA 16x16x16, fp32 accumulators), 128x128 tiles;
//     products of 16-bit inputs are exact in fp32, so this is as accurate as an fp32 GEMM on
//     the upcast inputs, and only the upper triangle's tiles are computed (half the FLOPs).
//   * fp32 inputs, or older GPUs: a SIMT kernel, 64x64 tiles, 4x4 outputs per thread.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

namespace lrcomp {
namespace {

constexpr int64_t kRowsPerFold = 8192;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ __half zero_value<__half>() {
  return __float2half(0.f);
}
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() {
  return __float2bfloat16(0.f);
}

// ------------------------------------------------------------------------------ SIMT kernel
constexpr int kSimtTile = 64;
constexpr int kSimtRows = 16;
constexpr int kSimtThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    covariance_simt_kernel(const T* __restrict__ x, double* __restrict__ master, int64_t rows, int64_t d) {
  const int bi = blockIdx.y;
  const int bj = blockIdx.x;
  if (bi > bj) return;  // lower-triangle tiles are never computed
  const int64_t i0 = static_cast<int64_t>(bi) * kSimtTile;
  const int64_t j0 = static_cast<int64_t>(bj) * kSimtTile;

  __shared__ __align__(16) float As[kSimtRows][kSimtTile];
  __shared__ __align__(16) float Bs[kSimtRows][kSimtTile];
  const int tid = threadIdx.x;
  const int ti = tid / 16;  // this thread's outputs: rows i0 + 4*ti + p, cols j0 + 4*tj + q
  const int tj = tid % 16;
  float acc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = 0.f;

  for (int64_t r0 = 0; r0 < rows; r0 += kSimtRows) {
    for (int e = tid; e < kSimtRows * kSimtTile; e += kSimtThreads) {
      const int rr = e / kSimtTile;
      const int cc = e % kSimtTile;
      const int64_t row = r0 + rr;
      const int64_t ci = i0 + cc;
      const int64_t cj = j0 + cc;
      As[rr][cc] = (row < rows && ci < d) ? to_float(x[row * d + ci]) : 0.f;
      Bs[rr][cc] = (row < rows && cj < d) ? to_float(x[row * d + cj]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kSimtRows; ++rr) {
      const float4 a = *reinterpret_cast<const float4*>(&As[rr][4 * ti]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[rr][4 * tj]);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(av[p], bv[q], acc[p][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < 4; ++p) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + 4 * ti + p;
      const int64_t j = j0 + 4 * tj + q;
      if (i < d && j < d && i <= j) master[i * d + j] += static_cast<double>(acc[p][q]);
    }
  }
}

// ------------------------------------------------------------------------------ WMMA kernel
constexpr int kWmmaTile = 128;            // output tile is kWmmaTile x kWmmaTile
constexpr int kWmmaRows = 32;             // rows of x staged in shared memory per step
constexpr int kWmmaLd = kWmmaTile + 8;    // padded leading dim (elements): fewer bank conflicts
constexpr int kWmmaThreads = 256;         // 8 warps in a 2 x 4 grid, 64 x 32 outputs each

// Stage rows [r0, r0 + kWmmaRows) x cols [c0, c0 + kWmmaTile) of x into smem[row][col], zero
// outside x. `vec` means 16-byte loads are aligned (d % 8 == 0 and x 16-byte aligned).
template <typename T>
__device__ __forceinline__ void stage_tile(T* smem, const T* __restrict__ x, int64_t r0, int64_t c0, int64_t rows,
                                           int64_t d, bool vec) {
  constexpr int kGroups = kWmmaRows * kWmmaTile / 8;  // groups of 8 consecutive columns
  for (int g = threadIdx.x; g < kGroups; g += kWmmaThreads) {
    const int rr = g / (kWmmaTile / 8);
    const int cg = (g % (kWmmaTile / 8)) * 8;
    const int64_t row = r0 + rr;
    const int64_t col = c0 + cg;
    T* dst = smem + rr * kWmmaLd + cg;
    if (vec && row < rows && col + 8 <= d) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(x + row * d + col);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = (row < rows && col + e < d) ? x[row * d + col + e] : zero_value<T>();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWmmaThreads)
    covariance_wmma_kernel(const T* __restrict__ x, double* __restrict__ master, int64_t rows, int64_t d, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int bi = blockIdx.y;
  const int bj = blockIdx.x;
  if (bi > bj) return;
  const int64_t i0 = static_cast<int64_t>(bi) * kWmmaTile;
  const int64_t j0 = static_cast<int64_t>(bj) * kWmmaTile;

  __shared__ __align__(128) T As[kWmmaRows * kWmmaLd];  // As[t][i] = x[r0 + t, i0 + i]
  __shared__ __align__(128) T Bs[kWmmaRows * kWmmaLd];  // Bs[t][j] = x[r0 + t, j0 + j]
  __shared__ __align__(128) float scratch[kWmmaThreads / 32][16 * 16];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wi = warp / 4;  // 64 rows of the tile
  const int wj = warp % 4;  // 32 cols of the tile

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc[p][q], 0.f);

  for (int64_t r0 = 0; r0 < rows; r0 += kWmmaRows) {
    stage_tile(As, x, r0, i0, rows, d, vec);
    stage_tile(Bs, x, r0, j0, rows, d, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kWmmaRows; kk += 16) {
      // (x^T)[i, t] is As[t][i]: column-major A operand; x[t, j] is Bs[t][j]: row-major B.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int p = 0; p < 4; ++p) wmma::load_matrix_sync(a[p], As + kk * kWmmaLd + wi * 64 + p * 16, kWmmaLd);
#pragma unroll
      for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(b[q], Bs + kk * kWmmaLd + wj * 32 + q * 16, kWmmaLd);
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 2; ++q) wmma::mma_sync(acc[p][q], a[p], b[q], acc[p][q]);
    }
    __syncthreads();
  }

  // Fold into the fp64 master through a per-warp 16x16 scratch tile.
  float* mine = scratch[warp];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      wmma::store_matrix_sync(mine, acc[p][q], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t i = i0 + wi * 64 + p * 16 + e / 16;
        const int64_t j = j0 + wj * 32 + q * 16 + e % 16;
        if (i < d && j < d && i <= j) master[i * d + j] += static_cast<double>(mine[e]);
      }
      __syncwarp();
    }
  }
#endif
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& master, bool tensor_cores, cudaStream_t stream) {
  const int64_t M = x.size(0);
  const int64_t d = x.size(1);
  const T* base = reinterpret_cast<const T*>(x.data_ptr());
  double* out = master.data_ptr<double>();
  const int tile = tensor_cores ? kWmmaTile : kSimtTile;
  const int64_t tiles = (d + tile - 1) / tile;
  TORCH_CHECK(tiles <= 65535, "covariance_update_: dim ", d, " is too large for one launch grid");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  for (int64_t r0 = 0; r0 < M; r0 += kRowsPerFold) {
    const int64_t rows = std::min(kRowsPerFold, M - r0);
    const T* chunk = base + r0 * d;
    if (tensor_cores) {
      if constexpr (!std::is_same_v<T, float>) {
        const bool vec = d % 8 == 0 && reinterpret_cast<std::uintptr_t>(chunk) % 16 == 0;
        covariance_wmma_kernel<T><<<grid, kWmmaThreads, 0, stream>>>(chunk, out, rows, d, vec);
      }
    } else {
      covariance_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(chunk, out, rows, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void covariance_update_cuda(const at::Tensor& master, const at::Tensor& x) {
  TORCH_CHECK(master.is_cuda(), "covariance_update_: master must be a CUDA tensor, got one on ", master.device());
  TORCH_CHECK(x.is_cuda(), "covariance_update_: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.device() == master.device(), "covariance_update_: x must be on master's device (", master.device(),
              "), got ", x.device());
  TORCH_CHECK(master.scalar_type() == at::kDouble, "covariance_update_: master must be float64, got ",
              master.scalar_type());
  TORCH_CHECK(master.dim() == 2 && master.size(0) == master.size(1),
              "covariance_update_: master must be a square [d, d] matrix, got shape ", master.sizes());
  TORCH_CHECK(master.is_contiguous(), "covariance_update_: master must be contiguous, got strides ",
              master.strides());
  TORCH_CHECK(x.dim() == 2, "covariance_update_: x must be 2-D [tokens, d], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == master.size(0), "covariance_update_: x must have width d = ", master.size(0),
              " (master's size), got ", x.size(1));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "covariance_update_: x must be bfloat16, float16 or float32, got ", dtype);
  if (x.size(0) == 0 || x.size(1) == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  const bool sm80 = major >= 8;
  if (dtype == at::kFloat) {
    launch<float>(xc, master, false, stream);
  } else if (dtype == at::kHalf) {
    launch<__half>(xc, master, sm80, stream);
  } else {
    launch<__nv_bfloat16>(xc, master, sm80, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lrcomp, CUDA, m) { m.impl("covariance_update_", &covariance_update_cuda); }

}  // namespace lrcomp
