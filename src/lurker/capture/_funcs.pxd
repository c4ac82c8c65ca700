# C layout of FuncInfo when setup.py compiles _funcs.py with Cython (the .py is the source):
# the recorder reads these flags on every op.

cdef class FuncInfo:
    cdef readonly str name
    cdef readonly bint inplace_first, readout, random, dropout, norm
