// simt_core.h — blocks of fibers, barriers, warp collectives, cp.async, errors and the launch.
//
// Execution model. The blocks of a launch run one after the other (in a seeded random order) on the
// calling OS thread; the threads of a block are fibers. A fiber runs until it reaches a
// synchronisation point (__syncthreads, a warp collective) or exits; the scheduler then resumes
// the next runnable fiber (in a seeded random order within each pass). So:
//   * __syncthreads completes when every thread of the block has arrived at the same barrier;
//     a thread that exits while others wait, or threads waiting at two different __syncthreads,
//     is an error (divergent barrier), never a hang;
//   * a warp collective (shuffle, vote, match, __syncwarp, mma.sync) completes when every lane of
//     its mask has arrived at the same collective (same operation, mask and source line); its
//     result is computed once, from all lanes' inputs, by the last lane to arrive;
//   * when no fiber can run and some have not finished, the block is deadlocked: the error lists
//     what every thread waits for;
//   * faults (SIGSEGV, SIGBUS, SIGFPE, SIGILL) in kernel code and launches that exceed their time
//     limit become errors of the launch (not crashes of the process), except under
//     AddressSanitizer, which reports faults itself.
// Everything that fails is reported through kivi_simt_launch's error string, naming the kernel,
// the block and thread, and the source line.
#pragma once

#include <link.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <mutex>
#include <random>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "simt_fiber.h"

// Runtime code is never instrumented by the race check (it compiles the kernel with
// -fsanitize=thread and implements the __tsan_* hooks itself, see simt_race.h).
#define KIVI_SIMT_RT __attribute__((no_sanitize_thread))

namespace kivi_simt {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr unsigned kSmemCapacity = 232448;  // 227 KiB: the most dynamic shared memory an sm_90 block can have
constexpr int kPayload = 64;                // bytes of one lane's input or output of a collective
constexpr int kMaxCopies = 512;             // cp.async copies in flight per thread (emulation limit)
constexpr int kMaxGroups = 32;              // committed cp.async groups per thread (emulation limit)
constexpr unsigned char kPoison = 0xff;     // uninitialised shared memory; cp.async in flight
constexpr unsigned char kCanary = 0x5a;     // shared memory past the launch's dynamic size
#ifndef KIVI_SIMT_STACK
#define KIVI_SIMT_STACK (256 * 1024)
#endif

struct Copy {
  void* dst;
  const void* src;
  unsigned bytes;
};

struct Fiber {
  enum State : uint8_t { kRun, kBarrier, kCollective, kDone };
  Context ctx;
  Stack stack;
  void* asan_fake = nullptr;
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  State state = kRun;
  // what the fiber waits for (kBarrier, kCollective)
  const char* what = "";
  std::source_location loc{};
  unsigned mask = 0;
  const void* complete = nullptr;
  alignas(16) unsigned char out[kPayload];  // its result of the last collective
  // cp.async: issued copies (oldest first) and the ends of the committed groups
  Copy copies[kMaxCopies];
  int n_copies = 0;
  int group_end[kMaxGroups];
  int n_groups = 0;
};

struct Warp {
  unsigned exists = 0;   // lanes that exist in this block
  unsigned waiting = 0;  // lanes waiting at a collective
  unsigned exited = 0;   // lanes that have returned
  unsigned epoch = 0;    // completed full-warp __syncwarp (race check)
  alignas(16) unsigned char in[kWarpSize][kPayload];
};

// One kernel of a module: its name, its parameter codes (p pointer, i int32, u uint32, l int64,
// L uint64, f float, d double) and a function that calls it with arguments cuLaunchKernel-style
// (args[i] points at parameter i's bytes).
struct Kernel {
  const char* name;
  const char* signature;
  void (*invoke)(void* fn, void** args);
  void* fn;
};

struct State {
  const Kernel* kernel = nullptr;
  void** args = nullptr;
  dim3 grid, block;
  uint3 block_idx{};
  unsigned smem_bytes = 0;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Stack> stacks;
  std::vector<int> order;
  Fiber* cur = nullptr;
  Context main;
  void* main_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  volatile sig_atomic_t in_fiber = 0;
  int live = 0, at_barrier = 0, exited = 0;
  std::source_location bar_loc{};
  unsigned bar_epoch = 0;
  bool failed = false;
  std::string error;
  // options
  bool shuffle = true;
  std::mt19937_64 rng;
  double deadline = 0, timeout = 0;
  // memory: the module's dynamic shared memory array and TLS block (all of its shared memory)
  unsigned char* dyn = nullptr;
  unsigned char* tls_lo = nullptr;
  size_t tls_size = 0;
  uintptr_t module_base = 0;
};
inline State g;
inline std::mutex g_launch_mutex;

// --------------------------------------------------------------------------------- messages
KIVI_SIMT_RT inline std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}
KIVI_SIMT_RT inline std::string where(const std::source_location& loc) {
  const char* f = loc.file_name();
  const char* slash = strrchr(f, '/');
  return format("%s:%u", slash ? slash + 1 : f, (unsigned)loc.line());
}
KIVI_SIMT_RT inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && strcmp(a.file_name(), b.file_name()) == 0;
}
KIVI_SIMT_RT inline std::string who(const Fiber& f) {
  return format("thread (%u,%u,%u) [warp %d lane %d]", f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
}
KIVI_SIMT_RT inline std::string pc_str(const void* pc) {
  return format("pc +0x%lx", (unsigned long)((uintptr_t)pc - g.module_base));
}
KIVI_SIMT_RT inline double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
// "0-31,64-95": a set of thread indices.
KIVI_SIMT_RT inline std::string ranges(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += j > i ? format("%d-%d", v[i], v[j]) : format("%d", v[i]);
    i = j + 1;
  }
  return s;
}

