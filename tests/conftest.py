"""Shared test helpers: where the shared fixtures and tokenizers are (skip cleanly when absent)."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

# Without a GPU the fused Triton kernels' tests (test_fused_kernels.py) run on CPU tensors under Triton's interpreter,
# which triton reads when it is imported and its kernels are defined: set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

# Under pytest-xdist (setup.cfg runs the suite on one worker per core) each worker gets its share of the cores: torch's
# default of one thread per core in every worker oversubscribes them (the tests' ops are small, so threads buy little).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """The shards' sha256 cache (data/file_hashes.py) of this session, not the user's (inherited by the pgolf
    subprocesses the tests start)."""
    previous = os.environ.get("PGOLF_CACHE_DIR")
    os.environ["PGOLF_CACHE_DIR"] = str(tmp_path_factory.mktemp("pgolf_cache"))
    yield
    if previous is None:
        os.environ.pop("PGOLF_CACHE_DIR", None)
    else:
        os.environ["PGOLF_CACHE_DIR"] = previous


def fixture_root(env_var: str, sub: str) -> Path | None:
    """The fixture root named by ``env_var``, else ``../shared/fixtures/<sub>``; None when neither exists."""
    p = Path(os.environ[env_var]) if os.environ.get(env_var) else SHARED / "fixtures" / sub
    return p if p.is_dir() else None


def fixture_cases(env_var: str, sub: str) -> list:
    """One pytest param per case directory (a folder holding hparams.json); a skip marker when none."""
    root = fixture_root(env_var, sub)
    if root is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fixtures: set {env_var} or provide ../shared"))]
    cases = sorted(p for p in root.iterdir() if (p / "hparams.json").is_file())
    return [pytest.param(p, id=p.name) for p in cases]


def shared_tokenizer(name: str) -> Path:
    p = SHARED / "tokenizers" / name
    if not p.is_file():
        pytest.skip(f"shared tokenizer {name} not available (../shared/tokenizers)")
    return p


@pytest.fixture(scope="session")
def embedded_data_root(tmp_path_factory) -> Path:
    """A data root holding the embedded-corpus dataset at sp1024 (built once per test session, ~10 s):
    ``<root>/datasets/fineweb10B_sp1024`` and ``<root>/tokenizers/fineweb_1024_bpe.model``."""
    from pgolf_lit.data.build import build_embedded_dataset

    root = tmp_path_factory.mktemp("embedded")
    build_embedded_dataset(root / "datasets" / "fineweb10B_sp1024", 1024, progress=False)
    return root


@pytest.fixture
def run_cwd(tmp_path, monkeypatch, embedded_data_root) -> Path:
    """A fresh working directory whose ``data/demo`` is the session's embedded dataset (the path the demo and
    *_tiny configs use), so CLI runs neither rebuild the data nor write into the repository."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ours(name: str) -> bool:
    return name == "pgolf_lit" or name.startswith("pgolf_lit.")


@contextmanager
def pgolf_lit_listing(registry: str, attribute: str, module: str) -> Iterator[None]:
    """pgolf_lit imported afresh, in this process, with ``module`` appended to the module list ``attribute`` of
    ``registry`` (the eval methods' ``METHOD_MODULES``, the quantizers' ``QUANTIZER_MODULES``) before anything reads
    it: what a new interpreter sees once the module is listed there, without starting one. Modules that register
    process-wide state when imported (the fused kernels' torch.library ops, marked ``TRAINING_ONLY``) stay; every
    pgolf_lit module is put back afterwards."""
    saved = {n: m for n, m in sys.modules.items() if _ours(n)}
    for name, mod in saved.items():
        if not hasattr(mod, "TRAINING_ONLY"):
            del sys.modules[name]
    try:
        listing = importlib.import_module(registry)
        setattr(listing, attribute, (*getattr(listing, attribute), module))
        yield
    finally:
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
