"""The records' fused Triton kernels (issue 23 item 4) against the eager math they replace, values and gradients:
PR #1787's softcapped CE (``model/fused_softcap_ce.py``) and PR #1530's LeakyReLU² MLP (``model/fused_mlp.py``), alone,
inside a GPT with the switch on, under torch.compile, and the ``model.fused_kernels`` switch from the PR #1855 config.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); the shapes are the records' scaled down (tokens 128, dim 64, hidden 4·dim, vocab 512-1000)
so each test takes seconds. Skips without triton (the ``kernels``/``test`` extras install it).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pgolf_lit.config import CONFIG_DIR, GPTConfig  # noqa: E402
from pgolf_lit.model import fused_mlp, fused_softcap_ce  # noqa: E402
from pgolf_lit.model.fused_mlp import fused_leaky_relu2_mlp  # noqa: E402
from pgolf_lit.model.fused_softcap_ce import softcapped_cross_entropy  # noqa: E402
from pgolf_lit.model.gpt import GPT  # noqa: E402
from pgolf_lit.model.fused_kernels import use_fused_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
C = 30.0  # the records' logit softcap
BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp is at most 2^-7 of the value (a rounding: half that)


@pytest.fixture(autouse=True)
def _interpreter_on_cpu():
    if DEVICE.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET=1 without a GPU"


def eager_ce(z: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """Our eager training loss: the softcap in z's dtype (bf16 under autocast), then CE on the fp32 logits."""
    return F.cross_entropy((C * torch.tanh(z / C)).float(), y, **kw)


