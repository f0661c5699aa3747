"""The run config: validated against workflow/schemas/config.schema.yaml, which also holds every default.

The Snakefile validates the user's config once and writes the result (defaults filled) to
results/<run>/config.yaml; every `nyaflow <stage>` reads that file through `load`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the key."""


def _with_defaults(validator_class):
    """A validator that fills `default` values of absent properties before checking them."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": properties})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise FileNotFoundError(
            f"config schema not found at {SCHEMA_PATH}: install nyaflow from its source tree"
            " (pip install -e .)"
        )
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate(config: dict) -> dict:
    """Return a validated copy of `config` with every default filled; raise ConfigError naming the key."""
    config = copy.deepcopy(dict(config))
    errors = sorted(_Validator(schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"config key '{'.'.join(map(str, e.absolute_path)) or '<top level>'}': {e.message}"
            for e in errors
        ]
        raise ConfigError("invalid nyaflow config:\n  " + "\n  ".join(lines))
    lines = combination_problems(config)
    if lines:
        raise ConfigError("invalid nyaflow config:\n  " + "\n  ".join(lines))
    return config


def combination_problems(config: dict) -> list[str]:
    """Settings that are valid one by one but not together (the schema checks each key alone)."""
    tc = config["train"]
    offload = "CPU offload needs DeepSpeed's CPU Adam; nyaflow trains with torch's AdamW"
    not_passed = {
        "stage": "the stage is train.zero_stage",
        "offload_optimizer": offload,
        "offload_param": offload,
    }
    problems = [
        f"config key 'train.zero_options.{key}': {why}"
        for key, why in not_passed.items()
        if key in tc["zero_options"]
    ]
    if tc["zero_stage"] == 3:
        # ZeRO-3 partitions the UNet's weights across ranks: nothing outside the engine sees them whole.
        for key, why in (
            ("ema_decay", "the EMA averages the whole UNet on every rank"),
            ("sample_every", "rank 0 alone would run the UNet while the others wait in no collective"),
        ):
            if tc[key]:
                problems.append(f"config keys 'train.zero_stage' 3 and 'train.{key}' {tc[key]}: {why}")
    return problems


def load(path: str | Path) -> dict:
    """Read and validate a config file."""
    with open(path) as f:
        return validate(yaml.safe_load(f) or {})


def write_snapshot(config: dict, path: str | Path) -> None:
    """Write the validated config to `path`, leaving the file untouched when its content is the same."""
    path = Path(path)
    text = yaml.safe_dump(config, sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def reference_markdown() -> str:
    """config/README.md: every key of the schema with its type, default and description."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `workflow/schemas/config.schema.yaml` by `nyaflow config-docs`; a test keeps the two",
        "in step. `config/config.yaml` is the demo. Keys left out take the defaults below.",
        "",
    ]

    def walk(node: dict, path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            key = f"{path}{name}"
            if sub.get("type") == "object" and "properties" in sub:
                lines.extend(["", f"## `{key}`", "", " ".join(sub["description"].split()), ""])
                lines.extend(["| key | type | default | description |", "| --- | --- | --- | --- |"])
                walk(sub, f"{key}.")
                continue
            kind = sub.get("type", "")
            if "enum" in sub:
                kind += " (" + " / ".join(map(str, sub["enum"])) + ")"
            default = json.dumps(sub["default"]) if "default" in sub else "required"
            lines.append(f"| `{key}` | {kind} | `{default}` | {' '.join(sub['description'].split())} |")

    lines.extend(["| key | type | default | description |", "| --- | --- | --- | --- |"])
    walk(schema(), "")
    return "\n".join(lines) + "\n"
