// cuda_emu.cpp — the runtime of the host CUDA emulation (see cuda_emu.h for the model).
//
// One fiber per CUDA thread of the running block. A fiber runs until it reaches a
// synchronisation call, where it records what it waits for and jumps back to the scheduler.
// When no fiber can run, the scheduler resolves what is complete (a warp's shuffle, then a
// block barrier) or reports a deadlock. Fibers start through ucontext once and then switch
// with _setjmp/_longjmp, which do not save the signal mask (no system call per switch):
// build with _FORTIFY_SOURCE off, whose longjmp check rejects a jump to another stack.
#include "cuda_emu.h"

#include <setjmp.h>
#include <stdlib.h>
#include <ucontext.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// Bounds of the static __shared__ storage (the linker defines them for the section).
extern "C" char __start_qk_emu_shared[] __attribute__((weak));
extern "C" char __stop_qk_emu_shared[] __attribute__((weak));

namespace qk_emu {
namespace {

constexpr int kThreads = 256;
constexpr size_t kStackBytes = 256 * 1024;
constexpr uint32_t kPoison = 0x7FBADBADu;  // a NaN as float, nonsense as an integer
constexpr size_t kGuardBytes = 64;         // canary after the dynamic shared memory
constexpr int kStaticSmemLimit = 48 * 1024;  // static + dynamic without opting in

enum State { kRunnable, kAtBarrier, kAtShuffle, kDone };

struct Fiber {
  jmp_buf ctx;
  ucontext_t uc;
  char* stack = nullptr;
  bool started = false;
  State state = kDone;
  unsigned tid = 0;
  unsigned mask = 0;  // shuffle: mask, lane mask, width, value in; result out
  int lane_mask = 0, width = 32;
  uint32_t value = 0, result = 0;
  int predicate = 0;  // barrier: predicate in, OR of the block out
};

Fiber g_fibers[kThreads];
Fiber* g_current = nullptr;
jmp_buf g_scheduler;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;

struct Config {
  int sm = 90;
  std::mt19937_64 rng{0};
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
  std::map<const void*, int> static_smem;       // register_static_smem (kept by configure)
  std::vector<unsigned char> dynamic_smem;
  size_t dynamic_bytes = 0;
  cudaError_t last = cudaSuccess;
  std::string error;  // message of the last failed launch
  std::string log;    // one line per launch
} g;

int optin_smem(int sm) {  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  switch (sm) {
    case 80: case 87: return 163 * 1024;
    case 86: case 89: case 120: return 99 * 1024;
    case 90: case 100: return 227 * 1024;
    case 75: return 64 * 1024;
  }
  return 48 * 1024;
}

void fail(cudaError_t err, const std::string& msg) {
  if (g.last == cudaSuccess) {
    g.last = err;
    g.error = msg;
  }
}

void fiber_main() {
  for (;;) {  // one kernel body per resume-from-idle; kept for the next block or launch
    Fiber* self = g_current;
    g_body(g_body_ctx);
    self->state = kDone;
    if (!_setjmp(self->ctx)) _longjmp(g_scheduler, 1);
  }
}

void yield_to_scheduler(Fiber* f) {
  if (!_setjmp(f->ctx)) _longjmp(g_scheduler, 1);
}

void resume(Fiber* f) {
  g_current = f;
  threadIdx = uint3{f->tid, 0, 0};
  if (_setjmp(g_scheduler)) return;  // the fiber yielded
  if (f->started) _longjmp(f->ctx, 1);
  f->started = true;
  if (f->stack == nullptr) f->stack = static_cast<char*>(malloc(kStackBytes));
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = kStackBytes;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_main, 0);
  setcontext(&f->uc);
}

void poison(void* begin, size_t bytes) {
  unsigned char* p = static_cast<unsigned char*>(begin);
  for (size_t i = 0; i < bytes; ++i) p[i] = (unsigned char)(kPoison >> (8 * (i % 4)));
}

std::string describe(const char* what, unsigned tid) {
  return std::string(what) + " (block " + std::to_string(blockIdx.x) + "," +
         std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ", thread " +
         std::to_string(tid) + ")";
}

// Completes the shuffles of warps whose named lanes all wait at one; true if any did.
bool resolve_shuffles(std::string& err) {
  bool progressed = false;
  for (int w = 0; w < kThreads / 32; ++w) {
    Fiber* lanes = g_fibers + 32 * w;
    for (int l = 0; l < 32; ++l) {
      Fiber& f = lanes[l];
      if (f.state != kAtShuffle) continue;
      const unsigned mask = f.mask;
      if (!(mask >> l & 1u)) {
        err = describe("__shfl_xor_sync: the calling lane is not in its mask", f.tid);
        return false;
      }
      bool complete = true;
      for (int j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        if (lanes[j].state != kAtShuffle) complete = false;
        else if (lanes[j].mask != mask || lanes[j].width != f.width)
          err = describe("__shfl_xor_sync: lanes of one exchange pass different masks/widths",
                         lanes[j].tid);
      }
      if (!err.empty()) return false;
      if (!complete) continue;
      for (int j = 0; j < 32; ++j) {  // phase 2: every value was deposited; now read
        if (!(mask >> j & 1u)) continue;
        const int width = lanes[j].width;
        int src = j ^ lanes[j].lane_mask;
        if (src >= 32 || src / width != j / width) src = j;  // outside the segment: own value
        if (!(mask >> src & 1u)) {
          err = describe("__shfl_xor_sync: source lane is not in the mask", lanes[j].tid);
          return false;
        }
        lanes[j].result = lanes[src].value;
      }
      for (int j = 0; j < 32; ++j)
        if (mask >> j & 1u) lanes[j].state = kRunnable;
      progressed = true;
    }
  }
  return progressed;
}

// Runs one CUDA block to completion; false (with g.error set) on a deadlock or misuse.
bool run_block() {
  char *begin = __start_qk_emu_shared, *end = __stop_qk_emu_shared;
  if (begin != nullptr && end > begin) poison(begin, (size_t)(end - begin));
  poison(g.dynamic_smem.data(), g.dynamic_smem.size());
  for (int t = 0; t < kThreads; ++t) {
    g_fibers[t].tid = (unsigned)t;
    g_fibers[t].state = kRunnable;
  }
  std::vector<Fiber*> order;
  order.reserve(kThreads);
  for (;;) {
    order.clear();
    for (Fiber& f : g_fibers)
      if (f.state == kRunnable) order.push_back(&f);
    if (!order.empty()) {
      std::shuffle(order.begin(), order.end(), g.rng);
      for (Fiber* f : order) resume(f);
      continue;
    }
    std::string err;
    if (resolve_shuffles(err)) continue;
    int done = 0, at_barrier = 0, at_shuffle = 0, pred = 0;
    for (Fiber& f : g_fibers) {
      done += f.state == kDone;
      at_barrier += f.state == kAtBarrier;
      at_shuffle += f.state == kAtShuffle;
      if (f.state == kAtBarrier) pred |= f.predicate;
    }
    if (err.empty() && done == kThreads) break;
    if (err.empty() && at_barrier == kThreads) {
      for (Fiber& f : g_fibers) {
        f.predicate = pred;
        f.state = kRunnable;
      }
      continue;
    }
    if (err.empty())
      err = "deadlock in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
            "," + std::to_string(blockIdx.z) + "): " + std::to_string(at_barrier) +
            " threads at __syncthreads, " + std::to_string(at_shuffle) +
            " at __shfl_xor_sync waiting for lanes, " + std::to_string(done) + " exited";
    fail(cudaErrorLaunchFailure, err);
    for (Fiber& f : g_fibers) f.started = false;  // abandon the suspended bodies
    return false;
  }
  for (size_t i = g.dynamic_bytes; i < g.dynamic_smem.size(); ++i)
    if (g.dynamic_smem[i] != (unsigned char)(kPoison >> (8 * (i % 4)))) {
      fail(cudaErrorLaunchFailure, "write past the end of the dynamic shared memory");
      return false;
    }
  return true;
}

}  // namespace

