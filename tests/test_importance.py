"""Head importance (``score="importance"``, Michel, Levy & Neubig 2019): gate gradients against central
finite differences in float64; the accumulated score against a plain per-example loop with its own
gates and loss (classifiers and a causal LM, padding included); task awareness (heads that cannot
affect the loss score 0 while their richness does not); the task-head warm-up; selection;
serialisation; errors; and distributed scoring (2 gloo processes)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import BertModel, LlamaConfig, LlamaForCausalLM

import hifi_fast
from hifi_fast.selecting import importance as imp
from hifi_fast.selecting.importance import head_gate_gradients
from hifi_fast.heads import HeadScores
from hifi_fast.selecting.scoring import score_for_config
from conftest import VOCAB, tiny_batch, tiny_model
from reference import O_PROJ, geometry

NO_WARMUP = dict(importance=True, warmup_steps=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is far faster here


def _batches():
    return [tiny_batch(seed=1), tiny_batch(seed=2, batch=3, tokens=7, pad_rows={0: 2, 2: 5})]


def tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def _nll(logits, targets):
    """Per-row negative log-likelihood, written out (not the package's loss)."""
    return -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def reference_importance(model, family, batches, lm_labels=None):
    """Each example alone and unpadded, with gates and loss of its own: mean over examples of
    ``|dL/d xi|`` (classifier: cross-entropy of the label; LM: mean next-token NLL over the targets,
    ``lm_labels`` rows when given, else the text)."""
    num_layers, num_heads, *_ = geometry(model, family)
    modules = dict(model.named_modules())
    total, count = torch.zeros(num_layers, num_heads, dtype=torch.float64), 0
    for b, batch in enumerate(batches):
        for row in range(batch["input_ids"].shape[0]):
            valid = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row:row + 1, :valid]
            gates = [torch.ones(num_heads, dtype=torch.float64, requires_grad=True) for _ in range(num_layers)]

            def hook_for(layer):
                def hook(_module, args):
                    c = args[0]
                    heads = c.view(*c.shape[:-1], num_heads, c.shape[-1] // num_heads)
                    return ((heads * gates[layer].to(c.dtype)[:, None]).view(c.shape),)
                return hook

            handles = [modules[O_PROJ[family].format(i)].register_forward_pre_hook(hook_for(i)) for i in range(num_layers)]
            try:
                logits = model(input_ids=ids).logits.double()
            finally:
                for handle in handles:
                    handle.remove()
            if lm_labels is None and "labels" in batch and batch["labels"].dim() == 1:
                loss = _nll(logits, batch["labels"][row:row + 1])[0]
            else:
                targets = (lm_labels[b] if lm_labels is not None else batch["input_ids"])[row, 1:valid]
                keep = targets != -100  # an example with no target contributes 0
                loss = _nll(logits[0, :-1][keep], targets[keep]).sum() / max(int(keep.sum()), 1)
            total += torch.stack(torch.autograd.grad(loss, gates)).abs()
            count += 1
    return total / count


def _loss_with_gate(model, batch, layer, head, value):
    """Per-example cross-entropy with head ``head`` of ``layer`` scaled by ``value`` (own hook)."""
    num_heads = model.config.num_attention_heads
    o_proj = dict(model.named_modules())[O_PROJ["bert"].format(layer)]

    def hook(_module, args):
        c = args[0].clone()
        width = c.shape[-1] // num_heads
        c[..., head * width:(head + 1) * width] *= value
        return (c,)

    handle = o_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        handle.remove()
    return _nll(logits, batch["labels"])


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 3), (2, 0)])
def test_gate_gradient_equals_central_difference(layer, head):
    model = tiny_model("bert", dtype=torch.float64)
    with torch.no_grad():  # logits of a trained head's size (a fresh one's are ~0.01: tiny gradients)
        model.classifier.weight.mul_(30)
    batch = tiny_batch(seed=5)
    grads = head_gate_gradients(model, batch)
    eps = 1e-3  # float64: the truncation error (~eps^2) stays far below the rounding error (~1e-16/eps)
    central = (_loss_with_gate(model, batch, layer, head, 1 + eps) - _loss_with_gate(model, batch, layer, head, 1 - eps)) / (2 * eps)
    assert grads.shape == (4, 3, 4)
    assert torch.all(central.abs() > 1e-5)  # a real gradient, not rounding noise
    torch.testing.assert_close(grads[:, layer, head], central, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_importance_equals_per_example_loop(family):
    model = tiny_model(family, dtype=torch.float64)
    batches = _batches()
    scores = hifi_fast.score_heads(model, batches, **NO_WARMUP)
    assert scores.num_examples == 7
    torch.testing.assert_close(scores.importance, reference_importance(model, family, batches), rtol=1e-7, atol=1e-12)
    # the statistics of the same pass are those of a pass without importance
    plain = hifi_fast.score_heads(model, batches)
    for name in ("richness", "correlation", "pagerank"):
        torch.testing.assert_close(getattr(scores, name), getattr(plain, name), rtol=1e-12, atol=1e-12)


def test_causal_lm_predicts_its_text_without_warmup():
    model = tiny_lm().double()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _batches()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = hifi_fast.score_heads(model, batches, importance=True)  # default warm-up: none for an LM
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(scores.importance, reference_importance(model, "llama", batches), rtol=1e-7, atol=1e-12)
    # labels given (a collator's, prompt masked with -100) are the targets instead
    labels = [b["input_ids"].masked_fill(b["attention_mask"] == 0, -100) for b in batches]
    for lab in labels:
        lab[:, :3] = -100
    with_labels = [dict(b, labels=lab) for b, lab in zip(batches, labels)]
    got = hifi_fast.score_heads(model, with_labels, importance=True).importance
    torch.testing.assert_close(got, reference_importance(model, "llama", batches, lm_labels=labels), rtol=1e-7, atol=1e-12)


def _head_slice(width, head):
    return slice(head * width, (head + 1) * width)


def test_heads_that_cannot_change_the_loss_score_zero():
    """Head 2 of layer 1 outputs zeros (its value rows are zero); head 1 of layer 0 is read by no one
    (its output-projection columns are zero). Both have importance 0. The first has richness 0, the
    second keeps its richness: richness cannot tell that nothing downstream reads a head."""
    model = tiny_model("bert", dtype=torch.float64)
    intact = hifi_fast.score_heads(model, _batches(), **NO_WARMUP)
    width = model.config.hidden_size // model.config.num_attention_heads
    layers = model.bert.encoder.layer
    with torch.no_grad():
        layers[1].attention.self.value.weight[_head_slice(width, 2)] = 0
        layers[1].attention.self.value.bias[_head_slice(width, 2)] = 0
        layers[0].attention.output.dense.weight[:, _head_slice(width, 1)] = 0
    scores = hifi_fast.score_heads(model, _batches(), **NO_WARMUP)
    assert scores.importance[1, 2] == 0 and scores.importance[0, 1] == 0
    assert intact.importance[1, 2] > 0 and intact.importance[0, 1] > 0
    assert scores.richness[1, 2] == 0 and scores.richness[0, 1] == intact.richness[0, 1] > 0
    others = scores.importance.clone()
    others[1, 2] = others[0, 1] = 1.0
    assert torch.all(others > 0)
    picked = hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(heads_per_layer=3, score="importance")).heads
    assert 1 not in picked[0] and 2 not in picked[1]


