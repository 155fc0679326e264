"""Shared pydantic machinery for specs: strict models whose errors say what would be valid.

No torch here: specs must validate instantly anywhere (spec -> plan -> registry -> modules;
a test checks that validating and planning never import torch).
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..errors import PlanError  # noqa: F401  (re-exported: spec modules raise it)

__all__ = ["StrictModel", "did_you_mean", "located_error", "PlanError", "MAX_SIZE", "MAX_BLOCKS", "refuse_huge_ints"]

#: The largest size the plan accepts: any integer a spec sets (channels, pixels per image side,
#: kernel, window, class count ...; token counts such as ``seq_len`` excepted) and any hidden width
#: a component derives. ViT-22B, the widest published ViT, is 6144 wide with 24576 MLP units.
#: Larger numbers are refused with a :class:`PlanError` before any tensor is allocated.
MAX_SIZE = 65536

#: The most blocks (all stages together) a plan accepts; the deepest published ViTs have ~50.
MAX_BLOCKS = 1024


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_MAX_SUGGESTIONS = 20


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys are errors that list the valid keys.

    The removed xformers factory silently dropped unknown keys (a typo such as ``casual``
    was ignored); here the error names the key, the closest valid key and all valid keys.
    """

    # allow_inf_nan=False: inf/nan are no sizes, rates or eps (and JSON, which the plan's cache and
    # the spec hash use, cannot carry them); they are refused here, at their location.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads true as 1 and false as 0 for int and float fields, so a
        # `depth: true` would build one block; a boolean is only taken where a field allows one.
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if not _allows_bool(cls.model_fields[info.field_name].annotation):
                raise PydanticCustomError("bool_for_number", "expected a number, got the boolean {value}",
                                          {"value": str(value).lower()})
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _explain_unknown_keys(cls, data: Any, handler):
        try:
            return handler(data)
        except ValidationError as err:
            errors = err.errors()
            if not any(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in errors):
                raise
            valid = sorted(_accepted_keys(cls))
            rewritten, suggested = [], 0
            for e in errors:
                if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
                    key = str(e["loc"][0])
                    # difflib costs ~0.1 ms a key: suggest for the first few only (a hostile document
                    # with 10^5 unknown keys must still be refused in well under a second)
                    suggested += 1
                    hint = did_you_mean(key, valid) if suggested <= _MAX_SUGGESTIONS else ""
                    msg = (
                        f"unknown key {key!r}{hint}; "
                        f"valid keys of {cls.__name__}: {', '.join(valid)}"
                    )
                    e = {"type": PydanticCustomError("extra_forbidden", msg), "loc": e["loc"],
                         "input": e["input"]}
                else:
                    e = _as_line_error(e)
                rewritten.append(e)
            raise ValidationError.from_exception_data(err.title, rewritten) from None


def _allows_bool(annotation: Any) -> bool:
    """Whether a field annotated so can hold a bare boolean (``bool``, ``Any``, a Literal of
    one, unions and ``Annotated`` of those; not ``int``, ``float`` or containers)."""
    if annotation is bool or annotation is Any:
        return True
    if annotation is type(None):
        return False
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _allows_bool(typing.get_args(annotation)[0])
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_allows_bool(a) for a in typing.get_args(annotation))
    # a number, a string, a container, a nested model (which checks its own fields)
    return not (annotation in (int, float) or (isinstance(annotation, type) and issubclass(annotation, (
        int, float, str, list, tuple, dict, BaseModel))) or origin in (list, tuple, dict))


def _accepted_keys(cls: type[BaseModel]) -> set[str]:
    keys = set(cls.model_fields)
    for f in cls.model_fields.values():
        alias = f.validation_alias
        if isinstance(alias, str):
            keys.add(alias)
        elif alias is not None:
            keys.update(c for c in getattr(alias, "choices", ()) if isinstance(c, str))
    return keys


def _as_line_error(e: dict) -> dict:
    """Turn an ``errors()`` entry back into an ``InitErrorDetails`` that keeps its message."""
    out = {"type": PydanticCustomError(e["type"], e["msg"].replace("{", "{{").replace("}", "}}")),
           "loc": e["loc"], "input": e.get("input")}
    return out


def located_error(title: str, loc: tuple, message: str, input_value: Any = None,
                  error_type: str = "value_error") -> ValidationError:
    """Build a pydantic ``ValidationError`` with one error at ``loc`` (e.g. ``("stages", 2, "embedding")``)."""
    return ValidationError.from_exception_data(
        title,
        [{"type": PydanticCustomError(error_type, message.replace("{", "{{").replace("}", "}}")),
          "loc": tuple(loc), "input": input_value}],
    )


def refuse_huge_ints(data, loc: str = "") -> None:
    """Raise :class:`PlanError` at the first integer in ``data`` (a spec dumped to JSON-like
    dicts and lists) above :data:`MAX_SIZE` (``seq_len``, a token count, above its square), so
    that nothing loops over or allocates a size no model needs."""
    if isinstance(data, dict):
        for key, value in data.items():
            refuse_huge_ints(value, f"{loc}.{key}" if loc else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            refuse_huge_ints(value, f"{loc}.{i}" if isinstance(value, (dict, list, tuple)) else loc)
    elif isinstance(data, int) and not isinstance(data, bool):
        limit = MAX_SIZE ** 2 if loc.endswith(".seq_len") else MAX_SIZE
        if abs(data) > limit:
            shown = str(data) if data.bit_length() < 64 else f"a {int(data.bit_length() * 0.30103) + 1}-digit number"
            raise PlanError(loc, f"{shown} is larger than {limit}, the largest the plan accepts here (a sanity "
                            "bound far above any published model)")
