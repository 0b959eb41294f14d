"""The syntax of one Jinja chat template, walked for what can run code: parsed, never rendered.

Split from chat_templates.py so that Jinja is imported only when a model has a template.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["MAX_TEMPLATE_CHARS", "template_issues"]

# Real chat templates are a few KB (the longest in common use, Cohere's, is under 20 KB). Parsing
# is linear but slow in pure Python (a 1 MiB template of `{{ a.b }}` took 4.4-13.8 s); a bigger
# "template" is not one, and is not passed unread.
MAX_TEMPLATE_CHARS = 256 * 1024
CVE = "CVE-2024-34359"

# Attributes that are no Python dunder yet reach interpreter internals (frames, code, the MRO).
INTERNAL_ATTRIBUTES = frozenset(
    {"mro", "func_globals", "func_code", "f_globals", "f_locals", "f_builtins", "f_back",
     "f_code", "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame",
     "tb_next", "co_code", "im_func", "im_class"}
)  # fmt: skip
# Modules that are never template data; reaching one as an attribute means a global escaped.
MODULE_ATTRIBUTES = frozenset(
    {"os", "sys", "subprocess", "builtins", "importlib", "posix", "nt", "pty", "shutil",
     "socket", "ctypes", "pickle", "marshal", "codecs", "io"}
)  # fmt: skip
# Methods that run programs or code, whatever object they are reached through.
EXEC_METHODS = frozenset(
    {"popen", "popen2", "popen3", "system", "spawnl", "spawnle", "spawnlp", "spawnv", "spawnve",
     "spawnvp", "execl", "execle", "execlp", "execv", "execve", "execvp", "fork", "forkpty",
     "Popen", "check_output", "check_call", "getoutput", "getstatusoutput", "import_module",
     "load_module", "exec_module", "eval", "exec", "compile"}
)  # fmt: skip
# Python builtins no renderer gives a template; calling one means the renderer leaked builtins.
PYTHON_BUILTINS = frozenset(
    {"eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals",
     "vars", "breakpoint", "input", "exit", "quit", "memoryview"}
)  # fmt: skip
# Filters whose `attribute=` argument (or, for selectattr/rejectattr, first argument) is an
# attribute path that Jinja resolves with getattr, splitting on dots.
ATTRIBUTE_FILTERS = frozenset(
    {"map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max"}
)
# Folded strings stay short: names are short, and folding must not build big strings for anyone.
MAX_FOLDED_CHARS = 256
MAX_FOLD_DEPTH = 40
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# printf conversions we fold: no `*`, no mapping keys, widths of at most two digits.
_PRINTF = re.compile(r"%(?:%|[-#0 +]?\d{0,2}(?:\.\d{0,2})?[sdicrxXoeEfFgGa])")


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (it marks assistant tokens).
    Parsed here only so that real templates using it parse; its body is walked like any other."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's Extension API declares tags this way)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        body: list[nodes.Node] = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return body


# The extensions the renderers enable (transformers: loopcontrols and generation; llama.cpp's
# engine also takes `do`), so that every template a renderer runs parses here too. Only the
# parser is used; nothing is ever compiled or rendered.
_ENVIRONMENT = ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do", _Generation],
)


def template_issues(text: str) -> list[str]:
    """What in a chat template can run code or escape a sandbox, one short sentence each."""
    if len(text) > MAX_TEMPLATE_CHARS:
        return [
            f"is {len(text):,} characters, more than the {MAX_TEMPLATE_CHARS:,} a chat template "
            "is read to (real ones are a few KB); not scanned"
        ]
    try:
        tree = _ENVIRONMENT.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return [
            f"line {exc.lineno}: does not parse: {exc.message} (a renderer cannot run it, and a "
            "scanner does not pass what it cannot read)"
        ]
    except jinja2.TemplateError as exc:
        return [f"does not parse: {exc} (a scanner does not pass what it cannot read)"]
    except RecursionError:
        return ["does not parse: nested too deeply (a scanner does not pass what it cannot read)"]
    except (ValueError, OverflowError, MemoryError) as exc:
        # Jinja's lexer turns literals into Python values itself: a 5,000-digit integer is
        # past int()'s limit and raises ValueError, which is no TemplateError.
        return [
            f"does not parse: {type(exc).__name__}: {str(exc)[:200]} (a scanner does not pass "
            "what it cannot read)"
        ]
    try:
        return _Scan(tree).run()
    except RecursionError:
        return ["nested too deeply to scan (a scanner does not pass what it cannot read)"]
    except (ValueError, OverflowError, MemoryError) as exc:
        return [f"could not be scanned: {type(exc).__name__}: {str(exc)[:200]}"]


# ---- the syntax-tree walk ---------------------------------------------------------------------


# The order a line's sentences read in: what is read, then how it was hidden, then what it does.
_KINDS = ("load", "attribute", "built", "computed", "internal", "variable", "module", "exec",
          "builtin")  # fmt: skip


@dataclass
class _Issues:
    """Findings grouped by (line, kind, subject) so that one chain reads as one sentence."""

    groups: dict[tuple[int, str, str], dict[str, int]] = field(default_factory=dict)

    def add(self, line: int, kind: str, subject: str, name: str, order: int = 0) -> None:
        # order: how deep in its chain a name sits, so that a chain lists as it is written.
        self.groups.setdefault((line, kind, subject), {}).setdefault(name, order)

    def sentences(self) -> list[str]:
        ordered = sorted(self.groups.items(), key=lambda g: (g[0][0], _KINDS.index(g[0][1])))
        return [
            _sentence(line, kind, subject, sorted(names, key=names.__getitem__))
            for (line, kind, subject), names in ordered
        ]


def _listed(names: Sequence[str], most: int = 5) -> str:
    # Sentences stay short whatever a template throws at them: long names and lists are cut.
    shown = [n if len(n) <= 40 else n[:37] + "..." for n in names[:most]]
    if len(names) > most:
        shown.append(f"{len(names) - most} more")
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def _sentence(line: int, kind: str, subject: str, names: list[str]) -> str:
    of = f" of {subject}" if subject else ""
    through = f" through {subject}" if subject else ""
    plural = "s" if len(names) > 1 else ""
    if kind == "attribute":
        if any(n.startswith("__") for n in names):
            why = f"a sandbox escape: {CVE}"
        else:
            why = "a private attribute: the sandbox refuses these, as they lead out of it"
        return f"line {line}: reads attribute{plural} {_listed(names)}{of} ({why})"
    if kind == "internal":
        return (
            f"line {line}: reads {_listed(names)}{through} (interpreter internals: "
            f"a sandbox escape, {CVE})"
        )
    if kind == "module":
        return (
            f"line {line}: gets at module{plural} {_listed(names)}{through} (never template data)"
        )
    if kind == "exec":
        return f"line {line}: calls {_listed(names)}{through} (runs a program or Python code)"
    if kind == "builtin":
        return (
            f"line {line}: calls the Python builtin{plural} {_listed(names)} "
            "(no renderer gives a template these)"
        )
    if kind == "variable":
        return f"line {line}: reads the variable{plural} {_listed(names)} (Python internals)"
    if kind == "built":
        return (
            f"line {line}: builds the name{plural} {_listed(names)} from pieces with {subject} "
            "(hides a sandbox escape from a plain reading)"
        )
    if kind == "computed":
        return (
            f"line {line}: reads an attribute whose name is computed when rendered "
            f"({_listed(names)}); which one cannot be known without running it"
        )
    # kind == "load"
    return (
        f"line {line}: {_listed(names)} loads another template through the renderer's loader "
        "(a chat template is self-contained)"
    )


def _suspicious(name: str, *, dotted: bool = False) -> list[str]:
    """The parts of an attribute name (or dotted attribute path) that start with an underscore."""
    parts = name.split(".") if dotted else [name]
    return [p for p in parts if p.startswith("_") and _IDENTIFIER.fullmatch(p)]


class _Scan:
    """One walk over a parsed template. Strings built from constants (~, +, %, |format,
    .format(), |join, |replace, |reverse, slices, {% set %} variables) are folded to the
    names they spell, so an obfuscated attribute name reads as the name itself."""

    def __init__(self, tree: nodes.Template) -> None:
        self.tree = tree
        self.issues = _Issues()
        # {% set name = value %} and {% with name = value %}, flow-insensitively: every value a
        # name is ever given counts, so reassignment cannot hide one.
        self.bindings: dict[str, list[nodes.Node]] = {}
        for assign in tree.find_all(nodes.Assign):
            for target in _names_of(assign.target):
                self.bindings.setdefault(target, []).append(assign.node)
        for with_node in tree.find_all(nodes.With):
            for t, v in zip(with_node.targets, with_node.values, strict=False):
                for target in _names_of(t):
                    self.bindings.setdefault(target, []).append(v)
        for block in tree.find_all(nodes.AssignBlock):
            # {% set g %}__glo{{ 'bals__' }}{% endset %}: the body's output is the value.
            pieces = [n for out in block.body if isinstance(out, nodes.Output) for n in out.nodes]
            if (
                isinstance(block.target, nodes.Name)
                and len(pieces)
                and all(isinstance(out, nodes.Output) for out in block.body)
            ):
                value = nodes.Concat(pieces, lineno=block.lineno)
                self.bindings.setdefault(block.target.name, []).append(value)
        # {% for a in ['__glo', 'bals__'] %}: a loop variable is each element of a constant list.
        self.elements: dict[str, list[nodes.Node]] = {}
        for loop in tree.find_all(nodes.For):
            if isinstance(loop.target, nodes.Name):
                self.elements.setdefault(loop.target.name, []).append(loop.iter)
        self._folding: set[str] = set()
        # Folded names, once each: a chain of {% set b = a ~ a %} must not fold exponentially.
        self._folded: dict[str, Any] = {}
        # Folded nodes, once each: the walk folds every string-building node it meets, and
        # without this each `+` of a 900-long `a+a+...+a` folded all the `+`s below it again
        # (quadratic: a 9 KB template took 3.4 s). Kept only for folds made outside any name's
        # fold, whose results cannot depend on which name is being folded.
        self._folded_nodes: dict[int, Any] = {}

    def run(self) -> list[str]:
        stack: list[nodes.Node] = [self.tree]
        while stack:
            stack.extend(reversed(self._visit(stack.pop())))
        return self.issues.sentences()

    def _visit(self, node: nodes.Node) -> list[nodes.Node]:
        """Record what a node does; return the children still to walk."""
        line = node.lineno or 0
        children = list(node.iter_child_nodes())
        if isinstance(node, nodes.Getattr):
            self._attribute(line, node.attr, node.node)
            if node.attr in INTERNAL_ATTRIBUTES:
                self.issues.add(line, "internal", self._subject(node.node), node.attr)
            if node.attr in MODULE_ATTRIBUTES:
                self.issues.add(line, "module", self._subject(node.node), node.attr)
        elif isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Slice):
            # Jinja falls back from item to attribute lookup: x['__class__'] is x.__class__.
            key = self._fold(node.arg)
            if key is not None:
                self._attribute(line, key, node.node)
                self._built(line, node.arg, key, _depth(node.node))
                return [node.node]  # the key is accounted for; walk the container
        elif isinstance(node, nodes.Filter):
            self._filter(line, node)
        elif isinstance(node, nodes.Call):
            self._call(line, node)
        elif isinstance(node, nodes.Name):
            if node.name.startswith("__"):
                self.issues.add(line, "variable", "", node.name)
        elif isinstance(node, nodes.Import | nodes.FromImport | nodes.Include | nodes.Extends):
            name = self._describe(node.template)
            tags = {"Import": f"import {name}", "FromImport": f"from {name} import",
                   "Include": f"include {name}", "Extends": f"extends {name}"}  # fmt: skip
            tag = tags[type(node).__name__]
            self.issues.add(line, "load", "", f"{{% {tag} %}}")
        if isinstance(node, nodes.Expr) and _is_string_building(node):
            value = self._fold(node)
            if value is not None:
                self._built(line, node, value)
                return []  # folded whole: its pieces are constants
        return children

    def _attribute(self, line: int, name: str, base: nodes.Node, *, dotted: bool = False) -> None:
        depth = _depth(base)
        for part in _suspicious(name, dotted=dotted):
            self.issues.add(line, "attribute", self._subject(base), part, depth)

    def _built(self, line: int, node: nodes.Node, value: str, order: int = 0) -> None:
        """A name put together from pieces rather than written out: itself a finding when it
        spells something with an underscore."""
        if isinstance(node, nodes.Const | nodes.Name) or not _suspicious(value, dotted=True):
            return  # written out, or a variable holding a name (its {% set %} is judged)
        self.issues.add(line, "built", _how_built(node), value, order)

    def _filter(self, line: int, node: nodes.Filter) -> None:
        if node.name == "attr" and node.args:
            name = self._fold(node.args[0])
            base = node.node if node.node is not None else node
            if name is None:
                self.issues.add(line, "computed", "", f"|attr({self._describe(node.args[0])})")
            else:
                self._attribute(line, name, base)
                self._built(line, node.args[0], name, _depth(base))
        elif node.name in ATTRIBUTE_FILTERS:
            paths: list[nodes.Node] = [kw.value for kw in node.kwargs if kw.key == "attribute"]
            if node.name in ("selectattr", "rejectattr") and node.args:
                paths.append(node.args[0])
            if node.name == "map" and len(node.args) >= 2 and self._fold(node.args[0]) == "attr":
                paths.append(node.args[1])  # map('attr', name) applies the attr filter
            base = node.node if node.node is not None else node
            for path in paths:
                value = self._fold(path)
                if value is not None:
                    self._attribute(line, value, base, dotted=True)
                    self._built(line, path, value, _depth(base))

    def _call(self, line: int, node: nodes.Call) -> None:
        target = node.node
        if isinstance(target, nodes.Getattr):
            if target.attr in EXEC_METHODS:
                self.issues.add(line, "exec", self._subject(target.node), target.attr)
            if target.attr in ("format", "format_map"):
                # str.format resolves {0.attr} and {0[key]} fields itself, past any sandbox.
                fmt = self._fold(target.node)
                for part in _format_field_attributes(fmt) if fmt is not None else []:
                    self.issues.add(line, "attribute", "a format string", part)
        elif isinstance(target, nodes.Name) and target.name in PYTHON_BUILTINS:
            self.issues.add(line, "builtin", "", target.name)
        elif isinstance(target, nodes.Getitem):
            key = self._fold(target.arg)  # __builtins__['eval'](...)
            if key in EXEC_METHODS or key in PYTHON_BUILTINS:
                self.issues.add(line, "exec", self._subject(target.node), str(key))

    # ---- naming what a chain starts from ------------------------------------------------------

    def _subject(self, node: nodes.Node) -> str:
        """What an attribute chain starts from, as the template spells it (cycler, (), x)."""
        for _ in range(MAX_FOLD_DEPTH):
            inner = getattr(node, "node", None)
            if not isinstance(node, nodes.Getattr | nodes.Getitem | nodes.Call | nodes.Filter):
                break
            if not isinstance(inner, nodes.Node):
                break
            node = inner
        if isinstance(node, nodes.Name):
            aliases = [
                v.name for v in self.bindings.get(node.name, []) if isinstance(v, nodes.Name)
            ]
            return f"{node.name} (set to {_listed(aliases)})" if aliases else node.name
        return self._describe(node)

    def _describe(self, node: nodes.Node) -> str:
        if isinstance(node, nodes.Const):
            return repr(node.value)[:40]
        if isinstance(node, nodes.Name):
            return node.name
        if isinstance(node, nodes.Tuple):
            return "()" if not node.items else "a tuple"
        if isinstance(node, nodes.List):
            return "[]" if not node.items else "a list"
        if isinstance(node, nodes.Dict):
            return "{}" if not node.items else "a dict"
        if isinstance(node, nodes.Getattr):
            return f"{self._describe(node.node)}.{node.attr}"[:60]
        return "an expression"

    # ---- folding constant strings -------------------------------------------------------------

    def _fold(self, node: nodes.Node, depth: int = 0) -> str | None:
        """The string an expression always evaluates to, when that follows from constants
        alone; None when it depends on data. Pure: nothing the template names is called."""
        if depth > MAX_FOLD_DEPTH:
            return None
        value = self._fold_any(node, depth)
        if isinstance(value, str) and len(value) <= MAX_FOLDED_CHARS:
            return value
        return None

    def _fold_any(self, node: nodes.Node, depth: int) -> Any:
        key = id(node)  # the tree holds every node while the walk runs: ids are not reused
        if key in self._folded_nodes:
            return self._folded_nodes[key]
        value = self._fold_node(node, depth)
        if not self._folding:
            self._folded_nodes[key] = value
        return value

    def _fold_node(self, node: nodes.Node, depth: int) -> Any:
        d = depth + 1
        if isinstance(node, nodes.Const):
            return node.value if isinstance(node.value, str | int | bool) else None
        if isinstance(node, nodes.TemplateData):
            return node.data
        if isinstance(node, nodes.Name):
            return self._fold_name(node.name, d)
        if isinstance(node, nodes.Neg | nodes.Pos):
            operand = self._fold_any(node.node, d)
            if not isinstance(operand, int) or isinstance(operand, bool):
                return None
            return -operand if isinstance(node, nodes.Neg) else operand
        if isinstance(node, nodes.List | nodes.Tuple):
            items = [self._fold_any(item, d) for item in node.items]
            return items if all(isinstance(i, str | int) for i in items) else None
        if isinstance(node, nodes.Concat):
            parts = [self._fold_any(n, d) for n in node.nodes]
            if all(isinstance(p, str | int) for p in parts):
                return _bounded("".join(str(p) for p in parts))
            return None
        if isinstance(node, nodes.Add):
            left, right = self._fold_any(node.left, d), self._fold_any(node.right, d)
            if isinstance(left, str) and isinstance(right, str):
                return _bounded(left + right)
            return None
        if isinstance(node, nodes.Mul):
            left, right = self._fold_any(node.left, d), self._fold_any(node.right, d)
            if isinstance(left, int) and isinstance(right, str):
                left, right = right, left
            if (
                isinstance(left, str)
                and isinstance(right, int)
                and not isinstance(right, bool)
                and 0 <= len(left) * right <= MAX_FOLDED_CHARS
            ):
                return left * right
            return None
        if isinstance(node, nodes.Mod):
            return _printf(self._fold_any(node.left, d), self._fold_any(node.right, d))
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            return self._fold_slice(node, d)
        if isinstance(node, nodes.Filter) and node.node is not None:
            return self._fold_filter(node, d)
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
            return self._fold_method(node, node.node, d)
        return None

    def _fold_name(self, name: str, depth: int) -> Any:
        if name in self._folded:
            return self._folded[name]
        if name in self._folding:
            return None  # {% set a = a ~ 'x' %}: a cycle, not a constant
        self._folding.add(name)
        try:
            values = [self._fold_any(v, depth) for v in self.bindings.get(name, [])]
            for iterable in self.elements.get(name, []):
                folded = self._fold_any(iterable, depth)
                values.extend(folded if isinstance(folded, list) else [])
        finally:
            self._folding.discard(name)
        known = [v for v in values if v is not None]
        # Any value that spells a hidden name wins: the walk must not depend on branch order.
        result = next(
            (v for v in known if isinstance(v, str) and _suspicious(v, dotted=True)),
            known[0] if known else None,
        )
        self._folded[name] = result
        return result

    def _fold_slice(self, node: nodes.Getitem, depth: int) -> Any:
        value = self._fold_any(node.node, depth)
        bounds: list[int | None] = []
        assert isinstance(node.arg, nodes.Slice)
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            folded = None if part is None else self._fold_any(part, depth)
            if part is not None and not isinstance(folded, int):
                return None
            bounds.append(folded)
        if not isinstance(value, str) or bounds[2] == 0:
            return None
        return value[slice(*bounds)]

    def _fold_filter(self, node: nodes.Filter, depth: int) -> Any:
        assert node.node is not None
        value = self._fold_any(node.node, depth)
        args = [self._fold_any(a, depth) for a in node.args]
        if value is None or any(a is None for a in args) or node.kwargs:
            return None
        if node.name == "format":
            return _printf(value, tuple(args) if args else ())
        if node.name == "join" and isinstance(value, list):
            sep = args[0] if args else ""
            return _bounded(str(sep).join(str(v) for v in value)) if isinstance(sep, str) else None
        if not isinstance(value, str):
            return None
        if node.name == "reverse":
            return value[::-1]
        if node.name in ("lower", "upper", "string", "trim", "capitalize"):
            return {"lower": value.lower, "upper": value.upper, "string": lambda: value,
                    "trim": value.strip, "capitalize": value.capitalize}[node.name]()  # fmt: skip
        if node.name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
            return _bounded(value.replace(args[0], args[1], 16))
        return None

    def _fold_method(self, node: nodes.Call, target: nodes.Getattr, depth: int) -> Any:
        value = self._fold_any(target.node, depth)
        args = [self._fold_any(a, depth) for a in node.args]
        if not isinstance(value, str) or any(a is None for a in args) or node.kwargs:
            return None
        method = target.attr
        if method == "format":
            return _str_format(value, args)
        if method == "join" and len(args) == 1 and isinstance(args[0], list):
            return _bounded(value.join(str(a) for a in args[0]))
        if method == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
            return _bounded(value.replace(args[0], args[1], 16))
        if method in ("lower", "upper", "strip", "lstrip", "rstrip", "title") and not args:
            return {"lower": value.lower, "upper": value.upper, "strip": value.strip,
                    "lstrip": value.lstrip, "rstrip": value.rstrip,
                    "title": value.title}[method]()  # fmt: skip
        return None


def _depth(node: nodes.Node) -> int:
    """How many lookups and calls stand between an expression and what its chain starts from."""
    depth = 0
    while depth < MAX_FOLD_DEPTH and isinstance(
        node, nodes.Getattr | nodes.Getitem | nodes.Call | nodes.Filter
    ):
        inner = getattr(node, "node", None)
        if not isinstance(inner, nodes.Node):
            break
        node, depth = inner, depth + 1
    return depth


def _names_of(target: nodes.Node) -> list[str]:
    if isinstance(target, nodes.Name):
        return [target.name]
    if isinstance(target, nodes.Tuple):
        return [n for item in target.items for n in _names_of(item)]
    return []


_BUILDING_FILTERS = frozenset({"format", "join", "reverse", "replace", "lower", "upper", "string"})


def _is_string_building(node: nodes.Node) -> bool:
    """Expressions that compute a string from others (as opposed to writing it out)."""
    if isinstance(node, nodes.Concat | nodes.Add | nodes.Mul | nodes.Mod):
        return True
    if isinstance(node, nodes.Filter):
        return node.name in _BUILDING_FILTERS
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Slice)
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
        return node.node.attr in ("format", "join", "replace", "lower", "upper")
    return False


def _how_built(node: nodes.Node) -> str:
    if isinstance(node, nodes.Concat):
        return "~"
    if isinstance(node, nodes.Add):
        return "+"
    if isinstance(node, nodes.Mul):
        return "*"
    if isinstance(node, nodes.Mod):
        return "% formatting"
    if isinstance(node, nodes.Filter):
        return f"|{node.name}"
    if isinstance(node, nodes.Getitem):
        return "a slice"
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
        return f".{node.node.attr}()"
    if isinstance(node, nodes.Name):
        return f"the variable {node.name}"
    return "an expression"


def _bounded(value: str) -> str | None:
    return value if len(value) <= MAX_FOLDED_CHARS else None


def _printf(fmt: Any, args: Any) -> str | None:
    """`fmt % args` for simple conversions of folded constants only (no `*` widths, no wide
    fields: a scanner must not be talked into building huge strings)."""
    if not isinstance(fmt, str) or len(fmt) > MAX_FOLDED_CHARS:
        return None
    if _PRINTF.sub("", fmt).count("%"):
        return None
    values = tuple(args) if isinstance(args, list | tuple) else (args,)
    if not all(isinstance(v, str | int) for v in values):
        return None
    try:
        return _bounded(fmt % values)
    except (TypeError, ValueError, OverflowError):
        return None


def _str_format(fmt: str, args: list[Any]) -> str | None:
    """str.format with plain positional fields only; attribute fields are findings, not folded."""
    out: list[str] = []
    auto = 0
    try:
        for literal, field_name, spec, conversion in string.Formatter().parse(fmt):
            out.append(literal)
            if field_name is None:
                continue
            if spec or conversion:
                return None
            if field_name == "":
                index = auto
                auto += 1
            elif field_name.isdigit() and len(field_name) <= 2:
                index = int(field_name)
            else:
                return None
            if index >= len(args):
                return None
            out.append(str(args[index]))
    except ValueError:
        return None
    return _bounded("".join(out))


def _format_field_attributes(fmt: str) -> list[str]:
    """Underscore attributes that a format string's fields ({0.__class__}, {0[_x]}) read."""
    found: list[str] = []
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(fmt) if name]
    except ValueError:
        return found
    for name in fields:
        for part in re.split(r"[.\[\]]", name)[1:]:
            found.extend(_suspicious(part))
    return found
