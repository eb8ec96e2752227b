// binding.cpp — DecodeBatch.attend's per-layer call with the tensors read in C++ (a CPython
// extension module over torch's C++ tensors; loader.py builds it once per machine and torch).
//
// Why: a decode call at short context is small (SmolLM2 at 1K: ~24 us of kernel on two threads) and
// runs once per layer per step, and reading a torch tensor's dtype, shape, strides, device and data
// pointer from Python costs 60-130 ns per attribute: ~4 us of Python per call, which does not
// parallelise. Here the same reads are a few nanoseconds each.
//
// What: `attend(block, query, key, value, kv_pages, staging, scale, out) -> int`. `block` is the
// DecodeBatch's int64 block (BindArg below: the kernel's entry point, the plan, what the layer's
// tensors must match, the RunArg block to fill). If every argument is in the form the quick test of
// decode_attention.py DecodeBatch.attend accepts — the same conditions — the RunArg block is filled
// and kivi_decode_run (the ctypes library's, whose ISA the batch picked) runs with the GIL released:
// the result is its status (0, or a kivi_cpu.h Status with err in the RunArg block). Anything else
// returns -1 without touching anything: the Python side then names what is wrong (or passes an
// unusual valid form, e.g. a size-1 dimension with any stride, through the ctypes path). So every
// error message stays in one place, and this file is only a faster reader of the common case.
//
// Headers: torch's python_variable.h (the official THPVariable -> at::Tensor access); building it
// costs ~20 s of CPU once per torch version (loader.py caches it), which is why the kernels
// themselves stay a torch-free library.

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>

#include "kivi_cpu.h"

namespace {

using kivi_cpu::i64;

// A DecodeBatch's block (decode_attention.py _BIND, in this order).
enum BindArg : int {
  kBindRun,          // kivi_decode_run of the batch's library
  kBindPlan,         // its plan
  kBindCall,         // address of the batch's RunArg block (kivi_cpu.h)
  kBindHkv,          // KV heads
  kBindDim,          // head_dim
  kBindNeed,         // rows every layer tensor must have (query_start_loc[B])
  kBindPages,        // kv_pages' shape (3)
  kBindStaging = kBindPages + 3,      // staging's shape (5)
  kBindStagingType = kBindStaging + 5,  // staging's dtype: a model dtype's code, or kI8 (uint8)
  kNumBindArgs
};

typedef int (*RunFn)(void*, i64*, float);

// kivi_cpu.h DType of a model dtype, -1 for any other.
inline int model_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return kivi_cpu::kF32;
    case c10::ScalarType::BFloat16: return kivi_cpu::kBF16;
    case c10::ScalarType::Half: return kivi_cpu::kF16;
    default: return -1;
  }
}

// A plain strided CPU tensor (exactly torch.Tensor or a Parameter: a subclass may mean something
// else), or nullptr.
inline const at::Tensor* plain(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || t.layout() != c10::kStrided || !t.device().is_cpu() || !t.has_storage()) return nullptr;
  return &t;
}

// The row stride of `t` as (>= need, heads, D) of `dtype` with each token's row dense (strides
// (s, D, 1), s >= heads * D), heads 0 meaning any (> 0); -1 if it is not so.
inline i64 row_stride(const at::Tensor& t, c10::ScalarType dtype, i64 heads, i64 D, i64 need) {
  if (t.scalar_type() != dtype || t.dim() != 3) return -1;
  const c10::IntArrayRef s = t.sizes(), st = t.strides();
  if (s[2] != D || s[0] < need || s[1] <= 0 || (heads && s[1] != heads)) return -1;
  if (st[2] != 1 || st[1] != D || st[0] < s[1] * D) return -1;
  return st[0];
}

inline bool same_shape(const at::Tensor& t, const i64* want, int n) {
  if (t.dim() != n) return false;
  const c10::IntArrayRef s = t.sizes();
  for (int i = 0; i < n; ++i)
    if (s[i] != want[i]) return false;
  return true;
}

