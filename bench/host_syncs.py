"""Host syncs per training step of the Lightning path: every place the CPU waits for the device.

    python bench/host_syncs.py --config configs/records/pr1394_sp8192_loop45.yaml --device cuda
    python bench/host_syncs.py --config configs/demo_cpu.yaml --steps 5

The Lightning side of ``bench/throughput.py`` (same Trainer, callbacks and overrides) trains ``--warmup``
steps, then the calls of the next ``--steps`` whole step cycles (loop, hooks, callbacks, logging) are recorded
and listed by call site with their count per step.

- CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronizing CUDA call: reads of a device
  value (``.item()``, ``float()``, ``bool()``), blocking host-to-device copies (``torch.tensor(x,
  device="cuda")``) and device-to-host copies. This is the authoritative list.
- CPU: nothing waits, so the script lists what would wait on CUDA and is visible on CPU: reads of a tensor's
  value into Python (``aten._local_scalar_dense``). Blocking host-to-device copies and device-to-host copies
  cannot be seen here; run on CUDA for those.

A site is the chain of the three innermost Python frames outside torch (and Lightning's collection helpers),
innermost first.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import LightningSide, fit_args, make_fit_cli, resolve_device, split_passthrough  # noqa: E402

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
HERE = str(Path(__file__).resolve())
BENCH_DIR = str(Path(__file__).resolve().parent)
REPO_DIR = str(Path(__file__).resolve().parent.parent) + "/"


def call_site(depth: int = 3) -> Optional[str]:
    """The innermost ``depth`` Python frames outside torch and Lightning's generic collection helpers
    (``apply_func.py``, which only forward a read), innermost first; None for the benchmark's own syncs
    (its step timer)."""
    frames = [
        f
        for f in traceback.extract_stack()
        if not f.filename.startswith(TORCH_DIR) and not f.filename.endswith("apply_func.py")
    ]
    while frames and frames[-1].filename == HERE:  # the recorder itself
        frames.pop()
    if not frames or frames[-1].filename.startswith(BENCH_DIR):
        return None
    names = [
        f"{f.filename.split('site-packages/')[-1].replace(REPO_DIR, '')}:{f.lineno} ({f.name})"
        for f in reversed(frames[-depth:])
    ]
    return " <- ".join(names)


def record(sites: collections.Counter) -> None:
    site = call_site()
    if site is not None:
        sites[site] += 1


class _ScalarReads(TorchDispatchMode):
    """Records the call site of every read of a tensor value into Python (what syncs on CUDA)."""

    def __init__(self, sites: collections.Counter):
        super().__init__()
        self.sites = sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            record(self.sites)
        return func(*args, **(kwargs or {}))


class SyncRecorder(Callback):
    """Records from the end of optimizer step ``start`` to the end of step ``stop`` (whole step cycles)."""

    def __init__(self, start: int, stop: int, cuda: bool):
        self.start, self.stop, self.cuda = start, stop, cuda
        self.sites: collections.Counter = collections.Counter()
        self._context = None

    def _begin(self) -> None:
        if self.cuda:
            self._context = warnings.catch_warnings()
            self._context.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._on_warning
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._context = _ScalarReads(self.sites)
            self._context.__enter__()

    def _end(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
        self._context.__exit__(None, None, None)

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" in str(message):
            record(self.sites)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            self._begin()
        elif trainer.global_step == self.stop:
            self._end()


def main(argv: Optional[Sequence[str]] = None) -> collections.Counter:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=5, help="recorded step cycles")
    p.add_argument("--warmup", type=int, default=3, help="steps before recording starts")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(own)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="pgolf_host_syncs_") as tmp:
        cli = make_fit_cli(fit_args(args, device, Path(tmp), extra))
        cli.datamodule.prepare_data()
        side = LightningSide(cli, args.warmup, args.steps)
        recorder = SyncRecorder(args.warmup, args.warmup + args.steps, device.type == "cuda")
        side.run(recorder)
    kind = "synchronizing CUDA calls" if device.type == "cuda" else "tensor value reads (CPU proxy)"
    print(f"host syncs: {kind} over {args.steps} step cycles, config={Path(args.config).name}")
    for site, count in recorder.sites.most_common():
        print(f"  {count / args.steps:6.2f}/step  {site}")
    print(
        f"host_syncs per_step={sum(recorder.sites.values()) / args.steps:.2f} device={device.type} "
        f"config={Path(args.config).name}",
        flush=True,
    )
    return recorder.sites


if __name__ == "__main__":
    main()
