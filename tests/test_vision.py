"""Vision transformers (and CLIP's text tower): ViT, DeiT, CLIP towers, CLIPForImageClassification.

Scoring from ``pixel_values`` against a float64 per-example reference, patch/train/save/load/unpatch
against masked full fine-tuning, and the refusals: ``CLIPModel`` (two towers, two geometries) and
``nn.MultiheadAttention`` (fused ``in_proj_weight``). Module names and slice masks are written by
hand here, independent of the adapters.
"""
import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

import hifi_fast
from hifi_fast.adapters import ViTAdapter, get_adapter
from hifi_fast.storing.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from conftest import VOCAB, tiny_batch
from reference import examples_reference
from test_errors import unchanged

LAYERS, HEADS, HIDDEN = 2, 4, 32
HEAD_DIM = HIDDEN // HEADS
VISION = dict(image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=48)
TEXT = dict(
    vocab_size=VOCAB, hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=40,
    max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
)
VIT_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
CLIP_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")

# name: (builder, attention module of layer {}, its Q/K/V/O names, task heads, takes pixels)
FAMILIES = {
    "vit": (lambda: ViTForImageClassification(ViTConfig(**VISION, num_labels=3)), "vit.layers.{}.attention", VIT_PROJ, ("classifier",), True),
    "deit": (lambda: DeiTForImageClassification(DeiTConfig(**VISION, num_labels=3)), "deit.layers.{}.attention", VIT_PROJ, ("classifier",), True),
    "deit_teacher": (
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**VISION, num_labels=3)), "deit.layers.{}.attention",
        VIT_PROJ, ("cls_classifier", "distillation_classifier"), True,
    ),
    "clip_vision": (lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)), "encoder.layers.{}.self_attn", CLIP_PROJ, (), True),
    "clip_vision_proj": (
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=16)),
        "vision_model.encoder.layers.{}.self_attn", CLIP_PROJ, (), True,
    ),
    "clip_text": (
        lambda: CLIPTextModel(CLIPTextConfig(**{**TEXT, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS})),
        "encoder.layers.{}.self_attn", CLIP_PROJ, (), False,
    ),
    "clip_cls": (
        lambda: CLIPForImageClassification(CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=3)),
        "vision_model.encoder.layers.{}.self_attn", CLIP_PROJ, ("classifier",), True,
    ),
}
SELECTION = {0: [1], 1: [0, 3]}


@pytest.fixture(params=list(FAMILIES))
def name(request):
    return request.param


def tiny_vision_model(name, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[name][0]().eval()


def pixel_batch(seed=0, batch=3):
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator), "labels": torch.randint(0, 3, (batch,), generator=generator)}


def batch_for(name, seed=0, batch=3):
    return pixel_batch(seed, batch) if FAMILIES[name][4] else tiny_batch(seed, batch, tokens=9, pad_rows={1: 5})


def _inputs(batch):
    keys = ("pixel_values",) if "pixel_values" in batch else ("input_ids", "attention_mask")
    return {k: batch[k] for k in keys}


def _output(model, batch):
    out = model(**_inputs(batch))
    return out.logits if "logits" in out else out[0]


def _loss(model, batch):
    out = model(**_inputs(batch))
    if "logits" in out:
        return F.cross_entropy(out.logits, batch["labels"])
    target = torch.sin(0.37 * torch.arange(out[0].numel(), dtype=out[0].dtype)).view_as(out[0])
    return F.mse_loss(out[0], target)


def _projection(name, layer, part):
    attention, names, *_ = FAMILIES[name][1:]
    return attention.format(layer) + "." + names["qkvo".index(part)]


# --- scoring -------------------------------------------------------------------------------------

def _score_reference(model, name, batches):
    """Every example alone (text unpadded), float64 (``reference.examples_reference``)."""
    examples = (
        {"pixel_values": batch["pixel_values"][row : row + 1]} if "pixel_values" in batch
        else {"input_ids": batch["input_ids"][row : row + 1, : int(batch["attention_mask"][row].sum())]}
        for batch in batches
        for row in range(len(batch["labels"]))
    )
    o_proj = [_projection(name, layer, "o") for layer in range(LAYERS)]
    return examples_reference(model, model, o_proj, HEADS, HEAD_DIM, examples)


