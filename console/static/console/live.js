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
  // The flagged studies of the list drawn last: a flag not among them is new and sounds,
  // whether its own event came or was lost while the stream was down. null before the
  // first list: flags already there when the page opens show in the banner, silently.
  let flaggedShown = null;
  let requested = 0;
  let drawn = 0;

  function refresh() {
    const request = ++requested;
    return fetch("/api/studies", { headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) {
        if (request < drawn) return; // an older list that came late: never draw it over a newer one
        drawn = request;
        connection.hidden = source !== null && source.readyState === EventSource.OPEN;
        // Shadow mode (a validation period): flags are recorded, never announced.
        const flagged = data.shadow_mode ? [] :
          data.studies.filter(function (s) { return s.status === "flagged"; });
        renderBanner(flagged);
        if (flaggedShown !== null) {
          const fresh = flagged.filter(function (s) { return !flaggedShown.has(s.id); });
          if (fresh.length > 0) beep();
          fresh.forEach(notify);
        }
        flaggedShown = new Set(flagged.map(function (s) { return s.id; }));
        document.dispatchEvent(new CustomEvent("hemotriage:worklist", { detail: data }));
      })
      .catch(function (status) {
        if (status === 401) { window.location = "/auth/login"; return; }
        // A triage screen must never sit on a stale list: say so and try again.
        connection.hidden = false;
        clearTimeout(retryTimer);
        retryTimer = setTimeout(refresh, RETRY_MS);
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

  function connect() {
    source = new EventSource("/api/stream");
    // Events sent while the stream was down are gone: redraw from the server on every (re)connect.
    source.addEventListener("open", function () { connection.hidden = true; refresh(); });
    source.addEventListener("error", function () {
      connection.hidden = false;
      // The browser retries a dropped stream by itself, but gives up on a refused one (every
      // stream slot taken, a proxy's 502 while the console restarts, a session that ended):
      // redraw (which also sends an ended session to the login) and open a new one.
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(function () { refresh(); connect(); }, RETRY_MS);
      }
    });
    source.addEventListener("study", function (event) {
      const data = JSON.parse(event.data);
      document.dispatchEvent(new CustomEvent("hemotriage:study", { detail: data }));
      refresh();
    });
  }

  function start() {
    connect();
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
