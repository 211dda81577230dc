"""A whole HiFi training step compiled (``torch.compile`` of the model: forward and backward; and of
the optimizer step), on CPU with inductor: no graph break from hifi_fast, no recompile once the
optimizer state exists, the eager results. And what CUDA-graph capture (``mode="reduce-overhead"``)
needs, checked on the graphs themselves: no host sync (no op that reads a tensor's value on the
host) and nothing read from Python-side state (the slices' version counters) inside them."""
import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import hifi_fast
from conftest import tiny_batch, tiny_model

SELECTION = hifi_fast.HeadSelection({0: [0, 2], 1: [1], 2: [0, 1]})  # copies, views, adjacent heads
HOST_SYNCS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose"}


def _dropout_free(family):
    model = tiny_model(family).train()
    model.config.problem_type = "single_label_classification"  # else transformers sets it in the first call: a recompile
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _train(base, compile_with=None, steps=4):
    model = hifi_fast.patch(copy.deepcopy(base), SELECTION)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    forward = torch.compile(model, backend=compile_with, dynamic=False) if compile_with else model
    step = torch.compile(opt.step, backend=compile_with) if compile_with else opt.step
    graphs = []
    for index in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = forward(**tiny_batch(seed=index)).loss
        loss.backward()
        step()
        graphs.append(counters["stats"]["unique_graphs"])
    return model, graphs


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_training_step_trains_like_eager_without_breaks_or_recompiles(family):
    torch._dynamo.reset()
    counters.clear()
    base = _dropout_free(family)
    eager, _ = _train(base)
    compiled, graphs = _train(base, "inductor")
    assert graphs[1] == graphs[-1], f"recompiled after the optimizer state existed: {graphs}"
    # torch.optim's own first-step state initialisation is the only break (optimizer.py).
    assert all("torch._dynamo.graph_break()" in reason for reason in counters["graph_break"]), dict(counters["graph_break"])
    explanation = torch._dynamo.explain(compiled)(**tiny_batch())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    batch = tiny_batch(seed=7)
    with torch.no_grad():
        logits = compiled(**batch).logits  # eager, after compiled steps: the weight holds the slices
        plain = hifi_fast.unpatch(copy.deepcopy(compiled))(**batch).logits
        torch.testing.assert_close(logits, plain, rtol=0, atol=0)
        want = hifi_fast.unpatch(eager).state_dict()
        for name, value in hifi_fast.unpatch(compiled).state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_compiled_graphs_hold_no_host_sync_nor_python_state():
    """What CUDA graphs need: the forward and backward graphs of a patched model contain no op that
    reads a value on the host, and the compiled forward guards on no version counter (a graph
    guarded on Python-side state would recompile or replay stale values)."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = hifi_fast.patch(_dropout_free("llama"), SELECTION)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record), dynamic=False)
    for index in range(3):
        opt.zero_grad(set_to_none=True)
        compiled(**tiny_batch(seed=index)).loss.backward()
        opt.step()
    assert len(graphs) == 2, f"{len(graphs)} graphs: recompiled across steps"  # one forward, one backward
    ops = {node.target.__name__.split(".")[0] for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert not ops & HOST_SYNCS, ops & HOST_SYNCS
    assert "mm" in ops and "index_select" in ops  # the slice gradients are traced inline, not opaque