// attend(block, query, key, value, kv_pages, staging, scale, out) -> status (module docstring).
PyObject* attend(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "attend(block, query, key, value, kv_pages, staging, scale, out)");
    return nullptr;
  }
  Py_buffer view;
  if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) != 0) return nullptr;
  if (view.len != (Py_ssize_t)(kNumBindArgs * sizeof(i64))) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_ValueError, "attend: block is not a DecodeBatch's binding block");
    return nullptr;
  }
  const i64* b = static_cast<const i64*>(view.buf);
  const i64 H = b[kBindHkv], D = b[kBindDim], need = b[kBindNeed];
  int status = -1;
  const at::Tensor *q = plain(args[1]), *k = plain(args[2]), *v = plain(args[3]), *pages = plain(args[4]),
                   *staging = plain(args[5]), *out = plain(args[7]);
  PyObject* scale_obj = args[6];
  const double scale = PyFloat_CheckExact(scale_obj) ? PyFloat_AS_DOUBLE(scale_obj) : -1.0;
  if (q && k && v && pages && staging && out && scale > 0.0 && scale < INFINITY) {
    const c10::ScalarType dt = q->scalar_type();
    const int code = model_code(dt);
    const int stype = model_code(staging->scalar_type()) >= 0 ? model_code(staging->scalar_type())
                      : staging->scalar_type() == c10::ScalarType::Byte ? kivi_cpu::kI8 : -1;
    const i64 qt = code >= 0 ? row_stride(*q, dt, 0, D, need) : -1;
    const i64 Hq = qt >= 0 ? q->sizes()[1] : 0;
    const i64 kt = row_stride(*k, dt, H, D, need), vt = row_stride(*v, dt, H, D, need);
    const i64 ot = row_stride(*out, dt, Hq, D, need);
    if (qt >= 0 && kt >= 0 && vt >= 0 && ot >= 0 && Hq % H == 0 && stype == b[kBindStagingType] &&
        (stype == kivi_cpu::kI8 || stype == code) && pages->scalar_type() == c10::ScalarType::Byte &&
        same_shape(*pages, b + kBindPages, 3) && pages->is_contiguous() && same_shape(*staging, b + kBindStaging, 5) &&
        staging->is_contiguous()) {
      i64* call = reinterpret_cast<i64*>(static_cast<uintptr_t>(b[kBindCall]));
      const i64 T = std::min(std::min(q->sizes()[0], k->sizes()[0]), std::min(v->sizes()[0], out->sizes()[0]));
      call[kivi_cpu::kRunDtype] = code;
      call[kivi_cpu::kRunHq] = Hq;
      call[kivi_cpu::kRunT] = T;
      call[kivi_cpu::kRunQuery] = reinterpret_cast<i64>(q->data_ptr());
      call[kivi_cpu::kRunKey] = reinterpret_cast<i64>(k->data_ptr());
      call[kivi_cpu::kRunValue] = reinterpret_cast<i64>(v->data_ptr());
      call[kivi_cpu::kRunStaging] = reinterpret_cast<i64>(staging->data_ptr());
      call[kivi_cpu::kRunPages] = reinterpret_cast<i64>(pages->data_ptr());
      call[kivi_cpu::kRunOut] = reinterpret_cast<i64>(out->data_ptr());
      call[kivi_cpu::kRunQStride] = qt;
      call[kivi_cpu::kRunKStride] = kt;
      call[kivi_cpu::kRunVStride] = vt;
      call[kivi_cpu::kRunOStride] = ot;
      call[kivi_cpu::kRunThreads] = at::get_num_threads();
      const RunFn run = reinterpret_cast<RunFn>(static_cast<uintptr_t>(b[kBindRun]));
      void* plan = reinterpret_cast<void*>(static_cast<uintptr_t>(b[kBindPlan]));
      const float fscale = (float)scale;
      Py_BEGIN_ALLOW_THREADS
      status = run(plan, call, fscale);
      Py_END_ALLOW_THREADS
    }
  }
  PyBuffer_Release(&view);
  return PyLong_FromLong(status);
}

PyMethodDef methods[] = {
    {"attend", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(attend)), METH_FASTCALL,
     "attend(block, query, key, value, kv_pages, staging, scale, out) -> status: one layer's decode over a "
     "DecodeBatch's plan (0: done; > 0: the kernel's status; -1: arguments not in the common form, nothing run)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "kivi_cpu_binding", "kivi-serve: DecodeBatch.attend read in C++",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_kivi_cpu_binding() {
  if (THPVariableClass == nullptr) {  // torch's C module must be imported first (it is: loader.py imports torch)
    PyErr_SetString(PyExc_ImportError, "kivi_cpu_binding: import torch first");
    return nullptr;
  }
  return PyModule_Create(&module);
}
