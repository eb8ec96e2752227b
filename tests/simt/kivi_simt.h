// kivi_simt.h — a SIMT runtime that runs the CUDA kernels of cuda/ on the CPU ("emulated on CPU").
//
// Header-only, C++20, g++ 12 or newer, CUDA headers on the include path (for cuda_fp16.h and
// cuda_bf16.h only: no CUDA driver, no GPU). tests/support/simt.py builds one shared object
// per kernel configuration from a glue file:
//
//   #include "kivi_simt.h"            // this file, first (-DKIVI_SIMT=1)
//   #include "decode_attention.cu"    // the same source nvcc and NVRTC compile
//   alignas(16) thread_local unsigned char smem[kivi_simt::kSmemCapacity];   // extern __shared__
//   const kivi_simt::Kernel kivi_simt::kivi_simt_kernel_table[] = {kivi_simt::make_kernel("kivi_decode",
//       &kivi_decode), ...};
//
// and launches kernels through kivi_simt_launch() (ctypes), with CuPy's RawKernel calling
// convention on the Python side. Modes (compile flags chosen by simt.py):
//   plain  -O2                          results, barriers, collectives, faults, time limit
//   race   -O1 -fsanitize=thread + KIVI_SIMT_RACE: shared-memory race check (simt_race.h)
//   asan   -O1 -fsanitize=address,undefined: out-of-bounds global / shared accesses, misaligned
//          vector loads; the process must preload libasan (simt.py runs it in a subprocess)
//
// Files: simt_fiber.h (context switch), simt_core.h (scheduler, barriers, collectives, cp.async,
// launch), simt_race.h (race check), simt_device.h (CUDA built-ins), ../../cuda/kivi_ptx.cuh
// (the emulated PTX: mma.sync, cp.async, %dynamic_smem_size).
#pragma once

#define KIVI_SIMT_RUNTIME 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "simt_core.h"
#include "simt_device.h"
