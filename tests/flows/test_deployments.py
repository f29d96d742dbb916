"""deployments/prefect.yaml, the served deployments, their parameter forms and the failure automation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.events.schemas.automations import AutomationCore
from prefect.flows import load_flow_from_entrypoint

from distill_core.config import LossName, parse_config
from flows.nightly import nightly
from flows.serve import NIGHTLY_CRON, NIGHTLY_TIMEZONE, build_deployments
from flows.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
AUTOMATION = REPO / "deployments" / "automations" / "nightly-failed.yaml"
POOL = "distillery-process"


def _prefect_yaml() -> tuple[dict, PrefectYamlModel]:
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    return raw, PrefectYamlModel.model_validate(raw)  # the model `prefect deploy` loads the file with


def _served() -> dict[tuple[str, str], object]:
    return {(d.flow_name, d.name): d for d in build_deployments()}


def test_prefect_yaml_loads_and_every_entrypoint_is_a_flow():
    raw, model = _prefect_yaml()
    assert "definitions" in raw  # anchors for the shared work pool and parameters
    flows = set()
    for d in model.deployments:
        flow = load_flow_from_entrypoint(str(REPO / d.entrypoint), use_placeholder_flow=False)
        flows.add(flow.name)
        assert d.work_pool.name == POOL and d.work_pool.job_variables == {}
        assert parse_config(d.parameters["config"])  # a valid run config
    assert flows == {nightly.name} | {f.name for f in STAGES.values()}  # every stage has a deployment

    (night,) = [d for d in model.deployments if d.name == "nightly"]
    (schedule,) = [_schedule_config_to_deployment_schedule(s.model_dump(exclude_unset=True)) for s in night.schedules]
    assert isinstance(schedule["schedule"], CronSchedule)
    assert (schedule["schedule"].cron, schedule["schedule"].timezone) == (NIGHTLY_CRON, NIGHTLY_TIMEZONE)


def test_nightly_parameters_are_demo_yaml():
    """Prefect cannot read parameters from another file, so prefect.yaml holds a copy: keep it equal."""
    raw, _ = _prefect_yaml()
    demo = yaml.safe_load((REPO / "deployments" / "demo.yaml").read_text())
    for d in raw["deployments"]:
        assert d["parameters"]["config"] == demo, d["entrypoint"]


def test_serve_builds_the_deployments_of_prefect_yaml():
    raw, model = _prefect_yaml()
    served = _served()
    from_yaml = {}
    for d in model.deployments:
        flow = load_flow_from_entrypoint(str(REPO / d.entrypoint), use_placeholder_flow=False)
        schedules = [_schedule_config_to_deployment_schedule(s.model_dump(exclude_unset=True))["schedule"]
                     for s in d.schedules or []]
        from_yaml[(flow.name, d.name)] = (d.entrypoint, [(s.cron, s.timezone) for s in schedules], d.parameters, sorted(d.tags))
    assert set(served) == set(from_yaml)
    for key, d in served.items():
        schedules = [(s.schedule.cron, s.schedule.timezone) for s in d.schedules]
        assert (d.entrypoint, schedules, d.parameters, sorted(d.tags)) == from_yaml[key], key


def test_parameter_forms_have_what_users_need():
    """What the UI renders: teacher kinds as a choice, loss names as a dropdown, bounds, descriptions."""
    for (flow_name, name), deployment in _served().items():
        # RunnerDeployment keeps the schema it sends to the API privately in Prefect 3.9
        schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
        defs = schema["definitions"]
        assert schema["properties"]["config"]["$ref"] == "#/definitions/RunConfig"
        required = set(schema.get("required") or [])
        props = schema["properties"]
        if name != "nightly":
            assert name == f"stage-{flow_name}"  # a list of deployments says which stage each runs
            assert "run_id" in required, flow_name  # the UI asks which run the stage works on, first
            assert min(props, key=lambda p: props[p]["position"]) == "run_id"
            assert "runs/" in props["run_id"]["description"] and "distillery run" in props["run_id"]["description"]
            if "recompute_damaged" in props:
                assert "checksum" in props["recompute_damaged"]["description"]
        else:
            assert "run_id" not in required

        teacher = defs["RunConfig"]["properties"]["teacher"]
        assert teacher["discriminator"]["propertyName"] == "kind"
        assert set(teacher["discriminator"]["mapping"]) == {"hub", "path", "gguf"}
        for kind in ("HubTeacher", "PathTeacher", "GGUFTeacher"):
            fields = {k: v for k, v in defs[kind]["properties"].items() if k != "kind"}
            assert fields and all(v.get("description") for v in fields.values()), kind

        loss_name = defs["LossTerm"]["properties"]["name"]
        assert set(typing.get_args(LossName)) <= set(loss_name["enum"]) and loss_name["description"]
        assert defs["TrainConfig"]["properties"]["losses"]["items"]["$ref"] == "#/definitions/LossTerm"
        k = defs["TopKConfig"]["properties"]["k"]
        assert (k["minimum"], k["maximum"]) == (1, 1024) and k["description"]
        for section in ("DataConfig", "TopKConfig", "TrainConfig", "StudentConfig"):
            props = defs[section]["properties"]
            described = [p for p in props.values() if p.get("description")]
            assert len(described) >= len(props) * 0.7, section  # most fields explain themselves


def test_failure_automation_is_valid_and_targets_the_nightly_flow():
    automation = AutomationCore.model_validate(yaml.safe_load(AUTOMATION.read_text()))
    trigger = automation.trigger
    assert {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"} <= set(trigger.expect)
    assert "flow" in trigger.match_related.get("prefect.resource.role")
    assert nightly.name in trigger.match_related.get("prefect.resource.name")
    assert automation.actions[0].type == "send-notification"
    with get_client(sync_client=True) as client:  # the API accepts it (what `prefect automation create` sends)
        automation_id = client.create_automation(automation)
        assert client.read_automation(automation_id).trigger.expect == trigger.expect
        client.delete_automation(automation_id)


# -- `prefect deploy --all` and `distillery serve` against a real `prefect server start` (about a minute each on 2 cores)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _local_server(tmp_path):
    """A fresh `prefect server start` on loopback; yields (env for the CLI, API URL, run(*prefect args))."""
    port = _free_port()
    env = {
        **os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    prefect = [sys.executable, "-m", "prefect"]
    server = subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not start"
            time.sleep(1)
        run = lambda *args: subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # noqa: E731
        yield env, env["PREFECT_API_URL"], run
    finally:
        server.terminate()
        server.wait(timeout=30)


def _deployments(api: str) -> dict[tuple[str, str], dict]:
    found = {}
    for d in httpx.post(f"{api}/deployments/filter", json={}).json():
        flow = httpx.get(f"{api}/flows/{d['flow_id']}").json()
        found[(flow["name"], d["name"])] = d
    return found


def _deploy_all(run) -> None:
    deploy = run("deploy", "--all", "--prefect-file", str(PREFECT_YAML))
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr


@pytest.mark.slow
def test_prefect_deploy_all_against_a_local_server(tmp_path):
    with _local_server(tmp_path) as (env, api, run):
        pool = run("work-pool", "create", POOL, "--type", "process")
        assert pool.returncode == 0, pool.stdout + pool.stderr
        _deploy_all(run)
        found = _deployments(api)
        assert set(found) == set(_served())
        for (flow_name, name), d in found.items():
            assert d["work_pool_name"] == POOL and d["entrypoint"] and parse_config(d["parameters"]["config"])
            assert ("run_id" in d["parameter_openapi_schema"].get("required", [])) == (name != "nightly")
        (schedule,) = found[(nightly.name, "nightly")]["schedules"]
        assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == (NIGHTLY_CRON, NIGHTLY_TIMEZONE)


@pytest.mark.slow
def test_serve_after_prefect_deploy_runs_a_stage_then_deploy_takes_it_back(tmp_path, tiny_config):
    """The README's order: `prefect deploy --all`, then `distillery serve`; a served run completes (with a
    partial config laid over the deployment's), stopping serve pauses the deployments, and a later
    `prefect deploy --all` hands them back to the pool."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    with _local_server(tmp_path) as (env, api, run):
        assert run("work-pool", "create", POOL, "--type", "process").returncode == 0
        _deploy_all(run)
        log = (tmp_path / "serve.log").open("w")
        serve_env = {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        served = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", str(config_file)],
                                  env=serve_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            name = "prepare-data/stage-prepare-data"
            deadline = time.monotonic() + 120
            while "being served" not in (tmp_path / "serve.log").read_text():
                assert time.monotonic() < deadline and served.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(1)
            override = {"storage": {"root": tiny_config.storage.root}, "data": {"max_train_sequences": 32}}
            started = run("deployment", "run", name, "--param", "run_id=served", "--param", f"config={json.dumps(override)}")
            assert started.returncode == 0, started.stdout + started.stderr
            deployment_id = _deployments(api)[("prepare-data", "stage-prepare-data")]["id"]
            deadline = time.monotonic() + 300
            while True:
                (flow_run,) = httpx.post(f"{api}/flow_runs/filter",
                                         json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}).json()
                if flow_run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                    break
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(2)
            assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], (tmp_path / "serve.log").read_text())
            recorded = json.loads((Path(tiny_config.storage.root) / "runs/served/config.json").read_text())
            assert recorded["data"]["max_train_sequences"] == 32  # the run's override
            assert recorded["teacher"] == tiny_config.model_dump(mode="json")["teacher"]  # the deployment's value
            assert recorded["data"]["seq_len"] == tiny_config.data.seq_len
        finally:
            served.send_signal(signal.SIGINT)
            served.wait(timeout=60)
            log.close()
        after_serve = _deployments(api)
        assert all(d["paused"] for d in after_serve.values()), {k: d["paused"] for k, d in after_serve.items()}

        _deploy_all(run)
        for key, d in _deployments(api).items():
            assert d["work_pool_name"] == POOL and d["pull_steps"], key
            assert not d["paused"], key
