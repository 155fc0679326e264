"""MkDocs hook (``hooks:`` in mkdocs.yml): the generated parts of the documentation site.

Everything here is made at build time from the code, so it cannot drift from it:

- ``reference/components.md``: every registered component (:mod:`hfactory.registry`), slot by
  slot, with its description (the params model's docstring) and its options (the params model's
  pydantic JSON Schema). Components registered by any module that ``import hfactory`` loads
  join automatically.
- ``reference/spec-fields.md``: the model-, stage-, defaults-, block- and head-level fields of a
  spec (their pydantic schemas), with the stage shortcuts.
- ``reference/cli.md``: ``hfactory --help`` and every command's help, from the argparse parser.
- ``benchmarks.md``: ``benchmarks/RESULTS.md`` with a provenance check per section: a section
  whose figures do not name the CPU model, its vector extensions, the threads, the torch
  version, the date and the reproducing command gets a visible "not re-measured on this machine
  kind" note (:func:`provenance_missing`).
- ``diagrams/<name>.svg``: :func:`hfactory.diagram.draw` of every preset and every encoder spec
  in ``examples/``; a preset family page embeds each of its presets with a
  ``<!-- preset: NAME -->`` marker (replaced by the preset's description, plan and diagram).
  A preset on no family page is listed under "Other presets" on the presets overview; a preset
  on two pages, or an unknown name in a marker, fails the build.

The functions are importable (``tests/test_docs.py`` uses them); nothing here is part of the
``hfactory`` package.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
PRESET_MARKER = re.compile(r"<!--\s*preset:\s*([A-Za-z0-9_.-]+)\s*-->")

# --------------------------------------------------------------------------- text helpers

_RST_ROLE = re.compile(r":(?:py:)?[a-z]+:`~?([^`]+)`")


def rst_to_md(text: str) -> str:
    """Docstring text as markdown: Sphinx roles (``:func:`x```) become code spans, ``::`` literal
    block introducers a plain colon."""
    text = _RST_ROLE.sub(r"`\1`", text)
    text = re.sub(r"::\s*$", ":", text, flags=re.M)
    return text


def _cell(text: Any) -> str:
    """One markdown table cell: no newlines, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _schema_type(prop: dict, defs: dict) -> str:
    """A short type name for one JSON Schema property."""
    if "x-hfactory-slot" in prop:
        return f"{prop['x-hfactory-slot']} component"
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " | ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        target = defs.get(name, {})
        return target.get("title", name) if "x-hfactory-slot" not in target else f"{target['x-hfactory-slot']} component"
    for key in ("anyOf", "oneOf"):
        if key in prop:
            parts = [_schema_type(p, defs) for p in prop[key]]
            return " | ".join(dict.fromkeys(p for p in parts if p))
    typ = prop.get("type")
    if typ == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_schema_type(p, defs) for p in prop["prefixItems"]) + "]"
        items = prop.get("items")
        return f"list of {_schema_type(items, defs)}" if items else "list"
    if typ == "object":
        return "mapping"
    if isinstance(typ, list):
        return " | ".join(typ)
    return typ or "any"


def _bounds(prop: dict) -> str:
    out = []
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in prop:
            out.append(f"{sym} {prop[key]}")
    for sub in prop.get("anyOf", []):
        b = _bounds(sub)
        if b:
            out.append(b)
    return ", ".join(out)


def options_table(model: type, skip: Iterable[str] = ("kind",)) -> str:
    """A markdown table of a pydantic model's fields from its JSON Schema: option, type, default
    (or "required"), bounds and description."""
    try:
        schema = model.model_json_schema()
    except Exception as err:  # a schema pydantic cannot write: fall back to the fields
        return "\n".join(f"- `{k}`: {f.annotation} (schema unavailable: {type(err).__name__})"
                         for k, f in model.model_fields.items() if k not in skip) + "\n"
    props = schema.get("properties", {})
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    rows = [k for k in props if k not in skip]
    if not rows:
        return "No options.\n"
    lines = ["| option | type | default | bounds | description |", "|---|---|---|---|---|"]
    for k in rows:
        p = props[k]
        default = "required" if k in required else (f"`{json.dumps(p['default'])}`" if "default" in p else "")
        lines.append(f"| `{k}` | {_cell(_schema_type(p, defs))} | {_cell(default)} | {_cell(_bounds(p))} | "
                     f"{_cell(p.get('description', ''))} |")
    return "\n".join(lines) + "\n"


