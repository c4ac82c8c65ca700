# C types for _tree.py when setup.py compiles it with Cython (the .py is the source).
cimport cython


@cython.locals(ins=list)
cpdef list call_tensors(tuple args, dict kwargs)

cpdef list tensors(obj, list acc)
