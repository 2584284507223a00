"""Triton kernels of lrcomp, installed as the subpackage ``lrcomp.kernels``.

Nothing here imports lrcomp; :mod:`lrcomp.ops` is the only caller. Importing this package
imports triton, so callers import it lazily.
"""