// --------------------------------------------------------------------------------- switching
KIVI_SIMT_RT inline void resume(Fiber& f) {
  g.cur = &f;
  g.in_fiber = 1;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&g.main_fake, f.stack.base, f.stack.size);
#endif
  context_switch(g.main, f.ctx);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(g.main_fake, nullptr, nullptr);
#endif
  g.in_fiber = 0;
  g.cur = nullptr;
}

// From a fiber back to the scheduler. `final`: the fiber will not be resumed.
KIVI_SIMT_RT inline void yield(bool final = false) {
  Fiber& f = *g.cur;
  asm volatile("" ::: "memory");
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake, g.main_bottom, g.main_size);
#else
  (void)final;
#endif
  context_switch(f.ctx, g.main);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.asan_fake, &g.main_bottom, &g.main_size);
#endif
  asm volatile("" ::: "memory");
}

// Record an error (the first one wins). From a fiber, the fiber is abandoned and the launch stops.
KIVI_SIMT_RT inline void fail(const std::string& msg) {
  if (!g.failed) {
    g.failed = true;
    g.error = format("block (%u,%u,%u)", g.block_idx.x, g.block_idx.y, g.block_idx.z);
    if (g.in_fiber && g.cur) g.error += " " + who(*g.cur);
    g.error += ": " + msg;
  }
  if (g.in_fiber && g.cur) {
    g.cur->state = Fiber::kDone;
    yield(true);
    __builtin_unreachable();
  }
}

// --------------------------------------------------------------------------------- shared memory
KIVI_SIMT_RT inline bool in_shared(const void* p, size_t n) {
  const uintptr_t a = (uintptr_t)p, lo = (uintptr_t)g.tls_lo;
  return a >= lo && a + n <= lo + g.tls_size;
}
KIVI_SIMT_RT inline unsigned dynamic_smem_bytes() { return g.smem_bytes; }

}  // namespace kivi_simt

#include "simt_race.h"

