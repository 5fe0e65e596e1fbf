// Live updates on every page: one EventSource on /api/stream, the flagged-study
// banner, a WebAudio tone and a browser Notification for each new alert.
// Other scripts listen for "hemotriage:study" events on document.
(function () {
  "use strict";
  const banner = document.getElementById("alert-banner");
  const bannerText = document.getElementById("alert-text");
  const connection = document.getElementById("connection");
  const enableButton = document.getElementById("enable-alerts");
  let audio = null;

  function beep() {
    if (!audio) return;
    // Three short 880 Hz tones: audible over ward noise, distinct from monitor alarms.
    const start = audio.currentTime;
    for (let i = 0; i < 3; i += 1) {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.frequency.value = 880;
      gain.gain.setValueAtTime(0.3, start + i * 0.3);
      gain.gain.setValueAtTime(0, start + i * 0.3 + 0.18);
      osc.connect(gain).connect(audio.destination);
      osc.start(start + i * 0.3);
      osc.stop(start + i * 0.3 + 0.2);
    }
  }

  function notify(study) {
    if (!("Notification" in window) || Notification.permission !== "granted") return;
    // OS notifications show on locked screens and in notification centres: the study
    // number only, never its label (a SeriesDescription or file name can name the patient).
    const n = new Notification("HemoTriage", {
      body: "Study " + study.id + " flagged: possible hemorrhage",
      requireInteraction: true,
      tag: "study-" + study.id,
    });
    n.onclick = function () { window.focus(); window.location = "/studies/" + study.id; };
  }

  function renderBanner(flagged) {
    bannerText.replaceChildren();
    if (flagged.length === 0) { banner.hidden = true; return; }
    flagged.forEach(function (study, i) {
      if (i > 0) bannerText.append(", ");
      const link = document.createElement("a");
      link.href = "/studies/" + study.id;
      link.className = "alert-link";
      link.dataset.study = study.id;
      link.textContent = "study " + study.id + " (" + study.label + ", score " +
        (study.score || 0).toFixed(2) + ")";
      bannerText.append(link);
    });
    bannerText.append(" — open and acknowledge.");
    banner.hidden = false;
  }

  const RETRY_MS = 3000;
  let retryTimer = null;

  function refresh(alertId) {
    return fetch("/api/studies", { headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) {
        connection.hidden = source !== null && source.readyState === EventSource.OPEN;
        // Shadow mode (a validation period): flags are recorded, never announced.
        renderBanner(data.shadow_mode ? [] :
          data.studies.filter(function (s) { return s.status === "flagged"; }));
        if (alertId !== undefined && !data.shadow_mode) {
          const study = data.studies.find(function (s) { return s.id === alertId; });
          if (study) { beep(); notify(study); }
        }
        document.dispatchEvent(new CustomEvent("hemotriage:worklist", { detail: data }));
      })
      .catch(function (status) {
        if (status === 401) { window.location = "/auth/login"; return; }
        // A triage screen must never sit on a stale list: say so and try again.
        connection.hidden = false;
        clearTimeout(retryTimer);
        retryTimer = setTimeout(function () { refresh(alertId); }, RETRY_MS);
      });
  }

  enableButton.addEventListener("click", function () {
    // Browsers start audio and ask for notifications only after a user gesture.
    audio = audio || new (window.AudioContext || window.webkitAudioContext)();
    audio.resume();
    if ("Notification" in window && Notification.permission === "default") {
      Notification.requestPermission();
    }
    enableButton.textContent = "Sound on";
    beep();
  });

  let source = null;

  function start() {
    source = new EventSource("/api/stream");
    // Events sent while the stream was down are gone: redraw from the server on every (re)connect.
    source.addEventListener("open", function () { connection.hidden = true; refresh(); });
    source.addEventListener("error", function () { connection.hidden = false; });
    source.addEventListener("study", function (event) {
      const data = JSON.parse(event.data);
      document.dispatchEvent(new CustomEvent("hemotriage:study", { detail: data }));
      refresh(data.alert ? data.id : undefined);
    });
    refresh();
  }

  // The page's own scripts (worklist.js, study.js) come after this one and listen for the
  // events it sends: start once every script has run, or the first list can be drawn to
  // nobody (a fetch can finish while the next script is still downloading).
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
