import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_run_then_one_stage_then_registry(tiny_config, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    assert main(["run", str(path), "--run-id", "cli-1"]) == 0
    out = capsys.readouterr().out
    assert "run cli-1: registered tiny v1 (champion)" in out
    assert all(name in out for name in ("teacher", "student", "baseline", "val_ppl"))

    assert main(["stage", "evaluate", str(path), "--run-id", "cli-1"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"teacher", "student", "baseline"}

    root = tiny_config.storage.root
    assert main(["registry", "list", "--root", root]) == 0
    assert capsys.readouterr().out.strip() == "tiny"
    assert main(["registry", "show", "tiny", "--root", root]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1


def test_bad_input_exits_2_with_the_fix(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("topk: {k: 0}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "topk.k" in err and "Fix these fields" in err
    assert main(["stage", "train_student", str(tmp_path / "missing.yaml"), "--run-id", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _cli(args, env_extra=None):
    """The CLI in its own process against the test API: what a user's terminal shows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=repo, capture_output=True, text=True, timeout=300)


def test_a_refusal_inside_a_flow_prints_one_error_line_and_no_traceback(tiny_config, tmp_path):
    """Prefect logs a failing task's and every enclosing flow's exception; the terminal gets it once."""
    raw = tiny_config.model_dump(mode="json")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    stage = _cli(["stage", "train_student", str(path), "--run-id", "never-prepared"])
    assert stage.returncode == 2
    assert "Traceback" not in stage.stderr and " ERROR " not in stage.stderr, stage.stderr
    assert [line for line in stage.stderr.splitlines() if "error" in line.lower()] == [
        "error: stage 'teacher' has not finished for run never-prepared: run prepare_data first "
        "(distillery stage prepare_data CONFIG --run-id never-prepared)."
    ]

    raw["teacher"]["path"] = str(tmp_path / "no-such-teacher")  # refused three flows deep: task, stage, nightly
    path.write_text(yaml.safe_dump(raw))
    run = _cli(["run", str(path), "--run-id", "no-teacher"])
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and " ERROR " not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no-such-teacher" in errors[0], run.stderr


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_run_takes_its_temporary_prefect_server_with_it(tiny_config, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / "cli.log"
    with open(log, "wb") as out:
        cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-id", "killed"], cwd=REPO,
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    server = None
    try:
        deadline = time.monotonic() + 120
        while "for flow 'nightly-distillation'" not in log.read_text(errors="replace"):  # the run is under way
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        servers = [c for c in _children(cli.pid) if "prefect.server.api.server:create_app" in _cmdline(c)]
        assert len(servers) == 1, [_cmdline(c) for c in _children(cli.pid)]
        server = servers[0]
        cli.kill()
        cli.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(server), "the temporary Prefect server outlived the killed `distillery run`"
    finally:
        if cli.poll() is None:
            cli.kill()
        if server is not None and not _gone(server):
            os.kill(server, signal.SIGKILL)