int static_smem_of(const void* kernel) {
  const auto it = g.static_smem.find(kernel);
  return it != g.static_smem.end() ? it->second : 0;
}

void register_static_smem(const void* kernel, int bytes) { g.static_smem[kernel] = bytes; }

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes + static_smem_of(kernel) > optin_smem(g.sm)) return cudaErrorInvalidValue;
  g.max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

void* dynamic_shared() { return g.dynamic_smem.data(); }

cudaError_t launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem,
                   void (*body)(void*), void* ctx) {
  g.log += std::string(name) + " grid=" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
           "," + std::to_string(grid.z) + " block=" + std::to_string(block.x) + " smem=" +
           std::to_string(smem) + "\n";
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration,
         std::string("invalid launch configuration of ") + name + " (grid " +
             std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
             std::to_string(grid.z) + ", block " + std::to_string(threads) + ")");
    return g.last;
  }
  if (block.x != kThreads || block.y != 1 || block.z != 1) {
    fail(cudaErrorInvalidValue, std::string("the emulation runs 256-thread blocks only: ") + name);
    return g.last;
  }
  // The driver's rule: dynamic up to the function's attribute (by default what the 48 KiB
  // leave beside the static arrays), static + dynamic within the arch's opt-in limit.
  const int64_t stat = static_smem_of(kernel);
  const auto attr = g.max_dynamic_smem.find(kernel);
  const int64_t allowed =
      attr != g.max_dynamic_smem.end() ? attr->second : kStaticSmemLimit - stat;
  if ((int64_t)smem > allowed || (int64_t)smem + stat > optin_smem(g.sm)) {
    fail(cudaErrorInvalidValue, std::string(name) + ": " + std::to_string(smem) +
                                    " bytes of dynamic shared memory beside " +
                                    std::to_string(stat) + " static, the function allows " +
                                    std::to_string(allowed) + " on sm_" + std::to_string(g.sm));
    return g.last;
  }
  g.dynamic_bytes = smem;
  g.dynamic_smem.assign(smem + kGuardBytes, 0);
  g_body = body;
  g_body_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (!run_block()) return g.last;
      }
  return cudaSuccess;
}