namespace kivi_simt {

// --------------------------------------------------------------------------------- barriers
// __syncthreads: see the header comment for the rules.
KIVI_SIMT_RT inline void syncthreads(const std::source_location& loc) {
  Fiber& f = *g.cur;
  if (g.exited) fail(format("__syncthreads at %s after %d thread(s) of the block returned (divergent barrier)",
                            where(loc).c_str(), g.exited));
  if (g.at_barrier == 0) {
    g.bar_loc = loc;
  } else if (!same_site(g.bar_loc, loc)) {
    fail(format("divergent __syncthreads: this thread is at %s while %d thread(s) wait at %s", where(loc).c_str(),
                g.at_barrier, where(g.bar_loc).c_str()));
  }
  f.state = Fiber::kBarrier;
  f.what = "__syncthreads";
  f.loc = loc;
  if (++g.at_barrier == g.live) {
    for (Fiber& o : g.fibers)
      if (o.state == Fiber::kBarrier) o.state = Fiber::kRun;
    g.at_barrier = 0;
    ++g.bar_epoch;
    race_barrier();
  } else {
    yield();
  }
}

// A warp collective: every lane of `mask` deposits `in`; the last to arrive runs complete(ins,
// outs, mask, warp) over all of them (ins/outs indexed by lane, entries outside the mask zeroed);
// each lane gets its outs[lane].
template <class In, class Out>
KIVI_SIMT_RT Out warp_collective(const char* what, unsigned mask, const In& in,
                                 void (*complete)(const In*, Out*, unsigned, int), const std::source_location& loc) {
  static_assert(sizeof(In) <= kPayload && sizeof(Out) <= kPayload, "collective payload too large");
  Fiber& f = *g.cur;
  Warp& w = g.warps[f.warp];
  const unsigned me = 1u << f.lane;
  if (!(mask & me)) fail(format("%s at %s: the calling lane is not in mask 0x%08x", what, where(loc).c_str(), mask));
  if (mask & ~w.exists)
    fail(format("%s at %s: mask 0x%08x names lanes that do not exist (block of %d threads)", what,
                where(loc).c_str(), mask, g.nthreads));
  if (mask & w.exited)
    fail(format("%s at %s: lanes 0x%08x of its mask 0x%08x have returned (divergent collective)", what,
                where(loc).c_str(), mask & w.exited, mask));
  memcpy(w.in[f.lane], &in, sizeof(In));
  f.what = what;
  f.loc = loc;
  f.mask = mask;
  f.complete = (const void*)complete;
  f.state = Fiber::kCollective;
  w.waiting |= me;
  if ((w.waiting & mask) == mask) {
    const int base = f.warp * kWarpSize;
    for (unsigned m = mask; m; m &= m - 1) {
      const Fiber& o = g.fibers[base + __builtin_ctz(m)];
      if (o.complete != f.complete || o.mask != mask || !same_site(o.loc, loc))
        fail(format("divergent warp collective: %s at %s (mask 0x%08x) meets lane %d in %s at %s (mask 0x%08x)", what,
                    where(loc).c_str(), mask, o.lane, o.what, where(o.loc).c_str(), o.mask));
    }
    In ins[kWarpSize];
    Out outs[kWarpSize];
    memset((void*)ins, 0, sizeof ins);
    memset((void*)outs, 0, sizeof outs);
    for (unsigned m = mask; m; m &= m - 1) memcpy((void*)&ins[__builtin_ctz(m)], w.in[__builtin_ctz(m)], sizeof(In));
    complete(ins, outs, mask, f.warp);
    for (unsigned m = mask; m; m &= m - 1) {
      Fiber& o = g.fibers[base + __builtin_ctz(m)];
      memcpy(o.out, &outs[o.lane], sizeof(Out));
      o.state = Fiber::kRun;
    }
    w.waiting &= ~mask;
  } else {
    yield();
  }
  Out r;
  memcpy((void*)&r, f.out, sizeof(Out));
  return r;
}

// --------------------------------------------------------------------------------- cp.async
KIVI_SIMT_RT inline void cp_async(void* dst, const void* src, unsigned n, const std::source_location& loc) {
  Fiber& f = *g.cur;
  if ((uintptr_t)dst % n || (uintptr_t)src % n)
    fail(format("cp.async at %s: addresses must be %u-byte aligned (dst %p, src %p)", where(loc).c_str(), n, dst, src));
  if (!in_shared(dst, n)) fail(format("cp.async at %s: destination %p is not shared memory", where(loc).c_str(), dst));
  if (in_shared(src, 1)) fail(format("cp.async at %s: source %p is shared memory", where(loc).c_str(), src));
  const uintptr_t d = (uintptr_t)dst - (uintptr_t)g.dyn;
  if ((uintptr_t)dst >= (uintptr_t)g.dyn && d < kSmemCapacity && d + n > g.smem_bytes)
    fail(format("cp.async at %s: destination offset %lu + %u is past the launch's %u bytes of dynamic shared memory",
                where(loc).c_str(), (unsigned long)d, n, g.smem_bytes));
  if (f.n_copies == kMaxCopies) fail(format("cp.async at %s: more than %d copies in flight", where(loc).c_str(), kMaxCopies));
  race_cp_async_issue(dst, n, __builtin_return_address(0));
  f.copies[f.n_copies++] = Copy{dst, src, n};
  memset(dst, kPoison, n);  // what a read before the copy lands sees
}
KIVI_SIMT_RT inline void cp_async_commit() {
  Fiber& f = *g.cur;
  if (f.n_groups == kMaxGroups) fail(format("cp.async.commit_group: more than %d groups pending", kMaxGroups));
  f.group_end[f.n_groups++] = f.n_copies;
}
// cp.async.wait_group n: the copies of all but the newest n committed groups land.
KIVI_SIMT_RT inline void cp_async_wait(int n, const std::source_location&) {
  Fiber& f = *g.cur;
  if (f.n_groups <= n) return;
  const int retire = f.n_groups - n, upto = f.group_end[retire - 1];
  for (int i = 0; i < upto; ++i) {
    memcpy(f.copies[i].dst, f.copies[i].src, f.copies[i].bytes);
    race_cp_async_land(f.copies[i].dst, f.copies[i].bytes);
  }
  memmove(f.copies, f.copies + upto, sizeof(Copy) * (f.n_copies - upto));
  f.n_copies -= upto;
  for (int i = 0; i < n; ++i) f.group_end[i] = f.group_end[retire + i] - upto;
  f.n_groups = n;
}

// --------------------------------------------------------------------------------- atomics
template <class T>
KIVI_SIMT_RT T atomic_add(T* p, T v) {
  race_atomic(p, sizeof(T), __builtin_return_address(0));
  const T old = *p;
  *p = old + v;
  return old;
}

// --------------------------------------------------------------------------------- threads
KIVI_SIMT_RT inline void thread_exit(Fiber& f) {
  Warp& w = g.warps[f.warp];
  f.state = Fiber::kDone;
  --g.live;
  ++g.exited;
  w.exited |= 1u << f.lane;
  if (g.at_barrier)
    fail(format("returned while %d thread(s) wait at __syncthreads at %s (divergent barrier)", g.at_barrier,
                where(g.bar_loc).c_str()));
  const int base = f.warp * kWarpSize;
  for (unsigned m = w.waiting; m; m &= m - 1) {
    const Fiber& o = g.fibers[base + __builtin_ctz(m)];
    if (o.mask & (1u << f.lane))
      fail(format("returned while lane %d waits for it in %s at %s (divergent collective)", o.lane, o.what,
                  where(o.loc).c_str()));
  }
}

KIVI_SIMT_RT inline void fiber_entry(void* p) {
  Fiber& f = *(Fiber*)p;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &g.main_bottom, &g.main_size);
#endif
  g.kernel->invoke(g.kernel->fn, g.args);
  thread_exit(f);
  yield(true);
  abort();
}

