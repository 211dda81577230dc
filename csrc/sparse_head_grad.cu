// Sparse-head weight gradients as one tiled CUDA kernel (DESIGN §2, "Sparse-head backward").
//
// Both ops are `out = headᵀ · dense` reduced over the N tokens, where `head` is the operand whose
// features are restricted to the selected head blocks and `dense` is used whole:
//
//   head_rows_grad:  ∂W_S[b*bs + r, c]    = Σ_n grad_out[n, blocks[b] + r] · inp[n, c]
//                    ∂b_S[b*bs + r]       = Σ_n grad_out[n, blocks[b] + r]        (fused, optional)
//   head_cols_grad:  ∂W[:, S][o, b*bs + r] = Σ_n grad_out[n, o] · inp[n, blocks[b] + r]
//
// The column gradient is the transpose of `inp[:, S]ᵀ · grad_out`, so it is the same kernel storing
// its tile through swapped output strides (as the Triton kernel does).
//
// One launch covers all selected head blocks: grid = (column tiles of `dense`, row tiles of one
// head block, head blocks). A CTA owns a BM x BK output tile and streams the tokens through shared
// memory kTokens at a time; each thread accumulates a TM x TK micro-tile in registers in the
// accumulation type (fp32 for fp32/fp16/bf16, fp64 for fp64). The head blocks are read in place
// through `blocks` (no gathered copy of either operand). Both operands are read through their own
// 2-D strides, so any strided view works; an operand whose tokens are contiguous (a column-major
// view) is loaded token-fastest so the loads stay coalesced. Partial tiles (N, the head size, and
// the dense width need not be multiples of anything) are masked. Outputs are stored in the input
// dtype. No CUTLASS, no cuBLAS, no tensor cores: plain SIMT FMAs.
//
// The Python-facing checks and output allocation live in bindings.cpp; this file only launches.

// HIFI_FAST_EMULATE_KERNEL: csrc/testing/emulate_kernel.cpp includes this file into a host C++
// program that runs the kernel on CPU threads (tests/test_cuda_ext.py), so the tile logic is tested
// on machines without a GPU. It compiles only the kernel and its launch geometry, not the launcher.
#ifndef HIFI_FAST_EMULATE_KERNEL
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace hifi_fast {
namespace {

constexpr int kThreads = 256;  // threads per CTA: a 16 x 16 grid of micro-tiles in every config
constexpr int kTokens = 32;    // tokens per shared-memory step of the reduction

// Streams one operand through shared memory, kTokens tokens at a time: each call stores the
// kTokens x WIDTH tile (tokens token0.., features feature0 + j for j < WIDTH) as the accumulation
// type and moves on to the next tokens. Masked entries (past N, past `count` features, or outside
// [0, features)) read as zero, so a partial tile or a bad block index never reads out of bounds.
// Each thread keeps one pointer and steps it, so the loads cost no 64-bit index arithmetic.
template <int WIDTH, typename scalar_t, typename acc_t>
struct TileLoader {
  static_assert(kThreads % WIDTH == 0 && kThreads % kTokens == 0, "tile must split evenly over the threads");
  static constexpr int kPerThread = kTokens * WIDTH / kThreads;

  const scalar_t* ptr;   // this thread's first element of the current tile
  int64_t step;          // address step between this thread's successive elements of a tile
  int64_t advance;       // address step from one token tile to the next
  int64_t tokens_left;   // tokens from the current tile's first one to N
  int64_t j_lo, j_hi;    // valid features j of the tile: j_lo <= j < j_hi
  int n0, j0, dn, dj;    // this thread's k-th element is (n0 + k*dn, j0 + k*dj)

  __device__ __forceinline__ TileLoader(
      const scalar_t* src, int64_t n_rows, int64_t feature0, int64_t count, int64_t features,
      int64_t stride_n, int64_t stride_f) {
    const int t = static_cast<int>(threadIdx.x);
    // Consecutive threads take consecutive addresses: features fastest for a row-major operand,
    // tokens fastest for a column-major one (the +1 padding of the tiles keeps both store
    // patterns free of bank conflicts).
    if (stride_n == 1 && stride_f != 1) {
      n0 = t % kTokens; j0 = t / kTokens; dn = 0; dj = kThreads / kTokens;
    } else {
      n0 = t / WIDTH; j0 = t % WIDTH; dn = kThreads / WIDTH; dj = 0;
    }
    ptr = src + n0 * stride_n + (feature0 + j0) * stride_f;
    step = dn * stride_n + dj * stride_f;
    advance = kTokens * stride_n;
    tokens_left = n_rows;
    j_lo = -feature0;
    j_hi = count < features - feature0 ? count : features - feature0;
  }

  __device__ __forceinline__ void load(acc_t (*tile)[WIDTH + 1]) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int n = n0 + k * dn;
      const int j = j0 + k * dj;
      acc_t value = acc_t(0);
      if (n < tokens_left && j >= j_lo && j < j_hi) value = static_cast<acc_t>(ptr[k * step]);
      tile[n][j] = value;
    }
    ptr += advance;
    tokens_left -= kTokens;
  }
};

