"""``pgolf demo``: the CPU demo. Builds the embedded dataset on first use, trains configs/demo_cpu.yaml for about
60 s, exports (GPTQ int6 + brotli), reloads and prints val_bpb before training, after training and after the
roundtrip, with the artifact's bytes. Extra arguments go to ``pgolf fit`` (e.g. ``--trainer.max_steps 20``)."""

from __future__ import annotations

from pgolf_lit.config import CONFIG_DIR


def main(argv) -> None:
    from pgolf_lit.cli import main as cli_main

    cli_main(["fit", "--config", str(CONFIG_DIR / "demo_cpu.yaml"), *argv])
