"""Every family in tests/families.py (decoders as sequence classifiers and causal LMs, encoders as
classifiers, encoder-decoders as sequence-to-sequence LMs and classifiers, and model types outside the
table that the general adapter takes), the same checks for each, with no per-family code:

- the adapter finds the declared geometry and output projections, and ``describe`` names it;
- the head layout is right: perturbing one block of a head's Q/K/V rows (fused layouts included)
  changes that head's block of the output projection's input (a query block) or its key/value group's
  (a key or value block), and no other;
- scoring equals the float64 reference (every example run alone, unpadded);
- one SGD step equals masked full fine-tuning (masks built from the slices);
- AdamW steps change only the selected heads' slices (and the task head); save/load, ``unpatch`` and,
  for causal and sequence-to-sequence LMs, greedy ``generate`` give the patched model's outputs bit for bit;
- patch + unpatch without training restores the model bit for bit.
"""
import copy

import pytest
import torch

import hifi_fast
from families import CASES, GENERATES, SEQ2SEQ, FAMILIES, build, model_inputs, o_proj_names, sample
from hifi_fast.adapters import attention_layers, get_adapter
from hifi_fast.tuning.patching import plan_slices
from reference import examples_reference, slice_masks

pytestmark = pytest.mark.usefixtures("one_thread")
SELECTION = {0: [1], 1: [0, 3]}  # a lone head (views) and two apart (compact copies)


@pytest.fixture(params=CASES, ids=[f"{name}-{kind}" for name, kind in CASES])
def case(request):
    return request.param


@torch.no_grad()
def _o_inputs(model, names, inputs) -> list[torch.Tensor]:
    """The inputs of the modules ``names`` (output projections) in one forward of ``inputs`` (a shared
    module's first run: ALBERT's later runs read what every head wrote before)."""
    modules = dict(model.named_modules())
    captured = {}

    def keep(name, args):
        if name not in captured:
            captured[name] = args[0].clone()  # returns None: the module's input stays as it is

    handles = [modules[n].register_forward_pre_hook(lambda m, args, n=n: keep(n, args)) for n in names]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[n] for n in names]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, case):
    if case[1] not in GENERATES:
        return None
    prompt = sample(*case, seed=9, rows=2, tokens=5)["input_ids"]
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=0)


def test_adapter_finds_the_declared_geometry(case):
    name, kind = case
    family, model = FAMILIES[name], build(*case)
    layers = attention_layers(model)
    assert get_adapter(model).family == family.adapter
    assert {(len(layers), l.num_heads, l.num_kv_heads, l.head_dim) for l in layers} == {family.geometry}
    assert [layer.o for layer in layers] == o_proj_names(*case)
    matched = "the general adapter" if family.adapter == "general" else f"the '{family.adapter}' family adapter"
    assert matched in hifi_fast.describe(model)


