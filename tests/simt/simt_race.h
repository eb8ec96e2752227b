// simt_race.h — race check on shared memory (KIVI_SIMT_RACE): shadow state per byte.
//
// The kernel source is compiled with -fsanitize=thread, which makes g++ call __tsan_read*/
// __tsan_write* before every memory access of the kernel code. This file implements those hooks
// itself (the ThreadSanitizer runtime is NOT linked): accesses outside the module's shared memory
// (its TLS block: the dynamic array and every `__shared__` variable) are ignored; for shared
// memory, each byte remembers its last writer and its readers since, with the block-barrier and
// warp-barrier epochs at the time. An access conflicts with an earlier one by another thread
// unless a __syncthreads completed in between, or both threads are in one warp and a __syncwarp
// of the whole warp completed in between (CUDA's memory model: shuffles, votes and mma.sync do not
// order shared-memory accesses). Reported as errors, with both program counters:
//   * read after write, write after read, write after write by unordered threads (atomics only
//     conflict with plain accesses);
//   * reading a byte that no thread of the block wrote (uninitialised shared memory);
//   * reading or writing the destination of a cp.async before its wait_group retired it;
//   * any access past the launch's dynamic shared memory.
// Without KIVI_SIMT_RACE every hook below is an empty inline function.
#pragma once

