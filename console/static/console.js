// Live refresh: pages whose <body data-refresh="N"> is set reload their <main> every N seconds,
// in place, while the tab is visible. Without JavaScript the pages work as they are.
(function () {
  "use strict";
  function schedule() {
    var seconds = parseFloat(document.body.dataset.refresh || "");
    if (!(seconds > 0)) { return; }
    window.setTimeout(refresh, seconds * 1000);
  }
  function refresh() {
    if (document.hidden) { schedule(); return; }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
      .then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.getElementById("live");
        if (fresh) { document.getElementById("live").replaceWith(fresh); }
        document.body.dataset.refresh = page.body.dataset.refresh || "";
      })
      .catch(function () { /* keep what is shown; try again later */ })
      .then(schedule);
  }
  document.addEventListener("DOMContentLoaded", schedule);
})();
