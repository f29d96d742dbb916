"""A partial config given to a deployment run is laid over the deployment's config (flows/overrides.py)."""

import pytest
import yaml

from distill_core.config import RunConfig
from distill_core.errors import ConfigError
from flows.overrides import merge_onto, with_deployment_config
from flows.serve import DEFAULT_CONFIG


def test_merge_onto_merges_mappings_and_replaces_the_rest():
    base = {"train": {"steps": 60, "lr": 3e-4, "losses": [{"name": "ce"}]}, "teacher": {"kind": "gguf", "file": "embedded"}}
    assert merge_onto(base, {"train": {"steps": 6, "losses": [{"name": "forward_kl"}]}}) == {
        "train": {"steps": 6, "lr": 3e-4, "losses": [{"name": "forward_kl"}]}, "teacher": {"kind": "gguf", "file": "embedded"}}
    # another kind of teacher replaces the whole section: a gguf `file` means nothing to a hub teacher
    assert merge_onto(base, {"teacher": {"kind": "hub", "name": "gpt2"}})["teacher"] == {"kind": "hub", "name": "gpt2"}
    assert merge_onto(base, {"teacher": {"file": "other.gguf"}})["teacher"] == {"kind": "gguf", "file": "other.gguf"}


def test_a_partial_run_config_keeps_the_deployments_other_values():
    deployment = yaml.safe_load(DEFAULT_CONFIG.read_text())
    partial = RunConfig.model_validate({"train": {"steps": 6}})  # what `--param config='{"train": {"steps": 6}}'` gives the flow
    assert partial.data.max_train_sequences != deployment["data"]["max_train_sequences"]  # the trap: defaults elsewhere
    merged = with_deployment_config(partial, deployment)
    assert merged.train.steps == 6
    assert merged.train.batch_size == deployment["train"]["batch_size"] and merged.train.baseline is True
    assert merged.data.max_train_sequences == deployment["data"]["max_train_sequences"]
    assert merged.teacher.kind == "gguf" and merged.storage.root == deployment["storage"]["root"]
    assert with_deployment_config(partial, None) is partial  # outside a deployment: unchanged
    full = RunConfig.model_validate(deployment)
    assert with_deployment_config(full, deployment) == full


def test_an_override_that_breaks_the_merged_config_is_refused():
    with pytest.raises(ConfigError, match=r"the run's config laid over the deployment's is invalid: topk.k"):
        with_deployment_config(RunConfig.model_validate({"topk": {"batch_size": 4}}), {"topk": {"k": 0}})
