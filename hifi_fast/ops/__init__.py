"""The hot ops of hifi_fast in plain PyTorch: the reference every backend must match."""
from .head_statistics import cka_from_cross, entropy_from_grams, head_grams
from .sparse_head_grad import cols_grad_at, feature_index, head_cols_grad, head_rows_grad, rows_grad_at

__all__ = [
    "cka_from_cross", "cols_grad_at", "entropy_from_grams", "feature_index", "head_cols_grad", "head_grams", "head_rows_grad",
    "rows_grad_at",
]