def grads(fn, *tensors):
    """fn's value and the gradients of the tensors (fresh leaves) under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------------------
# Softcapped CE
# ---------------------------------------------------------------------------------------------------------


def test_fused_ce_matches_eager_fp32_values_and_gradients():
    """fp32 logits, V = 700 (not a multiple of the 256/1024 vocab block: the masked tail). Both sides sum V fp32
    terms in a different order (blocks with an online max vs one pass), and σ(2z/c) vs tanh(z/c) differ by a few
    fp32 ulps, so the loss (~lse ≈ 60) agrees to a few ulps of 60 (1e-5 abs) and each dz (|dz| <= 1/N) to ~1e-6
    relative of 1/N."""
    g = torch.Generator().manual_seed(0)
    n, v = 64, 700
    z = (torch.randn(n, v, generator=g) * 20).to(DEVICE)  # spans most of the softcap's range
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    loss, (dz,) = grads(lambda t: softcapped_cross_entropy(t, y, C), z)
    want, (dz_want,) = grads(lambda t: eager_ce(t, y), z)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(dz, dz_want, rtol=1e-4, atol=1e-6 / n)
    # the same per row, and summed
    rows = softcapped_cross_entropy(z, y, C, reduction="none")
    torch.testing.assert_close(rows, eager_ce(z, y, reduction="none"), rtol=0, atol=1e-5)
    torch.testing.assert_close(softcapped_cross_entropy(z, y, C, reduction="sum"), rows.sum())


def test_fused_ce_from_bf16_logits_is_the_fp32_softcap():
    """bf16 pre-softcap logits (the training path under autocast): the kernel reads them and does every step in fp32,
    so it equals the eager math on z.float() to fp32 accuracy; dz is stored in bf16, one rounding (1 ulp). It is
    at least as close to the float64 CE as our eager bf16 path (softcap rounded to bf16 before the CE)."""
    g = torch.Generator().manual_seed(1)
    n, v = 64, 512
    z = (torch.randn(n, v, generator=g) * 15).to(DEVICE, torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    loss, (dz,) = grads(lambda t: softcapped_cross_entropy(t, y, C), z)
    assert dz.dtype == torch.bfloat16
    want, (dz_want,) = grads(lambda t: eager_ce(t.float(), y), z)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(dz.float(), dz_want.float(), rtol=BF16_ULP, atol=1e-7 / n)  # both rounded once
    exact = eager_ce(z.double(), y)
    assert (loss.double() - exact).abs() <= (eager_ce(z, y).double() - exact).abs() + 1e-5


# σ(2z/c) = 1/(1 + exp(-2z/c)): exp overflows to inf for z far below the cap and σ becomes 0, as it should (numpy,
# which runs the interpreter, warns; a GPU does not).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_fused_ce_edge_cases_saturated_logits_ignored_rows_and_block_edges():
    """|z| far past the cap (tanh saturates: u = 0 or 2c exactly, σ(1-σ) underflows to 0), a row of equal logits,
    targets in the first and last column of a partial last block, and ignore_index rows (loss 0, no gradient,
    left out of the mean, as F.cross_entropy)."""
    g = torch.Generator().manual_seed(2)
    n, v = 64, 600  # 600 = 2 full 256-blocks + a partial one
    z = torch.randn(n, v, generator=g) * 10
    z[0] = 1e4  # every logit saturated high: uniform softmax
    z[1, :] = -1e4
    z[1, 5] = 1e4  # one saturated winner
    z[2] = torch.linspace(-300.0, 300.0, v)  # spans the cap
    z[3] = 0.0
    y = torch.randint(0, v, (n,), generator=g)
    y[1], y[2], y[4], y[5] = 5, v - 1, 0, v - 1
    y[6], y[7], y[20] = -100, -100, -100
    z, y = z.to(DEVICE), y.to(DEVICE)
    loss, (dz,) = grads(lambda t: softcapped_cross_entropy(t, y, C), z)
    want, (dz_want,) = grads(lambda t: eager_ce(t, y), z)
    assert torch.isfinite(loss) and torch.isfinite(dz).all()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(dz, dz_want, rtol=1e-4, atol=1e-6 / n)
    assert (dz[[6, 7, 20]] == 0).all()
    rows = softcapped_cross_entropy(z, y, C, reduction="none")
    torch.testing.assert_close(rows[0], torch.tensor(v).log().to(rows), rtol=0, atol=1e-5)  # uniform over V
    assert (rows[[6, 7, 20]] == 0).all()
    torch.testing.assert_close(loss, rows.sum() / (n - 3), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------
# LeakyReLU² MLP
# ---------------------------------------------------------------------------------------------------------


def eager_mlp(x, w_up, w_down, slope=0.5):
    """Our eager MLP (CastedLinear fc → leaky_relu → square → CastedLinear proj)."""
    return F.linear(F.leaky_relu(F.linear(x, w_up.to(x.dtype)), slope).square(), w_down.to(x.dtype))


def mlp_inputs(seed: int, tokens: int = 128, dim: int = 64, hidden: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, dim, generator=g)
    w_up = torch.randn(hidden, dim, generator=g) / dim**0.5
    w_down = torch.randn(dim, hidden, generator=g) / hidden**0.5
    return x.to(DEVICE), w_up.to(DEVICE), w_down.to(DEVICE)


def test_fused_mlp_matches_eager_fp32_values_and_gradients():
    """fp32: the same products summed in another order over at most K = 256 terms (hidden, for dx; 64 and 128 for
    the others), so each result agrees within K·eps·(its largest magnitude), eps = 2^-23 (about 3e-5·scale; the
    typical error is √K·eps). On a GPU fp32 matmuls use TF32 (the records' setting; 10-bit mantissa): 2e-3·scale."""
    x, w_up, w_down = mlp_inputs(3)
    out, got = grads(fused_leaky_relu2_mlp, x, w_up, w_down)
    want_out, want = grads(eager_mlp, x, w_up, w_down)
    rel = 2e-3 if DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else 256 * 2.0**-23
    for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), [out, *got], [want_out, *want]):
        torch.testing.assert_close(a, b, rtol=0, atol=rel * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_tensors", "fp32_under_bf16_autocast"])
def test_fused_mlp_bf16_is_as_accurate_as_eager_bf16(autocast):
    """bf16 compute (the training path): both sides multiply bf16 operands exactly and sum in fp32, then round; the
    eager path rounds pre, then leaky², then the product (three roundings), the kernel rounds act and d_pre once
    from the fp32 accumulator. So the two differ by a few bf16 ulps (4 allowed), and the kernel is no farther from
    the float64 function of the same bf16 inputs than eager bf16 is, up to one ulp of slack: Triton's interpreter
    truncates fp32 → bf16 where a GPU rounds to nearest (measured here: 1.0-2.0× eager's max error, both within
    1.2 ulps)."""
    x, w_up, w_down = mlp_inputs(4)
    if not autocast:
        x, w_up, w_down = x.bfloat16(), w_up.bfloat16(), w_down.bfloat16()

    def run(fn):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            return grads(fn, x, w_up, w_down)

    out, got = run(fused_leaky_relu2_mlp)
    want_out, want = run(eager_mlp)
    assert out.dtype == want_out.dtype == torch.bfloat16
    assert [t.dtype for t in got] == [t.dtype for t in want]
    exact_out, exact = grads(lambda *t: eager_mlp(*(u.to(torch.bfloat16).double() for u in t)), x, w_up, w_down)
    for name, a, b, e in zip(("out", "x", "w_up", "w_down"), [out, *got], [want_out, *want], [exact_out, *exact]):
        scale = e.abs().max().item()
        err_fused = (a.double() - e).abs().max().item()
        err_eager = (b.double() - e).abs().max().item()
        assert err_fused <= err_eager + BF16_ULP * scale, (name, err_fused, err_eager)
        torch.testing.assert_close(
            a.float(), b.float(), rtol=0, atol=4 * BF16_ULP * scale, msg=lambda m: f"{name}: {m}"
        )


# ---------------------------------------------------------------------------------------------------------
# Inside the GPT: the switch
# ---------------------------------------------------------------------------------------------------------

TINY = dict(
    vocab_size=512,
    num_layers=2,
    model_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_mult=4.0,
    mlp_activation="leaky_relu2",
    init="orthogonal",
)


@pytest.fixture
def launches(monkeypatch):
    """Counts of kernel launches: {"mlp": n, "ce": n}."""
    counts = {"mlp": 0, "ce": 0}
    launch, ce = fused_mlp._launch, fused_softcap_ce._softcapped_ce_launch

    def spy_mlp(*a, **k):
        counts["mlp"] += 1
        return launch(*a, **k)

    def spy_ce(*a, **k):
        counts["ce"] += 1
        return ce(*a, **k)

    monkeypatch.setattr(fused_mlp, "_launch", spy_mlp)
    monkeypatch.setattr(fused_softcap_ce, "_softcapped_ce_launch", spy_ce)
    return counts


def gpt_loss_and_grads(model: GPT, ids, targets):
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_gpt() -> tuple[GPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).to(DEVICE).train()
    with torch.no_grad():  # the zero-initialised projections and head would hide the MLP's and CE's gradients
        for p in model.parameters():
            if p.ndim == 2 and not p.abs().any():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (2, 64), generator=g).to(DEVICE)
    return model, ids, torch.roll(ids, -1, 1)


