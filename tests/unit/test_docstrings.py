"""Issue 12 kind 6, kept true: every public function, method and class of ``orchestrator/`` has a docstring.

Public: a name without a leading ``_``, at module level or in a public class (nested public classes
included; Protocol methods and properties too). Functions defined inside functions are not API. An
``@overload`` stub needs none (the implementation carries it). Read from the source with ``ast``, so the
check imports nothing and costs milliseconds.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "orchestrator"

_Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _is_overload(node: _Def) -> bool:
    for d in node.decorator_list:
        name = d.attr if isinstance(d, ast.Attribute) else d.id if isinstance(d, ast.Name) else ""
        if name == "overload":
            return True
    return False


def _public(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, _Def]]:
    for node in body:
        if not isinstance(node, _Def) or node.name.startswith("_"):
            continue
        yield prefix + node.name, node
        if isinstance(node, ast.ClassDef):
            yield from _public(node.body, f"{prefix}{node.name}.")


def undocumented(source: str, where: str) -> tuple[list[str], int]:
    """The public definitions of ``source`` without a (non-blank) docstring, as ``where:line: name``,
    and how many public definitions there are."""
    missing: list[str] = []
    total = 0
    for name, node in _public(ast.parse(source).body, ""):
        if _is_overload(node):
            continue
        total += 1
        doc = ast.get_docstring(node)
        if doc is None or not doc.strip():
            missing.append(f"{where}:{node.lineno}: {name}")
    return missing, total


def test_every_public_definition_has_a_docstring() -> None:
    missing: list[str] = []
    total = 0
    for path in sorted(PKG.rglob("*.py")):
        found, n = undocumented(path.read_text(encoding="utf-8"), str(path.relative_to(PKG.parent)))
        missing += found
        total += n
    assert total > 500, f"only {total} public definitions found under {PKG}: is the path right?"
    assert not missing, f"{len(missing)} of {total} public definitions have no docstring:\n" + "\n".join(
        missing
    )


def test_the_check_names_what_lacks_a_docstring() -> None:
    source = '''
def documented():
    """Yes."""

def bare():
    pass

async def bare_async():
    pass

def _private():
    pass

def blank():
    """  """

class Public:
    """Yes."""

    def method(self):
        pass

    @property
    def prop(self):
        """Yes."""

    def _hidden(self):
        pass

    class Inner:
        def deep(self):
            pass

class _Private:
    def method(self):
        pass

class Proto:
    """A protocol."""

    def call(self) -> None: ...

    @overload
    def over(self, x: int) -> int: ...

def outer():
    """Yes."""

    def inner():
        pass
'''
    missing, total = undocumented(source, "m.py")
    names = [m.split(": ", 1)[1] for m in missing]
    assert names == [
        "bare",
        "bare_async",
        "blank",
        "Public.method",
        "Public.Inner",
        "Public.Inner.deep",
        "Proto.call",
    ]
    assert missing[0] == "m.py:5: bare"
    assert total == 12
