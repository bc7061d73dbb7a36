"""docs/configuration.md cannot drift from the configuration model: it is
generated from it (mailbridge/config_doc.py), and every other doc that names a
key or states a default is checked against the model too."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined

from mailbridge import config_doc
from mailbridge.config import Config

REPO = Path(__file__).resolve().parent.parent
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
CHECKED = [d for d in DOCS if d.name != "configuration.md"]


def test_the_committed_reference_is_what_the_model_generates() -> None:
    committed = config_doc.DOC_PATH.read_text(encoding="utf-8")
    assert committed == config_doc.render(), (
        f"docs/configuration.md differs from mailbridge/config.py: run `{config_doc.REGENERATE}`"
        " and commit the result"
    )
    assert config_doc.main(["--check"]) == 0


def test_every_key_has_a_description() -> None:
    missing = config_doc.missing_descriptions()
    assert missing == [], f"give these fields a Field(description=...) in config.py: {missing}"


def test_a_key_without_description_is_found() -> None:
    class Inner(BaseModel):
        documented: int = Field(default=1, description="yes")
        bare: int = 2

    class Outer(BaseModel):
        inner: Inner | None = Field(default=None, description="a block")
        items: list[Inner] = Field(default_factory=list, description="blocks")

    assert config_doc.missing_descriptions(Outer) == ["Inner.bare"]


def test_the_reference_lists_every_key_of_every_model() -> None:
    documented = set(config_doc.model_keys())
    for key in ("dispatch.retry_attempts", "providers.<name>.retry_attempts"):
        assert (key in documented) == (config_doc.field_at(key) is not None)
    for key in (
        "smtp.tls.required",
        "store.retention_days",
        "reports.from",
        "reports.smtp.connections",
        "http.tls.key",
        "providers.<name>.circuit_failures",
        "providers.<name>.product_token",
        "providers.<name>.time_bounds",
        "accounts[].routes[].prefix",
        "accounts[].plain.cut_markers",
        "dispatch.validity_s",
        "log_level",
    ):
        assert key in documented, key
    # Every field of every model, by walking the models independently of the generator.
    expected: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{info.alias or name}"
            expected.add(key)
            for inner in config_doc._models_of(info):
                walk(inner, key + ("[]." if config_doc._is_list(info) else "."))

    walk(Config, "")
    expected.discard("providers")
    for kind in config_doc._provider_types():
        walk(kind, "providers.<name>.")
    expected.add("providers")
    assert documented == expected


def _yaml_keys(node: Any, prefix: str) -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            key = "providers.<name>" if prefix == "providers." else f"{prefix}{k}"
            keys.add(key)
            keys |= _yaml_keys(v, key + ".")
    elif isinstance(node, list):
        for item in node:
            keys |= _yaml_keys(item, prefix.rstrip(".") + "[].")
    return keys


def test_the_example_config_uses_only_documented_keys() -> None:
    """config.yaml uses only keys of the reference (every one of its sections)."""
    text = (REPO / "config.yaml").read_text()
    documented = {*config_doc.model_keys(), "providers.<name>"}
    used = _yaml_keys(yaml.safe_load(text), "")
    assert used - documented == set()
    assert {"smtp.listen", "accounts[].plain.enabled", "providers.<name>.type"} <= used


# -- keys and defaults named in the other docs ----------------------------------------

TOP = "|".join(Config.model_fields)
KEY = re.compile(rf"`((?:{TOP})(?:\[\])?(?:\.[A-Za-z_<>\[\]]+)+)`")
FILES = ("py", "md", "yml", "yaml", "json", "j2")
# "`dispatch.lease_s` (default 300 s", "`dispatch.heartbeat_s`, default 5 s",
# "**`store.max_size_mb`** (default: none)".
DEFAULT = re.compile(
    rf"`(?P<key>(?:{TOP})(?:\[\])?(?:\.[A-Za-z_<>\[\]]+)+)`\**,? \(?defaults? (?:to |is )?:? ?"
    r"(?P<value>`[^`]*`|[0-9][0-9_.]*|none|true|false)(?: (?P<unit>s|min|h|days?|MiB)\b)?"
)
UNITS = {"s": 1, "min": 60, "h": 3600, "day": 86400, "days": 86400, "MiB": 2**20}
# Tables of bare keys, and the section they belong to.
TABLE_PREFIX = {("providers.md", "Settings every provider has"): "providers.<name>."}


def _default(key: str) -> Any:
    info = config_doc.field_at(key)
    assert info is not None, key
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def _same(stated: str, unit: str | None, actual: Any) -> bool:
    stated = stated.strip("`")
    if stated in ("none", "null"):
        return actual is None
    if stated in ("true", "false"):
        return actual is (stated == "true")
    if isinstance(actual, bool) or actual is None or actual is PydanticUndefined:
        return False
    if isinstance(actual, int | float):
        try:
            value = float(stated.replace("_", ""))
        except ValueError:
            return False
        return value * UNITS.get(unit or "s", 1) == actual
    return stated == config_doc._scalar(actual) or stated == str(actual)


def _mentions() -> list[tuple[str, str, str, str | None]]:
    """(file, key, stated default, unit) for every default the docs state."""
    found = []
    for doc in CHECKED:
        text = doc.read_text()
        for m in DEFAULT.finditer(text):
            found.append((doc.name, m["key"], m["value"], m["unit"]))
        heading = ""
        columns: list[str] = []
        for line in text.splitlines():
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if not line.startswith("|"):
                columns = []
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not columns:
                columns = [c.lower() for c in cells]
                continue
            if "default" not in columns or not re.fullmatch(r"`[\w.<>\[\]]+`", cells[0]):
                continue
            key = TABLE_PREFIX.get((doc.name, heading), "") + cells[0].strip("`")
            stated = cells[columns.index("default")]
            value = re.fullmatch(r"(`[^`]*`|none)(?: \(.*\))?", stated)
            if value and config_doc.field_at(key) is not None:
                found.append((doc.name, key, value[1], None))
    return found


def test_keys_named_in_the_docs_exist() -> None:
    unknown = []
    for doc in CHECKED + [REPO / "config.yaml"]:
        for m in KEY.finditer(doc.read_text()):
            key = m[1]
            if key.rsplit(".", 1)[1] in FILES:  # dispatch.py, http.py: files
                continue
            if config_doc.field_at(key) is None:
                unknown.append(f"{doc.name}: {key}")
    assert unknown == [], "docs name keys that config.py does not have"


def test_defaults_stated_in_the_docs_are_the_models() -> None:
    mentions = _mentions()
    # The checker sees the docs' ways of stating a default (fails if they are reworded away).
    keys = {(f, k) for f, k, _, _ in mentions}
    assert ("providers.md", "providers.<name>.circuit_failures") in keys
    assert ("deployment.md", "dispatch.lease_s") in keys
    wrong = [
        f"{f}: `{k}` default {v}{' ' + u if u else ''}, the model says {_default(k)!r}"
        for f, k, v, u in mentions
        if not _same(v, u, _default(k))
    ]
    assert wrong == []


@pytest.mark.parametrize(
    ("stated", "unit", "actual", "same"),
    [
        ("300", "s", 300.0, True),
        ("3", "days", 259200.0, True),
        ("5", None, 3, False),
        ("`full`", None, "full", True),
        ("none", None, None, True),
        ("`[]`", None, [], True),
        ("`false`", None, False, True),
    ],
)
def test_default_comparison(stated: str, unit: str | None, actual: Any, same: bool) -> None:
    assert _same(stated, unit, actual) is same
