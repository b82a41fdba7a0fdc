"""Honest code bytes: the source that loading and evaluating *this* artifact needs, minified and wrapped as the
records wrap theirs.

The challenge counts code bytes + compressed model bytes. A record counts its one script; a package counts what
reading its artifact and running its config's scored passes imports (``code_files``), starting from

* ``EVAL_ENTRY`` (``eval/artifact_eval.py``): read the artifact, build the model, load the val split and its byte
  counts, run the passes by name;
* the reader of the artifact's container (``export.format``): each container registers its reader where it is
  defined (``reader.py``'s ``CONTAINERS``; ``Container.modules``), the decoder side only;
* each scored pass of the config (``model.test_methods``): the module that declares it (``eval/registry.py``'s
  ``METHOD_MODULES``), with what else it needs (``EvalMethod.modules``);

and adding every pgolf_lit module these import, at module level or inside a function, so a new dependency is
counted the day it is added. Two exceptions are declared by the imported module itself, and both apply only to an
import inside a function (a module-level import is always followed):

* a module that assigns a string to ``TRAINING_ONLY`` (the fused Triton kernels: training speed, the same function
  as the eager path; the GPTConfig checks, which ran when the artifact's config was written) is never followed;
* a module that assigns ``COUNTED_WHEN = "<GPTConfig field>"`` or ``"<field>=<value>"`` (a model technique only some
  configs use, imported by the model only where that field is on) is followed when the measured config switches it
  on (``model=``), and always when no config is given (an upper bound, as ``methods=None``).

A package's ``__init__.py`` is counted only when a counted module imports a name from it (``from pgolf_lit.eval
import EvalSettings``); otherwise the program creates the package empty, so importing ``pgolf_lit.eval.runner``
does not import every method.

The sources are minified with python-minifier using PR #1855's ``pyminify`` flags (``PYMINIFY_OPTIONS``) and put in
one program, which serves them as an importable ``pgolf_lit`` package (``_BOOTSTRAP``), sets the eval registry's
``METHOD_MODULES`` to the modules of the config's passes (the program carries no other method), then imports the
container's reader and the entry. The program is wrapped as PR #1855 measures its code
(``_compressed_code_size``)::

    import brotli as B,base64 as b
    exec(B.decompress(b.b85decode("<brotli quality 11 of the program, base85>")))

A record may wrap its code another way (``CODE_WRAPPERS``; PR #2130/#2135's lzma wrapper registers in
``code_lzma.py``): the wrapper decides the minify flags and the compressor, the program is the same.

The wrapper really works: exec it in an interpreter without pgolf_lit installed, then
``from pgolf_lit.eval.artifact_eval import evaluate_artifact_file``. Its length is the counted size.
python-minifier is needed to measure (export side); the wrapped program needs only the runtime packages.
"""

from __future__ import annotations

import ast
import base64
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import brotli

from pgolf_lit.errors import ArtifactError, ConfigError

EVAL_ENTRY = "pgolf_lit.eval.artifact_eval"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
# PR #1855 train_gpt.py `_compressed_code_size`: pyminify --no-rename-locals --no-hoist-literals
# --remove-literal-statements --remove-asserts --prefer-single-line (the rest are pyminify's defaults).
PYMINIFY_OPTIONS = dict(
    rename_locals=False,
    hoist_literals=False,
    remove_literal_statements=True,
    remove_asserts=True,
    prefer_single_line=True,
)
BROTLI_QUALITY = 11
WRAPPER_HEAD = 'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("'
WRAPPER_TAIL = '")))\n'
OPTIONAL_MARK = "TRAINING_ONLY"
GATE_MARK = "COUNTED_WHEN"

# Serves the sources in S (path -> source) as modules ahead of the normal import system; a folder of S without an
# __init__.py is an empty package.
_BOOTSTRAP = """import sys,importlib.abc as A,importlib.util as U
class F(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  k=n.replace('.','/')
  if k+'.py' in S:return U.spec_from_loader(n,s,origin=k+'.py')
  if any(f.startswith(k+'/')for f in S):return U.spec_from_loader(n,s,origin=k+'/__init__.py',is_package=True)
 def create_module(s,spec):return
 def exec_module(s,m):
  f=m.__spec__.origin
  if f in S:m.__file__=f;exec(compile(S[f],f,'exec'),m.__dict__)
sys.meta_path.insert(0,F())
"""


