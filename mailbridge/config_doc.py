"""docs/configuration.md, generated from the configuration model (config.py).

`python -m mailbridge.config_doc` prints the reference; `--write` writes it to
docs/configuration.md, `--check` exits 1 when that file differs (the test
tests/test_configuration_doc.py does the same). Every key, its type with its
bounds, its default and its meaning come from the pydantic models: the
meanings are the fields' `description`, a section's introduction its model's
docstring. Nothing here is read at run time; this module imports nothing but
the model.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mailbridge.config import Config

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "python -m mailbridge.config_doc --write"

HEADER = f"""\
# Configuration reference

<!-- Generated from mailbridge/config.py by
     `{REGENERATE}`: do not edit by hand;
     tests/test_configuration_doc.py fails when this file and the model differ. -->

mailbridge reads one YAML file (`mailbridge serve -c config.yaml`; the
repository's `config.yaml` is a working, commented example). At start, and
with `mailbridge check-config -c config.yaml`, the whole file is checked and
every problem is named by its key (`accounts[0].keyid: Field required`); an
invalid file stops the daemon before it listens.

- `${{VAR}}` or `${{VAR:-default}}` anywhere in a value reads the environment
  (secrets: put them in `/etc/mailbridge/env` for the systemd unit).
- Relative paths are relative to the directory of the config file.
- Unknown keys are errors (a misspelt key is never silently ignored).
- Quote numbers meant as text (`"0601020304"`): YAML reads `0601020304` as a
  number.
- Durations are in seconds (`_s`) unless the key says otherwise
  (`retention_days`).
- `none` as a default means the key is absent (or `null`); what that means is
  in the description.

`check-config` also checks what no single key shows: references to providers
that are not defined, duplicate keyids or AUTH names, AUTH without TLS,
plain-mode settings that need `smtp.number_domains`, and settings that cancel
each other (e.g. `circuit_failures` above `retry_attempts` on a route's last
provider while `dispatch.outage_hold_s` is set).
"""


@dataclass
class Row:
    key: str
    type: str
    default: str
    meaning: str


@dataclass
class Section:
    """One heading and its table: a model at a path (`smtp`, `accounts[].plain`)."""

    path: str
    intro: str
    rows: list[Row] = field(default_factory=list)
    level: int = 2
    title: str = ""  # the heading; default: the path, as code

    @property
    def heading(self) -> str:
        return self.title or f"`{self.path}`"


# -- types ---------------------------------------------------------------------------


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _non_none(tp: Any) -> list[Any]:
    tp = _strip_annotated(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return [_strip_annotated(a) for a in get_args(tp) if a is not type(None)]
    return [tp]


def _models(tp: Any) -> list[type[BaseModel]]:
    """The models a field holds directly (`X`, `X | None`, a discriminated union)."""
    return [a for a in _non_none(tp) if inspect.isclass(a) and issubclass(a, BaseModel)]


def _is_network(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, ipaddress.IPv4Network | ipaddress.IPv6Network)


def type_name(tp: Any) -> str:
    """A type in words: `integer`, `list of strings`, `one of a, b`."""
    options = _non_none(tp)
    if len(options) > 1:
        if all(_is_network(o) for o in options):
            return "CIDR network"
        if all(inspect.isclass(o) and issubclass(o, BaseModel) for o in options):
            return "mapping"
        return " or ".join(type_name(o) for o in options)
    (tp,) = options
    origin = get_origin(tp)
    if origin is Literal:
        values = [f"`{v}`" for v in get_args(tp)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin is list:
        (item,) = get_args(tp)
        inner = type_name(item)
        if inner.startswith("one of"):
            return f"list, each {inner}"
        return f"list of {inner}s" if not inner.endswith("s") else f"list of {inner}"
    if origin is dict:
        _, value = get_args(tp)
        return f"mapping of names to {type_name(value)}s"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return "mapping"
    if _is_network(tp):
        return "CIDR network"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if tp in names:
        return names[tp]
    raise TypeError(f"config_doc: no words for the type {tp!r}")


def _bounds(info: FieldInfo) -> str:
    """`≥ 1`, `> 0`, `1–64`, `at least 16 characters` from the field's constraints."""
    low = high = None
    length = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            low = f"{_number(m.ge)}"
        elif isinstance(m, annotated_types.Gt):
            low = f"> {_number(m.gt)}"
        elif isinstance(m, annotated_types.Le):
            high = _number(m.le)
        elif isinstance(m, annotated_types.MinLen):
            length = m.min_length
    if low is not None and high is not None and not low.startswith(">"):
        return f"{low}–{high}"
    parts = []
    if low is not None:
        parts.append(low if low.startswith(">") else f"≥ {low}")
    if high is not None:
        parts.append(f"≤ {high}")
    if length is not None:
        parts.append(f"at least {length}" if length > 1 else "not empty")
    return ", ".join(parts)


def field_type(info: FieldInfo) -> str:
    words = type_name(info.annotation)
    bounds = _bounds(info)
    if not bounds:
        return words
    if words.startswith(("string", "list", "mapping")):  # a length
        unit = " characters" if words.startswith("string") and "at least" in bounds else ""
        return f"{words}, {bounds}{unit}"
    return f"{words} {bounds}"


# -- defaults ------------------------------------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _duration(seconds: float) -> str:
    for size, unit in ((86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}" if unit != "days" else f"{n} day" + ("s" if n > 1 else "")
    return ""


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w@.:/+\-]+", value) else f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return str(value)


def field_default(key: str, info: FieldInfo) -> str:
    """The default as written in YAML, `required`, or `none`."""
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "`{}`"
    if value is None:
        return "none"
    text = f"`{_scalar(value)}`"
    if (
        key.endswith(("_s", "_delay", "_age"))
        and isinstance(value, int | float)
        and (human := _duration(value))
    ):
        text += f" ({human})"
    if key.endswith("_bytes") and isinstance(value, int) and value % 2**20 == 0:
        text += f" ({value // 2**20} MiB)"
    return text


# -- walking the models --------------------------------------------------------------


def _doc(model: type[BaseModel]) -> str:
    """A model's own docstring (not an inherited one), as one paragraph."""
    text = model.__dict__.get("__doc__") or ""
    return " ".join(text.split())


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lower())
    return "#" + text.replace(" ", "-")


