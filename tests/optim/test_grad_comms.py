"""Gradient communication in bf16: PyTorch's DDP compression hook through Lightning's DDPStrategy (the records that
reduced bf16 gradients, PR #1855), and the manual reduction of ``grad_clip_scope: local`` following the same switch.

Two gloo processes on CPU, one training step of the tiny GPT. Each rank saves its local gradient (what its own
backward produced) and the reduced gradient the optimizers see; the fp32 reference is computed from the two local
gradients exactly as DDP reduces in fp32 (halve, then add: both exact or one rounding in fp32).

The bound used for bf16 (8 significant bits, unit roundoff u = 2^-8): the hook casts each rank's gradient to bf16
(relative error <= u each), halves it (exact), and gloo adds the two halves in bf16 (one more rounding, <= u of the
sum), so per element |bf16 result - fp32 mean| <= u·(|g0| + |g1|)/2 + u·(1 + u)·(|g0| + |g1|)/2 <= 2^-7·(1 + u)·
mean(|g0|, |g1|), plus fp32's own rounding of the mean.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from pgolf_lit.config import CONFIG_DIR, GPTConfig
from pgolf_lit.errors import ConfigError
from pgolf_lit.module import GolfModule, grad_compression_dtype
from pgolf_lit.optim.groups import OptimConfig, route_parameters
from trainer_utils import TINY_GPT, fit, tiny_datamodule, tiny_trainer

U = 2.0**-8  # bf16 unit roundoff


class GlooDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy, registering its comm hook on CPU too (test only).

    Lightning registers ``ddp_comm_hook`` only when the root device is CUDA, and a torch built without CUDA refuses
    ``bf16_compress_hook`` by its name (the check is for NCCL's bf16 support; gloo reduces bf16). So the library
    function is registered unchanged behind a function of another name: DDP then runs exactly its code."""

    def _register_ddp_hooks(self) -> None:
        hook = self._ddp_comm_hook
        if hook is None:
            return

        def library_hook(state, bucket):
            return hook(state, bucket)

        self.model.register_comm_hook(self._ddp_comm_state, library_hook)


class SaveGradients(Callback):
    """At the first step each rank saves its local gradients, the reduced ones and the names of the Muon parameters
    to ``<path>.<rank>.pt``."""

    def __init__(self, path):
        self.path = str(path)

    def on_train_start(self, trainer, pl_module):
        self.local = {}
        for name, p in pl_module.model.named_parameters():
            p.register_hook(functools.partial(self._keep, name))

    def _keep(self, name, grad):  # a leaf's tensor hook sees this backward's gradient, before any reduction
        self.local[name] = self.local.get(name, 0) + grad.detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step > 0:
            return
        model = pl_module.model
        torch.save(
            {
                "local": self.local,
                "reduced": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                "muon": [n for n, _ in route_parameters(model, pl_module.optim_config).muon],  # by declared role
            },
            f"{self.path}.{trainer.global_rank}.pt",
        )


def _one_step(data_root, root, scope: str):
    L.seed_everything(0)
    module = GolfModule(
        gpt=GPTConfig(**TINY_GPT), optim=OptimConfig(grad_clip_norm=0.0, grad_clip_scope=scope), train_log_every=1000
    )
    with torch.no_grad():  # move the zero-initialised tensors so that every gradient is nonzero at the first step
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    strategy = GlooDDPStrategy(start_method="spawn", ddp_comm_hook=default_hooks.bf16_compress_hook)
    fit(
        module,
        tiny_datamodule(data_root, grad_accum_base=2),
        tiny_trainer(root, 1, [SaveGradients(root / "grads")], devices=2, strategy=strategy),
    )
    ranks = [torch.load(root / f"grads.{r}.pt", weights_only=True) for r in (0, 1)]
    for name, g in ranks[0]["reduced"].items():
        assert torch.equal(g, ranks[1]["reduced"][name]), f"{scope}: the ranks disagree on {name}"
    return ranks


@pytest.fixture(scope="module")
def hooked_step(embedded_data_root, tmp_path_factory):
    """One step under DDP with the bf16 hook, global clip scope: DDP reduces (through the hook)."""
    return _one_step(embedded_data_root, tmp_path_factory.mktemp("global"), "global")


@pytest.fixture(scope="module")
def local_step(embedded_data_root, tmp_path_factory):
    """The same step (same weights and data) with the local clip scope: the module reduces, DDP does not."""
    return _one_step(embedded_data_root, tmp_path_factory.mktemp("local"), "local")


def _fp32_mean(ranks, name):
    g0, g1 = ranks[0]["local"][name], ranks[1]["local"][name]
    return g0 / 2 + g1 / 2, 2**-7 * (1 + U) * (g0.abs() + g1.abs()) / 2


def test_ddp_bf16_hook_reduces_within_bf16_rounding_of_fp32(hooked_step):
    ranks = hooked_step
    reduced = ranks[0]["reduced"]
    assert len(reduced) > 10 and ranks[0]["muon"]
    exact = []
    for name, got in reduced.items():
        want, bound = _fp32_mean(ranks, name)
        assert got.dtype == torch.float32
        assert ((got - want).abs() <= bound + 2**-23 * want.abs()).all(), name
        assert torch.equal(got, got.bfloat16().float()), f"{name}: not a bf16 value, the hook did not act"
        assert got.abs().max() > 0, name
        exact.append(torch.equal(got, want))
    assert not any(exact), "a gradient equals the fp32 reduction: the hook did not act on it"


def test_local_scope_reduces_muon_gradients_as_the_hook_and_the_rest_in_fp32(hooked_step, local_step):
    hooked, local = hooked_step, local_step
    muon = set(local[0]["muon"])
    assert muon and set(local[0]["reduced"]) - muon  # both kinds present
    for name, got in local[0]["reduced"].items():
        for r in (0, 1):  # the same weights and data: the same local gradients in both runs
            assert torch.equal(local[r]["local"][name], hooked[r]["local"][name]), name
        want, bound = _fp32_mean(local, name)
        if name in muon:
            # What DDP's bf16 hook gave (the same elementwise operations: bf16 cast, halve, one bf16 add), so equal
            # bit for bit, which is within the bf16 bound of the fp32 mean.
            assert torch.equal(got, hooked[0]["reduced"][name]), name
            assert ((got - want).abs() <= bound + 2**-23 * want.abs()).all(), name
            assert not torch.equal(got, want), f"{name}: reduced in fp32"
        else:
            assert torch.equal(got, want), f"{name}: not the fp32 reduction"


def test_strategy_switch_parses_and_names_the_reduction_dtype(tmp_path):
    """The record's switch is a YAML import path to the library hook; the module reads it off the strategy."""
    from pgolf_lit.cli import make_cli

    overlay = tmp_path / "bf16_comms.yaml"
    overlay.write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DDPStrategy\n    init_args:\n"
        "      ddp_comm_hook: torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook\n"
    )
    tiny = CONFIG_DIR / "records" / "pr1855_sp8192_lqer_sparsegate_tiny.yaml"
    cli = make_cli(["--config", str(tiny), "--config", str(overlay), "--trainer.logger", "false"], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is DDPStrategy and strategy._ddp_comm_hook is default_hooks.bf16_compress_hook
    assert grad_compression_dtype(strategy) == torch.bfloat16
    assert grad_compression_dtype(DDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook)) == torch.float16
    assert grad_compression_dtype(DDPStrategy()) is None and grad_compression_dtype(object()) is None
    with pytest.raises(ConfigError, match="allreduce_hook"):
        grad_compression_dtype(DDPStrategy(ddp_comm_hook=default_hooks.allreduce_hook))
