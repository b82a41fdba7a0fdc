"""Training throughput of the Lightning path against a plain PyTorch loop doing upstream's step.

    python bench/throughput.py --config configs/demo_cpu.yaml --steps 10 --warmup 3 --rounds 5
    python bench/throughput.py --config configs/records/pr1394_sp8192_loop45.yaml --device cuda
    python bench/throughput.py --config X.yaml -- --data.train_batch_tokens 2048   # extra pgolf fit arguments

Both sides train the same model (same config and seed) on the same batches in one process:

- lightning: GolfModule + TokenShardDataModule under a Trainer built by ``pgolf_lit.cli.make_cli`` exactly as
  ``pgolf fit`` builds it, with the config's callbacks minus CompilePriming (the warmup steps compile instead)
  and GPTQExport (it runs after training). Validation is off (the records keep it off the clock).
- plain: ``bench/plain_loop.py``, the records' step in plain PyTorch with the same model class, optimizers
  and loader.

Fairness: every round runs both sides back to back (alternating which goes first), each for ``warmup``
untimed steps (compilation, first-touch allocations) and then ``steps`` timed ones, with the device
synchronised at both ends of the timed span. Machine-load drift then hits both sides of a round alike; the
reported ratio is the median of the per-round ratios, the tok/s the per-side medians. Both sides keep their
weights across rounds (so compilation happens once per side) but start every round with fresh optimizers,
loader and EMA, like a fresh run.

The WallclockBudget's cap is moved far out (the configs' caps would stop a benchmark, and the tiny configs'
15 s cap would end the later rounds), so the LR multiplier stays 1 and a fraction-triggered recurrence
switch does not fire on either side; a step-triggered one (PR #1278's step 0) does, on both.

On CUDA the run keeps the config's precision and compile settings (bf16-mixed + torch.compile for the
records) and prints MFU; on CPU both sides run fp32 eager. The last line is machine-readable::

    throughput lightning_tok_s=... plain_tok_s=... ratio=... device=... config=... steps=...
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import PlainConfig, PlainTrainer  # noqa: E402

from pgolf_lit.callbacks import EMA, CompilePriming, GPTQExport, RecurrenceActivation, WallclockBudget  # noqa: E402
from pgolf_lit.cli import make_cli  # noqa: E402
from pgolf_lit.model.gpt import GPT  # noqa: E402

FAR_CAP_SECONDS = 1e9  # a wallclock cap no benchmark reaches
# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(own options, pgolf fit arguments): everything after ``--`` goes to the fit parser unchanged."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a pgolf YAML config (configs/demo_cpu.yaml, configs/records/...)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (compile, allocations)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs both sides once")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by name)")
    args = p.parse_args(own)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be at least 1")
    return args, extra


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(name)


def make_fit_cli(args: list[str]):
    """``pgolf fit``'s LightningCLI over ``args`` without running it (this script's own argv is not for it)."""
    return make_cli(args, run=False)


def fit_args(args: argparse.Namespace, device: torch.device, workdir: Path, extra: list[str]) -> list[str]:
    """The pgolf fit arguments of the Lightning side: one device, no validation, logs under ``workdir``."""
    out = [
        "--config",
        args.config,
        "--trainer.max_steps",
        str(args.warmup + args.steps),
        "--trainer.devices",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(workdir),
        "--trainer.logger.init_args.save_dir",
        str(workdir),
    ]
    if device.type == "cpu":
        out += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false"]
    else:
        out += ["--trainer.accelerator", "gpu"]
    return out + extra


class StepTimer(Callback):
    """Wall seconds from the end of optimizer step ``start`` to the end of step ``stop``, the device
    synchronised at both points (the same span the plain loop times)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.began: Optional[float] = None
        self.seconds: Optional[float] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.start, self.stop) and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if trainer.global_step == self.start:
            self.began = time.perf_counter()
        elif trainer.global_step == self.stop:
            self.seconds = time.perf_counter() - self.began


class LightningSide:
    """One GolfModule and datamodule, fitted by a fresh Trainer (with fresh copies of the config's callbacks)
    every round; the module keeps its compiled forward across rounds."""

    def __init__(self, cli, warmup: int, steps: int):
        self.cli, self.warmup, self.steps = cli, warmup, steps
        trainer_init = cli.config_init["trainer"]
        # The first entries are the config's; Lightning appended its defaults to the same list.
        configured = trainer_init["callbacks"][: len(cli.config["trainer"]["callbacks"] or [])]
        self.callbacks = [
            WallclockBudget(FAR_CAP_SECONDS, c.reserve_seconds) if isinstance(c, WallclockBudget) else c
            for c in configured
            if not isinstance(c, (CompilePriming, GPTQExport))
        ]
        self.logger = trainer_init["logger"]

    def callback(self, cls):
        return next((c for c in self.callbacks if isinstance(c, cls)), None)

    def run(self, *observers: Callback, **trainer_flags) -> float:
        """Fit one round; return the timed seconds. ``observers`` are extra callbacks used as given, ``trainer_flags``
        Trainer arguments over the config's."""
        timer = StepTimer(self.warmup, self.warmup + self.steps)
        trainer = self.cli.instantiate_trainer(
            callbacks=copy.deepcopy(self.callbacks) + [timer, *observers],
            logger=copy.deepcopy(self.logger),
            **trainer_flags,
        )
        trainer.fit(self.cli.model, datamodule=self.cli.datamodule)
        if timer.seconds is None:
            raise RuntimeError(f"the Lightning run stopped at step {trainer.global_step} before step {timer.stop}")
        return timer.seconds