// No fiber can run: say what each one waits for.
KIVI_SIMT_RT inline void deadlock() {
  struct Group {
    std::string what;
    std::vector<int> threads;
  };
  std::vector<Group> groups;
  for (const Fiber& f : g.fibers) {
    if (f.state == Fiber::kDone) continue;
    std::string what = f.state == Fiber::kBarrier
                           ? "__syncthreads at " + where(f.loc)
                           : format("%s (mask 0x%08x) at %s", f.what, f.mask, where(f.loc).c_str());
    Group* gr = nullptr;
    for (Group& x : groups)
      if (x.what == what) gr = &x;
    if (!gr) {
      groups.push_back({what, {}});
      gr = &groups.back();
    }
    gr->threads.push_back(f.linear);
  }
  std::string msg = "deadlock (divergent barrier or collective):";
  for (const Group& x : groups) msg += " threads " + ranges(x.threads) + " wait in " + x.what + ";";
  if (g.exited) msg += format(" %d thread(s) returned", g.exited);
  fail(msg);
}

// --------------------------------------------------------------------------------- faults, time limit
inline struct sigaction g_old_actions[65];
inline stack_t g_old_altstack;
inline char* g_altstack = nullptr;
inline timer_t g_timer;
inline bool g_timer_armed = false;
constexpr int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
constexpr size_t kAltStackSize = 256 * 1024;

inline int timer_signal() { return SIGRTMIN + 5; }

