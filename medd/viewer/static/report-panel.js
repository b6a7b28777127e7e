/* The report panel's draft: saved to the viewer node every few seconds while it changes, when the text
 * box loses focus and when the page is hidden or left, so that a reload, the idle lock or an expired
 * session loses nothing. When a save is refused because the session ended, the unsaved text is kept in
 * this tab (sessionStorage, gone when the tab closes) and put back after the radiologist logs in again,
 * if the server's draft did not change meanwhile. */
(function () {
  'use strict';
  var form = document.getElementById('report-form');
  if (!form) { return; }
  var text = document.getElementById('report-text');
  var status = document.getElementById('draft-status');
  var csrf = form.querySelector('input[name=csrf]').value;
  var url = form.dataset.draftUrl;
  var key = 'medd-draft:' + form.dataset.studyUid;
  var PERIOD_MS = 3000;
  var savedText = text.value;
  var savedAt = form.dataset.draftSavedAt || '';
  var sending = false;
  var signing = false;
  var stale = false;  // the study's report changed since this page was shown: reload before saving again

  function show(message, bad) {
    status.textContent = message;
    status.className = bad ? 'hint error' : 'hint';
  }

  function keepInTab() {
    try { sessionStorage.setItem(key, JSON.stringify({ text: text.value, base: savedAt })); } catch (e) { /* full */ }
  }

  function body() {
    var data = new URLSearchParams();
    data.set('csrf', csrf);
    data.set('text', text.value);
    data.set('reports', form.dataset.reports);
    return data;
  }

  function save() {
    if (signing || stale || sending || text.value === savedText) { return; }
    var sent = text.value;
    sending = true;
    fetch(url, { method: 'POST', body: body(), credentials: 'same-origin', headers: { Accept: 'application/json' } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (answer) {
        savedText = sent;
        savedAt = answer.saved_at;
        sessionStorage.removeItem(key);
        show('Draft saved ' + new Date(answer.saved_at).toLocaleTimeString());
      })
      .catch(function (code) {
        keepInTab();
        if (code === 401) {
          show('Your session has ended: log in again to save (the text is kept in this tab).', true);
          if (!document.getElementById('draft-login')) {
            var a = document.createElement('a');
            a.id = 'draft-login';
            a.href = form.dataset.loginUrl;
            a.textContent = ' Log in';
            status.appendChild(a);
          }
        } else if (code === 409) {
          stale = true;
          show('This study\'s report was signed meanwhile: copy your text, then reload the page.', true);
        } else {
          show('Draft not saved yet (' + code + '); retrying.', true);
        }
      })
      .then(function () { sending = false; });
  }

  function saveOnLeaving() {
    if (signing || stale || text.value === savedText) { return; }
    keepInTab();  // dropped at the next load if this reached the server (its draft is then newer)
    navigator.sendBeacon(url, body());
  }

  var kept = null;
  try { kept = JSON.parse(sessionStorage.getItem(key) || 'null'); } catch (e) { kept = null; }
  sessionStorage.removeItem(key);
  if (kept && kept.base === savedAt && kept.text !== text.value) {
    text.value = kept.text;
    show('Unsaved text from before you logged in again was put back.');
    save();
  } else if (savedAt) {
    show('Draft of ' + new Date(savedAt).toLocaleString());
  }

  setInterval(save, PERIOD_MS);
  text.addEventListener('blur', save);
  window.addEventListener('blur', save);
  document.addEventListener('visibilitychange', function () {
    if (document.visibilityState === 'hidden') { saveOnLeaving(); }
  });
  window.addEventListener('pagehide', saveOnLeaving);
  form.addEventListener('submit', function () { signing = true; sessionStorage.removeItem(key); });
}());
