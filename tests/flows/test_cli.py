import json

import yaml

from flows.cli import main


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
