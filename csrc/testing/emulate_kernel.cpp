// Runs the CUDA kernel of ../sparse_head_grad.cu on the CPU, for tests on machines without a GPU
// (tests/test_cuda_ext.py builds this file into a shared library and calls it through ctypes).
//
// Not part of the extension (setup.py compiles csrc/*.cpp and csrc/*.cu only, not this folder).
// The kernel source is included as is, with the CUDA keywords defined away: each CTA of the launch
// grid runs as kThreads std::threads (threadIdx is thread_local, blockIdx shared), __shared__
// arrays become function statics shared by those threads, and __syncthreads is a barrier (C++17:
// the file also builds with the flags of torch versions whose extensions are C++17).
// CTAs run one after another, so the statics are never shared between CTAs. This checks the tile
// logic (indexing, masking, strides, bias, launch geometry, tile choice), in the real scalar types
// (c10::Half, c10::BFloat16) and accumulation types; not the GPU's memory model or speed.

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace {
thread_local dim3 threadIdx;
dim3 blockIdx;

// std::barrier's arrive_and_wait, in C++17.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count), waiting_(0), phase_(0) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned phase = phase_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++phase_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return phase_ != phase; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const int count_;
  int waiting_;
  unsigned phase_;
};

Barrier* cta_barrier = nullptr;
}  // namespace

inline void __syncthreads() { cta_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define HIFI_FAST_EMULATE_KERNEL 1
#include "../sparse_head_grad.cu"

namespace {

template <typename scalar_t>
void emulate(
    const void* head, const void* dense, void* out, void* bias, const int64_t* blocks, int64_t num_blocks,
    int64_t n_rows, int64_t head_features, int64_t d_dense, int64_t block_size, int64_t head_stride_n,
    int64_t head_stride_f, int64_t dense_stride_n, int64_t dense_stride_f, int64_t out_stride_r,
    int64_t out_stride_c) {
  using namespace hifi_fast;
  using acc_t = at::opmath_type<scalar_t>;
  if (nothing_to_do(num_blocks, block_size, d_dense, bias != nullptr)) return;
  with_tile_config(block_size, [&](auto config) {
    using C = decltype(config);
    const dim3 grid = launch_grid<C>(d_dense, block_size, num_blocks);
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          Barrier barrier(kThreads);
          cta_barrier = &barrier;
          std::vector<std::thread> threads;
          threads.reserve(kThreads);
          for (unsigned t = 0; t < static_cast<unsigned>(kThreads); ++t) {
            threads.emplace_back([&, t] {
              threadIdx = dim3(t);
              head_block_grad_kernel<scalar_t, acc_t, C::BM, C::BK, C::TM, C::TK>(
                  static_cast<const scalar_t*>(head), static_cast<const scalar_t*>(dense), static_cast<scalar_t*>(out),
                  static_cast<scalar_t*>(bias), blocks, n_rows, head_features, d_dense, block_size, head_stride_n,
                  head_stride_f, dense_stride_n, dense_stride_f, out_stride_r, out_stride_c);
            });
          }
          for (auto& thread : threads) thread.join();
        }
      }
    }
  });
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. Same arguments as the kernel (plus the
// number of blocks); returns the head-block row tile chosen, or -1 for an unknown dtype.
extern "C" int hifi_fast_emulate_head_block_grad(
    int dtype, const void* head, const void* dense, void* out, void* bias, const int64_t* blocks,
    int64_t num_blocks, int64_t n_rows, int64_t head_features, int64_t d_dense, int64_t block_size,
    int64_t head_stride_n, int64_t head_stride_f, int64_t dense_stride_n, int64_t dense_stride_f,
    int64_t out_stride_r, int64_t out_stride_c) {
#define HIFI_FAST_EMULATE(T)                                                                              \
  emulate<T>(head, dense, out, bias, blocks, num_blocks, n_rows, head_features, d_dense, block_size,      \
             head_stride_n, head_stride_f, dense_stride_n, dense_stride_f, out_stride_r, out_stride_c)
  switch (dtype) {
    case 0: HIFI_FAST_EMULATE(float); break;
    case 1: HIFI_FAST_EMULATE(double); break;
    case 2: HIFI_FAST_EMULATE(c10::Half); break;
    case 3: HIFI_FAST_EMULATE(c10::BFloat16); break;
    default: return -1;
  }
#undef HIFI_FAST_EMULATE
  return hifi_fast::row_tile(block_size);
}
