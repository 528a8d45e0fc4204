"""The house rules of the layout, read from the source with `ast` (no project module is imported):
floors, imports at the top of a file, no circles, nobody imports train.py, line budgets, docstrings.

A module is a top-level file (`trigflow`) or a file of analysis/ or bench/ (`analysis/common`).
"""

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("analysis", "bench")  # besides the top level, the folders whose .py files are modules
BUDGET = 250  # lines per file; train.py has no exemption
EXEMPTION = re.compile(r"Over 250 lines:\s*(\S[^\n]*)")  # in the module docstring, with the reason

# The floors (README, "Where each equation lives"): a module imports only modules on strictly
# lower floors. A new file needs an entry here (test_every_file_has_a_floor).
BY_FLOOR = {
    0: "trigflow brightness_filter runtime parallel checkpoint toy sana_io report",
    1: "trajectory loss sampler config toy_teacher sana sana_tiny",
    2: "pairs metrics lora optimizers",
    3: "backbones",
    4: "bank monitor",
    5: "train evaluate analysis/common",
    6: "analysis/readings analysis/predicted_x0 analysis/sampling_schemes analysis/pair_sources "
    "bench/bank_storage bench/quality_report bench/cost_step bench/cost_report bench/sync",
    # a variant's process; paper-sana's parts composed; Eq. 8's readings drawn
    7: "bench/cost_worker bench/cost_compose bench/quality analysis/equivalent_noise analysis/tsne",
    8: "bench/cost bench/cost_stages",  # the cost bench's driver; paper-sana's stages
    9: "bench/cost_paper bench/gpu_check",  # one paper-sana part in its own process; the GPU check
    10: "bench/cost_shard",  # the sharded memory table, composed from paper-sana's parts
    11: "bench/optimizer_state",  # AdamW and CAME state at the paper shapes (cost_shard counts)
}
FLOORS = {m: floor for floor, names in BY_FLOOR.items() for m in names.split()}


@dataclass(frozen=True)
class Import:
    """One import of a project module: where it is, what it says, what it reaches."""

    module: str  # the importing module
    target: str  # the imported project module
    where: str  # file:line
    text: str  # the statement, shortened
    scope: str  # "" at module level, else the enclosing function or class


@cache
def modules() -> dict[str, Path]:
    """Every module of the repository: name → file."""
    files = [*ROOT.glob("*.py"), *(p for d in FOLDERS for p in (ROOT / d).glob("*.py"))]
    return {name(p): p for p in sorted(files)}


def name(path: Path) -> str:
    """trigflow.py → trigflow, analysis/common.py → analysis/common."""
    return path.relative_to(ROOT).with_suffix("").as_posix()


@cache
def tree(module: str) -> ast.Module:
    path = modules()[module]
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise AssertionError(f"{path.relative_to(ROOT)}:{e.lineno}: cannot parse: {e.msg}") from e


def resolve(dotted: str, importer: str) -> str | None:
    """The project module a dotted import name reaches, or None for stdlib / third-party names."""
    head, _, rest = dotted.partition(".")
    folder = importer.rpartition("/")[0]
    if folder and (ROOT / folder / f"{head}.py").exists():
        return f"{folder}/{head}"  # a script's own folder comes first on sys.path
    if head == "analysis":
        return f"analysis/{rest.partition('.')[0]}" if rest else None
    tops = {m for m in [*FLOORS, *modules()] if "/" not in m}
    return head if head in tops else None