def _doc(obj: Any) -> str:
    return rst_to_md(inspect.cleandoc(obj.__doc__ or "").strip())


def _summary(obj: Any) -> str:
    doc = _doc(obj)
    return doc.split("\n\n", 1)[0].replace("\n", " ") if doc else ""


# --------------------------------------------------------------------------- components

def registered_components() -> list[tuple[str, str]]:
    """``(slot, name)`` of every registered component, in slot order, names sorted."""
    import hfactory  # noqa: F401  (registers the built-ins)
    from hfactory import registry

    return [(slot, name) for slot in registry.SLOTS for name in registry.names(slot)]


def components_markdown() -> str:
    """The components reference page (markdown), generated from :mod:`hfactory.registry`."""
    import hfactory  # noqa: F401
    from hfactory import registry

    out = io.StringIO()
    out.write("# Components\n\n")
    out.write("<!-- Generated by docs/hooks.py from hfactory.registry at build time; do not edit. -->\n\n")
    out.write("Every component is a registry entry (`hfactory.registry`) with a pydantic params model and a "
              "builder. Write one as its name (`token_mixer: pooling`) or as a mapping with `kind` and "
              "options (`token_mixer: {kind: pooling, pool_size: 3}`). This page is generated from the "
              "registry when the site is built, so it lists exactly what `hfactory.registry.names(slot)` "
              "returns; components you register yourself ([tutorial](../tutorials/custom-components.md)) "
              "get the same validation and schema entry.\n\n")
    out.write("## All components\n\n<!-- components-table -->\n\n")
    out.write("| slot | kind | params model | what it is |\n|---|---|---|---|\n")
    for slot, name in registered_components():
        params = registry.get(slot, name).params
        out.write(f"| {slot} | [`{name}`](#{slot}-{name.replace('_', '-')}) | `{params.__name__}` | "
                  f"{_cell(_summary(params))} |\n")
    out.write("\n<!-- /components-table -->\n\n")
    for slot in registry.SLOTS:
        out.write(f"## {slot}\n\n")
        for name in registry.names(slot):
            entry = registry.get(slot, name)
            params = entry.params
            builder = entry.builder if isinstance(entry.builder, str) else \
                f"{entry.builder.__module__}:{getattr(entry.builder, '__qualname__', entry.builder)}"
            out.write(f"### `{name}` {{ #{slot}-{name.replace('_', '-')} }}\n\n")
            out.write(f"Slot `{slot}`; params model `{params.__module__}.{params.__name__}`; "
                      f"builder `{builder}`.\n\n")
            doc = _doc(params)
            if doc:
                out.write(doc + "\n\n")
            out.write(options_table(params) + "\n")
    return out.getvalue()


