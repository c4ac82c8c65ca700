# C types for postprocess.py when setup.py compiles it with Cython (the .py is the source).
cimport cython

from .nodes cimport ModuleInfo, Op


@cython.locals(node=Op, counters=dict, index=dict, n=Py_ssize_t, info=ModuleInfo)
cpdef dict finish(list nodes, dict modules)

@cython.locals(node=Op, child=Op, ms=tuple, cm=tuple, depth=Py_ssize_t, exit_at=Py_ssize_t,
               c=Py_ssize_t, j=Py_ssize_t, n=Py_ssize_t, info=ModuleInfo)
cpdef _module_outputs(list nodes, dict modules)

@cython.locals(node=Op)
cpdef _distances(list nodes)

@cython.locals(dist=list, node=Op, i=Py_ssize_t, j=Py_ssize_t)
cpdef list _levels(list nodes, str start, bint down)