@dataclass(frozen=True)
class CodeSize:
    files: tuple[str, ...]
    source_bytes: int  # the files as they are
    program_bytes: int  # minified sources inside the self-installing program
    wrapped_bytes: int  # the two-line wrapper: the counted size
    formats: tuple[str, ...] = ()  # the containers whose readers are counted
    methods: tuple[str, ...] = ()  # the eval passes whose code is counted
    wrapper: str = "brotli"  # how the program is wrapped (CODE_WRAPPERS)

    @property
    def counted_bytes(self) -> int:
        return self.wrapped_bytes


# ---------------------------------------------------------------------------------------------------------
# Which modules: the entries of a config, and their import closure
# ---------------------------------------------------------------------------------------------------------


def _registries():
    """Every registered container and eval method (importing the quant package registers every container)."""
    import pgolf_lit.quant  # noqa: F401
    from pgolf_lit.eval.registry import eval_methods
    from pgolf_lit.quant.reader import CONTAINERS

    return CONTAINERS, eval_methods()


def method_modules(methods: Iterable[str]) -> list[str]:
    """The modules of ``eval/registry.py``'s ``METHOD_MODULES`` that declare any of ``methods``, in that order."""
    from pgolf_lit.eval.registry import METHOD_MODULES

    wanted = set(methods)
    return [m for m in METHOD_MODULES if wanted & {x.name for x in importlib.import_module(m).METHODS}]


def entry_modules(formats: Optional[Iterable[str]] = None, methods: Optional[Iterable[str]] = None) -> list[str]:
    """The modules the program needs by name: the modules declaring each method and what each method needs, each
    format's reader, in that order, then ``EVAL_ENTRY``. ``None`` means every registered format / method (the whole
    evaluation side)."""
    containers, eval_methods = _registries()
    formats = list(containers) if formats is None else list(formats)
    methods = list(eval_methods) if methods is None else list(methods)
    unknown = [f for f in formats if f not in containers]
    if unknown:
        raise ConfigError(f"code size: unknown artifact format(s) {unknown}; expected some of {list(containers)}")
    unknown = [m for m in methods if m not in eval_methods]
    if unknown:
        raise ConfigError(f"code size: unknown eval method(s) {unknown}; expected some of {list(eval_methods)}")
    modules = method_modules(methods) + [m for name in methods for m in eval_methods[name].modules]
    modules += [m for name in formats for m in containers[name].modules]
    return list(dict.fromkeys([*modules, EVAL_ENTRY]))


def _module_file(root: Path, module: str) -> Optional[str]:
    base = module.replace(".", "/")
    for rel in (f"{base}.py", f"{base}/__init__.py"):
        if (root / rel).is_file():
            return rel
    return None


def _module_marks(root: Path, module: str) -> dict[str, object]:
    """The module-level string assignments to ``TRAINING_ONLY`` / ``COUNTED_WHEN`` of a module's source."""
    rel = _module_file(root, module)
    if rel is None:
        return {}
    marks = {}
    for node in ast.parse((root / rel).read_text(encoding="utf-8")).body:
        for target in node.targets if isinstance(node, ast.Assign) else []:
            if isinstance(target, ast.Name) and target.id in (OPTIONAL_MARK, GATE_MARK):
                marks[target.id] = node.value.value if isinstance(node.value, ast.Constant) else None
    return marks


def config_switches_on(gate: object, model, module: str = "") -> bool:
    """Whether ``model`` (a GPTConfig) switches on a ``COUNTED_WHEN`` gate: ``"field"`` (truthy) or
    ``"field=value"`` (``str(getattr(model, field)) == value``)."""
    if not isinstance(gate, str) or not gate:
        raise ArtifactError(f"{module}: {GATE_MARK} must be a string 'field' or 'field=value', got {gate!r}")
    field, _, value = gate.partition("=")
    if not hasattr(model, field):
        raise ArtifactError(f"{module}: {GATE_MARK} names {field!r}, which the model config does not have")
    return str(getattr(model, field)) == value if value else bool(getattr(model, field))