// out[blockIdx.z * block_size + r, c] = Σ_n head[n, blocks[blockIdx.z] + r] · dense[n, c] for the
// BM rows r of row tile blockIdx.y and the BK columns c of column tile blockIdx.x; with `bias`, the
// CTAs of column tile 0 also store bias[blockIdx.z * block_size + r] = Σ_n head[n, blocks[.] + r].
template <typename scalar_t, typename acc_t, int BM, int BK, int TM, int TK>
__global__ void __launch_bounds__(kThreads) head_block_grad_kernel(
    const scalar_t* __restrict__ head, const scalar_t* __restrict__ dense,
    scalar_t* __restrict__ out, scalar_t* __restrict__ bias, const int64_t* __restrict__ blocks,
    int64_t n_rows, int64_t head_features, int64_t d_dense, int64_t block_size,
    int64_t head_stride_n, int64_t head_stride_f, int64_t dense_stride_n, int64_t dense_stride_f,
    int64_t out_stride_r, int64_t out_stride_c) {
  constexpr int TY = BM / TM;  // threads along the head rows
  constexpr int TX = BK / TK;  // threads along the dense columns
  static_assert(TY * TX == kThreads, "one thread per TM x TK micro-tile");
  __shared__ acc_t head_tile[kTokens][BM + 1];
  __shared__ acc_t dense_tile[kTokens][BK + 1];

  const int tx = static_cast<int>(threadIdx.x) % TX;
  const int ty = static_cast<int>(threadIdx.x) / TX;
  const int64_t block = blockIdx.z;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * BM;  // first row of the tile in its head block
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t feature0 = blocks[block] + row0;  // the head block's features, read in place
  const int64_t rows = block_size - row0;          // valid rows of this tile (all BM if >= BM)
  const bool tile_bias = bias != nullptr && blockIdx.x == 0 && tx == 0;

  acc_t acc[TM][TK];
  acc_t bias_acc[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    bias_acc[i] = acc_t(0);
#pragma unroll
    for (int j = 0; j < TK; ++j) acc[i][j] = acc_t(0);
  }

  TileLoader<BM, scalar_t, acc_t> head_loader(
      head, n_rows, feature0, rows, head_features, head_stride_n, head_stride_f);
  TileLoader<BK, scalar_t, acc_t> dense_loader(
      dense, n_rows, col0, d_dense - col0, d_dense, dense_stride_n, dense_stride_f);
  for (int64_t token0 = 0; token0 < n_rows; token0 += kTokens) {
    head_loader.load(head_tile);
    dense_loader.load(dense_tile);
    __syncthreads();
#pragma unroll 8
    for (int n = 0; n < kTokens; ++n) {
      acc_t a[TM];
      acc_t b[TK];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = head_tile[n][ty + i * TY];
#pragma unroll
      for (int j = 0; j < TK; ++j) b[j] = dense_tile[n][tx + j * TX];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TK; ++j) acc[i][j] += a[i] * b[j];
      }
      if (tile_bias) {
#pragma unroll
        for (int i = 0; i < TM; ++i) bias_acc[i] += a[i];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = ty + i * TY;
    if (row >= rows) continue;
    const int64_t out_row = block * block_size + row0 + row;
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      const int64_t col = col0 + tx + j * TX;
      if (col < d_dense) out[out_row * out_stride_r + col * out_stride_c] = static_cast<scalar_t>(acc[i][j]);
    }
    if (tile_bias) bias[out_row] = static_cast<scalar_t>(bias_acc[i]);
  }
}