def components_in_markdown(text: str) -> list[tuple[str, str]]:
    """The ``(slot, kind)`` rows of the components table in ``text`` (between the
    ``<!-- components-table -->`` markers, or the first table whose header starts ``| slot | kind``)."""
    m = re.search(r"<!-- components-table -->(.*?)<!-- /components-table -->", text, re.S)
    body = m.group(1) if m else text
    rows = []
    in_table = False
    for line in body.splitlines():
        if line.startswith("| slot | kind"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= set("-: "):
                continue
            kinds = re.findall(r"`([^`]+)`", cells[1])
            rows += [(cells[0], k) for k in kinds]
    return rows


# --------------------------------------------------------------------------- spec fields

def spec_fields_markdown() -> str:
    """The spec-fields reference page, from the pydantic models of :mod:`hfactory.spec.model`."""
    from hfactory.spec.mae import MAESpec
    from hfactory.spec.model import BlockOverride, EncoderSpec, HeadSpec, StageDefaults, StageSpec

    out = io.StringIO()
    out.write("# Spec fields\n\n")
    out.write("<!-- Generated by docs/hooks.py from hfactory.spec.model at build time; do not edit. -->\n\n")
    out.write("The fields a spec can set, level by level, from the pydantic models that validate it "
              "(`hfactory schema` writes the same as JSON Schema for editors). Component-valued fields "
              "take any registered [component](components.md) of their slot. Unknown keys are errors that "
              "name the valid keys.\n\n")
    out.write("## Stage shortcuts\n\n"
              "A stage may give `patch_size`, `stride` and `padding` directly instead of a `downsample`: "
              "they mean a `conv` downsampler, so "
              "`{embedding: 64, patch_size: 7, stride: 4, padding: 2}` is "
              "`{embedding: 64, downsample: {kind: conv, patch_size: 7, stride: 4, padding: 2}}`. "
              "`stride` defaults to `patch_size` and `padding` to 0. Giving both the shortcut and "
              "`downsample` is an error. `repeat_layer` is an alias of `depth` and `attention_mechanism` "
              "of `token_mixer` (the names of xformers' hierarchical configs).\n\n")
    for title, model, note in (
            ("Model level (`EncoderSpec`)", EncoderSpec, "Top-level keys of a spec."),
            ("Stage level (`StageSpec`)", StageSpec, "One entry of `stages`. Unset fields are gap-filled from "
             "`defaults`, then from the library defaults (attention, MLP, LayerNorm, pre-norm, a MetaFormer "
             "conv stem for stage 0 and a 3x3 stride-2 conv after it)."),
            ("Defaults (`StageDefaults`)", StageDefaults, "`defaults:` holds any stage field except the "
             "stage's own width and sequence length; each fills the stages that leave it unset."),
            ("Per-block overrides (`BlockOverride`)", BlockOverride, "One entry of a stage's `blocks` list."),
            ("Classifier head (`HeadSpec`)", HeadSpec, "The `head` key."),
            ("Masked-autoencoder pretraining (`MAESpec`)", MAESpec, "The `mae` key, read by "
             "`hfactory pretrain`.")):
        out.write(f"## {title}\n\n{note}\n\n{options_table(model, skip=())}\n")
    return out.getvalue()


# --------------------------------------------------------------------------- CLI

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps no public accessor for them
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_markdown() -> str:
    """The command-line reference page: every command's ``--help`` from the argparse parser."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for a stable page
    try:
        from hfactory.cli import build_parser

        parser = build_parser()
        out = io.StringIO()
        out.write("# Command line\n\n")
        out.write("<!-- Generated by docs/hooks.py from hfactory.cli.build_parser() at build time; "
                  "do not edit. -->\n\n")
        out.write("Every command that takes a SPEC accepts a YAML path or a preset name, and "
                  "`--set PATH=VALUE` (repeatable) to change a field. Bad input exits with status 2 "
                  "and one located message on stderr; see [the command-line guide](../guide/command-line.md) "
                  "for the exit statuses and what `summary` and `bench` measure.\n\n")
        out.write("## hfactory\n\n```text\n" + parser.format_help().rstrip() + "\n```\n\n")
        for name, sub in _subparsers(parser).items():
            out.write(f"## hfactory {name}\n\n```text\n{sub.format_help().rstrip()}\n```\n\n")
        return out.getvalue()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def cli_commands() -> list[str]:
    """Names of the ``hfactory`` subcommands."""
    from hfactory.cli import build_parser

    return list(_subparsers(build_parser()))


# --------------------------------------------------------------------------- benchmarks

#: What every figure must name, with a pattern that finds it in a section's text.
PROVENANCE = {
    "CPU model": re.compile(r"AMD EPYC|Intel|Xeon|Ryzen|Neoverse|Apple M\d|Graviton", re.I),
    "vector extensions": re.compile(r"\bavx\w*|\bamx\w*|\bneon\b|\bsve\b", re.I),
    "threads": re.compile(r"thread", re.I),
    "torch version": re.compile(r"torch \d"),
    "date": re.compile(r"\d{4}-\d{2}-\d{2}"),
    "reproducing command": re.compile(r"Reproduce|\.venv/bin/|`hfactory \w+|pytest"),
}

_FIGURE = re.compile(r"^\|.*\d.*\|\s*$|\d(?:\.\d+)?\s?(?:ms|s|%|x|MB|GB|MiB|GiB|img/s)\b", re.M)


def provenance_missing(text: str, context: str = "") -> list[str]:
    """What of :data:`PROVENANCE` neither ``text`` (a section) nor ``context`` (its parent
    section's text) names."""
    both = context + "\n" + text
    return [what for what, pat in PROVENANCE.items() if not pat.search(both)]


def split_sections(text: str) -> list[tuple[int, str, str]]:
    """``(level, heading line, body)`` of every ``#``..``###`` section of a markdown document;
    text before the first heading is a level-0 section with an empty heading."""
    out: list[tuple[int, str, str]] = []
    level, heading, body = 0, "", []
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,3}) ", line)
        if m:
            out.append((level, heading, "\n".join(body)))
            level, heading, body = len(m.group(1)), line, []
        else:
            body.append(line)
    out.append((level, heading, "\n".join(body)))
    return out


