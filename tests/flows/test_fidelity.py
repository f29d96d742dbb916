"""The top-k fidelity report and a sampled top-k cache through their flows, on the tiny teacher."""

import json
import math

from prefect.client.orchestration import get_client

from distill_core.config import parse_config
from flows.stages import STAGES, prepare_data_flow, topk_fidelity_flow


def test_fidelity_report_then_a_sampled_capture_and_training(tiny_config, tmp_path):
    raw = tiny_config.model_dump(mode="json")
    raw["topk"] = {"strategy": "sampled", "draws": 12, "temperatures": [2.0], "batch_size": 8}
    raw["train"]["temperature"] = 2.0
    config = parse_config(raw)
    prepare_data_flow("fid-1", config)
    report = topk_fidelity_flow("fid-1", config, sequences=4)
    assert report["positions"] == 4 * 31 and report["strategies"]["sampled"]["configured"]
    root = tmp_path / "root"
    saved = list((root / "reports/fidelity").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == report
    assert json.loads((root / "runs/fid-1/stages/fidelity_topk.json").read_text()) == report
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "topk-fidelity" and "| sampled (configured) |" in a.data for a in artifact)

    cache = STAGES["cache_topk"]("fid-1", config)
    assert cache["meta"]["strategy"] == "sampled" and cache["meta"]["temperatures"] == [1.0, 2.0]
    assert saved[0].stem == cache["fingerprint"]  # the report is filed under the cache it previews
    trained = STAGES["train_student"]("fid-1", config)
    assert math.isfinite(trained["student"]["history"][-1]["forward_kl"])
