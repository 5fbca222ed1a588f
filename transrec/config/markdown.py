"""The configuration reference (``docs/configuration.md``), generated from the config dataclasses.

Every key of a run config with its type, default and help: the help is the field's comment in
``transrec/config/*.py`` (the comment lines right above the field and the one at the end of its
line), and each section starts with its dataclass's docstring. The presets table lists, for each
preset, every key it sets away from the defaults. Importing this module loads no torch.

    python -m transrec.config.markdown docs/configuration.md   # rewrite the file
    python -m transrec.config.markdown -                       # print it

``tests/test_docs.py`` fails when ``docs/configuration.md`` differs from :func:`render`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from transrec.config import schema
from transrec.config.presets import PRESETS
from transrec.config.schema import Config

COMMAND = "python -m transrec.config.markdown docs/configuration.md"


def _rst_to_md(text: str) -> str:
    """The reStructuredText bits the config docstrings use, as Markdown."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: "`" + m.group(1).rsplit(".", 1)[-1] + "`", text)
    return text.replace("``", "`")


def _docstring_md(doc: str | None, fields: dict[str, str] | None = None) -> str:
    """A docstring as Markdown: ``::`` blocks fenced, roles and double backquotes as code spans.
    A paragraph ``name: ...`` about a field of ``fields`` goes into ``fields[name]`` instead."""
    if not doc:
        return ""
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush():
        if not para:
            return
        m = re.match(r"^(\w+): ", para[0])
        if fields is not None and m and m.group(1) in fields and not fields[m.group(1)]:
            fields[m.group(1)] = " ".join(" ".join(para)[m.end():].split())
        else:
            out.extend([_rst_to_md("\n".join(para)), ""])
        para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            para.append(line.rstrip()[:-1])
            flush()
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            out += ["```", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            continue
        if not line.strip():
            flush()
        elif re.match(r"^\w+: ", line) and fields is not None and para:
            flush()  # "name: ..." at the margin starts a field note of its own
            para.append(line)
        else:
            para.append(line)
        i += 1
    flush()
    return "\n".join(out).strip()


def field_help(cls: type) -> dict[str, str]:
    """Each field's comment: the comment lines right above it, then the one ending its line."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    comments: dict[int, tuple[str, bool]] = {}  # line number -> (text, whole line)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            whole = lines[tok.start[0] - 1].strip().startswith("#")
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), whole)
    out = {}
    cls_node = ast.parse(src).body[0]
    for node in cls_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        ln = node.lineno - 1
        while ln in comments and comments[ln][1]:
            above.insert(0, comments[ln][0])
            ln -= 1
        trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not comments[n][1]]
        out[node.target.id] = " ".join(above + trailing)
    return out


def _dataclass_in(tp) -> type | None:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def type_name(tp) -> str:
    """A field type as a reader writes it: ``int``, ``list[int]``, ``"a" / "b"``, ``str or int``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " / ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _value(v: Any) -> str:
    return json.dumps(v)


def _cell(text: str) -> str:
    return _rst_to_md(text).replace("|", "\\|")


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of ``cls`` and of every section inside it, depth first."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            out += _sections(sub, f"{prefix}.{f.name}" if prefix else f.name)
    return out


def _table(prefix: str, cls: type, helps: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = _dataclass_in(tp)
        key = f"{prefix}.{f.name}" if prefix else f.name
        text = helps.get(f.name, "")
        if sub is not None:
            optional = _default(f) is None
            see = f"the `{key}.*` keys below"
            text = (text + "; " if text else "") + (
                f"off unless set: `{key}=true` switches it on with its defaults, or set any of {see}"
                if optional else f"section: {see}")
        default = "—" if sub is not None and _default(f) is not None else f"`{_value(_default(f))}`"
        rows.append(f"| `{key}` | {_cell(type_name(tp))} | {default} | {_cell(text)} |")
    return rows


def _flat(obj, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _preset_rows() -> list[str]:
    base = _flat(Config())
    rows = ["| preset | what it is | keys set away from the defaults |", "|---|---|---|"]
    for name, fn in PRESETS.items():
        doc = re.sub(r"-\n\s*", "-", inspect.getdoc(fn) or "")
        doc = " ".join(doc.split())
        cfg = _flat(fn())
        changed = [f"`{k}={_value(v)}`" for k, v in cfg.items()
                   if k != "preset" and base.get(k, object()) != v]
        rows.append(f"| `{name}` | {_cell(doc)} | {', '.join(changed) or '(none)'} |")
    return rows


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the dataclasses in transrec/config/ by `{COMMAND}`; do not edit by hand "
        "(tests/test_docs.py fails when this file is stale). -->",
        "",
        "Every key of a run config, with its type, default and meaning. A run's resolved config is "
        "written to `RUN/config.yaml`; `transrec train --help` lists the presets. A YAML file "
        "(`--config FILE`) holds the same keys nested by section, and `key=value` overrides use "
        "the dotted names below, for example:",
        "",
        "```bash",
        "transrec train --data data/source --out runs/a --preset tiny optim.lr=3e-4 model.user.layers=4 "
        "eval.ks=[5,10]",
        "```",
        "",
        _docstring_md(schema.__doc__.split("\n\n", 1)[1]),  # past its first line, about the module
        "",
        "## Presets",
        "",
        "A preset is a whole config; the YAML file and the overrides apply on top of it.",
        "",
        *_preset_rows(),
    ]
    for prefix, cls in _sections(Config, ""):
        title = f"`{prefix}`" if prefix else "Top level"
        out += ["", f"## {title}", ""]
        helps = field_help(cls)
        own_doc = cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")  # not dataclass's
        doc = _docstring_md(cls.__doc__, helps) if own_doc else ""
        if doc:
            out += [doc, ""]
        out += _table(prefix, cls, helps)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    asked = args[:1] in (["-h"], ["--help"])
    if len(args) != 1 or asked:
        print("usage: python -m transrec.config.markdown OUT.md   (OUT.md '-': standard output)\n"
              f"regenerate the docs: {COMMAND}", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    text = render()
    if args[0] == "-":
        sys.stdout.write(text)
    else:
        Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(args[0]).write_text(text)
        print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
