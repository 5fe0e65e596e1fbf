// Drag-and-drop upload to /api/scans with the session's CSRF token.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("file-input");
  const chosen = document.getElementById("chosen");
  const result = document.getElementById("upload-result");
  const token = document.querySelector("meta[name=csrf-token]").content;
  let dropped = null;

  function show(files) {
    chosen.textContent = files.length + " file(s): " +
      Array.from(files).slice(0, 5).map(function (f) { return f.name; }).join(", ") +
      (files.length > 5 ? ", …" : "");
  }

  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (e) {
    e.preventDefault();
    dropped = e.dataTransfer.files;
    show(dropped);
  });
  input.addEventListener("change", function () { dropped = null; show(input.files); });

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    const files = dropped || input.files;
    if (!files || files.length === 0) { result.textContent = "Choose files first."; return; }
    const body = new FormData();
    Array.from(files).forEach(function (f) { body.append("files", f, f.name); });
    const label = document.getElementById("study-label").value.trim();
    if (label) body.append("study", label);
    body.append("priority", document.getElementById("priority").value);
    result.textContent = "Uploading " + files.length + " file(s)…";
    result.className = "upload-result";
    fetch("/api/scans", { method: "POST", body: body, headers: { "X-CSRF-Token": token } })
      .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
      .then(function (pair) {
        const status = pair[0], data = pair[1];
        if (status === 201) {
          result.className = "upload-result ok";
          result.replaceChildren("Accepted into ");
          data.study_ids.forEach(function (id, i) {
            if (i > 0) result.append(", ");
            const a = document.createElement("a");
            a.href = "/studies/" + id;
            a.textContent = "study " + id;
            result.append(a);
          });
          result.append(data.duplicates ? " (" + data.duplicates + " duplicate file(s) skipped)." : ".");
          form.reset();
          dropped = null;
          chosen.textContent = "";
        } else {
          result.className = "upload-result error";
          result.textContent = "Refused (" + status + " " + data.error + "): " + data.message;
        }
      })
      .catch(function (err) {
        result.className = "upload-result error";
        result.textContent = "Upload failed: " + err;
      });
  });
})();
