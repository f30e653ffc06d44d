"""params.yaml lists every parameter the code has, at its default: nothing hides as a dataclass default."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import Params
from rlhf.params import load_params

REPO = Path(__file__).resolve().parents[1]


def dataclass_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → default value of every field of a config dataclass, nested configs included."""
    keys = {}
    for item in dataclasses.fields(obj):
        if item.metadata.get("from") == "launch":  # filled from params.yaml's `launch` (PPOConfig's launch fields)
            continue
        value = getattr(obj, item.name)
        if dataclasses.is_dataclass(value):
            keys.update(dataclass_keys(value, f"{prefix}{item.name}."))
        else:
            keys[f"{prefix}{item.name}"] = value
    return keys


def yaml_keys(raw: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key → value of a nested mapping, e.g. {"prepare.model.n_layer": 4}."""
    nested = [yaml_keys(value, f"{prefix}{name}.") for name, value in raw.items() if isinstance(value, dict)]
    flat = {f"{prefix}{name}": value for name, value in raw.items() if not isinstance(value, dict)}
    return flat | {key: value for keys in nested for key, value in keys.items()}


def test_params_yaml_lists_every_field_and_only_fields() -> None:
    in_code = dataclass_keys(Params())
    in_yaml = yaml_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert sorted(set(in_code) - set(in_yaml)) == [], "fields missing from params.yaml (add them with their default)"
    assert sorted(set(in_yaml) - set(in_code)) == [], "keys in params.yaml that no config dataclass has"


def test_params_yaml_holds_the_defaults() -> None:
    # one source of truth for the embedded default: params.yaml and the dataclass defaults agree on every value
    in_code = dataclass_keys(Params())
    in_yaml = yaml_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    differ = {key: (in_yaml[key], in_code[key]) for key in in_code if key in in_yaml and in_yaml[key] != in_code[key]}
    assert differ == {}, "params.yaml value vs dataclass default"
    assert load_params(REPO / "params.yaml") == Params()
