"""The general adapter (hifi_fast/adapters/general.py): a model type outside the family table is
patched when its attention follows the common pattern (tests/test_families.py runs every family check
through it on StarCoder2, StableLM, OLMo, Llama 4 text, EXAONE 4, Nemotron, HunYuan dense, Ministral,
Falcon-H1 and ERNIE), and refused otherwise, with an error naming the module and what was expected,
the model left untouched."""
import copy
import logging

import pytest
import torch
from torch import nn

import hifi_fast
from families import BART, DECODER, ENCODER, SEQ_CLS, build, tf
from hifi_fast.adapters import GENERAL, get_adapter


class _SubclassedLinear(nn.Linear):
    pass


def _starcoder2(**overrides):
    torch.manual_seed(0)
    return tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**{**DECODER, **overrides})).eval()


def _with_subclassed_q_proj():
    model = _starcoder2()
    q = model.model.layers[1].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj = _SubclassedLinear(q.in_features, q.out_features, bias=q.bias is not None)
    return model


def _head_dim_disagrees():
    model = _starcoder2()
    model.config.head_dim = 16  # the weights are 4 heads x 8
    return model


def _layer_without_its_own_keys_and_values():
    """As Gemma 3n's KV-shared layers: query and output projections, keys and values of another layer."""
    model = _starcoder2()
    attention = model.model.layers[1].self_attn
    del attention.k_proj, attention.v_proj
    return model


def _heads_per_layer():
    from transformers import CONFIG_MAPPING, AutoModel

    config = CONFIG_MAPPING["embedding_gemma2_text"](**{**DECODER, "head_dim": 8},
                                                     per_layer_config={"01": {"num_key_value_heads": 1}})
    torch.manual_seed(0)
    return AutoModel.from_config(config)


REFUSED = {
    "a convolution inside attention (Nystromformer)": (
        lambda: tf.NystromformerForSequenceClassification(tf.NystromformerConfig(**ENCODER)),
        r"'nystromformer\.encoder\.layer\.0\.attention\.self\.conv\.weight' \(shape \(4, 1, 65, 1\)\) belongs to "
        r"the attention module 'nystromformer\.encoder\.layer\.0\.attention' but is none of its Q/K/V/O projections "
        r"nor a per-head norm"),
    "q/k norm with a weight per head (Cohere)": (
        lambda: tf.CohereForCausalLM(tf.CohereConfig(**DECODER, use_qk_norm=True)),
        r"'model\.layers\.0\.self_attn\.q_norm\.weight' \(shape \(4, 8\)\)"),
    "fused Q/K/V (Falcon)": (
        lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4)),
        r"found a fused Q/K/V projection 'transformer\.h\.0\.self_attention\.query_key_value'"),
    "encoder-decoder stacks (M2M100)": (
        lambda: tf.M2M100ForConditionalGeneration(tf.M2M100Config(**BART)),
        r"found attention modules in 3 stacks \(model\.decoder\.layers\.\*\.encoder_attn, "
        r"model\.decoder\.layers\.\*\.self_attn, model\.encoder\.layers\.\*\.self_attn\)"),
    "a head_dim per layer (Gemma 4)": (
        lambda: tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**DECODER)),
        r"its config gives no single head_dim"),
    "a layer without keys and values of its own (Gemma 3n's KV sharing)": (
        _layer_without_its_own_keys_and_values,
        r"attention modules 'model\.layers\.1\.self_attn' have query and output projections but not key and value "
        r"projections of their own .* the general adapter would leave them out"),
    "a key/value head count per layer (EmbeddingGemma 2)": (
        _heads_per_layer,
        r"its config gives no single num_key_value_heads \('num_key_value_heads' is a per-layer attribute"),
    "shapes that contradict the config": (
        _head_dim_disagrees,
        r"'model\.layers\.0\.self_attn\.q_proj' \(the q projection of layer 0\) has 32 output features; "
        r"expected 4 heads x 16 = 64"),
    "a projection that is not a plain Linear": (
        _with_subclassed_q_proj,
        r"'model\.layers\.1\.self_attn\.q_proj' \(the q projection of layer 1\) is a _SubclassedLinear; hifi_fast "
        r"patches plain torch\.nn\.Linear"),
}


@pytest.mark.parametrize("what", REFUSED)
def test_refused_with_the_module_and_what_was_expected(what):
    make, detail = REFUSED[what]
    model = make().eval()
    model_type = model.config.model_type
    before = copy.deepcopy(model.state_dict())
    message = (rf"does not support {type(model).__name__} \(model_type='{model_type}'\); supported model types: "
               rf"bert, .*; the general adapter, tried for other model types, refused it: {detail}")
    for call in (lambda: get_adapter(model), lambda: hifi_fast.describe(model),
                 lambda: hifi_fast.patch(model, hifi_fast.HeadSelection({0: [0]}))):
        with pytest.raises(hifi_fast.UnsupportedModelError, match=message):
            call()
    assert not hifi_fast.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_describe_and_the_patch_log_name_the_layers_and_projections(caplog):
    model = build("starcoder2", SEQ_CLS)
    assert get_adapter(model) is GENERAL
    text = hifi_fast.describe(model)
    assert text.splitlines()[:2] == [
        "Starcoder2ForSequenceClassification (model_type='starcoder2'): the general adapter (model type not in "
        "hifi_fast's family table; matched by module names and shapes)",
        "2 attention layers x 4 query heads (2 key/value heads), head_dim 8; task heads trained in full: ['score']",
    ]
    assert ("  layer 1: q=model.layers.1.self_attn.q_proj [32->32], k=model.layers.1.self_attn.k_proj [32->16], "
            "v=model.layers.1.self_attn.v_proj [32->16], o=model.layers.1.self_attn.o_proj [32->32]") in text
    with caplog.at_level(logging.WARNING, logger="hifi_fast"):
        hifi_fast.patch(model, hifi_fast.HeadSelection({0: [1]}))
    assert "Starcoder2ForSequenceClassification is patched by the general adapter" in caplog.text
    assert text in caplog.text


def test_a_family_adapter_is_not_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="hifi_fast"):
        hifi_fast.patch(build("gemma", SEQ_CLS), hifi_fast.HeadSelection({0: [1]}))
    assert "general adapter" not in caplog.text
