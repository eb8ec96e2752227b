// simt_fiber.h — user-space context switching for the SIMT runtime (one fiber per CUDA thread).
//
// x86-64: a hand-written switch that saves the callee-saved registers, MXCSR and the x87 control
// word (System V ABI) — a few nanoseconds, no system call. Elsewhere: ucontext (swapcontext).
// Under AddressSanitizer every switch is announced with __sanitizer_{start,finish}_switch_fiber.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
extern "C" void __asan_poison_memory_region(void const volatile* addr, size_t size);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif

namespace kivi_simt {

// A fiber's stack: `size` usable bytes above one PROT_NONE guard page (an overflow faults).
struct Stack {
  char* base = nullptr;  // lowest usable byte
  size_t size = 0;
};

inline Stack stack_alloc(size_t size) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size = (size + page - 1) / page * page;
  char* p = (char*)mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
  if (p == (char*)MAP_FAILED) abort();
  mprotect(p, page, PROT_NONE);
  return Stack{p + page, size};
}

#if defined(__x86_64__)
extern "C" void kivi_simt_switch(void** save_sp, void* load_sp);
extern "C" void kivi_simt_trampoline();
// kivi_simt_switch(save, load): push rbp rbx r12-r15 and the FP control words, store rsp in *save,
// load rsp from `load`, pop the same and return into the other context.
// kivi_simt_trampoline: the first "return address" of a new fiber; calls r13(r12).
asm(R"(
    .text
    .p2align 4
    .globl kivi_simt_switch
    .hidden kivi_simt_switch
    .type kivi_simt_switch,@function
kivi_simt_switch:
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
    .size kivi_simt_switch, .-kivi_simt_switch

    .p2align 4
    .globl kivi_simt_trampoline
    .hidden kivi_simt_trampoline
    .type kivi_simt_trampoline,@function
kivi_simt_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size kivi_simt_trampoline, .-kivi_simt_trampoline
)");

// A saved context is just its stack pointer.
struct Context {
  void* sp = nullptr;
};

// Prepare `ctx` so that switching to it runs entry(arg) on `stack`.
inline void context_make(Context& ctx, const Stack& stack, void (*entry)(void*), void* arg) {
  uintptr_t top = ((uintptr_t)(stack.base + stack.size)) & ~(uintptr_t)15;
  uint64_t* sp = (uint64_t*)top;
  *--sp = (uint64_t)&kivi_simt_trampoline;  // return address of the first switch (then rsp % 16 == 0)
  *--sp = 0;                                // rbp
  *--sp = 0;                                // rbx
  *--sp = (uint64_t)arg;                    // r12
  *--sp = (uint64_t)entry;                  // r13
  *--sp = 0;                                // r14
  *--sp = 0;                                // r15
  uint32_t csr[2] = {0x1f80u, 0x037fu};     // default MXCSR, x87 control word
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  *--sp = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffffu) << 32);
  ctx.sp = sp;
}

inline void context_switch(Context& from, Context& to) { kivi_simt_switch(&from.sp, to.sp); }

#else
// Portable fallback: swapcontext (slower: it saves the signal mask with a system call).
struct Context {
  ucontext_t uc;
};
inline void (*g_uc_entry)(void*) = nullptr;
inline void uc_trampoline(unsigned lo, unsigned hi) {
  g_uc_entry((void*)(((uintptr_t)hi << 32) | (uintptr_t)lo));
  abort();
}
inline void context_make(Context& ctx, const Stack& stack, void (*entry)(void*), void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack.base;
  ctx.uc.uc_stack.ss_size = stack.size;
  ctx.uc.uc_link = nullptr;
  g_uc_entry = entry;  // every fiber runs the same entry
  const uintptr_t p = (uintptr_t)arg;
  makecontext(&ctx.uc, (void (*)())uc_trampoline, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

}  // namespace kivi_simt