KIVI_SIMT_RT inline void on_signal(int sig, siginfo_t* si, void* ucv) {
  Fiber* f = g.cur;
  uintptr_t sp = 0, pc = 0;
#if defined(__x86_64__)
  const ucontext_t* uc = (const ucontext_t*)ucv;
  sp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
  pc = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#else
  (void)ucv;
#endif
  const uintptr_t page = 4096;
  const bool on_fiber = g.in_fiber && f && (sp == 0 || (sp >= (uintptr_t)f->stack.base - page &&
                                                        sp < (uintptr_t)(f->stack.base + f->stack.size)));
  if (sig == timer_signal()) {
    if (!on_fiber || now() < g.deadline) return;
    fail(format("the launch ran for more than %.0f s (an endless loop? this thread was at pc +0x%lx); set "
                "KIVI_SERVE_SIMT_TIMEOUT to allow more",
                g.timeout, (unsigned long)(pc - g.module_base)));
  }
  if (!on_fiber) {  // not a kernel fault: let the previous handler have it (the instruction re-faults)
    sigaction(sig, &g_old_actions[sig], nullptr);
    return;
  }
  const char* name = sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : sig == SIGFPE ? "SIGFPE" : "SIGILL";
  const bool overflow = sig == SIGSEGV && (uintptr_t)si->si_addr >= (uintptr_t)f->stack.base - page &&
                        (uintptr_t)si->si_addr < (uintptr_t)f->stack.base;
  fail(format("%s at address %p, pc +0x%lx%s", name, si->si_addr, (unsigned long)(pc - g.module_base),
              overflow ? " (stack overflow: set KIVI_SIMT_STACK larger)" : ""));
}

KIVI_SIMT_RT inline void install_handlers() {
#if !defined(__SANITIZE_ADDRESS__)
  if (!g_altstack) g_altstack = (char*)malloc(kAltStackSize);
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = kAltStackSize;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int s : kFaultSignals) sigaction(s, &sa, &g_old_actions[s]);
  sigaction(timer_signal(), &sa, &g_old_actions[timer_signal()]);
  sigevent sev{};
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = timer_signal();
  sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
  g_timer_armed = timer_create(CLOCK_MONOTONIC, &sev, &g_timer) == 0;
  if (g_timer_armed) {
    itimerspec its{};
    its.it_value.tv_nsec = its.it_interval.tv_nsec = 250 * 1000 * 1000;
    timer_settime(g_timer, 0, &its, nullptr);
  }
#endif
}
KIVI_SIMT_RT inline void remove_handlers() {
#if !defined(__SANITIZE_ADDRESS__)
  if (g_timer_armed) timer_delete(g_timer);
  g_timer_armed = false;
  for (int s : kFaultSignals) sigaction(s, &g_old_actions[s], nullptr);
  sigaction(timer_signal(), &g_old_actions[timer_signal()], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
#endif
}

// --------------------------------------------------------------------------------- the module
// The glue (tests/support/simt.py) defines these after including the kernel source.
extern const Kernel kivi_simt_kernel_table[];
extern const int kivi_simt_kernel_count;
unsigned char* kivi_simt_dynamic_smem();  // this OS thread's dynamic shared memory array

// The module's TLS block (its `__shared__` variables, the dynamic array included) and load address.
KIVI_SIMT_RT inline void find_module(const void* probe) {
  struct Ctx {
    uintptr_t probe;
    State* g;
  } c{(uintptr_t)probe, &g};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* p) -> int {
        Ctx& c = *(Ctx*)p;
        bool mine = false;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && c.probe >= lo && c.probe < lo + ph.p_memsz) mine = true;
        }
        if (!mine) return 0;
        c.g->module_base = info->dlpi_addr;
        for (int i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_TLS) {
            c.g->tls_lo = (unsigned char*)info->dlpi_tls_data;
            c.g->tls_size = info->dlpi_phdr[i].p_memsz;
          }
        return 1;
      },
      &c);
}

