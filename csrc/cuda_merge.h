// CUDA merge launcher: a C++ interface with no CUDA types, so the pybind11 bindings compile with
// the host compiler alone and link against the nvcc-built object and the static CUDA runtime.
#pragma once

#include <cstdint>
#include <string>

#include "merge_operands.h"

namespace mergealign {

// Enqueue out[i] = merge_one(...) for i < ops.count on `stream` (a cudaStream_t as an integer;
// 0 is the legacy default stream) of GPU `device` (made current for the launch and then put
// back; -1: the current device).  All pointers are device pointers of any alignment.  Returns
// a cudaError_t value: 0 when the launch was accepted.
int merge_cuda(const MergeOperands& ops, unsigned char* out, uintptr_t stream, int device);

// The same for any merge method's recipe; ops.first_index keys the random masks.
int merge_recipe_cuda(const MergeOperands& ops, const Recipe& recipe, unsigned char* out,
                      uintptr_t stream, int device);

// cudaMemcpyAsync of `bytes` between any two addresses (host staging registered with
// cuda_host_register, device memory) on `stream` of `device`; a cudaError_t value.
int cuda_copy_async(uintptr_t dst, uintptr_t src, int64_t bytes, uintptr_t stream, int device);

// cudaHostRegister / cudaHostUnregister of page-aligned host memory (page-locked for DMA at its
// exact size; read_only for memory mapped without write permission).
int cuda_host_register(uintptr_t address, int64_t bytes, bool read_only);
int cuda_host_unregister(uintptr_t address);

// cudaGetDeviceCount; returns a cudaError_t value (no driver or no device is not a crash).
int cuda_device_count(int* count);

// cudaGetErrorString of a cudaError_t value.
std::string cuda_error_string(int error);

// The CUDA runtime this module was built with, e.g. 13000 for 13.0.
int cuda_runtime_version();

// The GPU architectures the kernels were compiled for, e.g. "sm_80 sm_90".
std::string cuda_architectures();

}  // namespace mergealign
