// The emulation runtime behind emu.hpp: one OS thread per CUDA thread, blocks in turn.
#include "emu.hpp"

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace cad_emu {

thread_local ThreadState t;

/// One warp's rendezvous: a barrier over its live lanes and one exchange slot per lane.
struct Warp {
  explicit Warp(unsigned lanes) : bar(lanes) {}
  std::barrier<> bar;
  uint64_t slot[32] = {};
  unsigned char gather[32][32] = {};
  bool exited[32] = {};
};

/// What the threads of the block being run share.
struct Block {
  Block(unsigned threads, unsigned shared_bytes)
      : bar(threads), smem(shared_bytes + 16), shared_bytes(shared_bytes) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      unsigned lanes = std::min(32u, threads - w * 32);
      warps.push_back(std::make_unique<Warp>(lanes));
    }
    // Uninitialised shared memory reads as NaN-ish garbage, not zeros, so kernels that forget
    // to initialise it fail their tests.
    std::fill(smem.begin(), smem.end(), static_cast<unsigned char>(0xff));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
  unsigned shared_bytes;
};

void sync_block() { t.block->bar.arrive_and_wait(); }

void require_aligned(const void* p, std::size_t align, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "cad_emu: misaligned %s at %p (needs %zu-byte alignment on a GPU)\n", what, p,
                 align);
    std::abort();
  }
}

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "cad_emu: %s\n", what);
    std::abort();
  }
}

unsigned lane_id() { return t.linear % 32; }

static Warp& my_warp() { return *t.block->warps[t.linear / 32]; }

void sync_warp() { my_warp().bar.arrive_and_wait(); }

uint64_t warp_exchange(uint64_t mine, unsigned src) {
  Warp& w = my_warp();
  w.slot[lane_id()] = mine;
  w.bar.arrive_and_wait();
  uint64_t got = w.slot[src % 32];
  w.bar.arrive_and_wait();
  return got;
}

void warp_all_gather(const void* mine, unsigned bytes, void* all) {
  if (bytes > 32) {
    std::fprintf(stderr, "cad_emu: warp_all_gather of %u bytes per lane (at most 32)\n", bytes);
    std::abort();
  }
  Warp& w = my_warp();
  std::memcpy(w.gather[lane_id()], mine, bytes);
  w.bar.arrive_and_wait();
  auto* out = static_cast<unsigned char*>(all);
  for (unsigned i = 0; i < 32; ++i) std::memcpy(out + i * bytes, w.gather[i], bytes);
  w.bar.arrive_and_wait();
}

unsigned warp_ballot(bool pred) {
  Warp& w = my_warp();
  w.slot[lane_id()] = pred ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned bits = 0;
  unsigned first = (t.linear / 32) * 32;
  unsigned lanes = std::min(32u, t.block_dim.x * t.block_dim.y * t.block_dim.z - first);
  for (unsigned i = 0; i < lanes; ++i) {
    if (!w.exited[i] && w.slot[i]) bits |= 1u << i;
  }
  w.bar.arrive_and_wait();
  return bits;
}

unsigned char* dynamic_smem() {
  // 16-byte aligned start, as CUDA guarantees for dynamic shared memory.
  auto addr = reinterpret_cast<uintptr_t>(t.block->smem.data());
  return reinterpret_cast<unsigned char*>((addr + 15) & ~uintptr_t(15));
}

unsigned char* dynamic_smem_at_least(std::size_t bytes) {
  if (t.block->shared_bytes < bytes) {
    std::fprintf(stderr,
                 "cad_emu: the kernel needs %zu bytes of dynamic shared memory, the launch gave %u\n",
                 bytes, t.block->shared_bytes);
    std::abort();
  }
  return dynamic_smem();
}

static std::mutex launch_mutex;

void launch(const CadEmuLaunch& l, const std::function<void()>& body) {
  std::lock_guard<std::mutex> guard(launch_mutex);
  dim3 grid(l.grid[0], l.grid[1], l.grid[2]);
  dim3 bdim(l.block[0], l.block[1], l.block[2]);
  unsigned threads = bdim.x * bdim.y * bdim.z;
  unsigned blocks = grid.x * grid.y * grid.z;
  if (threads == 0 || blocks == 0) return;
  // A GPU runs a grid's blocks in no set order (and at once): every other launch runs them last
  // to first, so a kernel whose result depends on block order fails its tests here.
  static unsigned long launch_count = 0;
  const bool reverse = (launch_count++ % 2) == 1;
  std::unique_ptr<Block> block;
  std::barrier<> between(threads);
  auto run = [&](unsigned linear) {
    t.linear = linear;
    t.block_dim = bdim;
    t.grid_dim = grid;
    t.thread_idx = dim3(linear % bdim.x, (linear / bdim.x) % bdim.y, linear / (bdim.x * bdim.y));
    for (unsigned step = 0; step < blocks; ++step) {
      const unsigned b = reverse ? blocks - 1 - step : step;
      if (linear == 0) block = std::make_unique<Block>(threads, l.shared_bytes);
      between.arrive_and_wait();
      t.block = block.get();
      t.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
      body();
      // A returned thread no longer holds up its block's or its warp's barriers.
      Warp& w = my_warp();
      w.exited[lane_id()] = true;
      w.bar.arrive_and_drop();
      t.block->bar.arrive_and_drop();
      between.arrive_and_wait();
    }
    t.block = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (unsigned i = 1; i < threads; ++i) pool.emplace_back(run, i);
  run(0);
  for (auto& th : pool) th.join();
}

}  // namespace cad_emu
