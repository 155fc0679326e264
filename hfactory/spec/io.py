"""Reading and writing specs as YAML: safe loading only, duplicate keys and aliases refused.

``yaml.SafeLoader`` constructs no Python objects (``!!python/object`` tags are errors). On top
of it we refuse duplicate mapping keys (YAML silently keeps the last one) and aliases/anchors
(no spec needs them, and alias expansion is the "billion laughs" memory bomb).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import SpecKindError, UsageError
from .model import EncoderSpec
from .sft import SFTSpec

__all__ = ["load_yaml", "load_spec", "load_any_spec", "read_spec_document", "dump_spec", "SpecSource", "SpecKindError",
           "MAX_SPEC_BYTES"]

#: Larger documents are refused before parsing; a spec is a few kilobytes (the largest preset is
#: under 3 kB). PyYAML's pure-Python parser needs several seconds per megabyte, so the bound keeps
#: the worst document's rejection well under a second.
MAX_SPEC_BYTES = 100_000
#: Deeper nesting of collections is refused while parsing; a spec nests about 6 levels. (PyYAML's
#: scanner spends O(depth) per token inside ``[[[...``, so depth is refused before it costs.)
MAX_NESTING = 64

SpecSource = Union[str, os.PathLike, dict, EncoderSpec]


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, aliases, unhashable keys and nesting deeper than
    :data:`MAX_NESTING`."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class):
        if self.flow_level >= MAX_NESTING:
            raise yaml.scanner.ScannerError(None, None, f"nesting too deep (more than {MAX_NESTING} levels; a "
                                            "spec needs about 6)", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in specs; write the value out",
                event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nesting too deep (more than {MAX_NESTING} levels; "
                                                  "a spec needs about 6)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to parse ints of more than 4300 digits
            raise yaml.constructor.ConstructorError(None, None, f"integer of {len(node.value)} characters is too "
                                                    "long for any spec field", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} cannot be a mapping key; spec keys are names",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; each key may appear once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely.

    Raises:
        ValueError: size over :data:`MAX_SPEC_BYTES`, syntax errors, Python tags, duplicate keys,
            aliases; the message gives the line and column.
    """
    if len(text) > MAX_SPEC_BYTES:  # characters; a UTF-8 file is checked in bytes before it is read
        raise UsageError(f"spec is {len(text)} characters; specs larger than {MAX_SPEC_BYTES} are refused")
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - _SpecLoader is a SafeLoader
    except yaml.YAMLError as err:
        raise UsageError(f"invalid spec YAML: {err}") from None
    except RecursionError:
        raise UsageError("invalid spec YAML: nesting too deep") from None


def load_spec(source: SpecSource) -> EncoderSpec:
    """Load and validate a spec from a path, YAML text, a dict or an :class:`EncoderSpec`.

    A ``str`` is a path when it is one line ending in ``.yaml``, ``.yml`` or ``.json`` or naming
    an existing file, otherwise YAML text (a preset name is resolved by :func:`hfactory.create_model`, not here).

    Raises:
        pydantic.ValidationError: a field is wrong; each error has its location in the spec.
        ValueError: unreadable or unsafe YAML (see :func:`load_yaml`), or a document that is
            not a mapping.
        FileNotFoundError: a path-like that does not exist.
        SpecKindError: an SFT spec (``levels`` and no ``stages``), which
            :func:`hfactory.sft.load_sft_spec` reads.
    """
    if isinstance(source, EncoderSpec):
        return source
    document = read_spec_document(source)
    cls = spec_class_of(document)
    if cls is not EncoderSpec:
        where = f"{source}: " if isinstance(source, (str, os.PathLike)) and "\n" not in str(source) else ""
        key = next(k for k, c in SPEC_CLASSES.items() if c is cls)
        raise SpecKindError(f"{where}this is {cls.kind_title} (it has {key!r}, not 'stages'); load_spec, "
                            "build_encoder and from_pretrained take encoder specs. Build it with "
                            "hfactory.build(spec) (or hfactory.sft.build_sft), reload a saved one with "
                            "hfactory.load(directory); hfactory train, eval and summary take either (docs: guide/sft.md).")
    return EncoderSpec.model_validate(document)


#: The spec classes, by the top-level key only a document of that class has. A document with
#: exactly one of these keys is of that class; any other is validated as an encoder spec, whose
#: errors then name what is missing or unknown.
SPEC_CLASSES = {"stages": EncoderSpec, "levels": SFTSpec}


def spec_class_of(document: dict) -> type:
    """The spec class of a spec document (a mapping), by :data:`SPEC_CLASSES`."""
    found = [cls for key, cls in SPEC_CLASSES.items() if key in document]
    return found[0] if len(found) == 1 else EncoderSpec


def load_any_spec(source):
    """An :class:`EncoderSpec`, or an :class:`~hfactory.spec.sft.SFTSpec` for a document with
    ``levels`` and no ``stages`` (what ``hfactory train``, ``eval`` and ``summary`` accept).

    Raises:
        as :func:`load_spec` for encoder specs; pydantic.ValidationError for a bad SFT spec.
    """
    if isinstance(source, tuple(SPEC_CLASSES.values())):
        return source
    document = read_spec_document(source)
    return spec_class_of(document).model_validate(document)


def read_spec_document(source, required: str = "'stages'") -> dict:
    """The mapping a spec is validated from: a ``dict`` as it is; a path (``os.PathLike``, or a
    one-line ``str`` ending in ``.yaml``/``.yml``/``.json`` or naming an existing file) read as
    UTF-8 after a size check; any other ``str`` parsed as YAML text (:func:`load_yaml`). Shared by
    every spec kind (encoder specs, SFT specs: ``required`` names their required keys in the
    error), so all get the same safety checks.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file over :data:`MAX_SPEC_BYTES` or not UTF-8, unsafe or malformed YAML, or a
            document that is not a mapping.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and (
            source.endswith((".yaml", ".yml", ".json")) or os.path.isfile(source))):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"spec file not found: {path}")
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise UsageError(f"{path}: larger than {MAX_SPEC_BYTES} bytes; not a spec")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"{path}: not UTF-8 text ({err}); a spec is a YAML or JSON text file") from None
    if isinstance(source, str):
        source = load_yaml(source)
    if not isinstance(source, dict):
        raise UsageError(f"a spec must be a mapping with at least {required}, got {type(source).__name__}")
    return source


def dump_spec(spec: EncoderSpec, schema_url: str | None = None) -> str:
    """The spec as YAML text; ``load_spec(dump_spec(s)) == s``.

    Unset stage fields are left out (they are gap-filled by the plan), so the text is what the
    user wrote plus the model-level defaults.
    """
    data = spec.model_dump(mode="json", exclude_none=True)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    if schema_url:
        text = f"# yaml-language-server: $schema={schema_url}\n" + text
    return text
