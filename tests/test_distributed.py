"""torch.distributed on CPU (gloo, 2 processes): distributed scoring equals one process on the union
(up to fp32 forward rounding: the workers run one thread each)
of the shards; DDP of a patched model gives the single-process gradients of the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hifi_fast
from conftest import tiny_batch, tiny_model

SELECTION = {0: [1, 4], 2: [0]}
WORLD = 2


def _init(rank: int, init_file: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _shards():
    return [tiny_batch(seed=10), tiny_batch(seed=11, batch=3, tokens=8, pad_rows={0: 4})]


def _scoring_worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file)
    try:
        scores = hifi_fast.score_heads(tiny_model("llama"), [_shards()[rank]])
        torch.save(scores.to_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_scoring_equals_one_process_on_the_union(tmp_path):
    out = str(tmp_path / "scores")
    mp.spawn(_scoring_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD)
    single = hifi_fast.score_heads(tiny_model("llama"), _shards())
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got["num_examples"] == single.num_examples == 7
        for name in ("richness", "correlation", "pagerank"):
            torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64), getattr(single, name), rtol=1e-6, atol=1e-9)


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file)
    try:
        model = hifi_fast.patch(tiny_model("llama"), hifi_fast.HeadSelection(SELECTION))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
        batch = {k: v.chunk(WORLD)[rank] for k, v in tiny_batch(seed=12).items()}
        ddp(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        logits = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = {k: v.clone() for k, v in hifi_fast.unpatch(model).state_dict().items()}
        torch.save({"grads": grads, "weights": merged, "logits": logits.detach()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD)
    model = hifi_fast.patch(tiny_model("llama"), hifi_fast.HeadSelection(SELECTION))
    batch = tiny_batch(seed=12)
    model(**batch).loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    results = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    for result in results:
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7)
    for name, weight in results[0]["weights"].items():
        assert torch.equal(weight, results[1]["weights"][name]), f"ranks diverged on {name}"