def _classification_loss(model, batches):
    with torch.no_grad():
        return sum(float(torch.nn.functional.cross_entropy(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], reduction="sum"))
            for b in batches)


def test_warmup_trains_only_the_task_head_and_keeps_it():
    model = tiny_model("bert").train()
    batches = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loss_before = _classification_loss(model.eval(), batches)
    model.train()
    hifi_fast.score_heads(model, batches, importance=True, warmup_steps=100, warmup_lr=1e-2)
    changed = {k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert _classification_loss(model.eval(), batches) < 0.8 * loss_before
    # warmup_steps=0 leaves the model bit for bit as it was
    again = {k: v.clone() for k, v in model.state_dict().items()}
    hifi_fast.score_heads(model, batches, **NO_WARMUP)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.items())


def test_warmed_head_restored_when_not_kept():
    """keep_warmed_head=False: the warm-up still shapes the scores (equal to the kept run's) but the
    model leaves the scoring pass bit for bit as it came in."""
    batches = _batches()
    kept_model, restored_model = tiny_model("bert"), tiny_model("bert")
    before = {k: v.clone() for k, v in restored_model.state_dict().items()}
    warmup = dict(importance=True, warmup_steps=30, warmup_lr=1e-2)
    kept = hifi_fast.score_heads(kept_model, batches, **warmup)
    restored = hifi_fast.score_heads(restored_model, batches, keep_warmed_head=False, **warmup)
    assert torch.equal(kept.importance, restored.importance)
    assert all(torch.equal(v, restored_model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(kept_model.classifier.weight, restored_model.classifier.weight)
    # the config carries it to patch()
    cfg = hifi_fast.HiFiConfig(heads_per_layer=1, score="importance", importance_warmup_steps=30,
                               keep_warmed_head=False)
    model = tiny_model("bert")
    head = model.classifier.weight.clone()
    hifi_fast.patch(model, cfg, batches=batches)
    assert torch.equal(model.classifier.weight, head)


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_warmup_replaying_the_backbone_equals_running_it(family, monkeypatch):
    """The warm-up runs the backbone once and replays its outputs; running the whole model every
    step gives the same head."""
    stream = list(hifi_fast.selecting.scoring.scoring_stream(_batches(), torch.device("cpu"), 256, "input_ids", True, False))
    replayed, run = tiny_model(family), tiny_model(family)
    imp.warm_up_task_head(replayed, stream, steps=20, lr=1e-2)
    monkeypatch.setattr(imp, "_backbone", lambda model: None)
    imp.warm_up_task_head(run, stream, steps=20, lr=1e-2)
    for (name, a), b in zip(replayed.named_parameters(), run.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    head = imp.task_head_names(run)[-1] + ".weight"
    assert not torch.equal(run.state_dict()[head], tiny_model(family).state_dict()[head])


def _scores_with(importance, num_layers=2, num_heads=4):
    corr = torch.eye(num_heads, dtype=torch.float64).repeat(num_layers, 1, 1)
    rich = torch.ones(num_layers, num_heads, dtype=torch.float64)
    return HeadScores(rich, corr, torch.full_like(rich, 1 / num_heads), num_examples=4, params_per_head=10,
                      importance=torch.tensor(importance, dtype=torch.float64))


def test_selection_ranks_by_importance():
    scores = _scores_with([[0.1, 0.4, 0.4, 0.3], [0.9, 0.0, 0.2, 0.5]])
    cfg = hifi_fast.HiFiConfig(heads_per_layer=2, score="importance")
    assert hifi_fast.select_heads(scores, cfg).heads == {0: [1, 2], 1: [0, 3]}  # tie 1/2 -> lower index


def test_global_selection_normalises_each_layer_by_its_l2_norm():
    """Layer 0 is flat (1, 1, 1, 1): L2-normalised 0.5 each; layer 1 is (2, 1, 0, 0): 0.894, 0.447.
    The top 2 overall are (1, 0) and (0, 0). Normalised by the layer sums instead (0.25 each; 0.667,
    0.333) they would be (1, 0) and (1, 1)."""
    scores = _scores_with([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 0.0, 0.0]])
    cfg = hifi_fast.HiFiConfig(heads_per_layer=1, score="importance", selection="global")
    assert hifi_fast.select_heads(scores, cfg).heads == {0: [0], 1: [0]}


def test_serialisation_keeps_importance_and_reads_older_dicts():
    scores = _scores_with([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    back = HeadScores.from_dict(scores.to_dict())
    torch.testing.assert_close(back.importance, scores.importance)
    older = scores.to_dict()
    del older["importance"]
    assert HeadScores.from_dict(older).importance is None
    plain = _scores_with([[1.0] * 4] * 2)
    plain.importance = None
    assert "importance" not in plain.to_dict()  # dicts without importance read as before
    selection = hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(heads_per_layer=1, score="importance"))
    again = hifi_fast.HeadSelection.from_json(selection.to_json())
    assert again == selection and torch.equal(again.scores.importance, scores.importance)


def test_errors():
    model = tiny_model("bert")
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in _batches()]
    with pytest.raises(ValueError, match="score='importance' needs labels: scoring batch 0 has no 'labels'"):
        hifi_fast.score_heads(model, unlabelled, importance=True)
    hifi_fast.score_heads(model, unlabelled)  # labels are needed for importance only
    scores = hifi_fast.score_heads(model, _batches())
    with pytest.raises(ValueError, match="needs head importance in the scores.*importance=True"):
        hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(score="importance"))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="needs a model whose output has logits.*BertModel"):
        hifi_fast.score_heads(BertModel(model.config).eval(), _batches(), **NO_WARMUP)
    with pytest.raises(ValueError, match="importance_warmup_steps must be an integer >= 0"):
        hifi_fast.HiFiConfig(score="importance", importance_warmup_steps=-1)
    with pytest.raises(ValueError, match="importance_warmup_lr must be a positive number"):
        hifi_fast.HiFiConfig(importance_warmup_lr=0.0)
    with pytest.raises(ValueError, match="keep_warmed_head must be True or False"):
        hifi_fast.HiFiConfig(keep_warmed_head="no")
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        hifi_fast.score_heads(model, _batches(), importance=True, warmup_steps=1.5)


