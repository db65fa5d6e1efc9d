"""Planning a fit without a GPU: predicted peak GPU memory, its breakdown, host RAM and a roofline s/step.

``fake`` (fake CPU tensors with CUDA's allocation behaviour, a cheap MemTracker), ``memory`` (the module's own
training step at full size on them), ``quant`` (quantised bases and 8-bit states), ``runtime`` (GPU table and
roofline), ``plan`` / ``request`` (a fit config -> a plan) and ``search`` (the fastest fitting options). Used by
``python -m glance_lightning plan``.
"""
