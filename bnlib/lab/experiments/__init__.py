"""Experiments that belong to one chapter each. The rest of :mod:`bnlib.lab` never imports from here.

- :mod:`~bnlib.lab.experiments.covariate_shift`: the internal-covariate-shift chapter's runs;
- :mod:`~bnlib.lab.experiments.conv_statistics`: per-channel vs per-position statistics in CNNs;
- :mod:`~bnlib.lab.experiments.train_vs_inference`: PreciseBN, small normalization batches, mistakes;
- :mod:`~bnlib.lab.experiments.benefits`: the practical benefits tested one by one;
- :mod:`~bnlib.lab.experiments.scale_invariance`: joint scale invariance, the first step, eval mode;
- :mod:`~bnlib.lab.experiments.small_batches`: small and non-i.i.d. batches;
- :mod:`~bnlib.lab.experiments.recurrent`: recurrent networks with batch and layer norm;
- :mod:`~bnlib.lab.experiments.data_parallel`: data-parallel training with synchronized BN;
- :mod:`~bnlib.lab.experiments.noisy`: noisy and lp batch norm (the smoothing chapter);
- :mod:`~bnlib.lab.experiments.deep_linear`: deep linear networks (the smoothing chapter);
- :mod:`~bnlib.lab.experiments.smoothing`: the smoothing chapter's landscape and curvature probes;
- :mod:`~bnlib.lab.experiments.limitations`: the limitations chapter's ablations;
- :mod:`~bnlib.lab.experiments.alternatives`: training without batch normalization;
- :mod:`~bnlib.lab.experiments.transformers`: a tiny Transformer on padded sequences.
"""
