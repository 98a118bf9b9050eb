// Pages that show live numbers (the body's data-live, in seconds) fetch themselves again and swap <main> in
// place: the scroll position stays, nothing blinks, and the "live" button pauses it (a meta refresh could not
// be paused and reloads the whole page). Nothing is fetched while the tab is hidden or paused; a failed fetch
// leaves the page as it was and says so in the button's title. Pages that hold a form are never live.
(function () {
  var every = Number(document.body.getAttribute("data-live")) * 1000;
  var button = document.getElementById("live");
  if (!every || !button) return;
  var paused = false;
  button.addEventListener("click", function () {
    paused = !paused;
    button.setAttribute("aria-pressed", String(!paused));
    button.textContent = paused ? "updates paused" : "live";
  });
  function again() { setTimeout(tick, every); }
  function tick() {
    if (paused || document.hidden) return again();
    fetch(location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("main");
        var shown = document.getElementById("main");
        if (fresh && shown) shown.replaceWith(fresh);
        button.title = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (why) { button.title = "last update failed (" + why + "): showing older numbers"; })
      .then(again);
  }
  again();
})();
