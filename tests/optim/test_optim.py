"""pgolf_lit.optim beyond the upstream fixtures: rank-sharded Muon, the optimizer chain's checkpoint round
trip, routing of every record config (against the group-size table of spec/training.md §2.1), and the
configuration switches that no record exercises."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pgolf_lit.config import CONFIG_DIR, gpt_config_from_yaml, load_config
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.convert import config_from_upstream
from pgolf_lit.model.gpt import GPT
from pgolf_lit.optim import (
    Muon,
    OptimConfig,
    OptimizerChain,
    apply_schedule,
    build_optimizers,
    clip_grad_norm,
    record_optim_config,
    route_parameters,
)
from pgolf_lit.optim.muon import balanced_owners, newton_schulz_cost
from pgolf_lit.records import published_record, published_record_configs

# ---------------------------------------------------------------------------------------------------------
# Rank-sharded Muon
# ---------------------------------------------------------------------------------------------------------

MUON_SHAPES = [(24, 16), (16, 40), (32, 32), (48, 8), (8, 8), (12, 20), (40, 24)]
NO_GRAD_AT_STEP_1 = 4  # this parameter has no gradient in the second step: zero update, still decayed


def _run_muon() -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Two Muon steps on fixed random matrices in two groups (MuonEq-R on / off, both with decay).
    Returns the parameters after and the momentum buffers this process holds, by parameter index."""
    g = torch.Generator().manual_seed(1234)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in MUON_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in MUON_SHAPES] for _ in range(2)]
    opt = Muon(
        [{"params": params[:3], "row_normalize": True}, {"params": params[3:]}],
        lr=0.02,
        momentum=0.95,
        weight_decay=0.1,
    )
    for step, step_grads in enumerate(grads):
        for i, (p, grad) in enumerate(zip(params, step_grads)):
            p.grad = None if (step == 1 and i == NO_GRAD_AT_STEP_1) else grad
        opt.step()
    buffers = {i: opt.state[p]["momentum_buffer"] for i, p in enumerate(params) if "momentum_buffer" in opt.state[p]}
    return [p.detach().clone() for p in params], buffers


