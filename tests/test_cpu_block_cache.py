"""The CPU block cache (csrc/cpu/block_cache_cpu.cpp, memory.cpu_block_cache): large
blocks reused by size class, small ones left to torch's allocator, values intact under
churn, across threads and a fork, everything mapped within the peak in use, off passes
every allocation to the previous allocator, raw pointers of the previous allocator freed
through it, and prepare_model's "auto" turns it on for CPU models."""
import subprocess
import sys
import threading

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.EXTENSION_LOADED,
                                reason="the block cache is part of the compiled extension")
MIB = 1 << 20


@pytest.fixture
def cache():
    was_on = qk.cpu_block_cache_stats()["enabled"]
    qk.cpu_block_cache(True)
    yield qk.cpu_block_cache_stats
    qk.cpu_block_cache(was_on)


def test_a_freed_block_serves_the_next_allocation_of_its_size(cache):
    t = torch.empty(3 * MIB, dtype=torch.uint8)
    ptr = t.data_ptr()
    del t
    before = cache()
    u = torch.empty(3 * MIB - 1000, dtype=torch.uint8)  # the same size class
    after = cache()
    assert u.data_ptr() == ptr
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    u.fill_(7)
    assert int(u.sum()) == 7 * u.numel()


def test_small_allocations_stay_with_torch(cache):
    before = cache()["in_use_bytes"]
    t = torch.empty(MIB - 1, dtype=torch.uint8)
    assert cache()["in_use_bytes"] == before
    del t


def test_values_survive_churn_and_mapped_stays_within_the_peak(cache, rng):
    live = []
    for i in range(300):
        if live and (torch.rand(1, generator=rng).item() < 0.45 or len(live) > 12):
            t, want = live.pop(int(torch.randint(len(live), (1,), generator=rng)))
            assert torch.equal(t, want.expand_as(t)), i
        n = int(torch.randint(MIB // 4, 3 * MIB, (1,), generator=rng))  # 1-12 MiB of float32
        t = torch.full((n,), float(i), dtype=torch.float32)
        live.append((t, torch.tensor([float(i)])))
        s = cache()
        assert s["in_use_bytes"] + s["cached_bytes"] <= s["peak_in_use_bytes"]
    for t, want in live:
        assert torch.equal(t, want.expand_as(t))


def test_threads_allocate_and_free_concurrently(cache):
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(100):
            x = torch.randn(600_000, generator=g)  # 2.3 MiB
            y = x * 2
            if not torch.equal(y / 2, x):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_off_passes_allocations_on_and_unmaps_the_cache(cache):
    kept = torch.full((MIB,), 3.0)  # 4 MiB from the cache, alive across the switch
    freed = torch.empty(2 * MIB)
    del freed
    assert cache()["cached_bytes"] >= 8 * MIB
    qk.cpu_block_cache(False)
    s = cache()
    assert not s["enabled"] and s["cached_bytes"] == 0
    in_use = s["in_use_bytes"]
    other = torch.empty(4 * MIB)  # from the previous allocator now
    assert cache()["in_use_bytes"] == in_use
    assert torch.equal(kept, torch.full((MIB,), 3.0))
    del kept, other
    assert cache()["in_use_bytes"] == in_use - 4 * MIB and cache()["cached_bytes"] == 0


def test_prepare_model_turns_it_on_for_cpu_models():
    was_on = qk.cpu_block_cache_stats()["enabled"]
    try:
        qk.cpu_block_cache(False)
        m = torch.nn.Sequential(torch.nn.Linear(64, 64))
        qk.prepare_model(m, r=4, verbose=False, cpu_block_cache=False)
        assert not qk.cpu_block_cache_stats()["enabled"]
        qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), r=4, verbose=False)
        assert qk.cpu_block_cache_stats()["enabled"]
        with pytest.raises(ValueError, match="cpu_block_cache must be True, False or 'auto'"):
            qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), verbose=False,
                             cpu_block_cache="yes")
    finally:
        qk.cpu_block_cache(was_on)


def _child_allocates():
    t = torch.empty(3 * MIB)  # the cache's lock, taken in a forked child
    del t


def test_a_child_forked_while_threads_allocate_can_allocate(cache):
    import multiprocessing

    stop = threading.Event()

    def churn():
        while not stop.is_set():
            torch.empty(2 * MIB)

    th = threading.Thread(target=churn)
    th.start()
    try:
        ctx = multiprocessing.get_context("fork")
        for _ in range(5):
            p = ctx.Process(target=_child_allocates)
            p.start()
            p.join(60)
            if p.exitcode is None:
                p.kill()
            assert p.exitcode == 0
    finally:
        stop.set()
        th.join()


def test_buffers_allocated_before_it_are_freed_after_it():
    # oneDNN allocates its buffers with the installed allocator's raw_allocate and frees
    # them with the one installed at the time: a bf16 GEMM before the cache is turned on
    # and after, in a fresh process (this crashed once: "a block it did not give out")
    code = (
        "import torch, qlora_kernels as qk\n"
        "a = torch.randn(300, 700).bfloat16(); b = torch.randn(700, 500).bfloat16()\n"
        "want = (a @ b).float()\n"
        "qk.cpu_block_cache(True)\n"
        "for _ in range(3):\n"
        "    big = torch.randn(1000, 1000).bfloat16()\n"
        "    assert torch.equal((a @ b).float(), want), 'bf16 GEMM changed'\n"
        "    del big\n"
        "qk.cpu_block_cache(False)\n"
        "assert torch.equal((a @ b).float(), want)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
