"""The method's pure code, the bottom layer: the answer format, the grounding record, the metrics.

No Lightning and no training machinery: functions and small classes of plain data that the
packages above (``lightning_modules``, ``datamodules``, ``callbacks``, then ``timerefine``) import.
"""