// Shared memory starts as garbage (kPoison), as on a GPU; past the launch's dynamic size it holds a
// canary checked at the end of the block (under AddressSanitizer it is poisoned instead).
KIVI_SIMT_RT inline void begin_block_memory() {
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(g.dyn + g.smem_bytes, kSmemCapacity - g.smem_bytes);
#endif
  memset(g.tls_lo, kPoison, g.tls_size);
  memset(g.dyn + g.smem_bytes, kCanary, kSmemCapacity - g.smem_bytes);
#if defined(__SANITIZE_ADDRESS__)
  __asan_poison_memory_region(g.dyn + g.smem_bytes, kSmemCapacity - g.smem_bytes);
#endif
  race_begin_block();
}
KIVI_SIMT_RT inline void end_block_memory() {
  race_end_block();
#if !defined(__SANITIZE_ADDRESS__)
  for (unsigned i = g.smem_bytes; i < kSmemCapacity; ++i)
    if (g.dyn[i] != kCanary) {
      fail(format("a thread wrote at byte %u of dynamic shared memory, past the launch's %u bytes", i, g.smem_bytes));
      return;
    }
#endif
}

KIVI_SIMT_RT inline void run_block(uint3 bidx) {
  g.block_idx = bidx;
  g.live = g.nthreads;
  g.at_barrier = g.exited = 0;
  g.bar_epoch = 0;
  for (size_t w = 0; w < g.warps.size(); ++w) {
    Warp& wp = g.warps[w];
    const int n = g.nthreads - (int)w * kWarpSize;
    wp.exists = n >= kWarpSize ? 0xffffffffu : (1u << n) - 1u;
    wp.waiting = wp.exited = 0;
    wp.epoch = 0;
  }
  for (int i = 0; i < g.nthreads; ++i) {
    Fiber& f = g.fibers[i];
    f.tid = uint3{i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y)};
    f.linear = i;
    f.lane = i % kWarpSize;
    f.warp = i / kWarpSize;
    f.state = Fiber::kRun;
    f.n_copies = f.n_groups = 0;
    f.asan_fake = nullptr;
    f.stack = g.stacks[i];
    context_make(f.ctx, f.stack, fiber_entry, &f);
  }
  if (g.shuffle) std::shuffle(g.order.begin(), g.order.end(), g.rng);
  begin_block_memory();
  while (g.live > 0 && !g.failed) {
    bool ran = false;
    for (int i : g.order) {
      if (g.fibers[i].state != Fiber::kRun) continue;
      resume(g.fibers[i]);
      ran = true;
      if (g.failed) break;
    }
    if (g.failed) break;
    if (!ran) deadlock();
    else if (now() > g.deadline)
      fail(format("the launch ran for more than %.0f s; set KIVI_SERVE_SIMT_TIMEOUT to allow more", g.timeout));
  }
  if (!g.failed) end_block_memory();
}

KIVI_SIMT_RT inline int launch(int index, const unsigned* dims, unsigned smem_bytes, void** args, unsigned long long seed,
                               double timeout, std::string& error) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (index < 0 || index >= kivi_simt_kernel_count) {
    error = "no such kernel";
    return 2;
  }
  const Kernel& k = kivi_simt_kernel_table[index];
  const dim3 grid(dims[0], dims[1], dims[2]), block(dims[3], dims[4], dims[5]);
  const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
  std::string bad;
  if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) bad = "grid and block dimensions must be >= 1";
  else if (grid.y > 65535 || grid.z > 65535) bad = "grid.y and grid.z must be <= 65535";
  else if (nthreads > (unsigned long long)kMaxThreads || block.z > 64) bad = "a block has at most 1024 threads (z <= 64)";
  else if (smem_bytes > kSmemCapacity) bad = format("dynamic shared memory %u > %u bytes (227 KiB)", smem_bytes, kSmemCapacity);
  if (!bad.empty()) {
    error = format("%s<<<(%u,%u,%u), (%u,%u,%u), %u>>>: %s", k.name, grid.x, grid.y, grid.z, block.x, block.y,
                   block.z, smem_bytes, bad.c_str());
    return 1;
  }
  g.kernel = &k;
  g.args = args;
  g.grid = grid;
  g.block = block;
  g.smem_bytes = smem_bytes;
  g.nthreads = (int)nthreads;
  if (g.fibers.size() < nthreads) g.fibers.resize(nthreads);
  while (g.stacks.size() < nthreads) g.stacks.push_back(stack_alloc(KIVI_SIMT_STACK));
  g.warps.assign((nthreads + kWarpSize - 1) / kWarpSize, Warp{});
  g.order.resize(nthreads);
  for (int i = 0; i < (int)nthreads; ++i) g.order[i] = i;
  g.shuffle = seed != 0;
  g.rng.seed(seed);
  g.failed = false;
  g.error.clear();
  g.timeout = timeout;
  g.deadline = now() + timeout;
  g.dyn = kivi_simt_dynamic_smem();
  find_module((const void*)&launch);
  if (!g.tls_lo || (uintptr_t)g.dyn < (uintptr_t)g.tls_lo || (uintptr_t)g.dyn + kSmemCapacity > (uintptr_t)g.tls_lo + g.tls_size) {
    g.tls_lo = g.dyn;  // (no TLS information: shared memory = the dynamic array)
    g.tls_size = kSmemCapacity;
  }
  // block order: a seeded permutation (or in order when seed == 0)
  const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
  std::vector<unsigned long long> blocks(nblocks);
  for (unsigned long long i = 0; i < nblocks; ++i) blocks[i] = i;
  if (g.shuffle) std::shuffle(blocks.begin(), blocks.end(), g.rng);
  install_handlers();
  for (unsigned long long b : blocks) {
    run_block(uint3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((unsigned long long)grid.x * grid.y))});
    if (g.failed) break;
  }
  remove_handlers();
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(g.dyn + smem_bytes, kSmemCapacity - smem_bytes);
#endif
  if (g.failed)
    error = format("%s<<<(%u,%u,%u), (%u,%u,%u), %u>>> %s", k.name, grid.x, grid.y, grid.z, block.x, block.y, block.z,
                   smem_bytes, g.error.c_str());
  g.kernel = nullptr;
  g.args = nullptr;
  return g.failed ? 1 : 0;
}

