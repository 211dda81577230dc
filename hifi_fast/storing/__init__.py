"""Patched model <-> files: ``checkpoint`` (``save``/``load`` of the slices and task head, checked
against the base model), ``swap`` (one base model serving many checkpoints), ``training_state``
(resumable runs) and ``files`` (crash-safe writes).
"""
