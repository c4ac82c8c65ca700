# C types for _recorder.py when setup.py compiles it with Cython (the .py is the source;
# without a build it runs as is). Attributes are public: trace.py and the tests read them.
cimport cython

from ..graph.nodes cimport ModuleInfo, Op
from ._funcs cimport FuncInfo
from ._tree cimport call_tensors, tensors


cdef class _Core:
    cdef public object model, save, transform, device, failed, stop_frame, _top
    cdef public bint grads, stale_hit, fast_save, save_all
    cdef public Py_ssize_t seq, _param_depth
    cdef public list nodes, _chain, _sites, _calls
    cdef public dict producers, aliases, mutators, params, param_shapes, buffers
    cdef public dict buffer_nodes, constant_nodes, keys, name_counts, module_info, modules
    cdef public dict paths, param_refs
    cdef public set param_modules, saved_modules
    cdef public tuple stack, _paths

    @cython.locals(kinds=dict, chain=list, sites=list, calls=list, prev_calls=list,
                   known=Py_ssize_t, splice=Py_ssize_t, cut=Py_ssize_t, q=Py_ssize_t,
                   shift=Py_ssize_t, i=Py_ssize_t, new=Py_ssize_t, j=Py_ssize_t,
                   stack=tuple, paths=tuple, depth=Py_ssize_t, info=ModuleInfo)
    cdef _locate(self)

    @cython.locals(d=Py_ssize_t, calls=list)
    cdef Py_ssize_t _cut(self)

    @cython.locals(hit=tuple)
    cpdef tuple _resolve(self, t)

    cpdef tuple _source_of(self, t)

    @cython.locals(producers=dict, inputs=list, versions=list, ins=list, outs=list,
                   changed=list, j=Py_ssize_t, inplace=bint, hit=tuple, dt=double, t0=double,
                   info=FuncInfo, node=Op)
    cdef _op(self, func, types, tuple args, kwargs)

    @cython.locals(idx=Py_ssize_t, k=Py_ssize_t, producers=dict, node=Op, hold=bint)
    cdef Op _record(self, func, FuncInfo info, list inputs, tuple args, dict kwargs, list outs,
                 double dt, kind, value)

    @cython.locals(parents=list, pnames=list, nodes=list, n=Py_ssize_t,
                   entry=list, sites=list, cut=Py_ssize_t, parent=Op, refs=dict)
    cdef _complete(self, Op node)


cdef _meta(t)


# ``d`` (a module's _modules, _parameters or _buffers) stays untyped: torch itself swaps in
# an OrderedDict (``del seq[i]``), which a ``dict``-typed local rejects
@cython.locals(out=list)
cpdef list _stamp(modules)

@cython.locals(i=Py_ssize_t, n=Py_ssize_t)
cpdef bint _same_stamp(list stamp, modules)


cdef inline bint _alive(held, t)
