"""Readers' verdicts on the model's results, and the live accuracy built from them."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.registry import get_model
from console.accuracy import wilson_interval
from console.auth import create_token
from console.db import connect
from console.services import EXTENSION_KEY
from tests.console.conftest import ADMIN, NURSE, api_client_of

HEMORRHAGE, NORMAL = "000.png", "150.png"  # kaggle: p = 0.94 and 0.07 with MobileNetV2


@pytest.fixture
def judged(api, upload, shared_data, services, drain):
    """A flagged and a negative study, classified by the real model."""
    folder = shared_data / "kaggle_head_ct" / "head_ct"
    ids = [
        upload(api, [(name, (folder / name).read_bytes())]).get_json()["study_id"]
        for name in (HEMORRHAGE, NORMAL)
    ]
    drain(services)
    statuses = [api.get(f"/api/studies/{i}").get_json()["status"] for i in ids]
    assert statuses == ["flagged", "negative"]
    return ids


def _verdict(client, study_id: int, verdict, note=None, **kwargs):
    body = {"verdict": verdict} if note is None else {"verdict": verdict, "note": note}
    return client.post(f"/api/studies/{study_id}/feedback", json=body, **kwargs)


def test_verdicts_are_stored_audited_changeable_and_the_last_one_counts(api, judged, db_rows):
    flagged, negative = judged
    first = _verdict(api, flagged, "confirmed")
    assert first.status_code == 201
    assert first.get_json()["outcome"] == "true_positive"
    changed = _verdict(api, flagged, "false", note="  calcified falx  ")
    assert changed.get_json()["outcome"] == "false_positive"
    assert _verdict(api, negative, "false").get_json()["outcome"] == "false_negative"

    detail = api.get(f"/api/studies/{flagged}").get_json()
    assert [f["outcome"] for f in detail["feedback"]] == ["false_positive", "true_positive"]
    assert detail["feedback"][0]["note"] == "calcified falx"
    assert detail["feedback"][0]["model_version"] == detail["model_version"]
    assert detail["feedback"][0]["score"] == detail["score"]
    audit = db_rows("SELECT username, study_id, detail FROM audit_log WHERE action = 'feedback'")
    assert [tuple(r) for r in audit] == [
        ("admin", flagged, "true_positive (was none)"),
        ("admin", flagged, "false_positive (was true_positive)"),
        ("admin", negative, "false_negative (was none)"),
    ]
    assert "falx" not in str([tuple(r) for r in db_rows("SELECT * FROM audit_log")])

    (version,) = api.get("/api/accuracy?days=all").get_json()["versions"]
    assert (version["true_positives"], version["false_positives"]) == (0, 1)
    assert (version["false_negatives"], version["flagged"]) == (1, 1)
    assert version["ppv"]["estimate"] == 0.0 and version["false_positive_rate"]["estimate"] == 1.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"verdict": "maybe"}, "verdict must be one of confirmed, false"),
        ({"verdict": "true_positive"}, "verdict must be one of confirmed, false"),
        ({}, "verdict must be one of confirmed, false"),
        ({"verdict": "false", "note": "x" * 501}, "note is 501 characters; at most 500"),
        ({"verdict": "false", "note": 7}, "note must be text"),
        (["confirmed"], "send a JSON object"),
    ],
)
def test_a_bad_verdict_is_refused_with_a_clear_error(api, judged, db_rows, body, message):
    response = api.post(f"/api/studies/{judged[0]}/feedback", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "InvalidRequestError"
    assert message in response.get_json()["message"]
    assert db_rows("SELECT * FROM feedback") == []


def test_a_study_without_a_result_cannot_be_judged(api, upload, shared_data):
    folder = shared_data / "kaggle_head_ct" / "head_ct"
    study_id = upload(api, [(NORMAL, (folder / NORMAL).read_bytes())]).get_json()["study_id"]
    response = _verdict(api, study_id, "confirmed")
    assert response.status_code == 409
    assert "no result to review (queued)" in response.get_json()["message"]
    assert _verdict(api, study_id + 1, "confirmed").status_code == 404


def test_upload_only_tokens_cannot_judge_or_read_accuracy(app, judged, logged_in):
    db = connect(app.config["DATABASE"])
    try:
        token = create_token(db, "admin", "ct-scanner", scope="upload", expires_days=1)
    finally:
        db.close()
    scanner = app.test_client(use_cookies=False)
    scanner.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    for response in (
        _verdict(scanner, judged[0], "false"),
        scanner.post(f"/studies/{judged[0]}/feedback", data={"verdict": "false"}),
        scanner.get("/api/accuracy"),
        scanner.get("/accuracy"),
    ):
        assert response.status_code == 403, response.request.path
        assert response.get_json()["error"] == "ForbiddenError"


def test_a_clinician_judges_from_the_study_page(app, judged, logged_in_as, auth_for):
    flagged, negative = judged
    nurse = logged_in_as(*NURSE)
    page = nurse.get(f"/studies/{flagged}").get_data(as_text=True)
    assert "Hemorrhage confirmed (true positive)" in page and "No verdict yet" in page
    assert "Missed hemorrhage" in nurse.get(f"/studies/{negative}").get_data(as_text=True)
    form = {"verdict": "confirmed", "note": "ICH on CTA"}
    assert nurse.post(f"/studies/{flagged}/feedback", data=form).status_code == 400  # no CSRF
    token = auth_for(nurse).headers()["X-CSRF-Token"]
    response = nurse.post(f"/studies/{flagged}/feedback", data={**form, "csrf_token": token})
    assert response.status_code == 302 and response.location.endswith(f"/studies/{flagged}")
    page = nurse.get(f"/studies/{flagged}").get_data(as_text=True)
    assert "Feedback recorded: true positive." in page
    assert "Current verdict:" in page and "by nurse" in page and "ICH on CTA" in page
    accuracy = nurse.get("/accuracy?days=7").get_data(as_text=True)
    assert "100.0% (1/1;" in accuracy and 'href="/accuracy?days=all"' in accuracy
    assert 'href="/accuracy"' in nurse.get("/").get_data(as_text=True)  # in the nav
    refused = nurse.get("/accuracy?days=14")
    assert refused.status_code == 400 and "days must be one of" in refused.get_json()["message"]


VERSION_A, VERSION_B = "1 (weights aaaaaaaaaaaa)", "2 (weights bbbbbbbbbbbb)"


def _constructed_study(db, version: str, flagged: bool, days_ago: float) -> int:
    """A finished study of ``version``, received ``days_ago``: only what the statistics read."""
    received = time.time() - days_ago * 86400
    cursor = db.execute(
        "INSERT INTO studies (study_key, label, source, priority, status, score, threshold, "
        "model_name, model_version, received_at, finished_at, flagged_at, flag_score, updated_at)"
        " VALUES (?, 'constructed', 'api', 2, ?, ?, 0.3, 'mobilenet_v2', ?, ?, ?, ?, ?, ?)"
        " RETURNING id",
        (
            f"constructed:{version}:{flagged}:{days_ago}:{time.monotonic_ns()}",
            "flagged" if flagged else "negative",
            0.9 if flagged else 0.1,
            version,
            received,
            received + 1,
            received + 1 if flagged else None,
            0.9 if flagged else None,
            received + 1,
        ),
    )
    return cursor.fetchone()["id"]


#: (version, flagged, days ago, verdicts in order; the last one counts)
CONSTRUCTED = [
    *[(VERSION_A, True, 1, ["confirmed"])] * 2,
    (VERSION_A, True, 1, ["false", "confirmed"]),
    (VERSION_A, True, 1, ["false"]),
    (VERSION_A, True, 1, []),  # flagged, not reviewed yet
    (VERSION_A, False, 1, ["confirmed"]),
    *[(VERSION_A, False, 2, ["false"])] * 2,
    *[(VERSION_A, True, 20, ["false"])] * 2,
    (VERSION_B, True, 3, ["confirmed"]),
    (VERSION_B, True, 3, ["false"]),
    (VERSION_B, False, 60, ["false"]),
]
#: window -> version -> (flagged, TP, FP, TN, FN)
EXPECTED = {
    "7": {VERSION_A: (5, 3, 1, 1, 2), VERSION_B: (2, 1, 1, 0, 0)},
    "30": {VERSION_A: (7, 3, 3, 1, 2), VERSION_B: (2, 1, 1, 0, 0)},
    "all": {VERSION_A: (7, 3, 3, 1, 2), VERSION_B: (2, 1, 1, 0, 1)},
}


@pytest.fixture
def constructed(app, api):
    db = connect(app.config["DATABASE"])
    with db:
        ids = [_constructed_study(db, v, f, d) for v, f, d, _ in CONSTRUCTED]
    db.close()
    for study_id, (*_, verdicts) in zip(ids, CONSTRUCTED, strict=True):
        for verdict in verdicts:
            assert _verdict(api, study_id, verdict).status_code == 201


@pytest.mark.parametrize("window", EXPECTED)
def test_accuracy_per_version_and_window_on_a_constructed_set(api, constructed, window):
    body = api.get(f"/api/accuracy?days={window}").get_json()
    assert body["days"] == {"7": 7, "30": 30, "all": None}[window]
    got = {v["model_version"]: v for v in body["versions"]}
    assert set(got) == set(EXPECTED[window])
    for version, (flagged, tp, fp, tn, fn) in EXPECTED[window].items():
        row = got[version]
        assert row["model_name"] == "mobilenet_v2"
        assert (row["flagged"], row["true_positives"], row["false_positives"]) == (flagged, tp, fp)
        assert (row["true_negatives"], row["false_negatives"]) == (tn, fn)
        low, high = wilson_interval(tp, tp + fp)
        assert row["ppv"] == {
            "successes": tp,
            "total": tp + fp,
            "estimate": tp / (tp + fp),
            "low": low,
            "high": high,
        }
        assert row["false_positive_rate"]["estimate"] == fp / (tp + fp)
        assert row["false_positive_rate"]["low"] == pytest.approx(1 - high)


def test_metrics_report_the_same_accuracy_per_model_version_and_window(client, constructed):
    text = client.get("/metrics").get_data(as_text=True)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("hemotriage_feedback_")
    }

    def value(name, window, version, **labels):
        key = {"model": "mobilenet_v2", "version": version, "window": window, **labels}
        return samples[(f"hemotriage_feedback_{name}", tuple(sorted(key.items())))]

    for window, versions in EXPECTED.items():
        for version, (flagged, tp, fp, tn, fn) in versions.items():
            assert value("flagged_studies", window, version) == flagged
            assert value("confirmed_misses", window, version) == fn
            assert value("studies", window, version, outcome="true_negative") == tn
            assert value("ppv", window, version, bound="estimate") == pytest.approx(tp / (tp + fp))
            fpr = value("false_positive_rate", window, version, bound="estimate")
            assert fpr == pytest.approx(fp / (tp + fp))
            low, high = wilson_interval(tp, tp + fp)
            assert value("ppv", window, version, bound="low") == pytest.approx(low)
            assert value("ppv", window, version, bound="high") == pytest.approx(high)


def _constructed_series(db, version: str, threshold: float, score: float, slices: int) -> int:
    """A finished study of ``slices`` classified slices, decided at ``threshold``."""
    received = time.time() - 3600
    flagged = score >= threshold
    study_id = db.execute(
        "INSERT INTO studies (study_key, label, source, priority, status, score, threshold, "
        "model_name, model_version, received_at, finished_at, flagged_at, flag_score, updated_at)"
        " VALUES (?, 'constructed', 'api', 2, ?, ?, ?, 'mobilenet_v2', ?, ?, ?, ?, ?, ?)"
        " RETURNING id",
        (
            f"series:{version}:{score}:{time.monotonic_ns()}",
            "flagged" if flagged else "negative",
            score,
            threshold,
            version,
            received,
            received + 1,
            received + 1 if flagged else None,
            score if flagged else None,
            received + 1,
        ),
    ).fetchone()["id"]
    for n in range(slices):
        db.execute(
            "INSERT INTO slices (study_id, filename, stored_path, sha256, status, priority, "
            "queued_at, probability, head_fraction) "
            "VALUES (?, ?, '', ?, 'classified', 2, ?, ?, 0.5)",
            (study_id, f"{n}.dcm", f"{study_id}-{n}", received, score),
        )
    return study_id


#: (version, threshold, score, slices, verdict): the reader's truth is a bleed where a flag
#: is confirmed or a negative is marked false.
SERIES = [
    (VERSION_A, 0.5, 0.9, 30, "confirmed"),  # bleed, flagged
    (VERSION_A, 0.5, 0.62345, 30, "confirmed"),  # bleed, flagged
    (VERSION_A, 0.5, 0.412345, 30, "false"),  # bleed, missed: the lowest bleed score
    (VERSION_A, 0.5, 0.8, 30, "false"),  # normal, flagged
    (VERSION_A, 0.5, 0.45, 30, "confirmed"),  # normal below 0.5 but above 0.4123
    (VERSION_A, 0.5, 0.2, 30, "confirmed"),
    (VERSION_A, 0.5, 0.39, 2, "confirmed"),
    (VERSION_A, 0.5, 0.05, 1, "false"),  # a lone image: decided at the slice threshold
    (VERSION_A, 0.5, 0.7, 30, None),  # not reviewed
    (VERSION_A, 0.7, 0.98765, 30, "confirmed"),  # the same version at a site's threshold
    (VERSION_A, 0.7, 0.95, 30, "false"),
]


def test_the_series_operating_point_on_this_sites_reviewed_series(app, api, logged_in):
    db = connect(app.config["DATABASE"])
    with db:
        ids = [_constructed_series(db, v, t, s, n) for v, t, s, n, _ in SERIES]
    db.close()
    for study_id, (*_, verdict) in zip(ids, SERIES, strict=True):
        if verdict:
            assert _verdict(api, study_id, verdict).status_code == 201

    points = api.get("/api/accuracy?days=all").get_json()["series_operating_points"]
    assert [(p["model_version"], p["threshold"]) for p in points] == [
        (VERSION_A, 0.5),
        (VERSION_A, 0.7),
    ]
    recorded, site = points
    assert (recorded["bleeds"], recorded["normals"]) == (3, 4)  # the lone image left out
    assert recorded["sensitivity"]["successes"] == 2 and recorded["sensitivity"]["total"] == 3
    assert recorded["specificity"]["successes"] == 3 and recorded["specificity"]["total"] == 4
    assert recorded["lowest_bleed_score"] == 0.412345
    # Rounded down, so the value copied into the setting still flags that bleed.
    assert recorded["site_threshold"] == 0.4123
    # At 0.4123 only the normals at 0.2 and 0.39 stay quiet; 0.45 and 0.8 would alarm.
    assert (recorded["site_specificity"]["successes"], recorded["site_specificity"]["total"]) == (
        2,
        4,
    )
    assert recorded["enough_bleeds"] is False
    assert (site["bleeds"], site["normals"], site["site_threshold"]) == (1, 1, 0.9876)
    assert site["site_specificity"]["estimate"] == 1.0

    page = logged_in.get("/accuracy?days=all").get_data(as_text=True)
    table = page.split('id="operating-points"')[1].split("</table>")[0]
    assert table.count("<tr>") == 3  # header and two rows
    assert "0.4123" in table and "0.9876" in table
    assert "only 3 reviewed" in table and "HEMOTRIAGE_SERIES_THRESHOLD" in page


def test_a_site_threshold_decides_its_series_and_its_check_shows_the_missed_bleed(
    app_factory, storage, token_for, logged_in_as, upload, drain, cq500_series
):
    """The CQ500 bleed at a threshold set too high: missed, reported, and the check says so."""
    app = app_factory(storage, SERIES_THRESHOLD="0.95")
    api = api_client_of(app, token_for)
    study_id = upload(api, [(p.name, p.read_bytes()) for p in cq500_series]).get_json()["study_id"]
    drain(app.extensions[EXTENSION_KEY])
    detail = api.get(f"/api/studies/{study_id}").get_json()
    assert detail["threshold"] == 0.95
    recorded = get_model("mobilenet_v2").series_threshold
    assert recorded <= detail["score"] < 0.95  # flagged at the recorded threshold, not here
    assert detail["status"] == "negative"
    page = logged_in_as(*ADMIN, on=app).get(f"/studies/{study_id}").get_data(as_text=True)
    assert "validated on this site" in page
    assert _verdict(api, study_id, "false").get_json()["outcome"] == "false_negative"
    (point,) = api.get("/api/accuracy?days=all").get_json()["series_operating_points"]
    assert point["threshold"] == 0.95 and point["sensitivity"]["estimate"] == 0.0
    assert point["lowest_bleed_score"] == pytest.approx(detail["score"])
    assert point["site_threshold"] <= detail["score"] < point["site_threshold"] + 1e-4