def test_scores_match_float64_reference(name):
    model = tiny_vision_model(name)
    batches = [batch_for(name, seed=1), batch_for(name, seed=2, batch=4)]
    scores = hifi_fast.score_heads(model, batches, num_examples=6)
    assert scores.num_examples == 6
    assert scores.richness.shape == (LAYERS, HEADS) and scores.correlation.shape == (LAYERS, HEADS, HEADS)
    assert all(torch.isfinite(getattr(scores, n)).all() for n in ("richness", "correlation", "pagerank"))
    richness, corr, pr = _score_reference(model, name, [batches[0], {k: v[:3] for k, v in batches[1].items()}])
    torch.testing.assert_close(scores.richness, richness, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.correlation, corr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.pagerank, pr, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "family, batch, message",
    [
        ("vit", {"labels": torch.zeros(2)}, r"batch 0 must be a dict with 'input_ids' \(and 'attention_mask'\) or 'pixel_values'"),
        ("vit", tiny_batch(), r"batch 0 has no 'pixel_values', which this model takes \(batch keys: \['attention_mask', 'input_ids', 'labels'\]\)"),
        ("clip_text", pixel_batch(), r"batch 0 has no 'input_ids', which this model takes"),
        ("deit", {"pixel_values": torch.zeros(3, 32, 32)}, r"pixel_values must be a float \[batch, channels, height, width\] tensor .* got \(3, 32, 32\)"),
        ("clip_vision", {"pixel_values": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, r"got \(2, 3, 32, 32\) torch.uint8"),
    ],
)
def test_bad_scoring_batches(family, batch, message):
    model = tiny_vision_model(family).train()
    with unchanged(model), pytest.raises((TypeError, ValueError), match=message):
        hifi_fast.score_heads(model, [batch])
    assert model.training and not any(m._forward_pre_hooks for m in model.modules())


# --- patch, train, save, load, unpatch -----------------------------------------------------------

def _trainable_masks(model, name, selection):
    """{plain parameter name: entries HiFi trains}: Q/K/V head rows (and bias), O head columns, task heads."""
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for n in masks:
        if n.split(".")[0] in FAMILIES[name][3]:
            masks[n][...] = True
    for layer, heads in selection.items():
        for h in heads:
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            for part in "qkv":
                masks[_projection(name, layer, part) + ".weight"][rows, :] = True
                masks[_projection(name, layer, part) + ".bias"][rows] = True
            masks[_projection(name, layer, "o") + ".weight"][:, rows] = True
    return masks


def _trained(name, seed=0, steps=1):
    base = tiny_vision_model(name, seed)
    model = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTION))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        optimizer.zero_grad()
        _loss(model, batch_for(name, seed=step)).backward()
        optimizer.step()
    return base, model


def test_adamw_step_changes_only_the_selected_heads_and_the_task_head(name):
    base, model = _trained(name)
    masks = _trainable_masks(base, name, SELECTION)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    task = {n for n in masks if n.split(".")[0] in FAMILIES[name][3]}
    assert model.hifi_state.modules_to_save == list(FAMILIES[name][3])
    slices = {_projection(name, layer, part) + f".hifi_{t}" for layer in SELECTION for part in "qkvo" for t in ("weight", "bias")}
    assert trainable == task | slices - {_projection(name, layer, "o") + ".hifi_bias" for layer in SELECTION}
    before, after = base.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for key, mask in masks.items():
        assert torch.equal(after[key][~mask], before[key][~mask]), f"{key}: a frozen entry changed"
    for layer, heads in SELECTION.items():
        for h in heads:
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            for part in "qkvo":
                key = _projection(name, layer, part) + ".weight"
                block = (lambda w: w[:, rows]) if part == "o" else (lambda w: w[rows])
                assert not torch.equal(block(after[key]), block(before[key])), f"{key}: head {h} did not train"