def plain_config(side: LightningSide, device: torch.device) -> PlainConfig:
    """The plain loop's settings, read from the objects the Lightning side runs, so both sides agree."""
    module, dm, trainer = side.cli.model, side.cli.datamodule, side.cli.trainer
    budget, ema, recurrence = side.callback(WallclockBudget), side.callback(EMA), side.callback(RecurrenceActivation)
    return PlainConfig(
        gpt=module.gpt_config,
        optim=module.optim_config,
        schedule=module.schedule_config,
        data_dir=dm.data_dir,
        loader=dm.loader_kind,
        seq_len=dm.train_seq_len,
        micro_batch_tokens=dm.micro_batch_tokens,
        grad_accum=dm.grad_accum_base,
        device=device,
        bf16=device.type == "cuda" and str(trainer.precision).startswith("bf16"),
        compile=module.compile,
        cap_ms=budget.effective_cap_ms if budget is not None else None,
        iterations=side.warmup + side.steps,  # the Trainer's max_steps, which the module's schedule reads
        ema_decay=ema.decay if ema is not None else None,
        recurrence_at_step=recurrence.at_step if recurrence is not None else None,
        recurrence_at_fraction=recurrence.at_fraction if recurrence is not None else None,
        log_every=module.train_log_every,
        seed=int(side.cli.config_init.get("seed_everything") or 0),
    )


def train_flops_per_token(model: GPT, seq_len: int) -> tuple[float, str]:
    """Training FLOPs per token by the PaLM estimate (appendix B): 6·N + 12·L·d·T, where N counts the matmul
    weights a token passes through (each executed block once per execution under depth recurrence; a tied
    embedding once, as the output head), L the executed blocks, d the model width and T the sequence length."""
    schedule = model.layer_schedule()

    def matmul_weights(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    outside_blocks = matmul_weights(model) - matmul_weights(model.blocks)
    tied_head = model.tok_emb.weight.numel() if model.lm_head is None else 0
    n = outside_blocks + tied_head + sum(matmul_weights(model.blocks[i]) for i in schedule)
    d = model.config.model_dim
    flops = 6.0 * n + 12.0 * len(schedule) * d * seq_len
    return flops, f"6*N + 12*L*d*T with N={n:,} L={len(schedule)} d={d} T={seq_len}"


def attention_backend(model: GPT, seq_len: int, device: torch.device) -> str:
    """Whether the model's attention runs on the flash SDPA kernel in the records' setting (bf16 autocast,
    training sequence length): one eager forward with only that backend allowed raises if any call of
    F.scaled_dot_product_attention would need another (dtype, head size, GQA or mask support)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16),
            sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        ):
            model(ids)
    except RuntimeError as e:
        return f"not-flash ({str(e).splitlines()[0][:200]})"
    return "flash"


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override is not None:
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="pgolf_throughput_") as tmp:
        workdir = Path(tmp)
        cli = make_fit_cli(fit_args(args, device, workdir, extra))
        cli.datamodule.prepare_data()  # builds the embedded corpus of the CPU configs on first use
        side = LightningSide(cli, args.warmup, args.steps)
        plain = PlainTrainer(plain_config(side, device))
        tokens = args.steps * plain.cfg.tokens_per_step
        print(
            f"config={args.config} device={device} tokens/step={plain.cfg.tokens_per_step} "
            f"warmup={args.warmup} steps={args.steps} rounds={args.rounds} threads={torch.get_num_threads()} "
            f"loadavg={load_average()}",
            flush=True,
        )
        rates: dict[str, list[float]] = {"lightning": [], "plain": []}
        with open(workdir / "plain_train.log", "w") as plain_log:
            runners = {
                "lightning": side.run,
                "plain": lambda: plain.run(args.warmup + args.steps, args.warmup, plain_log),
            }
            for r in range(args.rounds):
                order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
                for name in order:
                    rates[name].append(tokens / runners[name]())
                ratio = rates["lightning"][-1] / rates["plain"][-1]
                print(
                    f"round {r + 1}/{args.rounds}: lightning {rates['lightning'][-1]:,.0f} tok/s  "
                    f"plain {rates['plain'][-1]:,.0f} tok/s  ratio {ratio:.3f}  loadavg={load_average()}",
                    flush=True,
                )

    lightning_tok_s, plain_tok_s = statistics.median(rates["lightning"]), statistics.median(rates["plain"])
    ratio = statistics.median(lit / p for lit, p in zip(rates["lightning"], rates["plain"]))
    if device.type == "cuda":
        flops, formula = train_flops_per_token(plain.model, plain.cfg.seq_len)
        peak = peak_tflops(device, args.peak_tflops)
        print(
            f"flops/token={flops:.4g} ({formula}); device={torch.cuda.get_device_name(device)} "
            f"sdpa={attention_backend(plain.model, plain.cfg.seq_len, device)}"
        )
        if peak:
            for name, rate in (("lightning", lightning_tok_s), ("plain", plain_tok_s)):
                print(f"mfu {name}={flops * rate / (peak * 1e12):.4f} (flops/token * tok/s / {peak:g} TFLOP/s)")
    print(
        f"throughput lightning_tok_s={lightning_tok_s:.1f} plain_tok_s={plain_tok_s:.1f} ratio={ratio:.4f} "
        f"device={device.type} config={Path(args.config).name} steps={args.steps}",
        flush=True,
    )
    return {"lightning_tok_s": lightning_tok_s, "plain_tok_s": plain_tok_s, "ratio": ratio, "rates": rates}


if __name__ == "__main__":
    main()
