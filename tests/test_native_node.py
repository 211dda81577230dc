"""The C++ autograd node of the eager head-slice layer (``hifi_fast/tuning/native.py``).

It must compute what the Python autograd Function computes, to the bit (the same ops in the same
order), and what a float64 reference computes; it must be what the eager path runs where it can; and
where it cannot be built, ``HIFI_FAST_NATIVE`` decides between a clear error and the Python Function.
The first test to need it builds it (about 30 s) into the cache, where the others load it.
"""
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

import hifi_fast
from hifi_fast.tuning import native
from hifi_fast.tuning.modules import HeadSliceMixin

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_batch, tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the node cannot be built here")


@pytest.fixture
def native_mode(monkeypatch):
    """Set ``HIFI_FAST_NATIVE`` for one test (the choice is cached per process: cleared around it)."""
    def set_mode(value: str) -> None:
        monkeypatch.setenv("HIFI_FAST_NATIVE", value)
        native.extension.cache_clear()

    yield set_mode
    native.extension.cache_clear()


def ext():
    native.extension.cache_clear()
    module = native.extension()
    assert module is not None, "the C++ node did not build or load"
    return module


def _reference(kind, x, weight, bias, grad_out, start=0, length=0, index=None):
    """Output and gradients (x, weight slice, bias slice) in float64, from the definitions."""
    x, weight, grad_out = x.double(), weight.double(), grad_out.double()
    y = x @ weight.T + (bias.double() if bias is not None else 0)
    x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    rows = torch.arange(start, start + length) if kind == "run" else index
    if kind == "cols":
        return y, grad_out @ weight, g2.T @ x2[:, index], None
    return y, grad_out @ weight, g2[:, rows].T @ x2, g2[:, rows].sum(0)


# (kind, d_out, d_in, start, length, index): a run of rows, separated row blocks (one of them the
# last), one block of columns, every column.
SHAPES = [
    ("run", 12, 7, 4, 4, None),
    ("rows", 12, 7, 0, 0, [0, 1, 8, 9, 10, 11]),
    ("rows", 5, 3, 0, 0, [4]),
    ("cols", 6, 12, 0, 0, [3, 4, 5]),
    ("cols", 6, 4, 0, 0, [0, 1, 2, 3]),
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kind, d_out, d_in, start, length, index", SHAPES)
def test_node_matches_float64_reference(kind, d_out, d_in, start, length, index, with_bias):
    module = ext()
    torch.manual_seed(0)
    index = torch.tensor(index if index is not None else [], dtype=torch.long)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)  # 3-D, as attention inputs are
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64) if with_bias else None
    width = length if kind == "run" else len(index)
    slice_weight = torch.zeros((d_out, width) if kind == "cols" else (width, d_in), dtype=torch.float64, requires_grad=True)
    slice_bias = torch.zeros(width, dtype=torch.float64, requires_grad=True) if with_bias and kind != "cols" else None
    code = {"run": module.ROWS_RUN, "rows": module.ROWS_INDEX, "cols": module.COLS_INDEX}[kind]
    y = module.head_slice_linear(slice_weight, slice_bias, index, code, start, length, x, weight, bias)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    want_y, want_x, want_w, want_b = _reference(kind, x.detach(), weight, bias, grad_out, start, length, index)
    # float64 throughout: only the summation order may differ from the reference's
    tolerance = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, want_y, **tolerance)
    torch.testing.assert_close(x.grad, want_x, **tolerance)
    torch.testing.assert_close(slice_weight.grad, want_w, **tolerance)
    if slice_bias is not None:
        torch.testing.assert_close(slice_bias.grad, want_b, **tolerance)


def test_node_skips_what_needs_no_gradient():
    """Frozen input and bias slice: no gradient computed for them, the weight slice's still is."""
    module = ext()
    x = torch.randn(4, 5)
    weight, bias = torch.randn(6, 5), torch.randn(6)
    slice_weight = torch.zeros(2, 5, requires_grad=True)
    slice_bias = torch.zeros(2)
    y = module.head_slice_linear(slice_weight, slice_bias, torch.tensor([1, 4]), module.ROWS_INDEX, 0, 0, x, weight, bias)
    y.sum().backward()
    assert x.grad is None and slice_bias.grad is None
    torch.testing.assert_close(slice_weight.grad, torch.ones(4, 2).T @ x)


def test_node_rejects_bad_arguments():
    module = ext()
    x, weight = torch.randn(2, 4), torch.randn(4, 4)
    slice_weight = torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="kind must be 0 .rows run., 1 .rows index. or 2"):
        module.head_slice_linear(slice_weight, None, torch.tensor([0, 1]), 7, 0, 0, x, weight, None)
    with pytest.raises(RuntimeError, match="a column slice has no bias entries"):
        module.head_slice_linear(slice_weight, torch.zeros(2, requires_grad=True), torch.tensor([0, 1]),
                                 module.COLS_INDEX, 0, 0, x, weight, None)


def _patched(family, selection, mode, native_mode, dtype=torch.float32, master=None):
    native_mode(mode)
    model = tiny_model(family, dtype=dtype).train()
    hifi_fast.patch(model, hifi_fast.HeadSelection(selection), master_dtype=master)
    return model