def model_sections(
    model: type[BaseModel], path: str, level: int = 2, skip: frozenset[str] = frozenset()
) -> list[Section]:
    """The section of `model` at `path`, then one per nested model, depth first."""
    section = Section(path, _doc(model), level=level)
    nested: list[Section] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = info.alias or name
        full = f"{path}.{key}" if path else key
        meaning = describe(info, model, name)
        inner = _models_of(info)
        if len(inner) == 1:
            below = model_sections(inner[0], f"{full}[]" if _is_list(info) else full, level + 1)
            meaning += f" See [{below[0].heading}]({_anchor(below[0].heading)})."
            nested += below
        section.rows.append(Row(f"`{full}`", field_type(info), field_default(name, info), meaning))
    return [section, *nested]


def describe(info: FieldInfo, model: type[BaseModel], name: str) -> str:
    if info.description:
        return " ".join(info.description.split())
    if name == "type" and get_origin(info.annotation) is Literal:
        (tag,) = get_args(info.annotation)
        return f"`{tag}`: this provider type."
    raise ValueError(f"config_doc: {model.__name__}.{name} has no description")


def missing_descriptions(model: type[BaseModel] = Config) -> list[str]:
    """Fields without a description (the discriminator `type` needs none)."""
    missing: list[str] = []
    seen: set[type[BaseModel]] = set()

    def walk(m: type[BaseModel]) -> None:
        if m in seen:
            return
        seen.add(m)
        for name, info in m.model_fields.items():
            if not info.description and name != "type":
                missing.append(f"{m.__name__}.{name}")
            for sub in _models_of(info):
                walk(sub)
        if m is Config:
            for kind in _provider_types():
                walk(kind)

    walk(model)
    return missing


def _provider_types() -> list[type[BaseModel]]:
    _, value = get_args(_strip_annotated(Config.model_fields["providers"].annotation))
    return _models(value)