def test_each_heads_rows_reach_only_its_own_block_of_the_output_projection(case):
    """One block of rows perturbed at a time: a query block changes exactly its head's block of the
    output projection's input, a key or value block exactly its group's (so a query block given to
    another head of the same group is caught too)."""
    model = build(*case)
    adapter, layers = get_adapter(model), attention_layers(model)
    inputs = model_inputs(model, sample(*case), case[1])
    base = _o_inputs(model, [layer.o for layer in layers], inputs)
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    for i, layer in enumerate(layers):
        h, d, group = layer.num_heads, layer.head_dim, layer.num_heads // layer.num_kv_heads
        # OLMo 2 normalises all heads' queries (keys) together: only V's rows are a head's own there
        rows_only = [layer.v] if getattr(adapter, "qk_norm_spans_heads", False) else None
        for head in (0, h - 1):
            own, kv_group = [g == head for g in range(h)], [g // group == head // group for g in range(h)]
            reached = []
            for spec in layer.slices([head]):
                if spec.sliced != "rows" or (rows_only and spec.module_name not in rows_only):
                    continue
                module = modules[spec.module_name]
                weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()
                for block in spec.blocks:
                    rows = weight.detach()[block:block + spec.block_size]
                    kept = rows.clone()
                    with torch.no_grad():
                        rows += torch.randn(rows.shape, generator=generator)
                    out = _o_inputs(model, [layer.o], inputs)[0]
                    with torch.no_grad():
                        rows.copy_(kept)
                    changed = (out != base[i]).reshape(*out.shape[:-1], h, d).flatten(0, -3).any(0).any(-1).tolist()
                    assert changed in (own, kv_group), (layer.index, head, spec.module_name, block, changed)
                    reached.append(changed)
            assert (own in reached) or rows_only, (layer.index, head, "no block reaches the head alone")


def test_scoring_equals_the_float64_reference(case):
    model = build(*case)
    _, heads, _, head_dim = FAMILIES[case[0]].geometry
    data = sample(*case, seed=1)
    scores = hifi_fast.score_heads(model, [data])
    inputs = model_inputs(model, data, case[1])
    examples = [{"input_ids": data["input_ids"][row:row + 1, :int(data["attention_mask"][row].sum())]}
                for row in range(data["input_ids"].shape[0])]
    if case[1] == SEQ2SEQ:  # the decoder's tokens, unpadded
        for row, example in enumerate(examples):
            valid = int(inputs["decoder_attention_mask"][row].sum())
            example["decoder_input_ids"] = inputs["decoder_input_ids"][row:row + 1, :valid]
    richness, corr, pr = examples_reference(model, model, o_proj_names(*case), heads, head_dim, examples)
    assert scores.num_examples == 4
    # atol: a nearly rank-one head's entropy is ~1e-3 nats (Marian's and Pegasus's sinusoidal positions)
    torch.testing.assert_close(scores.richness, richness, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.correlation, corr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.pagerank, pr, rtol=1e-4, atol=1e-6)


def test_gradient_score_is_each_heads_slice_gradient_and_importance_runs(case):
    """``score="gradient"``: per head, the L1 norm of the summed loss's gradient over the slices it
    would train, per example (autograd on the whole model as the reference); ``score="importance"``
    runs on every layout (its values are checked against references in test_importance.py)."""
    if any(layer.mask != "attention_mask" for layer in attention_layers(build(*case))):
        pytest.skip("encoder-decoders refuse task scores (test_encoder_decoder_scoring_...)")
    from hifi_fast.selecting.importance import per_example_loss

    model = build(*case)
    data = sample(*case, seed=3)
    scores = hifi_fast.score_heads(model, [data], gradient=True, importance=True, warmup_steps=0)
    causal_lm = not get_adapter(model).default_modules_to_save(model)
    logits = model(**model_inputs(model, data, case[1])).logits
    per_example_loss(model, logits, data["labels"], causal_lm).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    layers = attention_layers(model)
    expected = torch.zeros(len(layers), layers[0].num_heads)
    for i, layer in enumerate(layers):
        for head in range(layer.num_heads):
            masks = slice_masks(model, layer.slices([head]), ())
            expected[i, head] = sum(grads[n][m].abs().sum() for n, m in masks.items() if m.any())
    torch.testing.assert_close(scores.gradient, expected.double() / 4, rtol=1e-5, atol=1e-9)
    assert scores.importance.shape == expected.shape and torch.isfinite(scores.importance).all()
    assert (scores.importance > 0).any()


def test_one_sgd_step_equals_masked_full_fine_tuning(case):
    base = build(*case)
    data, lr = sample(*case, seed=5), 0.5
    patched = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTION))
    task_heads = patched.hifi_state.modules_to_save
    masks = slice_masks(base, plan_slices(base, hifi_fast.HeadSelection(SELECTION)), task_heads)
    optimizer = torch.optim.SGD([p for p in patched.parameters() if p.requires_grad], lr=lr)
    patched(**data).loss.backward()
    optimizer.step()

    full = copy.deepcopy(base)
    full(**data).loss.backward()
    with torch.no_grad():
        for name, p in full.named_parameters():
            if p.grad is not None:  # None: unused by the task (BigBird's pooler)
                p -= lr * p.grad * masks[name]
    inputs = model_inputs(base, data, case[1])
    torch.testing.assert_close(_logits(patched, inputs), _logits(full, inputs), atol=1e-5, rtol=1e-4)
    merged = dict(hifi_fast.unpatch(patched).named_parameters())
    before = dict(base.named_parameters())
    for name, p in full.named_parameters():
        torch.testing.assert_close(merged[name], p, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
        assert torch.equal(merged[name][~masks[name]], before[name][~masks[name]]), name
        if masks[name].any() and name.endswith("weight") and name.split(".")[0] not in task_heads:
            assert not torch.equal(merged[name], before[name]), f"{name} did not train"


def test_adamw_trains_only_the_selected_slices_and_round_trips(case, tmp_path):
    base = build(*case)
    kind = case[1]
    model = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTION))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-6)
    for step in range(3):
        optimizer.zero_grad()
        model(**sample(*case, seed=step)).loss.backward()
        optimizer.step()
    inputs = model_inputs(base, sample(*case, seed=7), kind)
    logits, generated = _logits(model, inputs), _generate(model, case)

    hifi_fast.save(model, tmp_path)
    loaded = hifi_fast.load(build(*case), tmp_path)
    assert torch.equal(_logits(loaded, inputs), logits)
    plain = hifi_fast.unpatch(model)
    assert not any("HiFi" in type(m).__name__ for m in plain.modules()) and not hasattr(plain, "hifi_state")
    assert torch.equal(_logits(plain, inputs), logits)
    if generated is not None:
        assert torch.equal(_generate(loaded, case), generated) and torch.equal(_generate(plain, case), generated)
        assert torch.equal(_generate(hifi_fast.unpatch(loaded), case), generated)

    task_heads = get_adapter(base).default_modules_to_save(base)
    masks = slice_masks(base, plan_slices(base, hifi_fast.HeadSelection(SELECTION)), task_heads)
    before, after = dict(base.named_parameters()), dict(plain.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), f"{name} changed outside the selected slices"
        if mask.any() and name.endswith("weight"):
            assert not torch.equal(after[name], before[name]), f"{name} did not train"


