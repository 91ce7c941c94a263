// Fused one-pass merge on NVIDIA GPUs.
//
// The arithmetic is merge_math.h's, the same functions the CPU kernel runs (__host__ __device__),
// with explicit round-to-nearest intrinsics instead of contractible operators, so a GPU result is
// bit-for-bit the CPU's.  Memory-bound: 3 reads + 1 write per element, so the fast path moves
// 16 bytes per input per thread (LDG.128) when every pointer is 16-byte aligned; anything else
// (memory-mapped data is often unaligned, or inputs of different dtypes) takes a per-element path.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_merge.h"
#include "merge_math.h"

#ifndef MA_CUDA_ARCH_LIST
#define MA_CUDA_ARCH_LIST "unknown"
#endif

namespace mergealign {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: 8 blocks of 256 threads per SM are 2048 resident threads, the most an SM
// holds (sm_80 and sm_90); more blocks would only queue behind them.
constexpr int kBlocksPerSm = 8;

__device__ __forceinline__ int64_t global_thread() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// All inputs of dtype kIn, 16-byte aligned; processes `vectors` groups of 16 input bytes.
template <int kIn, int kOut>
__global__ void __launch_bounds__(kThreads)
merge_vector_kernel(const uint4* base, const uint4* domain, const uint4* aligned,
                    unsigned char* out, int64_t vectors, float w_domain, float w_align) {
  constexpr int kVec = 16 / (kIn == kF32 ? 4 : 2);   // elements per 16-byte load
  constexpr int kOutBytes = kVec * (kOut == kF32 ? 4 : 2);  // 8, 16 or 32
  for (int64_t v = global_thread(); v < vectors; v += grid_stride()) {
    const uint4 rb = base[v], rd = domain[v], ra = aligned[v];
    const auto* pb = reinterpret_cast<const unsigned char*>(&rb);
    const auto* pd = reinterpret_cast<const unsigned char*>(&rd);
    const auto* pa = reinterpret_cast<const unsigned char*>(&ra);
    alignas(16) unsigned char result[kOutBytes];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float merged = merge_one(load_as_f32(pb, i, kIn), load_as_f32(pd, i, kIn),
                                     load_as_f32(pa, i, kIn), w_domain, w_align);
      store_from_f32(result, i, kOut, merged);
    }
    unsigned char* dst = out + v * kOutBytes;
    if constexpr (kOutBytes == 8) {
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(result);
    } else {
#pragma unroll
      for (int k = 0; k < kOutBytes / 16; ++k) {
        reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(result)[k];
      }
    }
  }
}

// Any dtypes, any alignment: one element per iteration, byte-wise loads where needed.
__global__ void __launch_bounds__(kThreads)
merge_element_kernel(MergeOperands ops, unsigned char* out) {
  for (int64_t i = global_thread(); i < ops.count; i += grid_stride()) {
    const float merged = merge_one(load_input(ops.base, i, ops.base_dtype, ops.input_cast),
                                   load_input(ops.domain, i, ops.domain_dtype, ops.input_cast),
                                   load_input(ops.aligned, i, ops.aligned_dtype, ops.input_cast),
                                   ops.w_domain, ops.w_align);
    store_from_f32(out, i, ops.out_dtype, merged);
  }
}

// Any method's recipe (merge_operands.h), one element per iteration.  A method's statistics
// passes run on the CPU before this; this is its final pass, bound by memory like the plain
// merge.  The kind is the same for every element, so the branch never diverges.
__global__ void __launch_bounds__(kThreads)
merge_recipe_kernel(MergeOperands ops, Recipe r, unsigned char* out) {
  for (int64_t i = global_thread(); i < ops.count; i += grid_stride()) {
    const float b = load_input(ops.base, i, ops.base_dtype, ops.input_cast);
    const float d = load_input(ops.domain, i, ops.domain_dtype, ops.input_cast);
    const float a = load_input(ops.aligned, i, ops.aligned_dtype, ops.input_cast);
    store_from_f32(out, i, ops.out_dtype, merge_element(r, b, d, a, ops.first_index + i));
  }
}

int blocks_for(int64_t work) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * kBlocksPerSm)));
}

template <int kIn, int kOut>
void launch_vector(const MergeOperands& ops, unsigned char* out, int64_t vectors,
                   cudaStream_t stream) {
  merge_vector_kernel<kIn, kOut><<<blocks_for(vectors), kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(ops.base), reinterpret_cast<const uint4*>(ops.domain),
      reinterpret_cast<const uint4*>(ops.aligned), out, vectors, ops.w_domain, ops.w_align);
}

template <int kIn>
void launch_vector_for_out(const MergeOperands& ops, unsigned char* out, int64_t vectors,
                           cudaStream_t stream) {
  switch (ops.out_dtype) {
    case kBF16: launch_vector<kIn, kBF16>(ops, out, vectors, stream); break;
    case kF16: launch_vector<kIn, kF16>(ops, out, vectors, stream); break;
    default: launch_vector<kIn, kF32>(ops, out, vectors, stream); break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int merge_cuda(const MergeOperands& ops, unsigned char* out, uintptr_t stream_handle) {
  if (ops.count <= 0) return cudaSuccess;
  cudaGetLastError();  // clear a stale error so the one returned is this launch's
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const bool same_dtype = ops.base_dtype == ops.domain_dtype &&
                          ops.base_dtype == ops.aligned_dtype &&
                          !cast_changes(ops.base_dtype, ops.input_cast);
  const bool vectorisable = same_dtype && aligned16(ops.base) && aligned16(ops.domain) &&
                            aligned16(ops.aligned) && aligned16(out);
  int64_t done = 0;
  if (vectorisable) {
    const int64_t per_vector = 16 / dtype_size(ops.base_dtype);
    const int64_t vectors = ops.count / per_vector;
    if (vectors > 0) {
      switch (ops.base_dtype) {
        case kBF16: launch_vector_for_out<kBF16>(ops, out, vectors, stream); break;
        case kF16: launch_vector_for_out<kF16>(ops, out, vectors, stream); break;
        default: launch_vector_for_out<kF32>(ops, out, vectors, stream); break;
      }
      done = vectors * per_vector;
    }
  }
  if (done < ops.count) {  // the unaligned or mixed case, or the last < 16 bytes
    MergeOperands rest = ops;
    rest.base += done * dtype_size(ops.base_dtype);
    rest.domain += done * dtype_size(ops.domain_dtype);
    rest.aligned += done * dtype_size(ops.aligned_dtype);
    rest.count = ops.count - done;
    merge_element_kernel<<<blocks_for(rest.count), kThreads, 0, stream>>>(
        rest, out + done * dtype_size(ops.out_dtype));
  }
  return cudaGetLastError();
}

int merge_recipe_cuda(const MergeOperands& ops, const Recipe& recipe, unsigned char* out,
                      uintptr_t stream_handle) {
  if (ops.count <= 0) return cudaSuccess;
  cudaGetLastError();  // clear a stale error so the one returned is this launch's
  merge_recipe_kernel<<<blocks_for(ops.count), kThreads, 0,
                        reinterpret_cast<cudaStream_t>(stream_handle)>>>(ops, recipe, out);
  return cudaGetLastError();
}

int cuda_device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

std::string cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

std::string cuda_architectures() { return MA_CUDA_ARCH_LIST; }

}  // namespace mergealign