def provider_sections() -> list[Section]:
    """`providers`: the keys every type has once, then each type's own keys."""
    kinds = _provider_types()
    common = [n for n in kinds[0].model_fields if n != "type"]
    common = [n for n in common if all(n in k.model_fields for k in kinds)]
    out = [
        Section(
            "providers",
            "Each entry is `<name>: {type: …, …}`, the name of your choice; accounts and"
            " routes refer to it by that name. Retries, failover and the circuit breaker"
            " are the dispatcher's; docs/providers.md has what each type sends and how its"
            " answers map to codes.",
        ),
        Section("providers.<name>", "Settings every provider type has.", level=3),
    ]
    for name in common:
        info = kinds[0].model_fields[name]
        out[1].rows.append(
            Row(
                f"`providers.<name>.{name}`",
                field_type(info),
                field_default(name, info),
                describe(info, kinds[0], name),
            )
        )
    for kind in kinds:
        (tag,) = get_args(kind.model_fields["type"].annotation)
        found = model_sections(kind, "providers.<name>", level=3, skip=frozenset(common))
        found[0].title = f"`providers.<name>` with `type: {tag}`"
        out += found
    return out


def _is_list(info: FieldInfo) -> bool:
    """Whether the field is a list (`list[X]`, `list[X] | None`)."""
    return any(get_origin(t) is list for t in _non_none(info.annotation))


def _models_of(info: FieldInfo) -> list[type[BaseModel]]:
    """The models a field holds, directly or as the items of a list (not of a mapping)."""
    found: list[type[BaseModel]] = []
    for tp in _non_none(info.annotation):
        if get_origin(tp) is list:
            found += _models(get_args(tp)[0])
        else:
            found += _models(tp)
    return found


def sections() -> list[Section]:
    """The reference: the top-level keys, then a section per block, in model order."""
    top = Section("", _doc(Config), title="Top-level keys")
    out: list[Section] = [top]
    for name, info in Config.model_fields.items():
        meaning = describe(info, Config, name)
        below: list[Section] = []
        if name == "providers":
            below = provider_sections()
        elif inner := _models_of(info):
            below = model_sections(inner[0], f"{name}[]" if _is_list(info) else name)
        if below:
            meaning += f" See [{below[0].heading}]({_anchor(below[0].heading)})."
            out += below
        top.rows.append(Row(f"`{name}`", field_type(info), field_default(name, info), meaning))
    return out


# -- rendering -----------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [HEADER]
    for s in sections():
        lines.append(f"{'#' * s.level} {s.heading}\n")
        if s.intro:
            lines.append(_wrap(s.intro) + "\n")
        if s.rows:
            lines.append("| key | type | default | meaning |")
            lines.append("|---|---|---|---|")
            for r in s.rows:
                cells = (r.key, r.type, r.default, r.meaning)
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _wrap(text: str, width: int = 78) -> str:
    out: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return "\n".join(out)


def field_at(path: str) -> FieldInfo | None:
    """The field a documented key names: `smtp.tls.cert`, `accounts[].plain.enabled`,
    `providers.<name>.timeout_s` (any provider name; the first type that has it)."""
    parts = path.replace("[]", "").split(".")
    models: list[type[BaseModel]] = [Config]
    found: FieldInfo | None = None
    i = 0
    while i < len(parts):
        part = parts[i]
        found = None
        for m in models:
            for name, info in m.model_fields.items():
                if part in (name, info.alias):
                    found = info
                    break
            if found is not None:
                break
        if found is None:
            return None
        if found is Config.model_fields["providers"]:
            i += 1  # the provider's name
            models = _provider_types()
        else:
            models = _models_of(found)
        i += 1
    return found


def model_keys() -> Iterator[str]:
    """Every key the reference documents, as written in its first column."""
    for s in sections():
        for r in s.rows:
            yield r.key.strip("`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailbridge.config_doc", description=__doc__.splitlines()[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {DOC_PATH.name}")
    group.add_argument("--check", action="store_true", help="exit 1 if the file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
        return 0
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} differs from the model: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
