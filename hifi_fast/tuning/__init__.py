"""Make the selected heads trainable: model + ``HeadSelection`` -> a model whose only trainable
parameters are those heads' slices (and the task head); the per-step hot path.

``patching`` (``patch_selection``/``unpatch``, the base-weight fingerprint), ``modules`` (the head-slice
projections: views of the weight or compact copies written after each optimizer step),
``sparse_head_linear`` (the autograd Function: the base model's forward, a sparse-head backward) and
``guard`` (steps with a non-finite loss or gradient skipped).
"""
