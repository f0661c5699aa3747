"""Config validation: defaults come from the schema; bad values are refused with the key named."""

import pytest
import yaml
from conftest import REPO, run_snakemake

from nyaflow import config as nyaflow_config


def test_defaults_are_filled_from_the_schema():
    cfg = nyaflow_config.validate({"run": "x"})
    assert cfg["seed"] == 0
    assert cfg["train"]["zero_stage"] == 2
    assert cfg["train"]["sigma_mean"] == 0.0 and cfg["train"]["sigma_std"] == 1.0
    assert cfg["export"]["shift"] == 3.0
    assert cfg["data"]["download"]["threads"] == 8


def test_every_schema_property_has_a_description():
    def walk(schema, path):
        for name, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{path}{name} has no description"
            walk(sub, f"{path}{name}.")

    walk(nyaflow_config.schema(), "")


def test_the_demo_config_is_valid():
    nyaflow_config.load(REPO / "config" / "config.yaml")


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"run": "x", "train": {"lr": -1}}, "train.lr"),
        ({"run": "x", "train": {"zero_stage": 5}}, "train.zero_stage"),
        ({"run": "x", "train": {"steps": "many"}}, "train.steps"),
        ({"run": "x", "train": {"learning_rate": 1e-4}}, "train"),
        ({"run": "x", "data": {"source": "ftp"}}, "data.source"),
        ({"run": "x", "sample": {"prompts": []}}, "sample.prompts"),
        ({"run": "../escape"}, "run"),
        ({}, "<top level>"),
    ],
)
def test_bad_values_are_refused_naming_the_key(raw, key):
    with pytest.raises(nyaflow_config.ConfigError, match=f"config key '{key}'"):
        nyaflow_config.validate(raw)


@pytest.mark.parametrize("key,value", [("ema_decay", 0.999), ("sample_every", 100)])
def test_zero_stage_3_refuses_what_needs_the_whole_unet_on_a_rank(key, value):
    nyaflow_config.validate({"run": "x", "train": {"zero_stage": 3}})
    with pytest.raises(nyaflow_config.ConfigError, match=f"'train.zero_stage' 3 and 'train.{key}' {value}"):
        nyaflow_config.validate({"run": "x", "train": {"zero_stage": 3, key: value}})


@pytest.mark.parametrize("key", ["stage", "offload_optimizer"])
def test_zero_options_that_nyaflow_sets_or_cannot_run_are_refused(key):
    nyaflow_config.validate({"run": "x", "train": {"zero_options": {"overlap_comm": True}}})
    with pytest.raises(nyaflow_config.ConfigError, match=f"config key 'train.zero_options.{key}'"):
        nyaflow_config.validate({"run": "x", "train": {"zero_options": {key: {"device": "cpu"}}}})


def test_snakemake_stops_before_any_job_naming_the_bad_key(workdir):
    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    cfg["train"]["caption_dropout"] = 1.5
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = run_snakemake(workdir, "-n")
    assert result.returncode != 0
    assert "config key 'train.caption_dropout'" in result.stderr + result.stdout
    assert not (workdir / "results").exists()


def test_config_reference_is_in_step_with_the_schema():
    assert (REPO / "config" / "README.md").read_text() == nyaflow_config.reference_markdown()
