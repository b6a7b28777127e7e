// The worklist's script: refreshes the table from GET /api/worklist (same query string) without a reload,
// opens a study through POST /api/studies/{uid}/open (asking first when someone else is reading it), and
// "Next unread" through POST /api/next-unread. The page works without it, minus these.
"use strict";
(() => {
  const medd = window.medd;
  const table = document.getElementById("worklist");
  const empty = document.getElementById("worklist-empty");
  const message = document.getElementById("worklist-message");
  const refreshMs = parseFloat(document.body.dataset.refresh || "5") * 1000;
  if (!medd || !table) return;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "className") node.className = value;
      else if (key.startsWith("data-") || key === "title" || key === "href") node.setAttribute(key, value);
      else node[key] = value;
    }
    node.append(...children.filter((c) => c !== null && c !== undefined && c !== ""));
    return node;
  }

  // The same cells as medd/viewer/web/worklist.py row_tag.
  function row(d) {
    const priority = el("span", {className: `priority ${d.priority.toLowerCase() || "none"}`}, d.priority || "—");
    const centre = el("td", {className: "centre"}, d.centre);
    if (!d.centre_registered) {
      centre.title = "as the images state it (Institution Name); central has not named the registered centre";
    }
    const mark = d.complete ? el("span", {className: "complete"}, "✓ complete")
      : el("span", {className: "incomplete"}, "receiving…");
    const status = el("td", {className: "status"}, el("span", {className: `badge ${d.status}`}, d.status), " ",
      d.being_read_by.length ? el("span", {className: "being-read"}, `being read by ${d.being_read_by.join(", ")}`) : "");
    return el("tr", {className: `study ${d.status}`, "data-study-uid": d.study_uid,
                     "data-complete": d.complete ? "yes" : "no"},
      el("td", {}, priority),
      el("td", {}, el("a", {href: d.study_url, className: "patient"}, d.patient), el("br"),
         el("span", {className: "patient-id"}, d.patient_id)),
      el("td", {}, d.age_sex),
      el("td", {}, d.accession),
      el("td", {}, d.modalities),
      centre,
      el("td", {}, d.study_date, el("br"), el("span", {className: "description"}, d.description)),
      el("td", {className: "received"}, d.received),
      el("td", {className: "images num"}, `${d.images} / ${d.expected}`, " ", mark),
      status,
      el("td", {}, el("a", {href: d.images_url, className: "open-images button", "data-study-uid": d.study_uid}, "Images"),
         " ", el("a", {href: d.study_url, className: "open-report button secondary"}, "Report")),
    );
  }

  function render(data) {
    const tbody = table.tBodies[0];
    // Keep the keyboard focus on the same link of the same study across a refresh.
    const focused = document.activeElement;
    let keep = null;
    if (focused && tbody.contains(focused)) {
      keep = [focused.closest("tr").dataset.studyUid, focused.className];
    }
    tbody.replaceChildren(...data.studies.map(row));
    table.hidden = data.studies.length === 0;
    empty.hidden = data.studies.length !== 0;
    if (keep) {
      const again = [...tbody.rows].find((r) => r.dataset.studyUid === keep[0]);
      const link = again && [...again.querySelectorAll("a")].find((a) => a.className === keep[1]);
      if (link) link.focus();
    }
  }

  async function poll() {
    try {
      if (!medd.isLocked() && !document.hidden) {
        const answer = await fetch("/api/worklist" + location.search,
                                   {credentials: "same-origin", headers: {"Accept": "application/json"}});
        if (answer.status === 423) medd.lockedElsewhere();
        else if (answer.status === 401) location.assign("/?next=" + encodeURIComponent(location.pathname + location.search));
        else if (answer.ok) render(await answer.json());
      }
    } catch (e) {
      // The node is unreachable for a moment: the next poll tries again.
    }
    setTimeout(poll, refreshMs);
  }

  function say(text) { message.textContent = text; }

  async function answerOf(response) {
    if (response.status === 423) { medd.lockedElsewhere(); return null; }
    return response.json().catch(() => ({}));
  }

  async function open(studyUid, confirmed) {
    const response = await medd.post(`/api/studies/${encodeURIComponent(studyUid)}/open`,
                                      confirmed ? {confirmed: "yes"} : {});
    const answer = await answerOf(response);
    if (answer === null) return;
    if (response.status === 409) {
      const who = answer.being_read_by.join(", ");
      if (window.confirm(`This study is being read by ${who}. Read it as well?`)) await open(studyUid, true);
      else say(`Left for ${who}.`);
      return;
    }
    if (!response.ok) { say(answer.error || "The study cannot be opened."); return; }
    location.assign(answer.url);
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a.open-images");
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    open(link.dataset.studyUid, false);
  });

  document.getElementById("next-unread").addEventListener("click", async () => {
    const response = await medd.post("/api/next-unread");
    const answer = await answerOf(response);
    if (answer === null) return;
    if (!response.ok) { say(answer.error || "No unread study waits."); return; }
    location.assign(answer.url);
  });

  setTimeout(poll, refreshMs);
})();
