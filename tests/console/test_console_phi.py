"""Patient-identifying values stay out of OS notifications and the logs."""

import io
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

LIVE_JS = Path(__file__).parents[2] / "console" / "static" / "console" / "live.js"
#: A surname nothing else in the console could print.
SURNAME = "Zyxwick"

#: live.js on node, with just enough of a browser: one flagged study arrives on the stream.
_HARNESS = """
const [livePath, studiesJson] = process.argv.slice(2);
const shown = [];
const element = () => ({ dataset: {}, append() {}, replaceChildren() {}, addEventListener() {} });
const elements = {};
global.document = {
  getElementById: (id) => (elements[id] = elements[id] || element()),
  createElement: element,
  dispatchEvent() {},
};
class Notification {
  constructor(title, options) { shown.push({ title, body: options.body }); }
}
Notification.permission = "granted";
global.Notification = Notification;
global.window = { Notification, focus() {} };
global.CustomEvent = class { constructor(type, init) { this.detail = init.detail; } };
let stream = null;
global.EventSource = class {
  constructor() { this.listeners = {}; this.readyState = 1; stream = this; }
  addEventListener(type, listener) { this.listeners[type] = listener; }
};
global.EventSource.OPEN = 1;
const studies = JSON.parse(studiesJson);
let lists = 0; // the page opens on a list without the flag; later lists have it
global.fetch = () => {
  const shownNow = lists++ === 0 ? [] : studies;
  return Promise.resolve({ ok: true, json: () => Promise.resolve({ studies: shownNow }) });
};
require(livePath);
stream.listeners.study({ data: JSON.stringify({ id: studies[0].id, alert: true }) });
setTimeout(() => console.log(JSON.stringify(shown)), 0);
"""


def test_os_notification_names_the_study_number_only(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = tmp_path / "harness.js"
    harness.write_text(_HARNESS)
    study = {"id": 12, "label": f"{SURNAME}^Jane head CT", "status": "flagged", "score": 0.91}
    result = subprocess.run(
        [node, str(harness), str(LIVE_JS), json.dumps([study])],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (shown,) = json.loads(result.stdout)
    assert shown == {"title": "HemoTriage", "body": "Study 12 flagged: possible hemorrhage"}


def _named_series(phantom_series, dicom_bytes) -> list[tuple[str, bytes]]:
    """A DICOM series whose patient name, description and file names carry the surname."""
    files = []
    for i, data in enumerate(phantom_series(3)):
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.PatientName = f"{SURNAME}^Jane"
        dataset.SeriesDescription = f"{SURNAME} Jane head"
        files.append((f"{SURNAME}_{i}.dcm", dicom_bytes(dataset)))
    return files


def test_no_patient_name_label_or_file_name_reaches_the_logs(
    app, caplog, logged_in, auth, api, upload, phantom_series, dicom_bytes, services, drain
):
    caplog.set_level(logging.DEBUG)
    body = upload(api, _named_series(phantom_series, dicom_bytes)).get_json()
    refused = upload(api, [(f"{SURNAME}_broken.dcm", b"not a DICOM file")])
    assert refused.status_code == 415
    inbox_entry = Path(app.config["INBOX_DIR"]) / f"{SURNAME} Jane"
    inbox_entry.mkdir(parents=True)
    for name, data in _named_series(phantom_series, dicom_bytes):
        (inbox_entry / name).write_bytes(data)
    (Path(app.config["INBOX_DIR"]) / f"{SURNAME}_bad.dcm").write_bytes(b"unreadable")
    assert services.inbox.scan_once() == 2
    drain(services)
    study_id = body["study_id"]
    assert f"{SURNAME} Jane head" in logged_in.get(f"/studies/{study_id}").get_data(as_text=True)
    logged_in.post(f"/api/studies/{study_id}/acknowledge", headers=auth.headers())
    assert caplog.records, "the steps above log"
    assert SURNAME.lower() not in caplog.text.lower()
