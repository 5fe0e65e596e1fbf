// The worklist table, redrawn from /api/studies whenever live.js fetches it.
(function () {
  "use strict";
  const body = document.getElementById("worklist-rows");
  const workerStatus = document.getElementById("worker-status");

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.append(td);
    return td;
  }

  function minutes(seconds) {
    if (seconds < 90) return Math.round(seconds) + " s";
    return Math.round(seconds / 60) + " min";
  }

  function draw(data) {
    const now = Date.now() / 1000;
    body.replaceChildren();
    if (data.studies.length === 0) {
      const tr = document.createElement("tr");
      cell(tr, "No studies yet. Upload scans or drop them in the inbox folder.").colSpan = 7;
      body.append(tr);
    }
    data.studies.forEach(function (s) {
      const tr = document.createElement("tr");
      tr.className = "row-" + s.status;
      tr.dataset.study = s.id;
      const p = s.priority;
      cell(tr, p.total.toFixed(0)).title = "flagged " + p.flagged + " + unreadable " + p.failed +
        " + score " + p.score.toFixed(1) + " + waiting " + p.waiting.toFixed(1);
      cell(tr, s.status, "status status-" + s.status);
      const study = cell(tr, "");
      const link = document.createElement("a");
      link.href = "/studies/" + s.id;
      link.textContent = "#" + s.id + " " + s.label;
      study.append(link);
      cell(tr, s.score === null ? "–" : s.score.toFixed(3) + " / " + s.threshold.toFixed(2));
      const counts = s.slices;
      const total = Object.values(counts).reduce(function (a, b) { return a + b; }, 0);
      const done = (counts.classified || 0) + (counts.failed || 0);
      cell(tr, done + "/" + total + (counts.failed ? " (" + counts.failed + " failed)" : ""));
      cell(tr, minutes(now - s.received_at));
      cell(tr, s.time_to_alert_s === null ? "–" : s.time_to_alert_s.toFixed(1) + " s");
      body.append(tr);
    });
    const w = data.worker;
    workerStatus.textContent = w.classifier_ready ? "Classifier ready." :
      "Classifier unavailable" + (w.backoff_s ? ", retrying in " + w.backoff_s + " s" : "") +
      (w.last_error ? ": " + w.last_error : "") + ". Uploads are queued and kept.";
    workerStatus.className = "worker-status " + (w.classifier_ready ? "ok" : "down");
  }

  document.addEventListener("hemotriage:worklist", function (e) { draw(e.detail); });
})();