def test_patch_then_unpatch_restores_the_model_bit_for_bit(case):
    base = build(*case)
    model = hifi_fast.unpatch(hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTION)))
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    state, reference = model.state_dict(), base.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in base.parameters()]


def test_encoder_decoder_layers_are_the_encoders_then_each_decoder_blocks_self_and_cross_attention():
    model = build("bart", SEQ2SEQ)
    layers = attention_layers(model)
    assert [layer.q.rsplit(".", 1)[0] for layer in layers] == [
        "model.encoder.layers.0.self_attn", "model.encoder.layers.1.self_attn", "model.decoder.layers.0.self_attn",
        "model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.self_attn", "model.decoder.layers.1.encoder_attn"]
    assert [layer.mask for layer in layers] == ["attention_mask"] * 2 + ["decoder_attention_mask"] * 4
    assert [layer.index for layer in layers] == list(range(6))


def test_encoder_decoder_scoring_reads_decoder_inputs_or_labels_and_refuses_task_scores():
    model = build("t5", SEQ2SEQ)
    data = sample("t5", SEQ2SEQ, seed=2)
    inputs = model_inputs(model, data, SEQ2SEQ)
    from_labels = hifi_fast.score_heads(model, [data])
    explicit = hifi_fast.score_heads(model, [{k: v for k, v in inputs.items()}])
    torch.testing.assert_close(explicit.correlation, from_labels.correlation, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"scoring batch 0: an encoder-decoder's decoder layers need 'decoder_input_ids' "
                                        r"or token 'labels'"):
        hifi_fast.score_heads(model, [{"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}])
    empty = dict(data, labels=torch.full_like(data["labels"], -100))
    with pytest.raises(ValueError, match="scoring batch 0 is all decoder padding"):
        hifi_fast.score_heads(model, [empty])
    for score in ("importance", "gradient"):
        with pytest.raises(ValueError, match="importance and gradient scores are not implemented for encoder-decoder"):
            hifi_fast.patch(build("t5", SEQ2SEQ), hifi_fast.HiFiConfig(score=score), [data])


def test_encoder_decoder_with_other_decoder_head_count_or_no_encoder_is_refused():
    import transformers as tf
    from families import BART

    model = tf.BartForConditionalGeneration(tf.BartConfig(**{**BART, "decoder_attention_heads": 2}))
    with pytest.raises(hifi_fast.UnsupportedModelError, match=r"its encoder has 4 heads per layer and its decoder 2"):
        hifi_fast.patch(model, hifi_fast.HeadSelection({0: [0]}))
    decoder_only = tf.BartForCausalLM(tf.BartConfig(**BART))
    with pytest.raises(hifi_fast.UnsupportedModelError, match=r"a decoder without its encoder never runs its "
                                                              r"cross-attention layers"):
        hifi_fast.describe(decoder_only)


def test_big_bird_block_sparse_scores_the_tokens_it_pads_as_padding_and_trains():
    """Block-sparse BigBird pads the input to a multiple of its block itself: scoring counts those
    tokens as padding (the scores equal those of the batch padded beforehand), and training runs."""
    import transformers as tf
    from families import ENCODER, batch

    torch.manual_seed(0)
    config = tf.BigBirdConfig(**ENCODER, attention_type="block_sparse", block_size=2, num_random_blocks=1, num_labels=3)
    model = tf.BigBirdForSequenceClassification(config).eval()
    assert type(model.bert.encoder.layer[0].attention.self).__name__ == "BigBirdBlockSparseAttention"
    data = batch(seed=1, tokens=19)  # long enough for block-sparse attention, padded to 20 by the model
    padded = {k: v if k == "labels" else torch.nn.functional.pad(v, (0, 1)) for k, v in data.items()}
    scores, expected = hifi_fast.score_heads(model, [data]), hifi_fast.score_heads(model, [padded])
    for name in ("richness", "correlation", "pagerank"):
        torch.testing.assert_close(getattr(scores, name), getattr(expected, name), rtol=1e-6, atol=1e-9)
    patched = hifi_fast.patch(copy.deepcopy(model), hifi_fast.HeadSelection(SELECTION))
    optimizer = torch.optim.AdamW([p for p in patched.parameters() if p.requires_grad], lr=1e-2)
    patched(**data).loss.backward()
    optimizer.step()
    trained = _logits(patched, model_inputs(patched, data, "seq_cls"))
    assert torch.equal(_logits(hifi_fast.unpatch(patched), model_inputs(model, data, "seq_cls")), trained)


def test_head_gate_gradients_refuse_encoder_decoders():
    from hifi_fast.selecting.importance import head_gate_gradients

    with pytest.raises(ValueError, match="importance and gradient scores are not implemented for encoder-decoder"):
        head_gate_gradients(build("bart", SEQ2SEQ), sample("bart", SEQ2SEQ))