NOTE_TITLE = "Not re-measured on this machine kind"
#: A section of RESULTS.md holding only machine-independent figures (parameter and MAC counts) says so
#: with this comment and gets no provenance note.
MACHINE_INDEPENDENT = "<!-- provenance: machine-independent -->"


def benchmarks_markdown(results: Optional[str] = None) -> str:
    """``benchmarks/RESULTS.md`` as the benchmarks page, with a warning note on every section
    whose figures lack part of their provenance (:func:`provenance_missing`)."""
    if results is None:
        results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    out = io.StringIO()
    parents: dict[int, str] = {}
    for level, heading, body in split_sections(results):
        if level == 1:
            out.write("# Benchmark results\n\n")
            out.write("<!-- Generated by docs/hooks.py from benchmarks/RESULTS.md at build time; edit that file. -->\n\n")
            out.write("Every figure below should name the machine it was measured on (CPU model and vector "
                      "extensions), the threads, the torch version, the date and the command that reproduces "
                      "it. Sections that do not name all of these are marked "
                      f"**{NOTE_TITLE}**: they were recorded on an earlier machine of this project and are "
                      "kept as history, not as facts about any machine you have. The scripts are in "
                      "`benchmarks/`.\n")
            out.write(body + "\n")
            continue
        if heading:
            out.write(heading + "\n")
        context = "\n".join(parents.get(lv, "") for lv in range(1, level) if lv > 1)
        parents[level] = body
        for lv in list(parents):
            if lv > level:
                del parents[lv]
        exempt = MACHINE_INDEPENDENT in body  # counts (parameters, MACs) that no machine changes
        missing = provenance_missing(body, context) if _FIGURE.search(body) and not exempt else []
        if missing:
            out.write(f'\n!!! warning "{NOTE_TITLE}"\n    These figures do not name: {", ".join(missing)}. '
                      "They have not been re-measured on this machine kind; read them as a record of an "
                      "earlier run, not as facts.\n")
        out.write(body + "\n")
    return out.getvalue()


# --------------------------------------------------------------------------- presets and diagrams

def diagram_specs() -> dict[str, Any]:
    """Name -> encoder spec of every preset and every encoder spec under ``examples/``
    (``example-<stem>`` for the latter)."""
    from hfactory import list_models, load_preset, load_spec
    from hfactory.errors import SpecKindError
    from hfactory.spec.model import EncoderSpec

    out: dict[str, Any] = {name: load_preset(name) for name in list_models()}
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        try:
            spec = load_spec(path)
        except SpecKindError:  # an SFT spec (levels, not stages): not drawn
            continue
        if isinstance(spec, EncoderSpec):
            out[f"example-{path.stem}"] = spec
    return out


