"""TimeRefine on Lightning: the method's answer format, metrics, run pipeline and tools.

The model (``lightning_modules``), the data (``datamodules``) and the callbacks (``callbacks``) are
sibling packages; this one holds what they share and what composes them.
"""
