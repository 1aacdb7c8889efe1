// CUDA unified (managed) memory for paged optimizer state: allocation as a torch tensor with
// a cudaFree deleter, prefetch, and queries. Registered for every device key
// (CompositeExplicitAutograd) so CPU tensors get "not managed" / no-op. CUDA builds only;
// CPU-only builds use the reference in qlora_kernels/backends/reference/adamw.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>

#include <cuda_runtime_api.h>

namespace qk_cuda {
namespace {

// ------------------------------------------------------------------ CUDA runtime queries
// Device support (cudaDevAttrManagedMemory), concurrent managed access (needed for
// prefetching), whether ptr is managed, and a prefetch to `device` (-1: host).
bool managed_memory_supported(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    return false;
  }
  int managed = 0;
  if (cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return managed != 0;
}

bool concurrent_managed_access(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrConcurrentManagedAccess, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return v != 0;
}

bool pointer_is_managed(const void* ptr) {
  cudaPointerAttributes attr;
  if (ptr == nullptr || cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeManaged;
}

cudaError_t prefetch_managed(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation loc;
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
  return cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

}  // namespace
}  // namespace qk_cuda

namespace qlora_kernels::cuda {
namespace {

// Bytes of managed memory handed out and not yet freed: states pushed to the host free
// device memory, so free GPU memory alone would let us allocate more than the card holds.
std::atomic<int64_t> g_managed_bytes{0};

// MemAvailable from /proc/meminfo (what the kernel can give without swapping).
int64_t host_available_bytes() {
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    long long kb = -1;
    while (std::fgets(line, sizeof(line), f)) {
      if (std::sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    }
    std::fclose(f);
    if (kb >= 0) return (int64_t)kb * 1024;
  }
  return (int64_t)sysconf(_SC_AVPHYS_PAGES) * (int64_t)sysconf(_SC_PAGESIZE);
}

// Paged state needs both managed memory and concurrent managed access: without the latter
// (Windows/WSL, some Jetsons) the driver neither pages on demand nor allows prefetching, so
// the state would stay where it was first touched; the optimizer then uses ordinary memory
// and says so (qlora_kernels/optim/paged.py: fallback_reason).
bool managed_supported(int64_t device) {
  return qk_cuda::managed_memory_supported((int)device) &&
         qk_cuda::concurrent_managed_access((int)device);
}

at::Tensor managed_empty(at::IntArrayRef size, at::ScalarType dtype, int64_t device) {
  TORCH_CHECK(managed_supported(device), "managed_empty: cuda:", device,
              " does not support CUDA managed memory");
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCUDA, (int)device);
  int64_t numel = 1;
  for (int64_t s : size) {
    TORCH_CHECK(s >= 0, "managed_empty: negative size ", s);
    numel *= s;
  }
  if (numel == 0) return at::empty(size, options);
  const int64_t nbytes = numel * (int64_t)c10::elementSize(dtype);
  const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
  size_t free_b = 0, total_b = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const int64_t host_b = host_available_bytes();
  const int64_t in_use = g_managed_bytes.load();
  // Never oversubscribe: on some machines a GPU whose managed memory exceeds its capacity
  // hangs, not only the process. So the new state must fit in free device memory now, all
  // managed state together must fit the card (states paged out come back for their update),
  // and the host must be able to take it when it is paged out.
  TORCH_CHECK(nbytes <= (int64_t)free_b && nbytes + in_use <= (int64_t)total_b &&
                  nbytes <= host_b,
              "managed_empty: refusing to allocate ", nbytes, " bytes of managed memory (paged "
              "optimizer state): cuda:", device, " has ", (int64_t)free_b, " of ",
              (int64_t)total_b, " bytes free, ", in_use, " bytes of managed memory are already "
              "allocated, and the host has ", host_b, " bytes available; paged state is never "
              "allowed to oversubscribe the GPU. Use fewer trainable parameters, 8-bit "
              "optimizer state (PagedAdamW8bit), or free GPU memory.");
  void* ptr = nullptr;
  const cudaError_t err = cudaMallocManaged(&ptr, (size_t)nbytes, cudaMemAttachGlobal);
  if (err != cudaSuccess) {
    cudaGetLastError();
    TORCH_CHECK(false, "managed_empty: cudaMallocManaged(", nbytes, " bytes) on cuda:", device,
                " failed: ", cudaGetErrorString(err));
  }
  g_managed_bytes += nbytes;
  // The tensor may die while another device is current (or in a thread that never set
  // one): free it with its own device current, then restore the caller's. No throwing in
  // a deleter, hence the runtime calls rather than a c10 guard.
  const int owner = (int)device;
  auto deleter = [nbytes, owner](void* p) {
    int prev = -1;
    const bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != owner &&
                          cudaSetDevice(owner) == cudaSuccess;
    cudaFree(p);
    if (switched) cudaSetDevice(prev);
    cudaGetLastError();  // a failed free must not surface in an unrelated later launch
    g_managed_bytes -= nbytes;
  };
  return at::for_blob(ptr, size).options(options).deleter(deleter).make_tensor();
}

// A list in one call: the optimizer prefetches two states per param each step, and a
// LoRA model has hundreds of params (one Python-to-C++ call each would cost more).
void managed_prefetch_(at::TensorList tensors, int64_t device) {
  const int target = (int)device;
  int checked_device = -2, concurrent = 0;
  for (const at::Tensor& t : tensors) {
    if (!t.is_cuda() || t.numel() == 0) continue;
    const void* ptr = t.data_ptr();
    if (!qk_cuda::pointer_is_managed(ptr)) continue;
    const int on = target >= 0 ? target : t.device().index();
    // Prefetching needs concurrent managed access (not on Windows/WSL or pre-Pascal GPUs);
    // without it the driver migrates pages on demand and we leave it to do so.
    if (on != checked_device) {
      checked_device = on;
      concurrent = qk_cuda::concurrent_managed_access(on);
    }
    if (!concurrent) continue;
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)on);
    const cudaError_t err = qk_cuda::prefetch_managed(ptr, t.nbytes(), target,
                                                      c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "managed_prefetch_: cudaMemPrefetchAsync failed: ",
                cudaGetErrorString(err));
  }
}

bool is_managed(const at::Tensor& t) {
  return t.is_cuda() && t.numel() > 0 && qk_cuda::pointer_is_managed(t.data_ptr());
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CompositeExplicitAutograd, m) {
  m.impl("managed_supported", &managed_supported);
  m.impl("managed_empty", &managed_empty);
  m.impl("managed_prefetch_", &managed_prefetch_);
  m.impl("is_managed", &is_managed);
}

}  // namespace qlora_kernels::cuda
