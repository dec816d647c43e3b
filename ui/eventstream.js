// The page's event stream, continued across the server's stream ends (see ui/eventstream.py).
//
// gradio's client reads every queued event's updates from one stream (GET .../queue/data) and,
// when an event's join is answered, opens a new stream only if it counts the old one closed. The
// server ends a stream (close_stream) once the session has no event left; a join answered before
// that close_stream reaches the page leaves its event on a stream that has ended. Here the client
// is given one stream per page that does not end: this wrapper opens the server's streams under it
// while the page has events to read (at each join it sees, and again when a server stream ends
// while an event it saw joined has not completed) and passes every message on except close_stream.
// So the page holds a server connection only while it has events running, as before.
(() => {
  if (window.__keptEventStream) return;
  const realFetch = window.fetch.bind(window);
  const DATA = /\/gradio_api\/queue\/data\?/;
  const JOIN = /\/gradio_api\/queue\/join\/?(\?|$)/;
  const encoder = new TextEncoder();
  const sessions = new Map();
  // Counts for the tests: page streams (what gradio's client opened), server streams (the
  // connections under them), those opened for an event a server stream's end left unread, and
  // whether a server stream is open now, for how many events the page waits, and whether it has
  // read the end of a given event.
  const stats = {
    pageStreams: 0,
    serverStreams: 0,
    reopenedForAnEvent: 0,
    get connected() {
      return [...sessions.values()].some((s) => s.upstream !== null);
    },
    get waitingFor() {
      return [...sessions.values()].reduce((n, s) => n + s.pending.size, 0);
    },
    completed(eventId) {
      return [...sessions.values()].some((s) => s.done.has(eventId));
    },
  };
  window.__keptEventStream = stats;

  const urlOf = (input) => (typeof input === "string" ? input : input instanceof URL ? input.href : input.url);

  function session(hash) {
    if (!sessions.has(hash)) {
      sessions.set(hash, { pending: new Set(), done: new Set(), out: null, upstream: null, request: null });
    }
    return sessions.get(hash);
  }

  function remember(set, id) {
    set.add(id);
    if (set.size > 256) set.delete(set.values().next().value);
  }

  // One server event (its lines): false for close_stream, which is not passed on.
  function relay(s, event) {
    const line = event.split("\n").find((l) => l.startsWith("data:"));
    let message = null;
    try {
      message = line ? JSON.parse(line.slice(5)) : null;
    } catch (_) {
      message = null;
    }
    if (message && message.msg === "close_stream") return false;
    if (message && message.msg === "process_completed" && message.event_id) {
      s.pending.delete(message.event_id);
      remember(s.done, message.event_id);
    }
    if (s.out) s.out.enqueue(encoder.encode(event + "\n\n"));
    return true;
  }

  // Ends the page's stream: with an error, with close_stream (`announce`: the page then opens a new
  // one at its next event), or silently (the page has already opened another).
  function endPageStream(s, error, announce) {
    const out = s.out;
    s.out = null;
    if (!out) return;
    try {
      if (error) out.error(error);
      else {
        if (announce) out.enqueue(encoder.encode('data: {"msg":"close_stream","event_id":null}\n\n'));
        out.close();
      }
    } catch (_) {
      // the page already let go of it
    }
  }

  async function pump(s, response, upstream) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let closed = false;
    try {
      while (!closed) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while (!closed && (cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          closed = event !== "" && !relay(s, event);
        }
      }
    } catch (error) {
      if (s.upstream === upstream && !upstream.signal.aborted) {
        s.upstream = null;
        endPageStream(s, error, false);
      }
      return;
    }
    if (s.upstream !== upstream) return;
    s.upstream = null;
    if (!closed) {
      endPageStream(s, null, true); // ended without close_stream: the page opens a new one when it needs one
    } else if (s.pending.size > 0) {
      stats.reopenedForAnEvent += 1;
      connect(s); // an event joined after the server decided to end this stream
    }
    reader.cancel().catch(() => {});
  }

  function connect(s) {
    if (s.upstream || !s.out || !s.request) return;
    const upstream = new AbortController();
    s.upstream = upstream;
    stats.serverStreams += 1;
    const r = s.request;
    realFetch(new Request(r.url, { headers: r.headers, credentials: r.credentials, signal: upstream.signal }))
      .then((response) => {
        if (!response.ok || !response.body) throw new Error(`event stream: HTTP ${response.status}`);
        return pump(s, response, upstream);
      })
      .catch((error) => {
        if (s.upstream === upstream && !upstream.signal.aborted) {
          s.upstream = null;
          endPageStream(s, error, false);
        }
      });
  }

  async function openPageStream(request) {
    const hash = new URL(request.url, location.href).searchParams.get("session_hash") || "";
    const s = session(hash);
    if (s.upstream) s.upstream.abort();
    s.upstream = null;
    endPageStream(s, null, false);
    const upstream = new AbortController();
    let mine = null; // this stream's controller, once the page has it
    request.signal.addEventListener("abort", () => {
      upstream.abort();
      if (mine && s.out === mine) {
        if (s.upstream) s.upstream.abort();
        s.upstream = null;
        s.out = null;
      }
    });
    const first = await realFetch(new Request(request, { signal: upstream.signal }));
    if (!first.ok || !first.body) return first;
    stats.pageStreams += 1;
    stats.serverStreams += 1;
    s.request = request;
    s.upstream = upstream;
    const body = new ReadableStream({
      start(controller) {
        mine = controller;
        s.out = controller;
      },
      cancel() {
        if (s.out !== mine) return;
        if (s.upstream) s.upstream.abort();
        s.upstream = null;
        s.out = null;
      },
    });
    pump(s, first, upstream);
    return new Response(body, { status: first.status, statusText: first.statusText, headers: first.headers });
  }

  async function noteJoin(response, init) {
    let hash = null;
    let id = null;
    try {
      hash = JSON.parse(typeof init?.body === "string" ? init.body : "{}").session_hash || null;
      id = (await response.clone().json()).event_id || null;
    } catch (_) {
      // read below as a join of unknown event
    }
    if (!hash && sessions.size === 1) hash = sessions.keys().next().value;
    if (!hash) return;
    const s = session(hash);
    if (id && s.done.has(id)) return; // its updates were read already
    if (id) s.pending.add(id);
    connect(s); // an unknown join still gets a server stream, as gradio's client would open one
  }

  window.fetch = async (input, init) => {
    const url = urlOf(input);
    if (DATA.test(url) && input instanceof Request) return openPageStream(input);
    const response = await realFetch(input, init);
    if (JOIN.test(url) && response.ok) await noteJoin(response, init);
    return response;
  };
})();