def test_score_for_config_and_patch():
    cfg = hifi_fast.HiFiConfig(heads_per_layer=2, score="importance", importance_warmup_steps=10)
    model = tiny_model("bert")
    scores = score_for_config(model, _batches(), cfg)
    assert scores.importance is not None and scores.num_examples == 7
    selection = hifi_fast.select_heads(scores, cfg)
    hifi_fast.patch(model, selection)
    model(**tiny_batch()).loss.backward()
    assert score_for_config(tiny_model("bert"), _batches(), hifi_fast.HiFiConfig(score="pagerank")).importance is None


def test_patch_with_importance_config():
    cfg = hifi_fast.HiFiConfig(heads_per_layer=2, score="importance", importance_warmup_steps=10)
    model = hifi_fast.patch(tiny_model("bert"), cfg, batches=_batches())
    assert model.hifi_state.selection.scores.importance is not None


WORLD = 2


def _shards():
    return [tiny_batch(seed=10), tiny_batch(seed=11, batch=3, tokens=8, pad_rows={0: 4})]


def _worker(rank: int, init_file: str, out: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        plain = hifi_fast.score_heads(tiny_model("bert"), [_shards()[rank]], gradient=True, **NO_WARMUP)
        model = tiny_model("bert")
        torch.manual_seed(rank)
        model.classifier.reset_parameters()  # ranks start from different heads: the warm-up syncs them
        warmed = hifi_fast.score_heads(model, [_shards()[rank]], importance=True, warmup_steps=20, warmup_lr=1e-2)
        torch.save({"plain": plain.to_dict(), "warmed": warmed.to_dict(),
                    "head": {k: v.clone() for k, v in model.classifier.state_dict().items()}}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_importance_equals_one_process_on_the_union(tmp_path):
    """Without warm-up, 2 ranks give one process's importance on the union of their shards. With
    it, the ranks train the head data-parallel from rank 0's start, so they end with the same head
    and the same scores (not one process's: that would step through the batches one by one)."""
    out = str(tmp_path / "scores")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD)
    single = hifi_fast.score_heads(tiny_model("bert"), _shards(), gradient=True, **NO_WARMUP)
    results = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    for result in results:
        assert result["plain"]["num_examples"] == 7
        for name in ("importance", "gradient"):  # score='gradient' all-reduces the same way
            torch.testing.assert_close(torch.tensor(result["plain"][name], dtype=torch.float64),
                                       getattr(single, name), rtol=1e-5, atol=1e-9)
    a, b = results
    assert a["warmed"] == b["warmed"]
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])