def test_one_sgd_step_equals_masked_full_fine_tuning(name):
    base = tiny_vision_model(name)
    batch, lr = batch_for(name, seed=5, batch=4), 0.5
    patched = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTION))
    optimizer = torch.optim.SGD([p for p in patched.parameters() if p.requires_grad], lr=lr)
    _loss(patched, batch).backward()
    optimizer.step()

    full = copy.deepcopy(base)
    masks = _trainable_masks(full, name, SELECTION)
    _loss(full, batch).backward()
    with torch.no_grad():
        for n, p in full.named_parameters():
            if p.grad is not None:  # e.g. CLIPVisionModel's post_layernorm: not on the loss's path
                p -= lr * p.grad * masks[n]
        torch.testing.assert_close(_output(patched, batch), _output(full, batch), atol=1e-6, rtol=0)
    merged = dict(hifi_fast.unpatch(patched).named_parameters())
    for n, p in full.named_parameters():
        torch.testing.assert_close(merged[n], p, atol=1e-6, rtol=0, msg=lambda m: f"{n}: {m}")


def test_save_load_reproduces_outputs_bit_exactly(name, tmp_path):
    _, model = _trained(name, steps=2)
    hifi_fast.save(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = hifi_fast.load(tiny_vision_model(name), tmp_path)
    batch = batch_for(name, seed=7)
    with torch.no_grad():
        assert torch.equal(_output(fresh, batch), _output(model, batch))
    assert fresh.hifi_state.selection.heads == SELECTION
    assert hifi_fast.count_parameters(fresh) == hifi_fast.count_parameters(model)


def test_unpatch_returns_the_plain_model_with_the_same_outputs(name):
    base, model = _trained(name, steps=2)
    batch = batch_for(name, seed=3)
    with torch.no_grad():
        trained = _output(model, batch)
        plain = hifi_fast.unpatch(model)
        assert torch.equal(_output(plain, batch), trained)
    assert not hasattr(plain, "hifi_state") and not any("hifi" in n for n, _ in plain.named_parameters())
    assert type(plain) is type(base) and all(p.requires_grad for p in plain.parameters())
    assert plain.state_dict().keys() == base.state_dict().keys()


def test_patch_with_config_scores_pixel_batches():
    model = tiny_vision_model("deit")
    hifi_fast.patch(model, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=2, num_scoring_examples=5), batches=[pixel_batch(), pixel_batch(seed=1)])
    selection = model.hifi_state.selection
    assert selection.scores.num_examples == 5 and all(len(h) == 2 for h in selection.heads.values())


def test_clip_projection_trains_only_when_asked():
    model = hifi_fast.patch(tiny_vision_model("clip_vision_proj"), hifi_fast.HeadSelection(SELECTION), modules_to_save=["visual_projection"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "hifi_" not in n]
    assert trainable == ["visual_projection.weight"]


# --- CLIPModel: refused as a whole, each tower patched on its own --------------------------------

def _clip_model(seed=0):
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)).eval()


def test_clip_model_is_refused_with_the_towers_to_patch():
    model = _clip_model()
    message = (
        r"does not patch CLIPModel as a whole: its two towers have their own geometry \(vision: 2 layers x 4 heads, "
        r"text: 3 layers x 2 heads\).*Patch model\.vision_model \(clip_vision_model\) and/or model\.text_model"
    )
    calls = (
        lambda: get_adapter(model),
        lambda: hifi_fast.score_heads(model, [{**tiny_batch(), **pixel_batch(batch=4)}]),
        lambda: hifi_fast.patch(model, hifi_fast.HeadSelection({0: [0]})),
    )
    with unchanged(model):
        for call in calls:
            with pytest.raises(hifi_fast.UnsupportedModelError, match=message):
                call()