// --------------------------------------------------------------------------------- kernel table
template <class T>
constexpr char param_code() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (std::is_same_v<T, int>) return 'i';
  else if constexpr (std::is_same_v<T, unsigned>) return 'u';
  else if constexpr (std::is_same_v<T, long long> || std::is_same_v<T, long>) return 'l';
  else if constexpr (std::is_same_v<T, unsigned long long> || std::is_same_v<T, unsigned long>) return 'L';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else if constexpr (std::is_same_v<T, double>) return 'd';
  else static_assert(sizeof(T) == 0, "kernel parameter type not supported by the emulation");
}
template <class... A>
struct Signature {
  static constexpr char value[sizeof...(A) + 1] = {param_code<A>()..., '\0'};
};
template <class... A, size_t... I>
KIVI_SIMT_RT void invoke_with(void (*fn)(A...), void** args, std::index_sequence<I...>) {
  fn(*static_cast<A*>(args[I])...);
}
template <class... A>
KIVI_SIMT_RT void invoke(void* fn, void** args) {
  invoke_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}
template <class... A>
constexpr Kernel make_kernel(const char* name, void (*fn)(A...)) {
  return Kernel{name, Signature<std::decay_t<A>...>::value, &invoke<A...>, (void*)fn};
}

}  // namespace kivi_simt

// --------------------------------------------------------------------------------- C API (ctypes)
#define KIVI_SIMT_API extern "C" __attribute__((visibility("default"))) KIVI_SIMT_RT
KIVI_SIMT_API int kivi_simt_num_kernels() { return kivi_simt::kivi_simt_kernel_count; }
KIVI_SIMT_API const char* kivi_simt_kernel_name(int i) { return kivi_simt::kivi_simt_kernel_table[i].name; }
KIVI_SIMT_API const char* kivi_simt_kernel_signature(int i) { return kivi_simt::kivi_simt_kernel_table[i].signature; }
KIVI_SIMT_API unsigned kivi_simt_smem_capacity() { return kivi_simt::kSmemCapacity; }
// dims: grid x, y, z, block x, y, z. Returns 0, or non-zero with a message in err.
KIVI_SIMT_API int kivi_simt_launch(int kernel, const unsigned* dims, unsigned smem_bytes, void** args,
                                   unsigned long long seed, double timeout_s, char* err, int errlen) {
  std::string e;
  const int rc = kivi_simt::launch(kernel, dims, smem_bytes, args, seed, timeout_s, e);
  if (rc && errlen > 0) snprintf(err, (size_t)errlen, "%s", e.c_str());
  return rc;
}
