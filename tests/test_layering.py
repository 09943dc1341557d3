"""The package's layers import downward only: interfaces -> evaluation -> training / integrations -> model ->
inference (and chat_format). Read from the source (no module is imported)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medusa"

# Higher imports lower. Evaluation reads training's data and accuracy tables, never the reverse; training and
# integrations do not import each other. chat_format (messages <-> token ids) is a leaf any layer may use: it
# imports no other part of medusa.
LAYERS = {"medusa.inference": 0, "medusa.chat_format": 0, "medusa.model": 1, "medusa.training": 2,
          "medusa.integrations": 2, "medusa.evaluation": 3, "medusa.interfaces": 4}
# Entry points at the paths users and the original Medusa project run (`python -m ...`): they only call the CLI.
ENTRY_POINTS = {"medusa", "medusa.__main__", "medusa.hf_utils", "medusa.inference.cli"}


def _layer(module: str) -> tuple[str, int] | None:
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, level
    return None


def _target(name: str) -> str:
    """`medusa` itself (whose __init__ exports MedusaModel) counts as medusa.model."""
    return "medusa.model" if name == "medusa" else name


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `import medusa...` / `from medusa... import` in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "medusa":   # `from medusa import x`: a module, or what the package exports
                found += [(node.lineno, f"medusa.{a.name}" if _layer(f"medusa.{a.name}") else "medusa")
                          for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, _target(m)) for line, m in found if m == "medusa" or m.startswith("medusa.")]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def test_no_module_imports_upward():
    wrong = []
    for module, path in _modules():
        own = _layer(module)
        if module in ENTRY_POINTS or own is None:
            continue
        for line, target in _imports(path):
            theirs = _layer(target)
            if theirs is None or theirs[0] == own[0]:
                continue
            if theirs[1] >= own[1]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    assert [m for m, _ in _modules() if m not in ENTRY_POINTS and _layer(m) is None] == []