namespace {
Fiber* wait_here(State s) {
  Fiber* f = g_current;
  f->state = s;
  yield_to_scheduler(f);
  return f;
}
uint32_t exchange(unsigned mask, uint32_t v, int lane_mask, int width) {
  Fiber* f = g_current;
  f->mask = mask;
  f->value = v;
  f->lane_mask = lane_mask;
  f->width = width;
  return wait_here(kAtShuffle)->result;
}
}  // namespace

void configure(int sm, uint64_t seed) {
  g.sm = sm;
  g.rng.seed(seed);
  g.max_dynamic_smem.clear();
}
const char* last_error_message() { return g.error.c_str(); }
const char* launch_log() { return g.log.c_str(); }
void clear_log() {
  g.log.clear();
  g.error.clear();
  g.last = cudaSuccess;
}

}  // namespace qk_emu

void __syncthreads() { qk_emu::wait_here(qk_emu::kAtBarrier); }

int __syncthreads_or(int predicate) {
  qk_emu::g_current->predicate = predicate != 0;
  return qk_emu::wait_here(qk_emu::kAtBarrier)->predicate;
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width) {
  return __uint_as_float(qk_emu::exchange(mask, __float_as_uint(v), lane_mask, width));
}

int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width) {
  return (int)qk_emu::exchange(mask, (uint32_t)v, lane_mask, width);
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = qk_emu::g.last;
  qk_emu::g.last = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = qk_emu::optin_smem(qk_emu::g.sm); break;
    case cudaDevAttrManagedMemory: *value = 0; break;  // the emulation has no unified memory
    case cudaDevAttrConcurrentManagedAccess: *value = 0; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void*) {
  attr->type = cudaMemoryTypeUnregistered;
  attr->device = -1;
  return cudaSuccess;
}

cudaError_t cudaMemPrefetchAsync(const void*, size_t, cudaMemLocation, unsigned, cudaStream_t) {
  return cudaErrorInvalidValue;
}
