// Fused one-pass merge on NVIDIA GPUs.
//
// The arithmetic is merge_math.h's, the same functions the CPU kernel runs (__host__ __device__),
// with explicit round-to-nearest intrinsics instead of contractible operators, so a GPU result is
// bit-for-bit the CPU's (NaN included: every store writes the canonical NaN).  Memory-bound:
// 3 reads + 1 write per element, so the fast path moves 16 bytes per input per thread (LDG.128)
// when every pointer is 16-byte aligned and the inputs share a dtype, for the plain formula and
// for every method's recipe alike.  Anything else (memory-mapped data is often unaligned, or
// inputs of different dtypes) takes a per-element path, with typed loads where each pointer is
// aligned to its element size and byte loads only where not.
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

__device__ __forceinline__ int64_t global_thread() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// What an element becomes: the plain formula with two weights, or any method's recipe (its
// statistics passes ran on the CPU; this is its final pass).  The recipe's kind is the same for
// every element, so merge_element's branches never diverge within a warp.
struct TaskArithmetic {
  float w_domain, w_align;
  __device__ __forceinline__ float operator()(float b, float d, float a, int64_t) const {
    return merge_one(b, d, a, w_domain, w_align);
  }
};

struct RecipeOf {
  Recipe recipe;
  int64_t first_index;  // keys the random masks: element i is element first_index + i
  __device__ __forceinline__ float operator()(float b, float d, float a, int64_t i) const {
    return merge_element(recipe, b, d, a, first_index + i);
  }
};

// All inputs of dtype kIn, every pointer 16-byte aligned: `vectors` groups of 16 input bytes.
template <int kIn, int kOut, class Op>
__global__ void __launch_bounds__(kThreads)
merge_vector_kernel(const uint4* base, const uint4* domain, const uint4* aligned,
                    unsigned char* out, int64_t vectors, Op op) {
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
      const float merged = op(load_as_f32(pb, i, kIn), load_as_f32(pd, i, kIn),
                              load_as_f32(pa, i, kIn), v * kVec + i);
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

// Element i of a buffer whose address is a multiple of its element size: one typed load.
__device__ __forceinline__ float load_typed(const unsigned char* p, int64_t i, int dtype,
                                            int cast) {
  float v;
  if (dtype == kF32) {
    v = reinterpret_cast<const float*>(p)[i];
  } else {
    const uint16_t h = reinterpret_cast<const uint16_t*>(p)[i];
    v = dtype == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  return cast_changes(dtype, cast) ? cast_input(v, cast) : v;
}

__device__ __forceinline__ void store_typed(unsigned char* p, int64_t i, int dtype, float v) {
  if (dtype == kF32) {
    reinterpret_cast<float*>(p)[i] = canonical_nan(v);
  } else {
    reinterpret_cast<uint16_t*>(p)[i] = dtype == kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
  }
}

// Any dtypes, one element per iteration.  kTyped: every pointer is aligned to its element size
// (the usual case of mixed dtypes); otherwise merge_math.h's byte-wise loads and stores.
template <bool kTyped, class Op>
__global__ void __launch_bounds__(kThreads)
merge_element_kernel(MergeOperands ops, unsigned char* out, Op op) {
  for (int64_t i = global_thread(); i < ops.count; i += grid_stride()) {
    if constexpr (kTyped) {
      const float merged = op(load_typed(ops.base, i, ops.base_dtype, ops.input_cast),
                              load_typed(ops.domain, i, ops.domain_dtype, ops.input_cast),
                              load_typed(ops.aligned, i, ops.aligned_dtype, ops.input_cast), i);
      store_typed(out, i, ops.out_dtype, merged);
    } else {
      const float merged = op(load_input(ops.base, i, ops.base_dtype, ops.input_cast),
                              load_input(ops.domain, i, ops.domain_dtype, ops.input_cast),
                              load_input(ops.aligned, i, ops.aligned_dtype, ops.input_cast), i);
      store_from_f32(out, i, ops.out_dtype, merged);
    }
  }
}

// Grid-stride loops need no more blocks than the GPU holds at once: the occupancy API says how
// many of this kernel fit on an SM (its register count decides: kernels of 39-40 registers fit
// 6 blocks of 256 threads where 8 were assumed), times the SMs.
template <class Kernel>
int blocks_for(Kernel kernel, int64_t work) {
  int device = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * std::max(1, per_sm))));
}

template <int kIn, int kOut, class Op>
void launch_vector(const MergeOperands& ops, unsigned char* out, int64_t vectors, const Op& op,
                   cudaStream_t stream) {
  auto kernel = merge_vector_kernel<kIn, kOut, Op>;
  kernel<<<blocks_for(kernel, vectors), kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(ops.base), reinterpret_cast<const uint4*>(ops.domain),
      reinterpret_cast<const uint4*>(ops.aligned), out, vectors, op);
}

template <int kIn, class Op>
void launch_vector_for_out(const MergeOperands& ops, unsigned char* out, int64_t vectors,
                           const Op& op, cudaStream_t stream) {
  switch (ops.out_dtype) {
    case kBF16: launch_vector<kIn, kBF16>(ops, out, vectors, op, stream); break;
    case kF16: launch_vector<kIn, kF16>(ops, out, vectors, op, stream); break;
    default: launch_vector<kIn, kF32>(ops, out, vectors, op, stream); break;
  }
}

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

