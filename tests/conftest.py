"""Shared fixtures: tiny random models of every supported family, built in code (no downloads).

``TRITON_INTERPRET=1`` is set before anything imports Triton, so the Triton kernels run on CPU
tensors under the interpreter (correctness only, never speed).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    logging as hf_logging,
)

hf_logging.set_verbosity_error()


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton < 3.7's interpreter turns a scalar kernel argument into a Python int with ``int()`` of
    a one-element array, which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed in 3.7 by
    squeezing first). The GPU image pairs Triton 3.6 with NumPy 2.5, so squeeze there too."""
    import numpy as np

    try:
        int(np.zeros(1))
    except TypeError:
        from triton.runtime import interpreter

        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = patched


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
if INTERPRET:
    _patch_interpreter_for_numpy_2_4()
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong in the CPU interpreter; needs CUDA")
compiled_gpu = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")
KERNEL_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference, compared in float64 on ``want``'s device (0 when empty)."""
    return (got.double().to(want.device) - want).abs().max().item() if want.numel() else 0.0


def summation_slack(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error an fp32 sum over the N rows of ``aᵀb`` may reach whatever its order:
    √N·u·max(|a|ᵀ|b|) with u = 2⁻²⁴ (Higham's probabilistic bound). cuBLAS's blocked order can be
    several times more exact than a kernel's running sum over token tiles, so "≤ 2x PyTorch's error"
    alone fails a correct kernel: on an H200 at N = 4099 the Triton kernel's fp32 error was 7.5x
    cuBLAS's and 0.08 of this slack."""
    if a.numel() == 0 or b.numel() == 0:
        return 0.0
    return a.shape[0] ** 0.5 * 2.0 ** -24 * (a.double().abs().T @ b.double().abs()).max().item()


def assert_within_twice_torch(got, ref, want, slack: float) -> None:
    """The GPU accuracy rule: error vs float64 ≤ 2x PyTorch's own error in the same dtype, plus
    the fp32 summation slack (``summation_slack`` of the two operands)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape == want.shape
    err, ref_err = max_error(got, want), max_error(ref, want)
    assert err <= 2 * ref_err + slack, f"error {err:.3g} vs PyTorch's {ref_err:.3g}, slack {slack:.3g}"

VOCAB = 97
FAMILIES = ("bert", "gpt2", "llama")


def tiny_model(family: str, seed: int = 0, num_labels: int = 3, dtype: torch.dtype = torch.float32):
    """A tiny random sequence classifier of ``family`` in eval mode (no dropout)."""
    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
        )
        model = BertForSequenceClassification(config)
    elif family == "distilbert":
        config = DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
            max_position_embeddings=64, num_labels=num_labels,
        )
        model = DistilBertForSequenceClassification(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
            num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )
        model = GPT2ForSequenceClassification(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
            num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )
        model = LlamaForSequenceClassification(config)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def tiny_batch(seed: int = 0, batch: int = 4, tokens: int = 11, pad_rows: dict | None = None):
    """A batch dict with right padding: ``pad_rows`` maps row -> number of valid tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, tokens), generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row, valid in (pad_rows if pad_rows is not None else {1: tokens - 4, 3: 3}).items():
        mask[row, valid:] = 0
        input_ids[row, valid:] = 0
    labels = torch.randint(0, 3, (batch,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def trained_model(family: str, selection: dict, seed: int = 0):
    """A tiny model patched with ``selection`` after one AdamW step (slices differ from the base)."""
    import hifi_fast

    model = hifi_fast.patch(tiny_model(family, seed=seed), hifi_fast.HeadSelection(selection))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_batch()).loss.backward()
    optimizer.step()
    return model


def random_scores(num_layers: int = 4, num_heads: int = 5, seed: int = 0, params_per_head: int = 100):
    """``HeadScores`` of a random symmetric correlation graph and random richness."""
    from hifi_fast.selecting.pagerank import pagerank
    from hifi_fast.heads import HeadScores

    g = torch.Generator().manual_seed(seed)
    a = torch.rand(num_layers, num_heads, num_heads, generator=g, dtype=torch.float64)
    corr = (a + a.transpose(1, 2)) / 2
    corr.diagonal(dim1=1, dim2=2).fill_(1.0)
    richness = torch.rand(num_layers, num_heads, generator=g, dtype=torch.float64) + 0.1
    return HeadScores(richness, corr, pagerank(corr, richness), num_examples=8, params_per_head=params_per_head)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread (no pool contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
