/*
 * The web UI's behaviour that htmx attributes cannot express. A static file, loaded after htmx and its sse
 * extension: the page's content security policy allows no inline script, no inline handler and no eval.
 *
 * - the connection indicator (live / reconnecting / closed), from the sse extension's events;
 * - resuming a stream: EventSource resends its last event id by itself when it reconnects; when the extension
 *   has to make a new EventSource (the server refused a reconnect), the id goes along as `last_event_id`, so the
 *   page gets the rest of the session instead of all of it again;
 * - the task box: disabled while a task runs (the server's #run-state says which), Enter sends, cleared once
 *   the task is accepted;
 * - errors (problem+json) shown in the alert line; a 401 goes back to the sign-in page;
 * - keeping the newest events in view while the reader is at the bottom.
 */
(function () {
  'use strict';

  const lastIds = new Map(); // stream URL -> the last event id this page swapped in from it
  let submitting = false;
  let following = true;
  let alertTimer = 0;

  function setConnection(state, text) {
    const conn = document.getElementById('conn');
    if (conn) {
      conn.dataset.state = state;
      conn.textContent = text;
    }
  }

  htmx.createEventSource = function (url) {
    const last = lastIds.get(url);
    let target = url;
    if (last) {
      const resumed = new URL(url, window.location.href);
      resumed.searchParams.set('last_event_id', last);
      target = resumed.pathname + resumed.search;
    }
    const source = new EventSource(target, { withCredentials: true });
    // The extension sets onerror to log a console error and, once the source is closed, to make a new one. A
    // stream the server ended (a slow client, a restart) is reconnected by the browser itself, so only a closed
    // source reaches the extension's handler.
    let extensionHandler = null;
    Object.defineProperty(source, 'onerror', {
      get: function () { return extensionHandler; },
      set: function (handler) { extensionHandler = handler; },
    });
    source.addEventListener('error', function (event) {
      if (source.readyState === EventSource.CONNECTING) {
        setConnection('reconnecting', 'reconnecting…');
        return;
      }
      setConnection('closed', 'closed; retrying…');
      if (extensionHandler) {
        extensionHandler.call(source, event);
      }
    });
    return source;
  };

  // A session view that is (re)built starts with an empty timeline: its stream must replay from the start.
  document.addEventListener('htmx:beforeProcessNode', function (event) {
    const url = event.target.getAttribute && event.target.getAttribute('sse-connect');
    if (url) {
      lastIds.delete(url);
      setConnection('connecting', 'connecting…');
    }
  });

  document.addEventListener('htmx:sseOpen', function () {
    setConnection('live', 'live');
  });

  document.addEventListener('htmx:sseClose', function () {
    setConnection('closed', 'closed');
  });

  document.addEventListener('htmx:sseBeforeMessage', function (event) {
    const message = event.detail;
    // A failed task's frames are named `error`, as is EventSource's own event for a lost connection, which
    // carries no data: only a message is swapped in.
    if (!(message instanceof MessageEvent)) {
      event.preventDefault();
      return;
    }
    const source = event.target.closest('[sse-connect]');
    if (source && message.lastEventId) {
      lastIds.set(source.getAttribute('sse-connect'), message.lastEventId);
    }
    const page = document.documentElement;
    following = window.innerHeight + window.scrollY >= page.scrollHeight - 120;
  });

  document.addEventListener('htmx:sseMessage', function () {
    syncTaskBox();
    if (following) {
      window.scrollTo(0, document.documentElement.scrollHeight);
    }
  });

  function syncTaskBox() {
    const state = document.getElementById('run-state');
    const form = document.getElementById('task-form');
    if (!state || !form) {
      return;
    }
    const running = Boolean(state.dataset.task);
    const box = form.querySelector('textarea');
    const button = form.querySelector('button[type=submit]');
    const wasDisabled = box.disabled;
    box.disabled = running;
    button.disabled = running || submitting;
    // A keyboard user whose box was disabled under them gets it back when the task ends.
    if (wasDisabled && !running && (document.activeElement === document.body || !document.activeElement)) {
      box.focus();
    }
  }

  document.addEventListener('keydown', function (event) {
    const box = event.target;
    if (!(box instanceof HTMLTextAreaElement) || box.id !== 'task' || event.key !== 'Enter') {
      return;
    }
    if (event.shiftKey || event.altKey || event.isComposing) {
      return; // a new line, or an input method composing
    }
    event.preventDefault();
    if (box.form && !box.disabled && !submitting) {
      box.form.requestSubmit();
    }
  });

  function isTaskForm(event) {
    return event.detail && event.detail.elt && event.detail.elt.id === 'task-form';
  }

  document.addEventListener('htmx:beforeRequest', function (event) {
    if (isTaskForm(event)) {
      submitting = true;
      syncTaskBox();
    }
  });

  document.addEventListener('htmx:afterRequest', function (event) {
    const xhr = event.detail.xhr;
    if (xhr && xhr.status > 0 && xhr.status < 400) {
      hideAlert();
    }
    if (isTaskForm(event)) {
      submitting = false;
      if (xhr && xhr.status === 202) {
        event.detail.elt.querySelector('textarea').value = '';
      }
      syncTaskBox();
    }
  });

  document.addEventListener('htmx:responseError', function (event) {
    const xhr = event.detail.xhr;
    if (xhr.status === 401 && window.location.pathname !== '/ui/sign-in') {
      const session = document.getElementById('session');
      const query = session ? '?session_id=' + encodeURIComponent(session.dataset.sessionId) : '';
      window.location.assign('/ui/sign-in' + query);
      return;
    }
    let detail = xhr.statusText || 'the request failed';
    try {
      const problem = JSON.parse(xhr.responseText);
      if (problem && typeof problem.detail === 'string') {
        detail = problem.detail;
      }
    } catch (ignored) {
      // not problem+json: keep the status text
    }
    showAlert(detail + ' (' + xhr.status + ')');
  });

  document.addEventListener('htmx:sendError', function () {
    showAlert('The server could not be reached.');
  });

  function showAlert(text) {
    const alert = document.getElementById('alert');
    if (!alert) {
      return;
    }
    alert.textContent = text;
    alert.hidden = false;
    window.clearTimeout(alertTimer);
    alertTimer = window.setTimeout(hideAlert, 10000);
  }

  function hideAlert() {
    const alert = document.getElementById('alert');
    if (alert && !alert.hidden) {
      alert.hidden = true;
      alert.textContent = '';
    }
  }

  // The session list marks the open session; the title names it.
  function markCurrent() {
    const session = document.getElementById('session');
    const current = session ? session.dataset.sessionId : null;
    document.querySelectorAll('#session-list a[data-session-id]').forEach(function (link) {
      if (link.dataset.sessionId === current) {
        link.setAttribute('aria-current', 'page');
      } else {
        link.removeAttribute('aria-current');
      }
    });
    document.title = current ? current + ' · alex-server' : 'alex-server';
  }

  document.addEventListener('htmx:afterSettle', function (event) {
    if (event.target && event.target.id === 'main') {
      markCurrent();
      syncTaskBox();
    }
  });

  document.addEventListener('DOMContentLoaded', function () {
    if (document.getElementById('session-list')) {
      markCurrent();
    }
    syncTaskBox();
  });
})();