template <class Op>
void launch_elements(const MergeOperands& ops, unsigned char* out, const Op& op,
                     cudaStream_t stream) {
  const bool typed = aligned_to(ops.base, dtype_size(ops.base_dtype)) &&
                     aligned_to(ops.domain, dtype_size(ops.domain_dtype)) &&
                     aligned_to(ops.aligned, dtype_size(ops.aligned_dtype)) &&
                     aligned_to(out, dtype_size(ops.out_dtype));
  if (typed) {
    auto kernel = merge_element_kernel<true, Op>;
    kernel<<<blocks_for(kernel, ops.count), kThreads, 0, stream>>>(ops, out, op);
  } else {
    auto kernel = merge_element_kernel<false, Op>;
    kernel<<<blocks_for(kernel, ops.count), kThreads, 0, stream>>>(ops, out, op);
  }
}

// The vector kernel over the 16-byte groups where it applies, the element kernel for the rest
// (all of it when unaligned or mixed, else the last < 16 bytes).  `shift_index` moves the op to
// the rest's first element.
template <class Op, class Shift>
int launch(const MergeOperands& ops, unsigned char* out, const Op& op, Shift shift_index,
           cudaStream_t stream) {
  cudaGetLastError();  // clear a stale error so the one returned is this launch's
  const bool same_dtype = ops.base_dtype == ops.domain_dtype &&
                          ops.base_dtype == ops.aligned_dtype &&
                          !cast_changes(ops.base_dtype, ops.input_cast);
  const bool vectorisable = same_dtype && aligned_to(ops.base, 16) && aligned_to(ops.domain, 16) &&
                            aligned_to(ops.aligned, 16) && aligned_to(out, 16);
  int64_t done = 0;
  if (vectorisable) {
    const int64_t per_vector = 16 / dtype_size(ops.base_dtype);
    const int64_t vectors = ops.count / per_vector;
    if (vectors > 0) {
      switch (ops.base_dtype) {
        case kBF16: launch_vector_for_out<kBF16>(ops, out, vectors, op, stream); break;
        case kF16: launch_vector_for_out<kF16>(ops, out, vectors, op, stream); break;
        default: launch_vector_for_out<kF32>(ops, out, vectors, op, stream); break;
      }
      done = vectors * per_vector;
    }
  }
  if (done < ops.count) {
    MergeOperands rest = ops;
    rest.base += done * dtype_size(ops.base_dtype);
    rest.domain += done * dtype_size(ops.domain_dtype);
    rest.aligned += done * dtype_size(ops.aligned_dtype);
    rest.count = ops.count - done;
    launch_elements(rest, out + done * dtype_size(ops.out_dtype), shift_index(op, done), stream);
  }
  return cudaGetLastError();
}

// Runs `work` with `device` current and puts the caller's device back: a tensor on cuda:1 while
// cuda:0 is current must be launched on cuda:1 (torch's current device is not ours: this module
// links its own static runtime).  A negative device keeps the current one.
template <class Work>
int on_device(int device, Work work) {
  int previous = -1;
  if (device >= 0) {
    const int err = cudaGetDevice(&previous);
    if (err != cudaSuccess) return err;
    if (previous != device) {
      const int set = cudaSetDevice(device);
      if (set != cudaSuccess) return set;
    }
  }
  const int result = work();
  if (device >= 0 && previous != device) cudaSetDevice(previous);
  return result;
}

}  // namespace

int merge_cuda(const MergeOperands& ops, unsigned char* out, uintptr_t stream, int device) {
  if (ops.count <= 0) return cudaSuccess;
  return on_device(device, [&] {
    return launch(ops, out, TaskArithmetic{ops.w_domain, ops.w_align},
                  [](TaskArithmetic op, int64_t) { return op; },
                  reinterpret_cast<cudaStream_t>(stream));
  });
}

int merge_recipe_cuda(const MergeOperands& ops, const Recipe& recipe, unsigned char* out,
                      uintptr_t stream, int device) {
  if (ops.count <= 0) return cudaSuccess;
  return on_device(device, [&] {
    return launch(ops, out, RecipeOf{recipe, ops.first_index},
                  [](RecipeOf op, int64_t done) {
                    op.first_index += done;
                    return op;
                  },
                  reinterpret_cast<cudaStream_t>(stream));
  });
}

int cuda_copy_async(uintptr_t dst, uintptr_t src, int64_t bytes, uintptr_t stream, int device) {
  if (bytes <= 0) return cudaSuccess;
  return on_device(device, [&] {
    return int(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                               size_t(bytes), cudaMemcpyDefault,
                               reinterpret_cast<cudaStream_t>(stream)));
  });
}

int cuda_host_register(uintptr_t address, int64_t bytes, bool read_only) {
  // Portable: pinned for every device and context, whichever device the caller has current.
  // ReadOnly: the memory may be mapped without write permission (a model file's mapping).
  const unsigned flags = cudaHostRegisterPortable | (read_only ? cudaHostRegisterReadOnly : 0u);
  return cudaHostRegister(reinterpret_cast<void*>(address), size_t(bytes), flags);
}

int cuda_host_unregister(uintptr_t address) {
  return cudaHostUnregister(reinterpret_cast<void*>(address));
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