def test_clip_model_towers_patch_train_save_and_unpatch_on_their_own(tmp_path):
    model = _clip_model()
    text, pixels = tiny_batch(), pixel_batch(batch=4)
    vision_scores = hifi_fast.score_heads(model.vision_model, [pixels])
    text_scores = hifi_fast.score_heads(model.text_model, [text])
    assert vision_scores.richness.shape == (2, 4) and text_scores.richness.shape == (3, 2)
    config = hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=1)
    for tower, scores in ((model.vision_model, vision_scores), (model.text_model, text_scores)):
        hifi_fast.patch(tower, hifi_fast.select_heads(scores, config))
    rest = {n for n, p in model.named_parameters() if p.requires_grad and "hifi_" not in n}
    assert rest == {"logit_scale", "visual_projection.weight", "text_projection.weight"}  # outside the towers: the user's
    for n in rest:
        model.get_parameter(n).requires_grad_(False)
    inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels["pixel_values"]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, return_loss=True).loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained = model(**inputs).logits_per_image
        assert not torch.equal(trained, _clip_model()(**inputs).logits_per_image)
    fresh = _clip_model()
    for tower in ("vision_model", "text_model"):
        hifi_fast.save(getattr(model, tower), tmp_path / tower)
        hifi_fast.load(getattr(fresh, tower), tmp_path / tower)
        hifi_fast.unpatch(getattr(model, tower))
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits_per_image, trained)
        assert torch.equal(model(**inputs).logits_per_image, trained)
    assert not any("HiFi" in type(m).__name__ for m in model.modules())


# --- refusals and layouts ------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.mlp(x + self.attn(x, x, x, need_weights=False)[0])


class _TorchTransformer(nn.Module):
    def __init__(self, model_type=None):
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        if model_type is not None:
            self.config = SimpleNamespace(model_type=model_type)

    def forward(self, pixel_values):
        return self.blocks(pixel_values.flatten(2).transpose(1, 2)[..., :HIDDEN])


@pytest.mark.parametrize("model_type", [None, "vit"])
def test_multihead_attention_is_refused_naming_the_module(model_type):
    model = _TorchTransformer(model_type)
    message = (
        r"does not support _TorchTransformer: module 'blocks\.0\.attn' is a torch\.nn\.MultiheadAttention, whose Q/K/V "
        r"share one fused in_proj_weight; .*supported model types: bert, .*vit, deit, clip_vision_model, clip_text_model, clip$"
    )
    calls = (
        lambda: get_adapter(model),
        lambda: hifi_fast.score_heads(model, [pixel_batch()]),
        lambda: hifi_fast.patch(model, hifi_fast.HeadSelection({0: [0]})),
        lambda: hifi_fast.patch(model, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=1), batches=[pixel_batch()]),
    )
    with unchanged(model):
        for call in calls:
            with pytest.raises(hifi_fast.UnsupportedModelError, match=message):
                call()
    with pytest.raises(hifi_fast.UnsupportedModelError, match="the model itself is a torch.nn.MultiheadAttention"):
        get_adapter(nn.MultiheadAttention(HIDDEN, HEADS))


def test_vit_adapter_finds_the_transformers_4_layout():
    """transformers 4.x: ``encoder.layer.N.attention.{attention.query/key/value, output.dense}``."""

    def module(**children):
        parent = nn.Module()
        for key, child in children.items():
            parent.add_module(key, child)
        return parent

    def layer():
        self_attention = module(query=nn.Linear(HIDDEN, HIDDEN), key=nn.Linear(HIDDEN, HIDDEN), value=nn.Linear(HIDDEN, HIDDEN))
        return module(attention=module(attention=self_attention, output=module(dense=nn.Linear(HIDDEN, HIDDEN))))

    model = module(vit=module(encoder=module(layer=nn.ModuleList([layer(), layer()]))), classifier=nn.Linear(HIDDEN, 3))
    model.config = ViTConfig(**VISION)
    layers = ViTAdapter().layers(model)
    assert [(l.index, l.q, l.k, l.v, l.o, l.num_heads, l.head_dim) for l in layers] == [
        (i, *(f"vit.encoder.layer.{i}.attention.{p}" for p in ("attention.query", "attention.key", "attention.value", "output.dense")), HEADS, HEAD_DIM)
        for i in range(2)
    ]
