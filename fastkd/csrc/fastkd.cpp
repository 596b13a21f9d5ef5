// Every fastkd op schema, in one place. Kernels live per family and per device:
// csrc/cpu/<family>.cpp registers TORCH_LIBRARY_IMPL(fastkd, CPU, m), csrc/cuda/<family>.cu the CUDA ones.
// Python registers the fake (meta) kernels after loading (fastkd/_native.py).
//
// Convention: ops fill caller-allocated outputs (marked mutable, `Tensor(x!)`) and return nothing,
// so fake kernels are trivial and no op allocates on the hot path.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  // kd family (fastkd/reference/divergences.py is the contract): per-row loss and the unreduced
  // gradients w.r.t. student (and optionally teacher) logits, computed in one fused pass.
  // grad_student may alias student exactly (inplace mode).
  m.def(
      "kd_fwd(Tensor student, Tensor teacher, Tensor? labels, Tensor(a!) loss, "
      "Tensor(b!)? grad_student, Tensor(c!)? grad_teacher, int divergence, float temperature, "
      "float beta, float skew, int ignore_index, float soft_weight, float hard_weight, "
      "bool scale_temperature, float softcap) -> ()");

  // relational families (fastkd/reference/relational.py is the contract): the loss of one batch
  // of embeddings [N, D] (student and teacher D may differ) into a one-element `loss`, and the
  // student's gradient (for grad_output = 1) into grad_student when given; the teacher is constant.
  m.def(
      "rkd_distance_fwd(Tensor student, Tensor teacher, Tensor(a!) loss, Tensor(b!)? grad_student, "
      "float eps, float huber_delta) -> ()");
  m.def(
      "rkd_angle_fwd(Tensor student, Tensor teacher, Tensor(a!) loss, Tensor(b!)? grad_student, "
      "float huber_delta) -> ()");
  m.def(
      "similarity_preserving_fwd(Tensor student, Tensor teacher, Tensor(a!) loss, "
      "Tensor(b!)? grad_student) -> ()");

  // attention families (fastkd/reference/attention.py is the contract). attention_transfer_fwd:
  // per-sample loss [B] and the student gradient of features [B, C, H*W]; attention_map_fwd: per
  // query-row loss [B, H, L] and the gradient of maps [B, H, L, L] (both for grad_output = 1);
  // attention_relation_fwd: per-row KL and the row log-sum-exps [B, A, L] of Q/K/V relations,
  // attention_relation_bwd: the student gradients from them, recomputing the score tiles.
  m.def(
      "attention_transfer_fwd(Tensor student, Tensor teacher, Tensor(a!) loss, Tensor(b!)? grad_student, "
      "float p) -> ()");
  m.def(
      "attention_map_fwd(Tensor student, Tensor teacher, Tensor? mask, Tensor(a!) loss, "
      "Tensor(b!)? grad_student, int kind, bool student_scores, bool teacher_scores) -> ()");
  m.def(
      "attention_relation_fwd(Tensor student_m, Tensor student_n, Tensor teacher_m, Tensor teacher_n, "
      "Tensor? mask, int num_heads, float scale_s, float scale_t, Tensor(a!) loss, Tensor(b!) lse_student, "
      "Tensor(c!) lse_teacher) -> ()");
  m.def(
      "attention_relation_bwd(Tensor student_m, Tensor student_n, Tensor teacher_m, Tensor teacher_n, "
      "Tensor? mask, int num_heads, float scale_s, float scale_t, Tensor lse_student, Tensor lse_teacher, "
      "Tensor weight, Tensor(a!)? grad_m, Tensor(b!)? grad_n) -> ()");

  // sparse_kd family (fastkd/reference/sparse.py is the contract): distillation from a teacher
  // stored as its top-k (indices, values) per row; per-row loss and the dense unreduced student
  // gradient in one pass. grad_student must not overlap student.
  m.def(
      "sparse_kd_fwd(Tensor student, Tensor indices, Tensor values, Tensor? labels, Tensor(a!) loss, "
      "Tensor(b!)? grad_student, int divergence, float temperature, float beta, float skew, int tail, "
      "int ignore_index, float soft_weight, float hard_weight, bool scale_temperature) -> ()");

  // CPU buffer cache (csrc/cpu/buffers.cpp; used from fastkd/_buffers.py in eager mode only, never
  // traced): an uninitialized contiguous CPU tensor whose memory returns to a bounded pool when
  // its last reference dies, so the next step reuses resident pages; freeing every idle block
  // (-> bytes freed); the pool's byte limit for idle blocks (-> the previous one; 0 disables);
  // [limit, idle bytes, idle blocks, in-use bytes, in-use blocks, hits, misses].
  m.def("cpu_cache_empty(int[] size, ScalarType dtype) -> Tensor");
  m.def("cpu_cache_release() -> int");
  m.def("cpu_cache_set_limit(int limit_bytes) -> int");
  m.def("cpu_cache_stats() -> int[]");

  // Later families go here, one block each, same conventions.
}

// `import fastkd._C` (the ahead-of-time build from setup.py) needs a module init function; the
// import itself runs the static registrations above. The JIT build (fastkd/_native.py) loads the
// same library with torch.ops.load_library and never calls it.
#ifdef TORCH_EXTENSION_NAME
#define FASTKD_CAT_(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT_(a, b)
#define FASTKD_STR_(x) #x
#define FASTKD_STR(x) FASTKD_STR_(x)
PyMODINIT_FUNC FASTKD_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, FASTKD_STR(TORCH_EXTENSION_NAME),
                            "fastkd native ops (registered under torch.ops.fastkd)", -1, nullptr};
  return PyModule_Create(&def);
}
#endif
