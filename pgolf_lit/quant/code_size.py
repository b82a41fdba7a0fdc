"""Honest code bytes: the package source needed to load and evaluate an artifact, wrapped as records wrap theirs.

The challenge counts code bytes + compressed model bytes. A record counts its one script; a package must count
every source file that loading and evaluating an artifact runs: ``code_files()``, the import closure of
``CODE_ENTRY_MODULES``. Those sources (docstrings and
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

# What loading and evaluating an artifact imports: the artifact reader, every registered eval method, the val
# shards and byte LUTs. The counted files are these modules plus everything they import from pgolf_lit (lazy
# imports inside functions included), so a new dependency is counted the day it is added.
CODE_ENTRY_MODULES = (
    "pgolf_lit.quant.export",
    "pgolf_lit.eval",
    "pgolf_lit.metrics",
    "pgolf_lit.data.shards",
    "pgolf_lit.data.tokenizer",
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


def _module_file(root: Path, module: str) -> Optional[str]:
    base = module.replace(".", "/")
    for rel in (f"{base}.py", f"{base}/__init__.py"):
        if (root / rel).is_file():
            return rel
    return None


def _imported_modules(source: str, package: str) -> set[str]:
    """Every ``pgolf_lit`` module a source imports anywhere in it (``from a import b`` may name module ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pgolf_lit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "pgolf_lit":
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def code_files(root: Path = PACKAGE_ROOT, entries: tuple[str, ...] = CODE_ENTRY_MODULES) -> list[str]:
    """The .py files of ``entries`` and of every pgolf_lit module they import (with their packages' __init__),
    sorted; an entry that does not exist is an error."""
    files: set[str] = set()
    todo = []
    for module in entries:
        if _module_file(root, module) is None:
            raise ArtifactError(f"{root}: {module} is a code entry module but has no source; the code size cannot be counted")
        todo.append(module)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        rel = _module_file(root, module)
        if rel is None:  # ``from pkg import name`` where name is not a module
            continue
        files.add(rel)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages it sits in
        package = module if rel.endswith("__init__.py") else ".".join(parts[:-1])
        todo.extend(_imported_modules((root / rel).read_text(encoding="utf-8"), package))
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


def package_program(root: Path = PACKAGE_ROOT, entries: tuple[str, ...] = CODE_ENTRY_MODULES) -> tuple[str, int, list[str]]:
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
