"""Triton kernels for OPT-style training, one module per op family (installed as ``opt_core.kernels``).

The modules are never shadowed by the functions they define: ``opt_core.kernels.attention`` is the
module (its ``TMA`` switch works), ``opt_core.functional.attention`` the op.  ``dispatch`` decides
where every op runs (the Triton kernel, or a plain-PyTorch path), ``reference`` is the float64
oracle of the tests.  Importing this package imports nothing else, not the model stack.
"""
