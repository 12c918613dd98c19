// The dashboard's only script of its own: keyboard shortcuts, and no polling
// while the tab is hidden. No inline code and no eval, so it runs under a
// strict Content-Security-Policy; the page works without it.
(() => {
  "use strict";

  const typing = (el) =>
    el instanceof HTMLElement &&
    (el.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(el.tagName));

  // A key presses the enabled button whose data-shortcut names it.
  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) return;
    const key = { "=": "+", "_": "-", "−": "-" }[event.key] || event.key.toLowerCase();
    const button = [...document.querySelectorAll("[data-shortcut]")].find(
      (b) => b.dataset.shortcut === key && !b.disabled
    );
    if (!button) return;
    event.preventDefault();
    button.click();
  });

  // A hidden tab does not poll: the request is dropped before it is sent.
  document.addEventListener("htmx:before:request", (event) => {
    if (document.hidden && event.target.hasAttribute?.("data-poll")) event.preventDefault();
  });

  // Shown again: poll at once instead of waiting for the next tick.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden || !window.htmx) return;
    for (const el of document.querySelectorAll("[data-poll]")) htmx.trigger(el, "poll-now");
  });
})();
