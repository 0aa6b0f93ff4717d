// The emulation runtime behind emu.hpp: a block's CUDA threads as fibers (or OS threads), blocks
// in turn.
#include "emu.hpp"

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cad_emu {

thread_local ThreadState t;

float half_to_float[65536];
static const bool half_table_filled = [] {
  for (unsigned i = 0; i < 65536; ++i) {
    const uint16_t bits = static_cast<uint16_t>(i);
    _Float16 v;
    std::memcpy(&v, &bits, 2);
    half_to_float[i] = float(v);
  }
  return true;
}();

// ---- Barriers --------------------------------------------------------------------------------
//
// Two ways to run a block's threads, chosen at build time:
// - fibers (the default on x86-64 Linux): every CUDA thread of the block is a fiber with its own
//   stack on the launching OS thread, switched by ~20 instructions at each barrier. A thread
//   runs from one barrier to the next, then the next waiting thread runs. With one OS thread per
//   CUDA thread the emulated engine tests spent ~75% of their time in the kernel's scheduler
//   (futex waits, sched_yield); threads that all wait at barriers none can pass, a warp
//   primitive some lanes never reach, abort naming the block instead of hanging.
// - OS threads (CAD_EMU_OS_THREADS: ThreadSanitizer builds, which need real threads to see a
//   missing __syncthreads, and other architectures): one OS thread per CUDA thread.

#if defined(CAD_EMU_OS_THREADS) || !defined(__x86_64__) || !defined(__linux__)
#define CAD_EMU_THREADS 1
using Barrier = std::barrier<>;
#else
#define CAD_EMU_THREADS 0

struct Fiber;
/// The fiber running now (null between launches); launches are serialised by `launch_mutex`.
static Fiber* current = nullptr;
static void wait_for_phase(const unsigned* phase, unsigned seen);

/// A barrier over fibers of one OS thread: no atomics; a waiting fiber yields to the scheduler
/// until the phase moves on. The last arrival completes the phase and runs on.
class Barrier {
 public:
  explicit Barrier(unsigned expected) : expected_(expected) {}
  void arrive_and_wait() {
    const unsigned seen = phase_;
    if (arrive()) return;
    wait_for_phase(&phase_, seen);
  }
  /// Arrives and leaves: later phases expect one thread fewer.
  void arrive_and_drop() {
    --expected_;
    if (arrived_ == expected_) complete();
  }

 private:
  bool arrive() {
    if (++arrived_ < expected_) return false;
    complete();
    return true;
  }
  void complete() {
    arrived_ = 0;
    ++phase_;
  }
  unsigned expected_;
  unsigned arrived_ = 0;
  unsigned phase_ = 0;
};
#endif

/// One warp's rendezvous: a barrier over its live lanes and one exchange slot per lane.
struct Warp {
  explicit Warp(unsigned lanes) : bar(lanes) {}
  Barrier bar;
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
  Barrier bar;
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

/// The CUDA thread `linear` of a block of shape `bdim` in a grid `grid`.
static ThreadState thread_state(unsigned linear, dim3 bdim, dim3 grid) {
  ThreadState s;
  s.linear = linear;
  s.block_dim = bdim;
  s.grid_dim = grid;
  s.thread_idx = dim3(linear % bdim.x, (linear / bdim.x) % bdim.y, linear / (bdim.x * bdim.y));
  return s;
}

static dim3 block_index(unsigned b, dim3 grid) {
  return dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
}

/// A returned thread no longer holds up its block's or its warp's barriers.
static void leave_block() {
  Warp& w = my_warp();
  w.exited[lane_id()] = true;
  w.bar.arrive_and_drop();
  t.block->bar.arrive_and_drop();
}

static std::mutex launch_mutex;
/// Launches so far: every other one runs its blocks (and, with fibers, its threads) last to
/// first, so a kernel whose result depends on that order fails its tests here.
static unsigned long launch_count = 0;

/// One launch's shape, and whether it runs last to first.
struct Geometry {
  dim3 grid, bdim;
  unsigned threads, blocks, shared_bytes;
  bool reverse;
};

#if CAD_EMU_THREADS

static void run_grid(const Geometry& geo, const std::function<void()>& body) {
  const dim3 grid = geo.grid, bdim = geo.bdim;
  const unsigned threads = geo.threads, blocks = geo.blocks;
  const bool reverse = geo.reverse;
  std::unique_ptr<Block> block;
  std::barrier<> between(threads);
  auto run = [&](unsigned linear) {
    t = thread_state(linear, bdim, grid);
    for (unsigned step = 0; step < blocks; ++step) {
      const unsigned b = reverse ? blocks - 1 - step : step;
      if (linear == 0) block = std::make_unique<Block>(threads, geo.shared_bytes);
      between.arrive_and_wait();
      t.block = block.get();
      t.block_idx = block_index(b, grid);
      body();
      leave_block();
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

#else

// ---- Fibers ----------------------------------------------------------------------------------

// cad_emu_switch(save, to): saves the callee-saved registers, the SSE and x87 control words and
// the stack pointer at *save, then resumes the context whose stack pointer is `to`.
asm(R"(
  .pushsection .text
  .p2align 4
  .type cad_emu_switch, @function
cad_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cad_emu_switch, .-cad_emu_switch
  .popsection
)");
extern "C" void cad_emu_switch(void** save, void* to);

/// Virtual size of a fiber's stack (touched pages only are backed), below it a guard page.
constexpr std::size_t kStackBytes = 1u << 20;
constexpr std::size_t kGuardBytes = 4096;

struct Fiber {
  void* sp = nullptr;
  ThreadState state;
  /// Waiting until `*phase != seen`; null when runnable.
  const unsigned* phase = nullptr;
  unsigned seen = 0;
  bool done = false;
  unsigned char* stack = nullptr;  // lowest usable byte; kStackBytes above it is the top
};

/// The scheduler's saved stack pointer while a fiber runs.
static void* scheduler_sp = nullptr;
static const std::function<void()>* fiber_body = nullptr;
/// One fiber per thread of the largest block launched so far; stacks are mapped once.
static std::vector<Fiber> fibers;

[[noreturn]] static void fiber_main() {
  (*fiber_body)();
  leave_block();
  current->done = true;
  cad_emu_switch(&current->sp, scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

static void wait_for_phase(const unsigned* phase, unsigned seen) {
  current->phase = phase;
  current->seen = seen;
  cad_emu_switch(&current->sp, scheduler_sp);
}

static void ensure_fibers(unsigned threads) {
  while (fibers.size() < threads) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    require(m != MAP_FAILED, "mapping a fiber stack failed");
    require(mprotect(m, kGuardBytes, PROT_NONE) == 0, "protecting a fiber stack's guard page failed");
    Fiber f;
    f.stack = static_cast<unsigned char*>(m) + kGuardBytes;
    fibers.push_back(f);
  }
}

/// Points `f` at the start of `fiber_main`: the frame cad_emu_switch pops, then a return address.
static void prepare(Fiber& f) {
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  auto* w = reinterpret_cast<uint64_t*>(top);
  *--w = 0;  // fiber_main's return address: it never returns
  *--w = reinterpret_cast<uint64_t>(&fiber_main);  // cad_emu_switch's `ret` lands here
  for (int r = 0; r < 6; ++r) *--w = 0;             // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--w = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f.sp = w;
  f.phase = nullptr;
  f.done = false;
}

/// Runs one block's fibers to completion: each pass resumes every fiber that can go on.
static void run_block(unsigned threads, bool reverse, const dim3& idx) {
  unsigned live = threads;
  while (live > 0) {
    bool progressed = false;
    for (unsigned k = 0; k < threads; ++k) {
      Fiber& f = fibers[reverse ? threads - 1 - k : k];
      if (f.done || (f.phase != nullptr && *f.phase == f.seen)) continue;
      f.phase = nullptr;
      current = &f;
      t = f.state;
      cad_emu_switch(&scheduler_sp, f.sp);
      progressed = true;
      if (f.done) --live;
    }
    if (!progressed) {
      std::fprintf(stderr,
                   "cad_emu: deadlock in block (%u, %u, %u): %u threads wait at barriers none of "
                   "them can pass (a __syncthreads or a warp primitive not reached by every live "
                   "thread of its block or warp)\n",
                   idx.x, idx.y, idx.z, live);
      std::abort();
    }
  }
  current = nullptr;
}

static void run_grid(const Geometry& geo, const std::function<void()>& body) {
  ensure_fibers(geo.threads);
  fiber_body = &body;
  const ThreadState outside = t;
  for (unsigned step = 0; step < geo.blocks; ++step) {
    const unsigned b = geo.reverse ? geo.blocks - 1 - step : step;
    const dim3 idx = block_index(b, geo.grid);
    Block block(geo.threads, geo.shared_bytes);
    for (unsigned i = 0; i < geo.threads; ++i) {
      Fiber& f = fibers[i];
      prepare(f);
      f.state = thread_state(i, geo.bdim, geo.grid);
      f.state.block = &block;
      f.state.block_idx = idx;
    }
    run_block(geo.threads, geo.reverse, idx);
  }
  fiber_body = nullptr;
  t = outside;
}

#endif

void launch(const CadEmuLaunch& l, const std::function<void()>& body) {
  std::lock_guard<std::mutex> guard(launch_mutex);
  Geometry geo;
  geo.grid = dim3(l.grid[0], l.grid[1], l.grid[2]);
  geo.bdim = dim3(l.block[0], l.block[1], l.block[2]);
  geo.threads = geo.bdim.x * geo.bdim.y * geo.bdim.z;
  geo.blocks = geo.grid.x * geo.grid.y * geo.grid.z;
  geo.shared_bytes = l.shared_bytes;
  if (geo.threads == 0 || geo.blocks == 0) return;
  geo.reverse = (launch_count++ % 2) == 1;
  run_grid(geo, body);
}

}  // namespace cad_emu
