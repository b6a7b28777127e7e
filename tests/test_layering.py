"""The import graph between medd's subpackages: transports and storage know
no role, and the roles never import each other (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import medd

PACKAGE = Path(medd.__file__).parent

ROLES = ("medd.central", "medd.viewer", "medd.gateway")
ASSEMBLY = ("medd.service", "medd.validation", "medd.cli", "medd.demo", "medd.tap")

# (modules under this prefix, may not import these prefixes)
FORBIDDEN = [
    ("medd.transports", ROLES + ASSEMBLY),
    ("medd.storage", ROLES + ASSEMBLY + ("medd.transports",)),
    ("medd.plugins", ROLES + ASSEMBLY + ("medd.transports",)),
    ("medd.ingest", ROLES + ASSEMBLY + ("medd.transports",)),
    ("medd.audit", ROLES + ASSEMBLY + ("medd.transports",)),
    ("medd.webresource", ROLES + ASSEMBLY + ("medd.transports",)),
    ("medd.scheduling", ROLES + ASSEMBLY + ("medd.transports", "medd.storage")),
    ("medd.throttling", ROLES + ASSEMBLY + ("medd.transports", "medd.storage")),
    ("medd.package", ROLES + ASSEMBLY + ("medd.transports", "medd.storage")),
    ("medd.pull", ROLES + ASSEMBLY),
    ("medd.mail", ROLES + ASSEMBLY),
    ("medd.objects", ROLES + ASSEMBLY + ("medd.transports", "medd.storage")),
    ("medd.central", ("medd.viewer", "medd.gateway") + ASSEMBLY),
    ("medd.viewer", ("medd.central", "medd.gateway") + ASSEMBLY),
    ("medd.gateway", ("medd.central", "medd.viewer") + ASSEMBLY),
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = module_name(path, root)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        for owner, forbidden in FORBIDDEN:
            if not _within(name, owner):
                continue
            for imported in sorted(imports_of(path, root)):
                for bad in forbidden:
                    if _within(imported, bad):
                        out.append(f"{name} imports {imported} (no {owner} module may import {bad})")
    return sorted(set(out))


def test_no_forbidden_import_arrows():
    """No transport, storage or plugin module imports a role; no role imports another role."""
    assert violations() == []


def test_the_checker_sees_function_level_imports(tmp_path):
    """The walk finds an import hidden inside a function, so the rule cannot be dodged that way."""
    source = tmp_path / "medd" / "transports" / "sneaky.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from medd.central.routing import Router\n    return Router\n")
    assert violations(tmp_path / "medd") == [
        "medd.transports.sneaky imports medd.central.routing (no medd.transports module may import medd.central)",
        "medd.transports.sneaky imports medd.central.routing.Router (no medd.transports module may import medd.central)",
    ]
