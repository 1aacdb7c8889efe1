// Host check of csrc/cuda/adamw_multi_pack.h, the packing of the multi-tensor AdamW launches
// on machines without a GPU: a stand-in "launch" runs each block's chunk on the CPU the way
// adamw32_multi_kernel does, and the results must equal a plain per-element loop bit for bit,
// with every element updated exactly once. Built and run by tests/test_cuda_adamw_multi_pack.py.
// Prints "ok <launches>" and exits 0, or names the first failure and exits 1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "adamw_multi_pack.h"

namespace {

struct Param {
  std::vector<float> p, g, m, v;
  std::vector<int> visits;
  qk::AdamWScalars s;
};

int fail(const char* what, long long a, long long b) {
  std::printf("FAIL %s (%lld, %lld)\n", what, a, b);
  return 1;
}

int run_case(const std::vector<int64_t>& sizes, unsigned seed, int* launches_out) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Param> ps(sizes.size());
  std::vector<void*> pp;
  std::vector<const void*> gp;
  std::vector<float*> mp, vp;
  std::vector<qk::AdamWScalars> sp;
  for (size_t t = 0; t < sizes.size(); ++t) {
    Param& q = ps[t];
    const int64_t n = sizes[t];
    q.p.resize(n), q.g.resize(n), q.m.resize(n), q.v.resize(n), q.visits.assign(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      q.p[i] = normal(rng);
      q.g[i] = normal(rng);
      q.m[i] = 0.1f * normal(rng);
      q.v[i] = 0.01f * std::fabs(normal(rng));
    }
    q.s = qk::make_adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1 + (int64_t)(t % 7),
                                 t % 3 == 0);
    pp.push_back(q.p.data());
    gp.push_back(q.g.data());
    mp.push_back(q.m.data());
    vp.push_back(q.v.data());
    sp.push_back(q.s);
  }
  std::vector<Param> want = ps;
  for (Param& q : want)
    for (size_t i = 0; i < q.p.size(); ++i) qk::adamw_update(q.p[i], q.g[i], q.m[i], q.v[i], q.s);
  std::vector<int64_t> n(sizes);
  int launches = 0, bad = 0;
  auto launch = [&](const qk_cuda::MultiArgs& a, int nblocks) {
    ++launches;
    if (a.count < 1 || a.count > qk_cuda::kMultiTensors) return bad = fail("count", a.count, 0);
    if (a.block_start[0] != 0 || a.block_start[a.count] != nblocks)
      return bad = fail("block_start ends", a.block_start[0], a.block_start[a.count]);
    for (int b = 0; b < nblocks; ++b) {  // what block b of adamw32_multi_kernel does
      const int t = qk_cuda::multi_param_of_block(a, b);
      if (t < 0 || t >= a.count) return bad = fail("param slot", t, b);
      // the slot must name one of our params, whole: pointers, size and scalars together
      size_t k = 0;
      while (k < ps.size() && ps[k].p.data() != a.p[t]) ++k;
      if (k == ps.size()) return bad = fail("unknown param pointer in slot", t, b);
      Param& q = ps[k];
      if (a.g[t] != q.g.data() || a.m[t] != q.m.data() || a.v[t] != q.v.data() ||
          a.n[t] != (int64_t)q.p.size() || std::memcmp(&a.s[t], &q.s, sizeof(q.s)) != 0)
        return bad = fail("slot mixes two params", t, (long long)k);
      const int64_t begin = (int64_t)(b - a.block_start[t]) * qk_cuda::kMultiChunk;
      const int64_t end = std::min(begin + qk_cuda::kMultiChunk, a.n[t]);
      if (begin < 0 || begin >= a.n[t]) return bad = fail("chunk out of range", b, t);
      float* p = static_cast<float*>(a.p[t]);
      const float* g = static_cast<const float*>(a.g[t]);
      for (int64_t i = begin; i < end; ++i) {
        qk::adamw_update(p[i], g[i], a.m[t][i], a.v[t][i], a.s[t]);
        ++q.visits[i];
      }
    }
    return 0;
  };
  const int res = qk_cuda::pack_adamw32_multi((int64_t)sizes.size(), pp.data(), gp.data(),
                                              mp.data(), vp.data(), n.data(), sp.data(), launch);
  if (bad) return 1;
  if (res != 0) return fail("pack_adamw32_multi returned", res, 0);
  for (size_t t = 0; t < ps.size(); ++t) {
    for (size_t i = 0; i < ps[t].p.size(); ++i) {
      if (ps[t].visits[i] != 1)
        return fail("element updated this many times", ps[t].visits[i], (long long)i);
      const Param &got = ps[t], &ref = want[t];
      if (std::memcmp(&got.p[i], &ref.p[i], 4) || std::memcmp(&got.m[i], &ref.m[i], 4) ||
          std::memcmp(&got.v[i], &ref.v[i], 4))
        return fail("result differs from the per-element loop at param, element", (long long)t,
                    (long long)i);
    }
  }
  *launches_out = launches;
  return 0;
}

}  // namespace

int main() {
  const int64_t C = qk_cuda::kMultiChunk, T = qk_cuda::kMultiTensors;
  std::vector<std::vector<int64_t>> cases;
  cases.push_back({1, 0, C - 1, C, C + 1, 333 * 77, 0, 5});  // partial chunks, empty params
  cases.push_back({400 * C + 3, 7});                          // one large param
  std::vector<int64_t> many;
  for (int i = 0; i < 3 * T + 5; ++i) many.push_back(1 + (i * 7919) % (3 * C));
  cases.push_back(many);                                      // several launches
  std::vector<int64_t> exact(T, C);                           // one launch exactly full
  cases.push_back(exact);
  exact.insert(exact.begin() + T / 2, 0);                     // an empty param among them
  exact.push_back(2 * C + 1);                                 // and one more: a second launch
  cases.push_back(exact);
  int total = 0;
  for (size_t c = 0; c < cases.size(); ++c) {
    int launches = 0;
    if (run_case(cases[c], 1234u + (unsigned)c, &launches)) {
      std::printf("in case %zu\n", c);
      return 1;
    }
    total += launches;
  }
  // a failing launch stops the packing and its error comes back
  std::vector<int64_t> sizes(2 * T + 1, 10);
  std::vector<float> buf(10);
  std::vector<void*> pp(sizes.size(), buf.data());
  std::vector<const void*> gp(sizes.size(), buf.data());
  std::vector<float*> fp(sizes.size(), buf.data());
  std::vector<qk::AdamWScalars> sp(sizes.size(),
                                   qk::make_adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0, 1, false));
  int calls = 0;
  auto failing = [&calls](const qk_cuda::MultiArgs&, int) {
    ++calls;
    return 77;
  };
  const int res = qk_cuda::pack_adamw32_multi((int64_t)sizes.size(), pp.data(), gp.data(),
                                              fp.data(), fp.data(), sizes.data(), sp.data(),
                                              failing);
  if (res != 77 || calls != 1) return fail("launch error not returned at once", res, calls);
  std::printf("ok %d\n", total);
  return 0;
}
