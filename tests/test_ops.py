"""The custom op: opcheck, backend choice, autograd through the op, torch.compile."""

from __future__ import annotations

import pytest
import torch

import personamoe
from personamoe import reference as R
from personamoe.backends import resolve_backend
from personamoe.ops import persona_moe_linear_op

INF = float("inf")


def _args(T=7, d_in=13, d_out=10, E=4, r=3, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x, w, b, a, bb = mk(T, d_in), mk(d_out, d_in), mk(d_out), mk(E, r, d_in), mk(E, d_out, r)
    if requires_grad:
        for t in (x, a, bb):
            t.requires_grad_(True)
    s = torch.rand(E, generator=g) + 0.5
    return x, w, b, a, bb, s


def _op_samples():
    x, w, b, a, bb, s = _args(requires_grad=True)
    table = torch.tensor([[0.0, -INF, 0.5, 0.0], [1.0, 0.0, 0.0, -INF]])
    ids = torch.tensor([0, 1, -1, 0, 1, 1, 0])
    wt = torch.tensor([[0.5, 0.0, 1.5, 0.0], [0.0, 1.0, 0.0, 0.0]])
    cal = torch.tensor([1.0, 2.0, 0.5, 1.5])
    yield (x, w, b, a, bb, s, 2, 1.0, "topk", None, None, None, None)
    yield (x, w, None, a, bb, s, 3, 0.5, "full", cal, table, ids, None)
    yield (x, w, b, a, bb, s, 2, 1.0, "topk", None, None, ids, wt)
    yield (x[:1], w, b, a, bb, s, 1, 2.0, "topk", cal, None, None, None)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck(backend):
    with personamoe.use_backend(backend):
        for sample in _op_samples():
            torch.library.opcheck(persona_moe_linear_op, sample)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("sample", range(4))
def test_op_matches_reference_forward_and_grad(backend, sample):
    args = list(_op_samples())[sample]
    (x, w, b, a, bb, s, k, tau, norm, cal, pb, ids, pw) = args
    kwargs = dict(
        top_k=k,
        temperature=tau,
        normalize=norm,
        calibration=cal,
        persona_bias=pb,
        persona_ids=ids,
        persona_weights=pw,
    )
    want_y, want_idx, want_g = R.persona_moe_linear(
        x, w, b, a, bb, s, **kwargs, return_routing=True
    )
    gy = torch.randn_like(want_y)
    want_grads = torch.autograd.grad(want_y, (x, a, bb), gy)
    with personamoe.use_backend(backend):
        y, idx, g = personamoe.persona_moe_linear(x, w, b, a, bb, s, **kwargs, return_routing=True)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(g, want_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, want_y, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(y, (x, a, bb), gy)
    for got, want in zip(grads, want_grads, strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gradcheck_through_the_op_float64():
    x, w, b, a, bb, s = _args(T=4, d_in=5, d_out=3, E=3, r=2, dtype=torch.float64)
    s = s.double()
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, a, bb, w, b))

    def f(x, a, bb, w, b):
        return personamoe.persona_moe_linear(x, w, b, a, bb, s, top_k=2, temperature=0.8)

    for backend in ("reference", "cpp"):
        with personamoe.use_backend(backend):
            assert torch.autograd.gradcheck(f, inputs)


def test_scores_output_is_differentiable_for_the_balance_loss():
    x, w, b, a, bb, s = _args(requires_grad=True)
    _, idx, _, n = persona_moe_linear_op(x, w, b, a, bb, s, 2, 1.0, "topk", None, None, None, None)
    loss = personamoe.load_balancing_loss(n, idx)
    (ga,) = torch.autograd.grad(loss, (a,))
    h = R.shrink(x, a)
    want = torch.autograd.grad(R.load_balancing_loss(R.scores(h), idx), (a,))[0]
    torch.testing.assert_close(ga, want)


def test_backend_choice_and_errors(monkeypatch):
    assert personamoe.get_backend() in ("auto", "reference", "cpp")
    personamoe.set_backend("reference")
    assert personamoe.get_backend() == "reference"
    with personamoe.use_backend("cpp"):
        assert personamoe.get_backend() == "cpp"
        assert resolve_backend(torch.device("cpu")).name == "cpp"
    assert personamoe.get_backend() == "reference"
    with pytest.raises(ValueError, match="expected one of"):
        personamoe.set_backend("fastest")
    status = personamoe.available_backends()
    for name, why in status.items():
        if why != "available":
            with pytest.raises(ValueError, match=f"backend {name!r} is not available"):
                personamoe.set_backend(name)
    personamoe.set_backend("auto")
    # auto on CPU: the compiled kernel, never the Triton interpreter.
    assert resolve_backend(torch.device("cpu")).name == "cpp"


def test_env_var_sets_the_initial_backend():
    import subprocess
    import sys

    code = "import personamoe; print(personamoe.get_backend())"
    env = {**__import__("os").environ, "PERSONAMOE_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "reference", out.stderr
    env["PERSONAMOE_BACKEND"] = "nonsense"
    code = (
        "import torch, personamoe\n"
        "try:\n"
        "    personamoe.PersonaMoELinear(4, 4, 2, 1)(torch.randn(1, 4))\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "ValueError" in out.stdout and "nonsense" in out.stdout, out.stderr


def test_import_compiles_nothing_and_loads_no_extension():
    import subprocess
    import sys

    code = (
        "import sys, personamoe\n"
        "loaded = [m for m in ('personamoe._C', 'personamoe._C_cuda', 'triton') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_torch_compile_fullgraph_over_the_layer(backend):
    torch._dynamo.reset()
    layer = personamoe.PersonaMoELinear(12, 8, 4, 3, top_k=2, init_lora_weights=False)
    x = torch.randn(2, 5, 12)
    with personamoe.use_backend(backend):
        want = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        torch.testing.assert_close(got, want)
        # And a training step through the compiled layer.
        compiled(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def test_torch_compile_inductor_with_personas():
    torch._dynamo.reset()
    layer = personamoe.PersonaMoELinear(12, 8, 4, 3, top_k=2, init_lora_weights=False)
    table = torch.tensor([[0.0, -INF, 0.0, 0.0], [-INF, 0.0, -INF, 0.0]])
    layer.set_persona_bias(table)
    x, ids = torch.randn(3, 12), torch.tensor([0, 1, -1])
    want = layer(x, ids)
    got = torch.compile(layer, fullgraph=True)(x, ids)
    torch.testing.assert_close(got, want)
