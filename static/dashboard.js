// The dashboard's only script of its own. No inline code and no eval, so it
// runs under a strict Content-Security-Policy; the page works without it.
//
// What it does, in order below:
// - the Add work form shows the fields of the kind chosen;
// - scheduled tasks count down to when they are due;
// - a bulk action's confirmation takes the keyboard when it appears;
// - keyboard shortcuts;
// - no polling while the tab is hidden;
// - a click wins over a poll: a poll sent before a click never shows its older
//   answer after the click's, and no poll goes out while a click is in flight;
// - the page says when it lost the server (polls fail, or go unanswered) and
//   keeps trying; it clears that by itself when the server answers again;
// - an error from a click clears once the queue has moved on.
(() => {
  "use strict";

  // CSS shows what only works with this script (the keyboard footer) under .js.
  document.documentElement.classList.add("js");

  const isPoll = (el) => el instanceof Element && el.hasAttribute("data-poll");
  const polls = () => document.querySelectorAll("[data-poll]");
  const pollNow = () => {
    if (window.htmx) for (const el of polls()) htmx.trigger(el, "poll-now");
  };
  // The page's poll interval (ms), from data-poll="…" on what polls.
  const interval = () => {
    const el = document.querySelector("[data-poll]");
    return Math.max(100, Number(el?.dataset.poll) || 1000);
  };
  const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

  // -- the Add work form ----------------------------------------------------------

  // Show only the chosen kind's parameter fields (each names its kinds in
  // data-kinds). A hidden field is disabled too, so it is not sent.
  const showFieldsOf = (select) => {
    for (const field of select.form.querySelectorAll("[data-kinds]")) {
      const on = field.dataset.kinds.split(" ").includes(select.value);
      field.hidden = !on;
      for (const input of field.querySelectorAll("input, select")) input.disabled = !on;
    }
  };
  const kindSelect = () => document.getElementById("add-kind");
  document.addEventListener("change", (event) => {
    if (event.target === kindSelect()) showFieldsOf(event.target);
  });
  // On load, and when the browser restores the page with the kind chosen before.
  for (const when of ["DOMContentLoaded", "pageshow"]) {
    window.addEventListener(when, () => kindSelect() && showFieldsOf(kindSelect()));
  }

  // -- countdowns -----------------------------------------------------------------

  // A scheduled task says when it is due as a time (the server's rows are reused
  // between polls); here that becomes "in 8s", counted down every second.
  const inWords = (ms) => {
    const s = Math.ceil(ms / 1000);
    if (s < 60) return `in ${s}s`;
    if (s < 3600) return `in ${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    return `in ${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
  };
  const countDown = () => {
    const now = Date.now();
    for (const el of document.querySelectorAll("time.countdown[data-due]")) {
      const left = Number(el.dataset.due) - now;
      if (!el.title) el.title = el.textContent;
      el.textContent = left > 0 ? inWords(left) : "now";
    }
  };
  setInterval(countDown, 1000);
  document.addEventListener("htmx:after:swap", countDown);
  window.addEventListener("DOMContentLoaded", countDown);

  // -- a bulk action's confirmation ---------------------------------------------

  // It appears above the list of tasks: take the keyboard to it (Confirm, Back beside).
  document.addEventListener("htmx:after:swap", (event) => {
    const box = document.getElementById("bulk-confirm");
    if (box && event.detail.ctx?.target === box) box.querySelector("button, a")?.focus();
  });

  // -- keys -------------------------------------------------------------------

  const typing = (el) =>
    el instanceof HTMLElement &&
    (el.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(el.tagName));

  // A key presses the enabled button whose data-shortcut names it; once per
  // press: a held key repeats, and would add a task per repeat.
  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) return;
    const key = { "=": "+", "_": "-", "−": "-" }[event.key] || event.key.toLowerCase();
    const button = [...document.querySelectorAll("[data-shortcut]")].find(
      (b) => b.dataset.shortcut === key && !b.disabled
    );
    if (!button) return;
    event.preventDefault();
    if (!event.repeat) button.click();
  });

  // -- polls, clicks and their order ---------------------------------------------

  let inFlight = 0; // clicks sent and not yet answered
  let clicks = 0; // clicks sent since the page loaded
  let fresh = false; // the next poll asks for everything, whatever tag it holds

  document.addEventListener("htmx:before:request", (event) => {
    const ctx = event.detail.ctx;
    if (isPoll(event.target)) {
      // A hidden tab does not poll; nor does a page waiting for a click's answer
      // (the answer brings the regions; a poll now could only bring older ones).
      if (document.hidden || inFlight > 0) {
        event.preventDefault();
        return;
      }
      ctx.dashboardClicks = clicks;
    } else {
      inFlight += 1;
      clicks += 1;
      ctx.dashboardClick = true;
    }
  });

  document.addEventListener("htmx:finally:request", (event) => {
    const ctx = event.detail.ctx;
    if (ctx?.dashboardClick) {
      ctx.dashboardClick = false;
      inFlight -= 1;
    }
  });

  // A poll sent before a click may be answered after it, with the state from
  // before the click: drop it, or the page would show the click undone.
  document.addEventListener("htmx:before:swap", (event) => {
    const ctx = event.detail.ctx;
    if (ctx?.dashboardClicks !== undefined && ctx.dashboardClicks !== clicks) {
      event.preventDefault();
    }
  });

  // After the server was lost, ask for everything once: a restarted server
  // sharing a file may hold the same tag, and what the page shows is older.
  document.addEventListener("htmx:config:request", (event) => {
    if (fresh && isPoll(event.target)) {
      fresh = false;
      delete event.detail.ctx.request.headers["HX-PTag"];
    }
  });

  // Shown again: poll at once instead of waiting for the next tick.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) return;
    lastAnswer = Date.now(); // hidden, it did not ask: its silence is not the server's
    pollNow();
  });

  // -- a lost server ------------------------------------------------------------------

  let lastAnswer = Date.now(); // when a poll was last answered well
  let failures = 0; // polls failed since
  let problem = null; // what the last failure was
  let lost = false;
  let freshnessText = null;

  const show = () => {
    const banner = document.getElementById("connection");
    const freshness = document.getElementById("freshness");
    document.body.classList.toggle("lost", lost);
    if (freshness) {
      freshnessText ??= freshness.textContent;
      freshness.textContent = lost ? "not updating" : freshnessText;
    }
    if (!banner) return;
    banner.hidden = !lost;
    if (!lost) {
      banner.textContent = "";
      return;
    }
    const since = clock(lastAnswer);
    const every = `${interval() / 1000}s`;
    const wasClosing = document.querySelector(".flag.closed") !== null;
    banner.textContent =
      (problem === "network"
        ? wasClosing
          ? `The server shut down at ${since}.`
          : `Lost the server at ${since}: it does not answer.`
        : `The server answers with errors since ${since} (${problem}).`) +
      ` What the page shows is from then. Trying again every ${every}…`;
  };

  const answered = () => {
    lastAnswer = Date.now();
    failures = 0;
    problem = null;
    if (lost) {
      lost = false;
      show();
      fresh = true;
      pollNow();
    }
  };

  const check = () => {
    if (lost || document.hidden || !document.querySelector("[data-poll]")) return;
    const silent = Date.now() - lastAnswer;
    // Two polls failed in a row; or none answered for three intervals (a poll
    // can hang on a network that drops packets; htmx gives up on it later).
    if (failures >= 2 || silent > Math.max(3 * interval(), 3000)) {
      problem ??= "network";
      lost = true;
      show();
    }
  };

  const failed = (what) => {
    failures += 1;
    problem = what;
    check();
  };

  document.addEventListener("htmx:after:request", (event) => {
    const ctx = event.detail.ctx;
    if (!isPoll(event.target) || !ctx?.response) return;
    if (ctx.response.status >= 500) failed(`HTTP ${ctx.response.status}`);
    else answered();
  });

  document.addEventListener("htmx:error", (event) => {
    const ctx = event.detail.ctx;
    if (!ctx || ctx.response) return; // a fault in the swap, not the network
    if (isPoll(event.target)) {
      failed("network");
      return;
    }
    // A click that never reached the server (or was given up: base.html's
    // defaultTimeout): say so where its answer would go.
    const errors = document.getElementById("form-errors");
    if (errors) {
      const p = document.createElement("p");
      p.className = "error";
      p.textContent =
        "That click did not reach the server, or its answer did not come back; " +
        "see the queue once the page is updating again.";
      errors.replaceChildren(p);
    }
  });

  // -- errors that clear --------------------------------------------------------------

  // An error answers a click: "queue is full" is true when it is shown, not
  // for ever. It stays at least HOLD ms, then goes once a poll has brought a
  // changed state (the queue moved on); a click that succeeds clears it at once.
  const HOLD = () => Math.max(4000, 3 * interval());
  let errorText = "";
  let errorSince = 0;
  let movedOn = false;

  const noteError = () => {
    const text = document.getElementById("form-errors")?.textContent.trim() ?? "";
    if (text !== errorText) {
      errorText = text;
      errorSince = Date.now();
      movedOn = false;
    }
  };

  document.addEventListener("htmx:after:swap", (event) => {
    noteError();
    const ctx = event.detail.ctx;
    if (errorText && isPoll(ctx?.sourceElement) && ctx.response?.status === 200) movedOn = true;
  });

  const clearStaleError = () => {
    noteError();
    if (!errorText || !movedOn || Date.now() - errorSince < HOLD()) return;
    document.getElementById("form-errors")?.replaceChildren();
    noteError();
  };

  setInterval(() => {
    check();
    clearStaleError();
  }, 250);
})();