def _step(model, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**tiny_batch(pad_rows={1: 6})).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, selection", [
    ("bert", {0: [1, 3], 1: [0], 2: [0, 1, 2, 3]}),  # separated heads, one head, every head
    ("gpt2", {0: [0, 2], 1: [1, 2], 2: [3]}),  # Conv1D (transposed weight), fused QKV
    ("llama", {0: [0, 4], 1: [1, 2], 2: [5]}),  # GQA: both KV groups, one group
])
@pytest.mark.parametrize("precision", ["fp32", "bf16-master-fp32", "autocast-bf16"])
def test_eager_path_equals_python_function_bit_for_bit(family, selection, precision, native_mode):
    dtype = torch.bfloat16 if precision == "bf16-master-fp32" else torch.float32
    master = torch.float32 if precision == "bf16-master-fp32" else None
    results = {}
    for mode in ("1", "0"):
        model = _patched(family, selection, mode, native_mode, dtype, master)
        uses_native = [m.hifi_native is not None for m in model.modules() if isinstance(m, HeadSliceMixin)]
        assert all(uses_native) if mode == "1" else not any(uses_native)
        results[mode] = _step(model, autocast=precision == "autocast-bf16")
    (loss_native, grads_native), (loss_python, grads_python) = results["1"], results["0"]
    assert torch.equal(loss_native, loss_python)
    assert grads_native.keys() == grads_python.keys() and any("hifi_weight" in n for n in grads_native)
    for name, grad in grads_native.items():
        assert torch.equal(grad, grads_python[name]), name


def test_compact_slices_on_a_gpu_backend_keep_the_python_function(monkeypatch, native_mode):
    """A compact slice whose gradient a GPU backend computes in one launch (Triton here, under the
    interpreter) stays on the Python Function; a view's gradient is ATen ops on any backend."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HIFI_FAST_BACKEND", "triton")
    model = _patched("bert", {0: [1, 3], 1: [2]}, "1", native_mode)
    modules = [m for m in model.modules() if isinstance(m, HeadSliceMixin)]
    assert any(m.hifi_plan.view is None for m in modules) and any(m.hifi_plan.view is not None for m in modules)
    for module in modules:
        assert (module.hifi_native is not None) == (module.hifi_plan.view is not None), module


def test_mode_is_checked(native_mode):
    native_mode("yes")
    with pytest.raises(ValueError, match="HIFI_FAST_NATIVE='yes' is not one of"):
        native.extension()


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
    """A fresh cache and a source that does not compile."""
    broken = tmp_path / "head_slice_linear.cpp"
    broken.write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))


def test_required_node_that_cannot_build_raises(unbuildable, native_mode):
    native_mode("1")
    with pytest.raises(native.NativeUnavailableError, match="HIFI_FAST_NATIVE=1 but the C\\+\\+ autograd node cannot"):
        native.extension()


def test_auto_falls_back_to_the_python_function_with_one_warning(unbuildable, native_mode, caplog):
    native_mode("auto")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        model = _patched("bert", {0: [1, 3], 1: [0]}, "auto", native_mode)
        model(**tiny_batch()).loss.backward()
    assert all(m.hifi_native is None for m in model.modules() if isinstance(m, HeadSliceMixin))
    assert any(p.grad is not None for n, p in model.named_parameters() if "hifi_weight" in n)
    fallbacks = [r for r in caplog.records if "using the Python autograd Function" in r.getMessage()]
    assert len(fallbacks) == 1
    assert not list((Path(native.cache_dir())).glob("*.so"))  # nothing half-built left behind


def test_cached_library_loads_without_building(monkeypatch):
    ext()  # built or loaded into the cache

    def no_build(path):
        raise AssertionError("rebuilt although the cache holds the library")

    monkeypatch.setattr(native, "_build", no_build)
    assert native.build_or_load().head_slice_linear is not None


def test_damaged_cache_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a library")
    built = []
    monkeypatch.setattr(native, "_build", lambda p: built.append(p) or "rebuilt")
    assert native.build_or_load() == "rebuilt" and built == [path]


def test_node_backward_is_differentiable_with_create_graph(native_mode):
    """A gradient penalty (``create_graph=True``) differentiates the backward, as the Python Function
    does: the same second-order gradients. (Both take the input gradient from the base weight, which
    holds the slice values, so neither sees that gradient's own dependence on the slices.)"""
    from hifi_fast.adapters import ProjectionSlice
    from hifi_fast.tuning.modules import convert

    results = {}
    for mode in ("1", "0"):
        native_mode(mode)
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 6, dtype=torch.float64).requires_grad_(False)
        convert(layer, ProjectionSlice("query", "rows", (0, 4), 2))  # two separated head blocks
        assert (layer.hifi_native is not None) == (mode == "1")
        x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        slices = [x, layer.hifi_weight, layer.hifi_bias]
        grads = torch.autograd.grad((layer(x) ** 2).sum(), slices, create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        results[mode] = [t.grad for t in slices]
    for got, want in zip(*results.values()):
        assert got is not None and torch.equal(got, want)
