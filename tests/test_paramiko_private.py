"""paramiko internals the SSH transport relies on are fenced (each behind one small function in ssh.py) and watched:
a paramiko release that drops one fails here, naming the attribute, instead of deep inside an upload. Costs ~0.1 s."""
from __future__ import annotations

import ast
from pathlib import Path

import paramiko

from pipeline.devices.transport import ssh

SSH_PY = Path(ssh.__file__)


def _owners() -> dict[str, object]:
    """Real paramiko objects for the attributes set per instance (no connection needed)."""
    chan = paramiko.Channel(0)
    f = paramiko.SFTPFile(None, b"handle", "wb")
    f._closed = True   # never flushed to the (absent) server on garbage collection
    return {"Channel": chan, "SFTPFile": f}


def test_every_paramiko_internal_edgepipe_relies_on_is_still_there():
    owners = _owners()
    missing = [f"paramiko.{owner}.{name}" for owner, names in ssh.PARAMIKO_PRIVATE.items()
               for name in names if not hasattr(owners.get(owner) or getattr(paramiko, owner), name)]
    assert not missing, (f"paramiko {paramiko.__version__} no longer has {', '.join(missing)}: "
                         f"pipeline/devices/transport/ssh.py relies on it (PARAMIKO_PRIVATE); adapt the function "
                         f"that uses it, or pin paramiko below this version in pyproject.toml")


def test_the_internals_are_used_only_inside_their_fences():
    """Each listed attribute is touched only in the small functions (or the Transport subclass) named in FENCES."""
    private = {n for names in ssh.PARAMIKO_PRIVATE.values() for n in names}
    tree = ast.parse(SSH_PY.read_text())
    outside = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = where
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)) and where == "":
                name = child.name
            if isinstance(child, ast.Attribute) and child.attr in private and name not in ssh.FENCES:
                outside.append(f"{child.attr} at line {child.lineno} (in {name or 'module level'})")
            if isinstance(child, ast.Name) and child.id in private and name not in ssh.FENCES:
                outside.append(f"{child.id} at line {child.lineno} (in {name or 'module level'})")
            visit(child, name)

    visit(tree, "")
    assert not outside, "paramiko internals used outside their fences: " + "; ".join(outside)
    assert any(isinstance(n, ast.ClassDef) and n.name == "_Transport" for n in tree.body)


def test_dependency_bounds_name_an_upper_version():
    import tomllib

    deps = tomllib.loads((SSH_PY.parents[3] / "pyproject.toml").read_text())["project"]["dependencies"]
    for pkg in ("paramiko", "procrastinate"):
        (spec,) = [d for d in deps if d.split(">")[0].split("<")[0].split("=")[0].strip() == pkg]
        assert "<" in spec, f"{pkg} has no upper bound in pyproject.toml: {spec}"
