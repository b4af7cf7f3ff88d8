"""Experiments that belong to one chapter each: small batches and non-i.i.d. batches
(:mod:`~bnlib.lab.experiments.small_batches`), recurrent networks
(:mod:`~bnlib.lab.experiments.recurrent`), data-parallel training
(:mod:`~bnlib.lab.experiments.data_parallel`), noisy and lp batch norm
(:mod:`~bnlib.lab.experiments.noisy`), deep linear networks (:mod:`~bnlib.lab.experiments.deep_linear`).

The rest of :mod:`bnlib.lab` never imports from here.
"""
