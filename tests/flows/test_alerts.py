"""The failed-nightly automation (deployments/automations/nightly-failed.yaml) fires for real: the test
API's triggers and actions services send its notification to a webhook on loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

from distill_core.errors import TeacherError
from flows.nightly import nightly

AUTOMATION = Path(__file__).resolve().parents[2] / "deployments" / "automations" / "nightly-failed.yaml"


@pytest.fixture
def webhook():
    """A loopback HTTP endpoint; yields (url, the JSON bodies POSTed to it)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()


def test_failed_nightly_run_sends_the_notification(tiny_config, tmp_path, webhook):
    url, received = webhook
    block = CustomWebhookNotificationBlock(name="test", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save("distillery-alert-test", overwrite=True)
    spec = yaml.safe_load(AUTOMATION.read_text())
    spec["actions"][0]["block_document_id"] = str(block_id)
    with get_client(sync_client=True) as client:
        automation_id = client.create_automation(AutomationCore.model_validate(spec))
    try:
        missing = tmp_path / "no-such-teacher"
        bad = tiny_config.model_copy(update={"teacher": tiny_config.teacher.model_copy(update={"path": str(missing)})})
        with pytest.raises(TeacherError):
            nightly(config=bad, run_id="alert")

        deadline = time.monotonic() + 90
        while not received and time.monotonic() < deadline:
            time.sleep(0.5)
        assert received, "no notification within 90 s of the failed run"
        (message,) = received
        assert message["subject"].startswith("distillery: nightly run nightly-") and message["subject"].endswith(" is Failed")
        assert str(missing) in message["body"] and "prefect flow-run retry" in message["body"]
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(automation_id)
            client.delete_block_document(block_id)