def _lazily_counted(root: Path, module: str, model) -> bool:
    """Whether an import of ``module`` inside a function is counted (see the module docstring)."""
    marks = _module_marks(root, module)
    if OPTIONAL_MARK in marks:
        return False
    return GATE_MARK not in marks or model is None or config_switches_on(marks[GATE_MARK], model, module)


def _imported_modules(root: Path, source: str, module: str, is_package: bool, model=None) -> set[str]:
    """The pgolf_lit modules a source needs: ``import a.b`` needs ``a.b``; ``from a import n`` needs module ``a.n``
    when that is a module, else ``a`` itself (its ``__init__`` when a package). Imports inside functions count
    too, except of modules that declare ``TRAINING_ONLY`` or a ``COUNTED_WHEN`` that ``model`` leaves off."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against the importing package
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                names = [f"{base}.{a.name}" if _module_file(root, f"{base}.{a.name}") else base for a in child.names]
            else:
                visit(child, inner)
                continue
            for name in names:
                if name.split(".")[0] == "pgolf_lit" and not (lazy and not _lazily_counted(root, name, model)):
                    found.add(name)

    visit(ast.parse(source), False)
    return found


def code_files(
    formats: Optional[Iterable[str]] = None,
    methods: Optional[Iterable[str]] = None,
    root: Path = PACKAGE_ROOT,
    entries: Optional[Sequence[str]] = None,
    model=None,
) -> list[str]:
    """The .py files counted for an artifact of ``formats`` scored by ``methods`` (``entry_modules``), or for
    explicit ``entries``: those modules and every pgolf_lit module they need (for the model config ``model``;
    None: every model technique), sorted. An entry without source is an error."""
    entries = list(entries) if entries is not None else entry_modules(formats, methods)
    for module in entries:
        if _module_file(root, module) is None:
            raise ArtifactError(
                f"{root}: {module} is a code entry module but has no source; the code size cannot be counted"
            )
    files: set[str] = set()
    todo, seen = list(entries), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        rel = _module_file(root, module)
        if rel is None:  # a name pgolf_lit does not have as a file: the import fails at run time as it would here
            continue
        files.add(rel)
        source = (root / rel).read_text(encoding="utf-8")
        todo.extend(_imported_modules(root, source, module, rel.endswith("__init__.py"), model))
    return sorted(files)


# ---------------------------------------------------------------------------------------------------------
# The program and its wrapper
# ---------------------------------------------------------------------------------------------------------


def minify(source: str, options: Optional[Mapping[str, bool]] = None) -> str:
    """``source`` as PR #1855's pyminify call minifies it (python-minifier, ``PYMINIFY_OPTIONS``), or with another
    wrapper's ``options``."""
    import python_minifier  # the export side's dependency; the wrapped program never needs it

    return python_minifier.minify(source, **(PYMINIFY_OPTIONS if options is None else options))


@functools.lru_cache(maxsize=256)
def _read_minified(path: str, mtime_ns: int, size: int, options: tuple = ()) -> tuple[str, str]:
    """A file's text and its minified form, cached while the file is unchanged (every export measures its code)."""
    text = Path(path).read_text(encoding="utf-8")
    return text, minify(text, dict(options) if options else None)


