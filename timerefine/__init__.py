"""TimeRefine on Lightning, the top layer: the run pipeline, inference, tools, demo and entry points.

It composes the design card's packages (``lightning_modules``, ``datamodules``, ``callbacks``), which
build on the method's pure code (``grounding``).
"""
