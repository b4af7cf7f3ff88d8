"""Kernel benchmarks of batch normalization (:mod:`~bnlib.bench.timing`): bnlib against torch's
native kernel, autograd from operations and NumPy; used by ``benchmarks/bench_batchnorm.py`` and
the benchmarks chapter. Built on :mod:`bnlib.norm` only.
"""
