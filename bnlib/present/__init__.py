"""What a chapter page shows: tables and glued values (:mod:`~bnlib.present.report`), the figure
style (:mod:`~bnlib.present.plots`), explorers (:mod:`~bnlib.present.widgets`), the chapter's
setup (:mod:`~bnlib.present.setup`) and the verdicts on the sources' claims
(:mod:`~bnlib.present.claims`). Built on :mod:`bnlib.lab` and :mod:`bnlib.norm`.
"""