def _sharded_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, buffers = _run_muon()
        torch.save({"params": params, "buffers": buffers}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other is still communicating
    finally:
        dist.destroy_process_group()


def test_sharded_muon_equals_unsharded(tmp_path):
    world = 2
    mp.spawn(_sharded_worker, args=(world, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
    want_params, want_buffers = _run_muon()
    assert sorted(want_buffers) == list(range(len(MUON_SHAPES)))
    for rank, got in enumerate(results):
        for i, (p, want) in enumerate(zip(got["params"], want_params)):
            assert torch.equal(p, want), f"rank {rank} param {i}"
        assert sorted(got["buffers"]) == sorted(want_buffers)  # every rank holds the complete state
        for i, want in want_buffers.items():
            assert torch.equal(got["buffers"][i], want), f"rank {rank} buffer {i}"


# Banks [B, rows, cols] (PR #1855's storage) beside single matrices: at world 2 the balanced owners split banks
# between the ranks, so a rank orthogonalises some slices of a bank as one batch.
BANKED_SHAPES = [(5, 16, 24), (24, 40), (3, 32, 16), (8, 8), (4, 24, 24)]


def _run_banked_muon() -> list[torch.Tensor]:
    """Two steps of PR #1855's Muon (Polar Express, bf16 momentum, MuonEq-R, decay) on banks and matrices."""
    g = torch.Generator().manual_seed(4321)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in BANKED_SHAPES]
    opt = Muon(
        params,
        lr=0.02,
        momentum=0.97,
        weight_decay=0.095,
        row_normalize=True,
        coefficients="polar_express",
        momentum_dtype="bf16",
        skip_without_grad=True,
    )
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def _banked_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_run_banked_muon(), Path(out_dir) / f"banked{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_balanced_sharded_muon_on_banks_equals_one_process(tmp_path):
    """Each matrix (bank slice) has exactly one owner, so the bf16 SUM is exact: every rank ends bit-identical to a
    single process, whose step orthogonalises each bank as one batch."""
    world = 2
    matrices = [s[-2:] for s in BANKED_SHAPES for _ in range(s[0] if len(s) == 3 else 1)]
    owners = balanced_owners(matrices, world)
    first = 0
    split = []
    for s in BANKED_SHAPES:
        n = s[0] if len(s) == 3 else 1
        split.append(len(set(owners[first : first + n])) > 1)
        first += n
    assert sum(split) >= 2  # banks whose slices are orthogonalised on both ranks
    mp.spawn(_banked_worker, args=(world, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=world, join=True)
    want = _run_banked_muon()
    for rank in range(world):
        got = torch.load(tmp_path / f"banked{rank}.pt", weights_only=True)
        for i, (p, w) in enumerate(zip(got, want)):
            assert torch.equal(p, w), f"rank {rank} param {i} {BANKED_SHAPES[i]}"


def test_balanced_owners_small_cases():
    # cost rows·cols·min(rows, cols): the 8×8 (512) first, then the 4×4s (64 each) fill the other rank
    assert balanced_owners([(4, 4), (4, 4), (4, 4), (8, 8)], 2) == [1, 1, 1, 0]
    assert balanced_owners([(2, 2)] * 4, 2) == [0, 1, 0, 1]  # ties: list order, lowest rank
    assert balanced_owners([(3, 5), (5, 3)], 1) == [0, 0]
    assert balanced_owners([], 4) == []
    assert newton_schulz_cost(2048, 512) == newton_schulz_cost(512, 2048) == 2048 * 512 * 512
    with pytest.raises(ValueError):
        balanced_owners([(2, 2)], 0)


def _max_over_mean(owners: list[int], costs: list[int], world: int) -> float:
    loads = [0] * world
    for owner, cost in zip(owners, costs):
        loads[owner] += cost
    return max(loads) / (sum(loads) / world)


@pytest.mark.parametrize("record", ["pr1855_sp8192_lqer_sparsegate", "pr1394_sp8192_loop45"])
def test_balanced_owners_on_record_shapes(record):
    """World 8, the record config's Muon group (built on the meta device): max load / mean load of round robin
    (parameter i on rank i % 8, as the scripts and the former Muon.step) and of balanced_owners. The numbers are the
    ones muon.balanced_owners's docstring states; printed with ``pytest -s``."""
    world = 8
    with torch.device("meta"):
        model = GPT(gpt_config_from_yaml(CONFIG_DIR / "records" / f"{record}.yaml"))
    params = [p for _, p in route_parameters(model, record_optim_config(record)).muon]
    assert all(p.ndim == 2 for p in params) and len(params) == 66  # 11 blocks × (q, k, v, proj, fc, mlp.proj)
    shapes = [tuple(p.shape) for p in params]
    costs = [newton_schulz_cost(*s) for s in shapes]
    round_robin = _max_over_mean([i % world for i in range(len(shapes))], costs, world)
    balanced = _max_over_mean(balanced_owners(shapes, world), costs, world)
    print(f"{record} world {world}: max/mean load round robin {round_robin:.3f}, balanced {balanced:.3f}")
    assert (round(round_robin, 3), round(balanced, 3)) == (1.091, 1.004)
    assert balanced <= 1 + max(costs) / (sum(costs) / world)  # list scheduling: within one matrix of the mean
    if not record.startswith("pr1855"):
        return
    # PR #1855's script stores these 66 matrices as four banks (leaderboard.md §3.1): round robin over the banks
    # against balanced over their slices.
    banks = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
    bank_costs = [b * newton_schulz_cost(r, c) for b, r, c in banks]
    slices = [(r, c) for b, r, c in banks for _ in range(b)]
    assert sorted(slices) == sorted(shapes)
    per_bank = _max_over_mean([i % world for i in range(len(banks))], bank_costs, world)
    per_slice = _max_over_mean(balanced_owners(slices, world), [newton_schulz_cost(*s) for s in slices], world)
    print(f"  as 4 banks: round robin over the banks {per_bank:.3f}, balanced over the slices {per_slice:.3f}")
    assert (round(per_bank, 3), round(per_slice, 3)) == (3.048, 1.004)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))], lr=0.01)


# ---------------------------------------------------------------------------------------------------------
# OptimizerChain: one optimizer object, checkpoint round trip
# ---------------------------------------------------------------------------------------------------------

# A small PR #1263-style model with an untied head, so all four optimizers and three token tables exist.
TINY_1263 = dict(
    vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1, num_layers=3, rope_dims=4,
    bigram_vocab_size=32, bigram_dim=8, ve_dim=8, ve_layers="1,2", tie_embeddings=False,
)  # fmt: skip


def _tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(config_from_upstream("pr1263", TINY_1263))
    with torch.no_grad():  # move the zero-initialised tensors so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _train(model: GPT, chain: OptimizerChain, cfg: OptimConfig, steps: range) -> None:
    """The records' step order with a made-up schedule."""
    g = torch.Generator().manual_seed(99)
    batches = torch.randint(0, 64, (max(steps) + 1, 2, 17), generator=g)
    model.train()
    for s in steps:
        chain.zero_grad(set_to_none=True)
        model(batches[s][:, :-1], batches[s][:, 1:]).backward()
        apply_schedule(chain, 1.0 - 0.2 * s, cfg.muon_momentum_at(s))
        clip_grad_norm(model.parameters(), cfg.grad_clip_norm)
        chain.step()