@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification", "token",
                                     "causal_lm"])
def test_per_example_loss_is_the_transformers_loss(problem):
    """The mean of the per-example losses is the model's own loss (batches where every example has
    the same number of targets, so that the two ways of averaging agree)."""
    from transformers import BertForTokenClassification

    batch = tiny_batch(seed=3, pad_rows={})
    model = tiny_model("bert", num_labels=1 if problem == "regression" else 3)
    generator = torch.Generator().manual_seed(0)
    if problem == "causal_lm":
        model = tiny_lm()
        batch["labels"] = batch["input_ids"].clone()
    elif problem == "token":
        model = BertForTokenClassification(model.config).eval()
        batch["labels"] = torch.randint(0, 3, batch["input_ids"].shape, generator=generator)
        batch["labels"][:, :2] = -100
    elif problem == "regression":
        batch["labels"] = torch.randn(4, generator=generator)
    elif problem == "multi_label_classification":
        model.config.problem_type = problem
        batch["labels"] = torch.randint(0, 2, (4, 3), generator=generator).float()
    with torch.no_grad():
        out = model(**batch)
    causal_lm = not imp.task_head_names(model)
    assert causal_lm == (problem == "causal_lm")
    got = imp.per_example_loss(model, out.logits, batch["labels"], causal_lm)
    assert got.shape == (4,)
    torch.testing.assert_close(got.mean(), out.loss, rtol=1e-6, atol=1e-7)
