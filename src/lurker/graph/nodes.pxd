# C layout of Op when setup.py compiles nodes.py with Cython (the .py is the source).
# Every field stays public: everything downstream reads ops as plain Python objects.

cdef class Op:
    cdef public Py_ssize_t index, pass_num, num_passes, seq
    cdef public str kind, name, label, rolled
    cdef public tuple modules
    cdef public list module_outputs, parents, children, outputs, params
    cdef public double time
    cdef public bint inplace, random, decides_branch, stale, _provisional
    cdef public object flops, dist_from_input, dist_from_output, value, activation, grad
    cdef public object _func, _skel_args, _skel_kwargs, _inputs, _key, _snapshots
    cdef public object _where, _outs, _extra_parents, _source
    cdef object __weakref__


cdef class ModuleInfo:
    cdef public str path, type
    cdef public object parent
    cdef public list children, ops
    cdef public Py_ssize_t num_passes, num_params
    cdef public dict outputs