def diagram_svg(spec: Any) -> str:
    """The SVG text of :func:`hfactory.diagram.draw` for ``spec``."""
    import matplotlib
    from hfactory.diagram import draw, use_matplotlib

    use_matplotlib()
    fig = draw(spec)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "hfactory"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def preset_header(name: str) -> str:
    """The comment lines at the top of preset ``name``'s YAML (its source and notes), as text."""
    from hfactory.presets import preset_path

    lines = []
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if "yaml-language-server" in line:
            continue
        lines.append(line[1:].strip())
    return " ".join(lines)


def preset_block(name: str) -> str:
    """The markdown a ``<!-- preset: NAME -->`` marker is replaced with: the preset's notes, its
    plan and its diagram."""
    from hfactory import load_preset, resolve

    plan = resolve(load_preset(name))
    return (f"### `{name}`\n\n{_cell(preset_header(name))}\n\n"
            f"```python\nmodel = hfactory.create_model(\"{name}\")\n```\n\n"
            f"```text\n{str(plan).rstrip()}\n```\n\n"
            f"![Architecture diagram of {name}](../diagrams/{name}.svg)\n")


def presets_on_pages(docs_dir: Path) -> dict[str, list[str]]:
    """Preset name -> the pages (relative paths) whose ``<!-- preset: NAME -->`` markers embed it."""
    found: dict[str, list[str]] = {}
    for page in sorted((docs_dir / "presets").glob("*.md")):
        for name in PRESET_MARKER.findall(page.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(f"presets/{page.name}")
    return found


def unassigned_presets(docs_dir: Path) -> list[str]:
    """Presets on no family page: the presets overview lists them under "Other presets" (its
    ``<!-- presets: unassigned -->`` marker), so a new preset appears before its page is written."""
    from hfactory import list_models

    found = presets_on_pages(docs_dir)
    return [n for n in list_models() if n not in found]


def check_preset_pages(docs_dir: Path) -> None:
    """No unknown preset names on the family pages, and no preset on two of them.

    Raises:
        ValueError: naming each problem.
    """
    from hfactory import list_models

    found = presets_on_pages(docs_dir)
    known = set(list_models())
    problems = [f"{', '.join(p)}: unknown preset {n!r}" for n, p in sorted(found.items()) if n not in known]
    problems += [f"preset {n!r} is on several pages: {', '.join(p)}" for n, p in sorted(found.items())
                 if len(p) > 1]
    if problems:
        raise ValueError("; ".join(problems))


UNASSIGNED_MARKER = "<!-- presets: unassigned -->"


def unassigned_markdown(docs_dir: Path) -> str:
    """The "Other presets" section: every preset that no family page embeds (empty when none)."""
    names = unassigned_presets(docs_dir)
    if not names:
        return ""
    return ("## Other presets\n\nPresets that no family page describes yet, each with its plan and "
            "diagram:\n\n" + "\n".join(preset_block(n) for n in names))


# --------------------------------------------------------------------------- mkdocs events

GENERATED_PAGES = {
    "reference/components.md": components_markdown,
    "reference/spec-fields.md": spec_fields_markdown,
    "reference/cli.md": cli_markdown,
    "benchmarks.md": benchmarks_markdown,
}


def on_files(files, config):
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    try:
        check_preset_pages(Path(config["docs_dir"]))
    except ValueError as err:
        raise PluginError(str(err)) from None
    for uri, make in GENERATED_PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    for name, spec in diagram_specs().items():
        files.append(File.generated(config, f"diagrams/{name}.svg", content=diagram_svg(spec)))
    return files


def on_page_markdown(markdown, page, config, files):
    if UNASSIGNED_MARKER in markdown:
        markdown = markdown.replace(UNASSIGNED_MARKER, unassigned_markdown(Path(config["docs_dir"])))
    if PRESET_MARKER.search(markdown):
        markdown = PRESET_MARKER.sub(lambda m: preset_block(m.group(1)), markdown)
    return markdown