def test_fused_kernels_in_the_gpt_give_the_eager_loss_and_gradients(launches):
    """A tiny leaky-relu² GPT, fp32: the switch on (kernels forced onto CPU tensors under the interpreter) gives the
    loss and every parameter gradient of the switch off. MLP kernels run in training mode only (2 blocks × forward
    and backward), the CE kernel in GPT.forward's loss (also in eval mode); never for logits without targets."""
    model, ids, targets = tiny_gpt()
    loss_off, grads_off = gpt_loss_and_grads(model, ids, targets)
    assert launches == {"mlp": 0, "ce": 0}
    use_fused_kernels(model, True, force=True)
    loss_on, grads_on = gpt_loss_and_grads(model, ids, targets)
    assert launches == {"mlp": 2 * 2, "ce": 1}
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-5)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, targets), loss_off, rtol=0, atol=1e-5)
        model(ids)
    assert launches == {"mlp": 4, "ce": 2}
    # late-QAT fake quantization: the eager MLP (the kernel would skip the quantizer)
    model.train()
    for block in model.blocks:
        block.mlp.fc.qat_bits = block.mlp.proj.qat_bits = 6
    model(ids, targets)
    assert launches == {"mlp": 4, "ce": 3}


def test_fused_switch_is_a_noop_off_cuda_unless_forced(launches):
    """On CPU tensors the switch alone changes nothing: the same loss and gradients bit for bit, no kernel launched."""
    if DEVICE.type == "cuda":
        pytest.skip("a GPU runs the kernels: the no-op is for CPU tensors")
    model, ids, targets = tiny_gpt()
    loss_off, grads_off = gpt_loss_and_grads(model, ids, targets)
    use_fused_kernels(model, True)
    loss_on, grads_on = gpt_loss_and_grads(model, ids, targets)
    assert launches == {"mlp": 0, "ce": 0}
    assert torch.equal(loss_on, loss_off) and all(torch.equal(grads_on[n], grads_off[n]) for n in grads_off)
    use_fused_kernels(model, False)
    assert model.fused_ce is None and all(b.mlp.fused is None for b in model.blocks)


