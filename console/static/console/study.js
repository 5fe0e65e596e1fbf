// Study view: browse slices, toggle the Grad-CAM overlay, reload when the study changes.
(function () {
  "use strict";
  const main = document.getElementById("main-slice");
  const caption = document.getElementById("main-caption");
  const cam = document.getElementById("cam-toggle");

  function source() {
    const base = "/studies/" + main.dataset.study + "/slices/" + main.dataset.slice;
    return cam && cam.checked ? base + "/cam.png" : base + ".png";
  }

  // A study past the retention period has no image to show (console/retention.py).
  if (main) document.querySelectorAll(".show-slice").forEach(function (button) {
    button.addEventListener("click", function () {
      main.dataset.slice = button.dataset.slice;
      caption.textContent = button.dataset.caption;
      main.src = source();
    });
  });
  if (cam) cam.addEventListener("change", function () { main.src = source(); });

  document.addEventListener("hemotriage:study", function (e) {
    if (main && String(e.detail.id) === main.dataset.study) window.location.reload();
  });
})();
