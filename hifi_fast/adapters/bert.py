"""BERT-style encoders: BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT (separate Q/K/V) and DistilBERT."""
from .base import ArchitectureAdapter


class BertAdapter(ArchitectureAdapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
    layer_pattern = r"encoder\.layer\.(\d+)\.attention"
    q, k, v, o = "self.query", "self.key", "self.value", "output.dense"
    task_heads = ("classifier",)
    unmapped_cross_attention = r"encoder\.layer\.\d+\.crossattention"


class DistilBertAdapter(ArchitectureAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    layer_pattern = r"transformer\.layer\.(\d+)\.attention"
    q, k, v, o = "q_lin", "k_lin", "v_lin", "out_lin"
    heads_attr = "n_heads"
    task_heads = ("pre_classifier", "classifier")