def test_chain_presents_member_groups_and_state():
    model = _tiny_model()
    cfg = record_optim_config("pr1263", {"muon_momentum_warmup_steps": 3})
    optimizers = build_optimizers(model, cfg)
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "Adam", "Muon", "AdamW"]
    chain = OptimizerChain(optimizers)
    assert all(a is b for a, b in zip(chain.param_groups, [g for o in optimizers for g in o.param_groups]))
    _train(model, chain, cfg, range(2))
    assert len(chain.state) == sum(len(o.state) for o in optimizers) == len(list(chain.state))
    muon = optimizers[2]
    p = muon.param_groups[0]["params"][0]
    assert chain.state[p] is muon.state[p]
    assert muon.param_groups[0]["momentum"] == cfg.muon_momentum_at(1)
    assert muon.param_groups[0]["lr"] == cfg.matrix_lr * 0.8
    with pytest.raises(RuntimeError, match="member"):
        chain.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_chain_state_dict_round_trip_resumes_identically():
    cfg = record_optim_config("pr1263", {"muon_momentum_warmup_steps": 3})

    straight = _tiny_model()
    _train(straight, OptimizerChain(build_optimizers(straight, cfg)), cfg, range(4))

    first = _tiny_model()
    chain = OptimizerChain(build_optimizers(first, cfg))
    _train(first, chain, cfg, range(2))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": chain.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _tiny_model()
    resumed.load_state_dict(ckpt["model"])
    chain = OptimizerChain(build_optimizers(resumed, cfg))
    chain.load_state_dict(ckpt["optim"])
    _train(resumed, chain, cfg, range(2, 4))

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="optimizer"):
        chain.load_state_dict({"optimizers": ckpt["optim"]["optimizers"][:2]})


# ---------------------------------------------------------------------------------------------------------
# Routing of every record config
# ---------------------------------------------------------------------------------------------------------

# The published records whose YAML states their optimizer groups (``record.param_groups``: [tensors, elements] per
# group, spec/training.md §2.1 "Group sizes with record settings").
GROUPED_RECORDS = [p for p in published_record_configs() if published_record(p).param_groups]


def test_the_shipped_records_state_their_groups():
    """The spec's table covers the baseline and every shipped record (where their facts live: a record's own config
    or the leaderboard row its old name extends)."""
    stated = {published_record(p).pr for p in GROUPED_RECORDS}
    assert stated >= {0, 1263, 1278, 1321, 1333, 1421, 1394, 1855, 1945, 1953}


@pytest.mark.parametrize("path", GROUPED_RECORDS, ids=lambda p: p.stem)
def test_record_routing(path, monkeypatch):
    # Routing depends on names and shapes only; the orthogonal init of ~30M weights would dominate the run time.
    monkeypatch.setattr(nn.init, "orthogonal_", lambda tensor, gain=1.0: tensor)
    model = GPT(gpt_config_from_yaml(path))
    cfg = OptimConfig.from_dict((load_config(path).get("model") or {}).get("optim") or {})
    routing = route_parameters(model, cfg)
    optimizers = build_optimizers(model, cfg)

    names = {p: n for n, p in model.named_parameters()}
    routed = [names[p] for o in optimizers for g in o.param_groups for p in g["params"]]
    untrained = [n for n, _ in routing.no_optimizer]
    assert len(routed) == len(set(routed)) and set(routed) == set(names.values()) - set(untrained)
    assert not routing.head

    def size(named):
        return [len(named), sum(p.numel() for _, p in named)]

    got = {"muon": size(routing.muon), "scalar": size(routing.scalar), "token": size(routing.token)}
    got["untrained"] = size(routing.no_optimizer)
    expected = {"untrained": [0, 0], **published_record(path).param_groups}
    assert got == expected
    assert model.num_params() == published_record(path).params
    assert [n for n, _ in routing.muon] == [names[p] for p in optimizers[1].param_groups[0]["params"]]