def test_fused_ops_pass_opcheck_and_trace_under_torch_compile():
    """torch.library.opcheck accepts the four custom ops (schema, fake, autograd registration, AOT dispatch); both
    forward ops trace in one fullgraph compile, forward and backward, and compute what they compute eagerly
    (aot_eager: the graph machinery without a C compiler)."""
    x, w_up, w_down = mlp_inputs(6, tokens=32, dim=32, hidden=128)
    emb = torch.randn(256, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE) / 4
    y = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    x2, z = x.reshape(-1, 32), x.reshape(-1, 32) @ emb.t() * 10
    out, pre, act = torch.ops.pgolf.leaky_relu2_mlp(x2, w_up, w_down, 0.5)
    losses, lse = torch.ops.pgolf.softcapped_ce(z, y, C, -100)
    for op, args in [
        (torch.ops.pgolf.leaky_relu2_mlp, (x2.requires_grad_(), w_up.requires_grad_(), w_down.requires_grad_(), 0.5)),
        (
            torch.ops.pgolf.leaky_relu2_mlp_backward,
            (torch.randn_like(out), x2.detach(), w_up.detach(), w_down.detach(), pre, act, 0.5),
        ),
        (torch.ops.pgolf.softcapped_ce, (z.requires_grad_(), y, C, -100)),
        (torch.ops.pgolf.softcapped_ce_backward, (torch.rand_like(losses), z.detach(), y, lse, C, -100)),
    ]:
        assert set(torch.library.opcheck(op, args).values()) == {"SUCCESS"}, op
    x, w_up, w_down = (t.detach() for t in (x, w_up, w_down))

    def step(x, w_up, w_down, emb):
        h = fused_leaky_relu2_mlp(x, w_up, w_down).reshape(-1, x.size(-1))
        return softcapped_cross_entropy(F.linear(h, emb), y, C)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    loss, got = grads(compiled, x, w_up, w_down, emb)
    want_loss, want = grads(step, x, w_up, w_down, emb)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# The config switch
# ---------------------------------------------------------------------------------------------------------


def test_fused_kernels_switch_reaches_the_model_from_the_pr1855_config():
    """``model.fused_kernels: true`` in PR #1855's config (the only record here from PR #1530 on: both kernels) sets
    both kernels on its GPT; its CPU twin inherits the switch (ignored there: CPU tensors); the other records and the
    baseline leave it off."""
    from pgolf_lit.cli import make_cli
    from pgolf_lit.config import load_config

    cli = make_cli(
        [
            "--config",
            str(CONFIG_DIR / "records" / "pr1855_sp8192_lqer_sparsegate_tiny.yaml"),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    module = cli.model
    assert module.fused_kernels is True and module.hparams["fused_kernels"] is True
    assert module.model.fused_ce is softcapped_cross_entropy and not module.model.fused_force
    assert all(block.mlp.fused is fused_leaky_relu2_mlp for block in module.model.blocks)
    for path in sorted((CONFIG_DIR / "records").glob("*.yaml")) + [CONFIG_DIR / "baseline_sp1024.yaml"]:
        on = load_config(path)["model"].get("fused_kernels", False)
        extends_pr1855 = path.stem.startswith(("pr1855", "pr1945", "pr1953", "pr2014", "pr2135"))
        assert on == extends_pr1855, path.name
