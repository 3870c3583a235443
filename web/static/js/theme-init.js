// Runs before the first paint (a classic script in <head>), so a chosen theme never
// flashes the other one. The rest of the theme logic lives in theme.js.
(function () {
  try {
    var settings = JSON.parse(localStorage.getItem("rill.v1.settings") || "{}");
    if (settings.theme === "light" || settings.theme === "dark") {
      document.documentElement.dataset.theme = settings.theme;
    }
  } catch (error) {
    // Unreadable settings: the system theme applies.
  }
})();