def test_embed_projections_default_trained_or_frozen_as_upstream():
    cfg_model = config_from_upstream("pr1394", dict(vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1,
                                                    num_layers=3, rope_dims=4, embedding_dim=16, num_loops=1,
                                                    loop_start=1, loop_end=1))  # fmt: skip
    model = GPT(cfg_model)
    projections = ["embed_proj.weight", "head_proj.weight"]

    trained = route_parameters(model, record_optim_config("pr1394"))
    assert [n for n, _ in trained.muon[-2:]] == projections and not trained.no_optimizer

    quirk_cfg = record_optim_config("pr1394", {"train_embed_projections": False})
    quirk = route_parameters(model, quirk_cfg)
    assert [n for n, _ in quirk.no_optimizer] == projections
    in_optimizers = {p for o in build_optimizers(model, quirk_cfg) for g in o.param_groups for p in g["params"]}
    assert not {model.embed_proj.weight, model.head_proj.weight} & in_optimizers


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def test_presets_aliases_and_env_style_overrides():
    assert record_optim_config("pr1421") == record_optim_config("pr1421_recur_ema9965")
    # A script's whole hyperparameter dict can be passed: names that are not OptimConfig fields are ignored
    # (the control patterns are declared by the model now, not configured).
    cfg = record_optim_config("pr1394", {"MUON_ROW_NORMALIZE": "0", "CONTROL_TENSOR_NAME_PATTERNS": "a,b", "X": 1})
    assert cfg.muon_row_normalize is False and not hasattr(cfg, "control_tensor_patterns")
    assert record_optim_config("pr1263").token_wd == 0.04 and record_optim_config("pr1394").token_wd == 0.085
    with pytest.raises(ConfigError, match="unknown record"):
        record_optim_config("nope")


def test_config_errors():
    with pytest.raises(ConfigError, match="AdamW"):
        OptimConfig(adam_wd=0.01)
    with pytest.raises(ConfigError, match="unknown field"):
        OptimConfig.from_dict({"matrix_lr": 0.1, "matrix_lrr": 0.1})
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], 0.0) is None


def test_chain_param_groups_stay_the_members_after_a_state_load():
    """Priming restores the optimizer state: the chain's groups must still be the members' (LearningRateMonitor)."""
    from pgolf_lit.optim.chain import OptimizerChain
    from pgolf_lit.optim.schedule import apply_schedule

    model = nn.Linear(4, 4)
    chain = OptimizerChain([torch.optim.AdamW([model.weight], lr=0.1), torch.optim.AdamW([model.bias], lr=0.2)])
    for g in chain.param_groups:
        g["base_lr"] = g["lr"]
    chain.load_state_dict(chain.state_dict())
    apply_schedule(chain, 0.5, 0.9)
    assert [g["lr"] for g in chain.param_groups] == [0.05, 0.1]
    assert all(any(g is h for o in chain.optimizers for h in o.param_groups) for g in chain.param_groups)


# ---------------------------------------------------------------------------------------------------------
# Muon weight-decay taper (PR #1729)
# ---------------------------------------------------------------------------------------------------------


def _pr1729_wd_mul(frac: float, start_frac: float, final_mult: float) -> float:
    """PR #1729 train_gpt.py ``wd_mul``, transcribed."""
    start = min(max(start_frac, 0.0), 1.0)
    final = max(final_mult, 0.0)
    if frac <= start or start >= 1.0:
        return 1.0
    progress = min(max((frac - start) / max(1.0 - start, 1e-9), 0.0), 1.0)
    return 1.0 + (final - 1.0) * progress


def test_wd_taper_follows_pr1729_and_scales_only_muon_decay():
    from pgolf_lit.optim.schedule import ScheduleConfig

    cfg = ScheduleConfig(warmdown="frac", wd_taper_start_frac=0.7, wd_taper_final_mult=0.5)
    fracs = [0.0, 0.3, 0.7, 0.70001, 0.75, 0.85, 0.99, 1.0, 1.2]
    assert [cfg.muon_wd_multiplier(f) for f in fracs] == [_pr1729_wd_mul(f, 0.7, 0.5) for f in fracs]
    assert cfg.muon_wd_multiplier(0.85) == pytest.approx(0.75) and cfg.muon_wd_multiplier(1.0) == 0.5
    assert {ScheduleConfig().muon_wd_multiplier(f) for f in fracs} == {1.0}  # default: no taper
    with pytest.raises(ConfigError, match="wd_taper_start_frac"):
        ScheduleConfig(wd_taper_start_frac=1.5)

    # applied to a real optimizer chain: the Muon decay is base x factor, the Adam decays stay
    model = _tiny_model()
    ocfg = record_optim_config("pr1263", {})
    optimizers = build_optimizers(model, ocfg)
    chain = OptimizerChain(optimizers)
    muon = next(o for o in optimizers if isinstance(o, Muon))
    adam_wds = [g["weight_decay"] for o in optimizers if o is not muon for g in o.param_groups]
    base = muon.param_groups[0]["weight_decay"]
    assert base > 0
    factor = cfg.muon_wd_multiplier(0.9)
    apply_schedule(chain, 1.0, 0.95, factor)
    assert [g["weight_decay"] for g in muon.param_groups] == [base * factor] * len(muon.param_groups)
    assert [g["weight_decay"] for o in optimizers if o is not muon for g in o.param_groups] == adam_wds
    apply_schedule(chain, 1.0, 0.95)
    assert muon.param_groups[0]["weight_decay"] == base  # the base is kept, not compounded
