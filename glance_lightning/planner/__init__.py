"""Planning a fit without a GPU: predicted peak GPU memory, its breakdown, host RAM and s/step on a card.

``fake`` (fake CPU tensors with CUDA's allocation behaviour, a cheap MemTracker), ``memory`` (the module's own
training step at full size on them), ``quant`` (quantised bases and 8-bit states), ``compiled`` (what regional
compile does not keep for backward), ``trace`` (the step's kernels) priced by ``timing`` on a card of ``runtime``'s
table, ``measured`` (the GPU steps the planner is checked against), ``plan`` / ``request`` (a fit config -> a plan)
and ``search`` (the fastest fitting options, interpolated from the three steps ``anchors`` simulates). Used by
``python -m glance_lightning plan`` and ``performance.auto``.
"""
