// The reading room's idle lock, and the POST helper its pages' scripts share (window.medd).
// After [reading_room] idle_lock minutes without input (body data-idle-lock, in seconds) the session is
// locked on the node (POST /lock) and an overlay covers the page; the page is not reloaded, so what it
// holds stays. Typing the password again (POST /unlock) removes the overlay. A 423 from any call (the
// session was locked in another tab) shows the overlay too.
// In OHIF's page (/ohif/...) the settings are the script tag's own data attributes (medd writes them into
// OHIF's index.html). Framed by a reading-room page of this site (the reading screen's iframe), the page's
// input counts as the framing page's activity, whose timer and overlay lock both; opened alone, it locks itself.
"use strict";
(() => {
  const body = document.body;
  const script = document.currentScript;
  const settings = script && script.dataset.csrf ? script.dataset : body.dataset;
  const csrf = settings.csrf;
  if (!csrf) return;
  const idleMs = parseFloat(settings.idleLock || "0") * 1000;
  let last = Date.now();
  let locked = false;
  let overlay = null;

  const post = (url, fields) => fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": csrf, "Accept": "application/json"},
    body: new URLSearchParams(fields || {}),
  });

  let covered = [];  // what the overlay made inert

  function show() {
    locked = true;
    if (overlay) return;
    overlay = document.createElement("div");
    overlay.id = "idle-lock";
    overlay.className = "idle-lock";
    overlay.setAttribute("role", "dialog");
    overlay.setAttribute("aria-modal", "true");
    overlay.setAttribute("aria-labelledby", "idle-lock-title");
    const form = document.createElement("form");
    const title = document.createElement("h1");
    title.id = "idle-lock-title";
    title.textContent = "Locked";
    const text = document.createElement("p");
    text.textContent = `The reading room of ${settings.user} locked after a while without input. ` +
      "Type your password to go on where you were.";
    const label = document.createElement("label");
    label.textContent = "Password";
    const input = document.createElement("input");
    input.type = "password";
    input.id = "idle-lock-password";
    input.autocomplete = "current-password";
    input.required = true;
    label.append(input);
    const error = document.createElement("p");
    error.id = "idle-lock-error";
    error.className = "error";
    error.setAttribute("role", "alert");
    const button = document.createElement("button");
    button.type = "submit";
    button.id = "idle-lock-unlock";
    button.textContent = "Unlock";
    form.append(title, text, label, error, button);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      button.disabled = true;
      try {
        const answer = await post("/unlock", {password: input.value});
        const said = answer.ok ? {} : await answer.json().catch(() => ({}));
        if (answer.ok) {
          hide();
        } else if (answer.status === 401 && /session/.test(said.error || "")) {
          // The session itself ended (expired, or logged out elsewhere): log in again.
          location.assign("/?next=" + encodeURIComponent(location.pathname + location.search));
        } else {
          error.textContent = said.error || "Wrong password.";
          input.value = "";
          input.focus();
        }
      } catch (e) {
        error.textContent = "The reading room cannot be reached; try again.";
      } finally {
        button.disabled = false;
      }
    });
    overlay.append(form);
    // Inline too: OHIF's page has not the reading room's style sheet (CSSOM styles pass its policy).
    Object.assign(overlay.style, {position: "fixed", inset: "0", zIndex: "2147483000", display: "grid",
                                  placeItems: "center", background: "rgba(8, 10, 12, .92)", color: "#e8eaed"});
    covered = [...body.children].filter((el) => !el.inert);
    for (const el of covered) el.inert = true;
    body.append(overlay);
    input.focus();
  }

  function hide() {
    locked = false;
    last = Date.now();
    if (overlay) overlay.remove();
    overlay = null;
    for (const el of covered) el.inert = false;
    covered = [];
    window.dispatchEvent(new CustomEvent("medd:unlocked"));
  }

  async function lock() {
    show();
    try { await post("/lock"); } catch (e) { /* the overlay stays; the next call finds the session as it is */ }
  }

  // The reading-room page framing this one (same origin), if any: its timer is the one that counts.
  const host = () => {
    try {
      const framing = window.parent !== window && window.parent.medd;
      return framing && typeof framing.activity === "function" ? framing : null;
    } catch (e) {
      return null;  // framed by another origin: the page cannot be framed so (frame-ancestors 'self')
    }
  };
  const active = () => {
    const framing = host();
    if (framing) framing.activity();
    else if (!locked) last = Date.now();
  };
  for (const name of ["keydown", "mousedown", "mousemove", "wheel", "touchstart", "input"]) {
    window.addEventListener(name, active, {capture: true, passive: true});
  }
  if (idleMs > 0) {
    setInterval(() => {
      if (!locked && !host() && Date.now() - last >= idleMs) lock();
    }, Math.min(1000, idleMs / 4));
  }

  window.medd = {
    csrf,
    post,
    isLocked: () => locked,
    // Input in a page this one frames (OHIF in the reading screen).
    activity: () => { if (!locked) last = Date.now(); },
    // A call answered 423: the session was locked (in another tab, or before this page noticed).
    lockedElsewhere: () => show(),
  };
})();
