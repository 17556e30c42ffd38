"""The package's shape in numbers a reader can check: lines per module, the longest functions,
the import cycles between its modules, and how many modules each of a few options passes
through.

    python bench/code_shape.py                       # this working tree
    python bench/code_shape.py --rev 13074aa         # any commit, read with `git show`

"Passes through" counts the package modules (and entry scripts) whose code reads the option as
an attribute (`.per_device_train_batch_size`) or names it as a keyword: every place a reader has
to visit to follow it. Imports are module-level and function-level `from .x import` /
`import clm.x` alike, since a deferred import is still an arrow between the two modules.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "clm"
SCRIPTS = ("train_clm.py", "generate.py", "finetune/run_sft.py")
OPTIONS = ("per_device_train_batch_size", "gradient_accumulation_steps", "block_size",
           "learning_rate", "deepspeed", "fsdp", "mixed_precision")
CONFIG_NAMES = ("train_cfg", "training_cfg")  # or any parameter annotated TrainingConfig


def sources(rev: str | None) -> dict[str, str]:
    """{path: text} of the package's modules and the entry scripts, at `rev` or on disk."""
    if rev is None:
        paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PACKAGE).rglob("*.py"))
        return {p: (ROOT / p).read_text() for p in [*paths, *SCRIPTS] if (ROOT / p).is_file()}
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, PACKAGE], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for path in [*(p for p in listed if p.endswith(".py")), *SCRIPTS]:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True,
                               text=True)
        if shown.returncode == 0:
            out[path] = shown.stdout
    return out


def module_name(path: str) -> str:
    name = path[:-3].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def imports(path: str, tree: ast.AST) -> set[str]:
    """The package modules `path` imports, resolved to dotted names."""
    here = module_name(path)
    package = here if path.endswith("__init__.py") else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # `from . import data` and `from .parallel import ddp` name modules too
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
            found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    return found


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(tuple(sorted(group)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="a git commit to measure instead of the working tree")
    parser.add_argument("--top", type=int, default=12, help="how many of the longest functions")
    args = parser.parse_args()

    files = sources(args.rev)
    trees = {p: ast.parse(t) for p, t in files.items()}
    modules = {module_name(p) for p in files if p.startswith(PACKAGE + "/")}
    print(f"# {args.rev or 'working tree'}")
    print(f"\n## lines per module ({sum(len(t.splitlines()) for t in files.values())} in all)")
    for path in sorted(files, key=lambda p: -len(files[p].splitlines())):
        print(f"{len(files[path].splitlines()):6d}  {path}")

    functions = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}",
                                  len(node.args.args) + len(node.args.kwonlyargs)))
    functions.sort(reverse=True)
    print(f"\n## longest functions (lines, parameters) of {len(functions)}")
    for lines, name, params in functions[:args.top]:
        print(f"{lines:6d} {params:3d}  {name}")
    print(f"functions with 10 or more parameters: "
          f"{sum(1 for *_, p in functions if p >= 10)}")

    graph = {}
    for path, tree in trees.items():
        graph[module_name(path)] = {m for m in imports(path, tree) if m in modules}
    found = cycles(graph)
    print(f"\n## import cycles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))

    if not found:  # a DAG: each module's layer is one above the highest it imports
        layer = {}

        def depth(v):
            if v not in layer:
                layer[v] = 1 + max((depth(w) for w in graph.get(v, ()) if w != v), default=-1)
            return layer[v]

        for v in graph:
            depth(v)
        print("layers, bottom first (every import points to a lower layer):")
        for k in range(max(layer.values()) + 1):
            print(f"  {k}: {', '.join(sorted(v for v in layer if layer[v] == k))}")

    print("\n## modules an option passes through")
    for option in OPTIONS:
        users = []
        for path, tree in trees.items():
            if any(isinstance(n, ast.Attribute) and n.attr == option or
                   isinstance(n, ast.keyword) and n.arg == option for n in ast.walk(tree)):
                users.append(module_name(path))
        print(f"{len(users):3d}  --{option}: {', '.join(sorted(users))}")

    # the whole training config handed on: every function that takes it is a place the reader
    # must check for what it reads
    takers = [f"{module_name(path)}.{n.name}" for path, tree in trees.items()
              for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              and any(a.arg in CONFIG_NAMES or (isinstance(a.annotation, ast.Name) and
                                                 a.annotation.id == "TrainingConfig")
                      or (isinstance(a.annotation, ast.Constant) and
                          a.annotation.value == "TrainingConfig")
                      for a in [*n.args.args, *n.args.kwonlyargs])]
    owners = sorted({t.rpartition(".")[0] for t in takers})
    print(f"\n## functions taking the whole training config: {len(takers)} in {len(owners)} "
          f"modules ({', '.join(owners)})")


if __name__ == "__main__":
    main()