namespace kivi_simt {

#if defined(KIVI_SIMT_RACE)
struct Cell {
  int16_t wtid;       // last writer; kNever: nobody in this block; kInflight: a cp.async's destination
  uint8_t watomic;    // the last write was an atomic
  int16_t rtid;       // reader(s) since the write: kNone, one thread, or kMany
  int16_t rwarp;      // the readers' warp, or kMany
  uint32_t wbar, wwep;  // epochs of the write: block barriers, writer's warp barriers
  uint32_t rbar, rwep;  // epochs of the latest read
  const void* wpc;    // program counters, for the report
  const void* rpc;
};
constexpr int16_t kNever = -1, kInflight = -2, kNone = -1, kMany = -3;

struct Race {
  std::vector<Cell> cells;
  uintptr_t lo = 0;
  size_t size = 0;
  size_t dirty_lo = 0, dirty_hi = 0;
  bool active = false;
};
inline Race race;

KIVI_SIMT_RT inline void race_begin_block() {
  const uintptr_t lo = (uintptr_t)g.tls_lo;
  const Cell fresh{kNever, 0, kNone, kNone, 0, 0, 0, 0, nullptr, nullptr};
  if (race.lo != lo || race.size != g.tls_size) {
    race.lo = lo;
    race.size = g.tls_size;
    race.cells.assign(g.tls_size, fresh);
  } else if (race.dirty_hi > race.dirty_lo) {
    std::fill(race.cells.begin() + race.dirty_lo, race.cells.begin() + race.dirty_hi, fresh);
  }
  race.dirty_lo = race.size;
  race.dirty_hi = 0;
  race.active = true;
}
KIVI_SIMT_RT inline void race_end_block() { race.active = false; }
KIVI_SIMT_RT inline void race_barrier() {}  // g.bar_epoch is the block epoch

KIVI_SIMT_RT inline std::string race_offset(uintptr_t off) {
  const uintptr_t dyn = (uintptr_t)g.dyn - race.lo;
  if (off >= dyn && off < dyn + kSmemCapacity) return format("dynamic shared memory byte %lu", (unsigned long)(off - dyn));
  return format("static __shared__ byte %lu", (unsigned long)off);
}
KIVI_SIMT_RT inline std::string race_thread(int tid) {
  if (tid == kMany) return "several threads";
  return format("thread %d [warp %d lane %d]", tid, tid / kWarpSize, tid % kWarpSize);
}

enum Access { kRead, kWrite, kAtomic, kIssue, kLand };

// Did an access by `tid` at epochs (bar, wep) happen before the current one?
KIVI_SIMT_RT inline bool ordered(int16_t tid, uint32_t bar, uint32_t wep, int16_t me, int16_t my_warp, uint32_t B,
                                 uint32_t W) {
  return tid == me || B > bar || (tid / kWarpSize == my_warp && W > wep);
}
KIVI_SIMT_RT inline bool reads_ordered(const Cell& c, int16_t me, int16_t my_warp, uint32_t B, uint32_t W) {
  return c.rtid == kNone || c.rtid == me || B > c.rbar || (c.rwarp == my_warp && W > c.rwep);
}

// One access of `n` bytes at `addr` by the current thread.
KIVI_SIMT_RT inline void race_access(uintptr_t addr, size_t n, Access kind, const void* pc) {
  if (!race.active || !g.in_fiber || !g.cur) return;
  const uintptr_t off0 = addr - race.lo;
  if (off0 >= race.size) return;  // not shared memory
  const Fiber& f = *g.cur;
  const uintptr_t dyn = (uintptr_t)g.dyn;
  if (addr + n > dyn + g.smem_bytes && addr < dyn + kSmemCapacity)
    fail(format("%s of %zu bytes at dynamic shared memory byte %lu, past the launch's %u bytes (%s)",
                kind == kRead ? "read" : "write", n, (unsigned long)(addr - dyn), g.smem_bytes, pc_str(pc).c_str()));
  const uint32_t B = g.bar_epoch, W = g.warps[f.warp].epoch;
  const int16_t me = (int16_t)f.linear, my_warp = (int16_t)f.warp;
  const size_t end = off0 + n < race.size ? off0 + n : race.size;
  Cell* cells = race.cells.data();
  if (off0 < race.dirty_lo) race.dirty_lo = off0;
  if (end > race.dirty_hi) race.dirty_hi = end;
  for (size_t off = off0; off < end; ++off) {
    Cell& c = cells[off];
    const char* what = nullptr;
    const void* other_pc = nullptr;
    int16_t other = kNone;
    if (kind == kLand) {
      c.wtid = me;
      c.watomic = 0;
      c.wbar = B;
      c.wwep = W;
      c.wpc = pc;
      c.rtid = kNone;
      continue;
    }
    if (c.wtid == kInflight) {
      fail(format("%s %s at %s while a cp.async into it is in flight (issued at %s): wait_group first",
                  kind == kRead ? "reads" : "writes", race_offset(off).c_str(), pc_str(pc).c_str(),
                  pc_str(c.wpc).c_str()));
    }
    if (kind == kRead) {
      if (c.wtid == kNever) {
        fail(format("reads %s at %s, which no thread of this block wrote (uninitialised shared memory)",
                    race_offset(off).c_str(), pc_str(pc).c_str()));
      }
      if (!ordered(c.wtid, c.wbar, c.wwep, me, my_warp, B, W)) {
        what = "read after write";
        other = c.wtid;
        other_pc = c.wpc;
      } else {
        if (reads_ordered(c, me, my_warp, B, W)) {  // every earlier read happened before this one: it is the read set now
          c.rtid = me;
          c.rwarp = my_warp;
        } else {
          c.rtid = kMany;
          if (c.rwarp != my_warp) c.rwarp = kMany;
        }
        c.rbar = B;
        c.rwep = W;
        c.rpc = pc;
        continue;
      }
    } else {  // kWrite, kAtomic, kIssue
      if (c.wtid >= 0 && !ordered(c.wtid, c.wbar, c.wwep, me, my_warp, B, W) && !(kind == kAtomic && c.watomic)) {
        what = "write after write";
        other = c.wtid;
        other_pc = c.wpc;
      } else if (!reads_ordered(c, me, my_warp, B, W)) {
        what = "write after read";
        other = c.rtid;
        other_pc = c.rpc;
      } else {
        c.wtid = kind == kIssue ? kInflight : me;
        c.watomic = kind == kAtomic;
        c.wbar = B;
        c.wwep = W;
        c.wpc = pc;
        c.rtid = kNone;
        continue;
      }
    }
    fail(format("data race on %s: %s — this thread at %s, %s at %s, with no __syncthreads (or __syncwarp of "
                "the warp) in between",
                race_offset(off).c_str(), what, pc_str(pc).c_str(), race_thread(other).c_str(),
                pc_str(other_pc).c_str()));
  }
}

KIVI_SIMT_RT inline void race_cp_async_issue(void* dst, size_t n, const void* pc) {
  race_access((uintptr_t)dst, n, kIssue, pc);
}
KIVI_SIMT_RT inline void race_cp_async_land(void* dst, size_t n) {
  race_access((uintptr_t)dst, n, kLand, __builtin_return_address(0));
}
KIVI_SIMT_RT inline void race_atomic(const void* p, size_t n, const void* pc) {
  race_access((uintptr_t)p, n, kAtomic, pc);
}
#else
inline void race_begin_block() {}
inline void race_end_block() {}
inline void race_barrier() {}
inline void race_cp_async_issue(void*, size_t, const void*) {}
inline void race_cp_async_land(void*, size_t) {}
inline void race_atomic(const void*, size_t, const void*) {}
#endif

}  // namespace kivi_simt

