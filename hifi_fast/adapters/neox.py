"""GPT-NeoX / Pythia: a fused ``query_key_value`` that interleaves the heads."""
from .base import GROUPED, ArchitectureAdapter


class GPTNeoXAdapter(ArchitectureAdapter):
    """GPT-NeoX, Pythia: ``query_key_value``'s output features are per head ``[q_h | k_h | v_h]``
    (``GROUPED`` with one head per group), so head ``h`` trains the ``3 * head_dim`` adjacent rows
    ``h * 3 * head_dim ...`` of it (bias included) and its input columns of ``dense``."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)
    layer_pattern = r"layers\.(\d+)\.attention"
    qkv, o = "query_key_value", "dense"
    qkv_layout = GROUPED
    task_heads = ("score",)