def package_program(
    formats: Optional[Iterable[str]] = None,
    methods: Optional[Iterable[str]] = None,
    root: Path = PACKAGE_ROOT,
    entries: Optional[Sequence[str]] = None,
    minify_options: Optional[Mapping[str, bool]] = None,
    model=None,
) -> tuple[str, int, list[str]]:
    """The self-installing program, the raw source bytes it was made from, and the file list. Given ``formats`` and
    ``methods``, the program lists the modules of those methods in the eval registry and imports the containers'
    readers and ``EVAL_ENTRY``; given ``entries``, it imports those."""
    if entries is None:
        containers, eval_methods = _registries()
        formats = list(containers) if formats is None else list(formats)
        methods = list(eval_methods) if methods is None else list(methods)
        entries = entry_modules(formats, methods)
        readers = [m for name in formats for m in containers[name].modules]
        head = f"import pgolf_lit.eval.registry as R\nR.METHOD_MODULES={tuple(method_modules(methods))!r}\n"
        imports = list(dict.fromkeys([*readers, EVAL_ENTRY]))
    else:
        head, imports = "", list(entries)
    files = code_files(root=root, entries=entries, model=model)
    sources = {}
    raw = 0
    options = tuple(sorted(minify_options.items())) if minify_options is not None else ()
    for rel in files:
        stat = (root / rel).stat()
        text, sources[rel] = _read_minified(str(root / rel), stat.st_mtime_ns, stat.st_size, options)
        raw += len(text.encode("utf-8"))
    table = ",".join(f"{rel!r}:{_literal(src)}" for rel, src in sources.items())
    program = f"S={{{table}}}\n{_BOOTSTRAP}{head}import {','.join(imports)}\n"
    return program, raw, files


def _literal(source: str) -> str:
    """``source`` as a Python string literal: raw and triple-quoted where that spells it verbatim (no escaped
    newlines and quotes: ~2 % fewer compressed bytes than ``repr``), else ``repr``."""
    tail = len(source) - len(source.rstrip("\\"))
    literal = f"r'''{source}'''"
    if "'''" in source or "\r" in source or tail % 2 or source.endswith("'") or ast.literal_eval(literal) != source:
        return repr(source)
    return literal


def wrap(program: str) -> str:
    """PR #1855's two-line self-extracting wrapper around ``program`` (brotli quality 11, base85)."""
    payload = base64.b85encode(brotli.compress(program.encode("utf-8"), quality=BROTLI_QUALITY)).decode("ascii")
    return f"{WRAPPER_HEAD}{payload}{WRAPPER_TAIL}"


@dataclass(frozen=True)
class CodeWrapper:
    """How a record wraps its counted code: the pyminify flags, then ``wrap(program) -> the wrapper's text``."""

    name: str
    minify_options: Mapping[str, bool]
    wrap: Callable[[str], str]


CODE_WRAPPERS: dict[str, CodeWrapper] = {}


def register_code_wrapper(wrapper: CodeWrapper) -> CodeWrapper:
    if wrapper.name in CODE_WRAPPERS:
        raise ValueError(f"code wrapper {wrapper.name!r} is registered twice")
    CODE_WRAPPERS[wrapper.name] = wrapper
    return wrapper


BROTLI_WRAPPER = register_code_wrapper(CodeWrapper("brotli", PYMINIFY_OPTIONS, wrap))


def measure_code_size(
    formats: Optional[Iterable[str]] = None,
    methods: Optional[Iterable[str]] = None,
    root: Optional[Path] = None,
    wrapper: str = "brotli",
    model=None,
) -> CodeSize:
    """The counted code of an artifact in ``formats`` scored by ``methods`` (None: every registered one, the
    whole evaluation side: an upper bound) of a model built from the GPTConfig ``model`` (None: with every model
    technique, an upper bound), wrapped by the registered ``wrapper``."""
    import pgolf_lit.quant.code_lzma  # noqa: F401  (registers the lzma wrapper)

    if wrapper not in CODE_WRAPPERS:
        raise ConfigError(f"code size: unknown code wrapper {wrapper!r}; expected one of {sorted(CODE_WRAPPERS)}")
    how = CODE_WRAPPERS[wrapper]
    containers, eval_methods = _registries()
    formats = tuple(containers) if formats is None else tuple(formats)
    methods = tuple(eval_methods) if methods is None else tuple(methods)
    program, raw, files = package_program(
        formats, methods, root or PACKAGE_ROOT, minify_options=how.minify_options, model=model
    )
    wrapped = len(how.wrap(program).encode("utf-8"))
    return CodeSize(tuple(files), raw, len(program.encode("utf-8")), wrapped, formats, methods, wrapper)
