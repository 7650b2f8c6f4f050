// Backstop's dashboard: keeps a live page's main part fresh without reloading the page.
// Every element with data-live="URL" is refetched from URL (relative to the page) every
// data-every milliseconds and its content replaced. Without JavaScript the pages still work;
// they only stay as they were loaded.
"use strict";
(function () {
  document.documentElement.dataset.script = "on";
  function poll(element) {
    const every = Number(element.dataset.every) || 2000;
    const url = new URL(element.dataset.live, window.location.href);
    async function tick() {
      if (document.hidden) {
        // A tab nobody looks at costs the database nothing.
        window.setTimeout(tick, every);
        return;
      }
      try {
        const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
        if (response.redirected) {
          // The session ended: let the server send the whole page (the login form).
          window.location.reload();
          return;
        }
        if (response.ok) {
          const html = await response.text();
          // Not while the user is picking text, typing or opening a traceback.
          const busy = element.contains(document.activeElement) && document.activeElement !== document.body;
          const selecting = String(window.getSelection()).length > 0;
          const open = element.querySelector("details[open]");
          if (!busy && !selecting && !open) {
            element.innerHTML = html;
            element.dataset.updated = String(Date.now());
          }
        }
      } catch (error) {
        // The server is restarting or the network blinked: try again at the next tick.
      }
      window.setTimeout(tick, every);
    }
    window.setTimeout(tick, every);
  }
  document.querySelectorAll("[data-live]").forEach(poll);
})();
