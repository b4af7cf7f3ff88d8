"""Kernel benchmarks of batch normalization (:mod:`~bnlib.bench.timing`): bnlib against torch's
native kernel, autograd from operations and NumPy; and the roofline they are measured against
(:mod:`~bnlib.bench.roofline`: bytes that must move, the machine's bandwidth and balance). Used by
``benchmarks/bench_batchnorm.py`` and the benchmarks appendix. Built on :mod:`bnlib.norm` only.
"""
