"""Honest code bytes: the package source needed to load and evaluate an artifact, wrapped as records wrap theirs.

The challenge counts code bytes + compressed model bytes. A record counts its one script; a package must count
every source file that loading and evaluating an artifact runs: ``CODE_FILES``. Those sources (docstrings and
comments stripped, as PR #1394 minified its script) go into one Python program that installs them as an
importable ``pgolf_lit`` package, and that program is wrapped the way PR #1333/#1334 wrapped theirs::

    import lzma as L,base64 as B
    exec(L.decompress(B.b85decode("<xz preset 9 of the program, base85>")))

The wrapper really works (``exec`` it, then ``import pgolf_lit.quant.export``); its length is the counted size.
"""

from __future__ import annotations

import ast
import base64
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pgolf_lit.errors import ArtifactError

# Paths relative to the repository root; a directory means every .py file under it.
CODE_FILES = (
    "pgolf_lit/__init__.py",
    "pgolf_lit/errors.py",
    "pgolf_lit/fileio.py",
    "pgolf_lit/config.py",
    "pgolf_lit/metrics.py",
    "pgolf_lit/model",
    "pgolf_lit/quant",
    "pgolf_lit/eval",
    "pgolf_lit/data/__init__.py",
    "pgolf_lit/data/shards.py",
    "pgolf_lit/data/tokenizer.py",
)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent

# Serves the embedded sources (dict S: path -> source) as modules, ahead of the normal import system.
_BOOTSTRAP = """
import sys,importlib.abc,importlib.util
class _PgolfSources(importlib.abc.MetaPathFinder,importlib.abc.Loader):
 def _path(s,n):
  k=n.replace('.','/')
  return k+'/__init__.py' if k+'/__init__.py' in S else k+'.py' if k+'.py' in S else None
 def find_spec(s,n,p=None,t=None):
  f=s._path(n)
  return None if f is None else importlib.util.spec_from_loader(n,s,is_package=f.endswith('__init__.py'))
 def create_module(s,spec):return None
 def exec_module(s,m):
  f=s._path(m.__name__);m.__file__=f;exec(compile(S[f],f,'exec'),m.__dict__)
sys.meta_path.insert(0,_PgolfSources())
"""


@dataclass(frozen=True)
class CodeSize:
    files: tuple[str, ...]
    source_bytes: int  # the files as they are
    program_bytes: int  # minified sources inside the self-installing program
    wrapped_bytes: int  # the two-line wrapper: the counted size

    @property
    def counted_bytes(self) -> int:
        return self.wrapped_bytes


def code_files(root: Path = PACKAGE_ROOT, entries: tuple[str, ...] = CODE_FILES) -> list[str]:
    """The .py files of ``entries`` under ``root``, sorted; a listed path that does not exist is an error."""
    files: set[str] = set()
    for entry in entries:
        path = root / entry
        if path.is_dir():
            files.update(p.relative_to(root).as_posix() for p in path.rglob("*.py"))
        elif path.is_file():
            files.add(entry)
        else:
            raise ArtifactError(f"{path}: listed in CODE_FILES but missing; the code size cannot be counted")
    return sorted(files)


def minify(source: str) -> str:
    """The same program without comments and docstrings (annotations stay: dataclasses need them)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def package_program(root: Path = PACKAGE_ROOT, entries: tuple[str, ...] = CODE_FILES) -> tuple[str, int, list[str]]:
    """The self-installing program, the raw source bytes it was made from, and the file list."""
    files = code_files(root, entries)
    sources = {}
    raw = 0
    for rel in files:
        text = (root / rel).read_text(encoding="utf-8")
        raw += len(text.encode("utf-8"))
        sources[rel] = minify(text)
    return f"S={sources!r}\n{_BOOTSTRAP.lstrip()}", raw, files


def wrap(program: str) -> str:
    """The records' two-line self-extracting wrapper around ``program`` (xz preset 9, base85)."""
    payload = base64.b85encode(lzma.compress(program.encode("utf-8"), preset=9)).decode("ascii")
    return f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{payload}")))'


def measure_code_size(root: Optional[Path] = None) -> CodeSize:
    program, raw, files = package_program(root or PACKAGE_ROOT)
    return CodeSize(tuple(files), raw, len(program.encode("utf-8")), len(wrap(program).encode("utf-8")))
