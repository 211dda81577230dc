"""Benchmarks of hifi_fast: training steps vs LoRA / full / frozen, scoring cost, kernels."""
