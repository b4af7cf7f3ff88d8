"""The laboratory the chapters run: data, models, one training loop, measurements and probes,
seeds and scale, and (in :mod:`bnlib.lab.experiments`) each chapter's own experiments.

It builds on :mod:`bnlib.norm` and never on :mod:`bnlib.present`.
"""