def targets(node: ast.AST, importer: str) -> list[str]:
    """Project modules reached by an import statement or an `import_module("x")` call."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "analysis":
        names = [f"analysis.{a.name}" for a in node.names]  # from analysis import common
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        # importlib.import_module("x") / __import__("x"): an import all the same
        func = getattr(node.func, "attr", getattr(node.func, "id", ""))
        dynamic = func in ("import_module", "__import__") and isinstance(node.args[0].value, str)
        names = [node.args[0].value] if dynamic else []
    else:
        names = []
    return [t for t in (resolve(n, importer) for n in names) if t]


@cache
def imports(module: str) -> tuple[Import, ...]:
    """Every import of a project module in a file, at any depth, with its enclosing def or class."""
    found, path = [], modules()[module].relative_to(ROOT)

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            for target in targets(child, module):
                text = ast.unparse(child)
                text = text if len(text) <= 80 else text[:77] + "..."
                found.append(Import(module, target, f"{path}:{child.lineno}", text, scope))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, f"{scope}.{child.name}".lstrip(".") if inner else scope)

    visit(tree(module), "")
    return tuple(found)


def all_imports() -> list[Import]:
    return [i for m in modules() for i in imports(m)]


def test_every_file_has_a_floor():
    """Every top-level, analysis/ and bench/ file sits on a floor (a new file forces a
    decision: add it to FLOORS in tests/test_layout.py)."""
    missing = sorted(set(modules()) - set(FLOORS))
    assert not missing, f"files with no floor in tests/test_layout.py FLOORS: {missing}"


def test_imports_go_down():
    """A module imports only project modules on strictly lower floors."""
    bad = [
        f"{i.where}: {i.text}  ({i.module}, floor {FLOORS[i.module]}, imports {i.target}, "
        f"floor {FLOORS.get(i.target, 'none')})"
        for i in all_imports()
        if i.module in FLOORS and not (i.target in FLOORS and FLOORS[i.target] < FLOORS[i.module])
    ]
    assert not bad, "imports that do not go down a floor:\n" + "\n".join(bad)


def test_project_imports_at_module_level():
    """Project modules are imported at the top of a file, never inside a function or
    class (function-level imports are for heavy third-party libraries only)."""
    bad = [f"{i.where}: {i.text}  (inside {i.scope})" for i in all_imports() if i.scope]
    assert not bad, "project imports inside a function or class:\n" + "\n".join(bad)


def test_nobody_imports_train():
    """No module imports train.py, the entry point (bench scripts included, whose
    `sys.path.insert` makes `from train import ...` exactly that)."""
    bad = [f"{i.where}: {i.text}" for i in all_imports() if i.target == "train"]
    assert not bad, "imports of train.py:\n" + "\n".join(bad)


def test_no_import_cycles():
    """Imports run one way, no circles (implied by the floors; checked on its own so a
    circle is named edge by edge)."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules()}
    for i in all_imports():
        if i.target in edges and i.target != i.module:
            edges[i.module].setdefault(i.target, i)
    cycles, state, stack = set(), {}, []

    def dfs(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == "open":
                loop = stack[stack.index(t) :]
                k = loop.index(min(loop))
                cycles.add(tuple(loop[k:] + loop[:k]))  # one spelling per circle
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = "done"

    for m in edges:
        if m not in state:
            dfs(m)
    shown = [
        " → ".join([*c, c[0]])
        + "  ("
        + ", ".join(edges[a][b].where for a, b in zip(c, [*c[1:], c[0]], strict=True))
        + ")"
        for c in sorted(cycles)
    ]
    assert not shown, "import circles:\n" + "\n".join(shown)


def test_line_budgets():
    """About 250 lines per file; train.py at most 250, any other file only with
    'Over 250 lines: <reason>' in its module docstring."""
    bad = []
    for m, path in modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        reason = EXEMPTION.search(ast.get_docstring(tree(m)) or "")
        exempt = m != "train" and reason is not None and len(reason[1].split()) >= 3
        if n > BUDGET and not exempt:
            why = "no exemption for train.py" if m == "train" else "no 'Over 250 lines: <reason>'"
            bad.append(f"{path.relative_to(ROOT)}: {n} lines > {BUDGET} ({why})")
    assert not bad, "files over the line budget:\n" + "\n".join(bad)


def test_module_docstrings():
    """Each module opens with a docstring (concept, equations, conventions)."""
    bad = [
        str(path.relative_to(ROOT))
        for m, path in modules().items()
        if not (ast.get_docstring(tree(m)) or "").strip()
    ]
    assert not bad, f"modules without a docstring: {bad}"