#if defined(KIVI_SIMT_RACE)
// The ThreadSanitizer instrumentation's entry points (the subset g++ 12 emits for this code).
#define KIVI_SIMT_HOOK extern "C" __attribute__((visibility("hidden"), no_sanitize_thread, noinline))
#define KIVI_SIMT_RW(N)                                                                                        \
  KIVI_SIMT_HOOK void __tsan_read##N(void* a) {                                                                \
    kivi_simt::race_access((uintptr_t)a, N, kivi_simt::kRead, __builtin_return_address(0));                   \
  }                                                                                                            \
  KIVI_SIMT_HOOK void __tsan_write##N(void* a) {                                                               \
    kivi_simt::race_access((uintptr_t)a, N, kivi_simt::kWrite, __builtin_return_address(0));                   \
  }                                                                                                            \
  KIVI_SIMT_HOOK void __tsan_unaligned_read##N(void* a) {                                                      \
    kivi_simt::race_access((uintptr_t)a, N, kivi_simt::kRead, __builtin_return_address(0));                   \
  }                                                                                                            \
  KIVI_SIMT_HOOK void __tsan_unaligned_write##N(void* a) {                                                     \
    kivi_simt::race_access((uintptr_t)a, N, kivi_simt::kWrite, __builtin_return_address(0));                   \
  }                                                                                                            \
  KIVI_SIMT_HOOK void __tsan_volatile_read##N(void* a) {                                                       \
    kivi_simt::race_access((uintptr_t)a, N, kivi_simt::kRead, __builtin_return_address(0));                   \
  }                                                                                                            \
  KIVI_SIMT_HOOK void __tsan_volatile_write##N(void* a) {                                                      \
    kivi_simt::race_access((uintptr_t)a, N, kivi_simt::kWrite, __builtin_return_address(0));                   \
  }
KIVI_SIMT_RW(1)
KIVI_SIMT_RW(2)
KIVI_SIMT_RW(4)
KIVI_SIMT_RW(8)
KIVI_SIMT_RW(16)
KIVI_SIMT_HOOK void __tsan_read_range(void* a, unsigned long n) {
  kivi_simt::race_access((uintptr_t)a, n, kivi_simt::kRead, __builtin_return_address(0));
}
KIVI_SIMT_HOOK void __tsan_write_range(void* a, unsigned long n) {
  kivi_simt::race_access((uintptr_t)a, n, kivi_simt::kWrite, __builtin_return_address(0));
}
KIVI_SIMT_HOOK void __tsan_init() {}
KIVI_SIMT_HOOK void __tsan_func_entry(void*) {}
KIVI_SIMT_HOOK void __tsan_func_exit() {}
KIVI_SIMT_HOOK void __tsan_vptr_update(void**, void*) {}
KIVI_SIMT_HOOK void __tsan_vptr_read(void**) {}
#endif