// The tile shapes, as a type (BM head rows x BK dense columns per CTA, TM x TK per thread).
template <int BM_, int BK_, int TM_, int TK_>
struct TileConfig {
  static constexpr int BM = BM_, BK = BK_, TM = TM_, TK = TK_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// Rows of a head block per CTA: the largest power of two dividing the head size, clamped to
// [16, 64] (d_h = 64/128 -> 64, 96 -> 32, 80 -> 16), so common head sizes need no masked rows.
int row_tile(int64_t block_size) {
  const int64_t pow2 = block_size & -block_size;
  return static_cast<int>(std::min<int64_t>(64, std::max<int64_t>(16, pow2)));
}

namespace {

// Calls fn(TileConfig<...>{}) with the tile shapes for `block_size`.
template <typename Fn>
void with_tile_config(int64_t block_size, Fn&& fn) {
  switch (row_tile(block_size)) {
    case 64: fn(TileConfig<64, 64, 4, 4>{}); break;
    case 32: fn(TileConfig<32, 64, 2, 4>{}); break;
    default: fn(TileConfig<16, 128, 1, 8>{}); break;
  }
}

// Whether a launch has nothing to write: no head rows, or no columns and no bias.
inline bool nothing_to_do(int64_t num_blocks, int64_t block_size, int64_t d_dense, bool with_bias) {
  return num_blocks == 0 || block_size == 0 || (d_dense == 0 && !with_bias);
}

// Grid: (column tiles of the dense operand, row tiles of one head block, head blocks). At least
// one column tile: column tile 0 also stores the bias, even when there are no columns.
template <typename Config>
dim3 launch_grid(int64_t d_dense, int64_t block_size, int64_t num_blocks) {
  return dim3(
      static_cast<unsigned>(std::max<int64_t>(1, ceil_div(d_dense, Config::BK))),
      static_cast<unsigned>(ceil_div(block_size, Config::BM)),
      static_cast<unsigned>(num_blocks));
}

}  // namespace

#ifndef HIFI_FAST_EMULATE_KERNEL

// The launcher bindings.cpp calls once its checks have passed: `out` (stored through
// out_stride_r/out_stride_c) = headᵀ · dense over the head blocks, and `bias` (if defined) the head
// blocks' token sums. `head` and `dense` are 2-D CUDA tensors of one dtype with any strides,
// `blocks` a contiguous int64 vector on their device, `out` and `bias` allocated by the caller.
void head_block_grad_cuda(
    const at::Tensor& head, const at::Tensor& dense, const at::Tensor& blocks, int64_t block_size,
    const at::Tensor& out, int64_t out_stride_r, int64_t out_stride_c, const at::Tensor& bias) {
  const int64_t n_rows = dense.size(0), d_dense = dense.size(1), num_blocks = blocks.numel();
  if (nothing_to_do(num_blocks, block_size, d_dense, bias.defined())) return;
  const c10::cuda::CUDAGuard device_guard(head.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();  // c10::cuda's current stream
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, head.scalar_type(), "hifi_fast::head_block_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16, fp64 for fp64
    with_tile_config(block_size, [&](auto config) {
      using C = decltype(config);
      head_block_grad_kernel<scalar_t, acc_t, C::BM, C::BK, C::TM, C::TK>
          <<<launch_grid<C>(d_dense, block_size, num_blocks), kThreads, 0, stream>>>(
              head.const_data_ptr<scalar_t>(), dense.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
              bias.defined() ? bias.mutable_data_ptr<scalar_t>() : nullptr, blocks.const_data_ptr<int64_t>(),
              n_rows, head.size(1), d_dense, block_size,
              head.stride(0), head.stride(1), dense.stride(0), dense.stride(1), out_stride_r, out_stride_c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

#endif  // HIFI_FAST_EMULATE_KERNEL

}  // namespace hifi_fast
