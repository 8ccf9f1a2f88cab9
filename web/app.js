// The voice page: mic capture, the /ws session, transcript view and reply playback.
//
// Protocol: docs/protocol.md. The mic runs through an AudioWorklet
// (mic-worklet.js) in a 16 kHz AudioContext with the browser's echo
// cancellation on; every 20 ms frame of PCM16 goes out as one binary frame.
// Reply PCM arrives as binary frames after audio.start; each is scheduled
// back to back in a second AudioContext at the device's own rate. On
// audio.flush (barge-in) or the Stop button, everything scheduled stops.
// The session asks for the anytime canvas: each denoising step's draft
// (turn.canvas, masked positions as ░) is shown greyed until turn.reply.
//
// window.voiceStats exposes counters for tests and curious users.

(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const ui = {
    start: $('start'), stop: $('stop'), hangup: $('hangup'), status: $('status'), level: $('level'),
    live: $('live'), turns: $('turns'), typed: $('typed'), text: $('text'), knowledge: $('knowledge'),
  };

  const stats = window.voiceStats = {
    connected: false, ready: false, micOn: false, sessionId: null,
    framesSent: 0, bytesSent: 0,
    audioChunksReceived: 0, audioChunksScheduled: 0, audioChunksPlayed: 0, audioFlushes: 0,
    partials: 0, canvases: 0, turnsDone: 0, errors: [], events: [], lastTurn: null,
  };

  let ws = null;
  let mic = null;           // {ctx, stream, node, source, analyser}
  let player = null;        // {ctx, nextTime, sources:Set, rate}
  let pendingText = null;   // typed text waiting for session.ready
  let early = [];           // mic frames captured before session.ready
  const cards = new Map();  // turn_id -> card elements

  function setStatus(text, isError = false) {
    ui.status.textContent = text;
    ui.status.className = isError ? 'error' : '';
  }

  // ----- the turn cards

  function card(turnId) {
    if (cards.has(turnId)) return cards.get(turnId);
    const el = document.createElement('div');
    el.className = 'turn';
    el.dataset.turn = turnId;
    const row = (label, cls) => {
      const r = document.createElement('div');
      r.className = 'row';
      r.innerHTML = `<span class="label">${label}</span><span class="${cls}"></span>`;
      el.appendChild(r);
      return r.lastChild;
    };
    const c = {
      el, you: row('you', 'you'), cleaned: row('cleaned', 'cleaned'), reply: row('reply', 'reply'),
      latency: document.createElement('div'),
    };
    c.latency.className = 'latency';
    el.appendChild(c.latency);
    ui.turns.prepend(el);
    cards.set(turnId, c);
    while (cards.size > 50) {  // the page stays small in long sessions
      const oldest = cards.keys().next().value;
      cards.get(oldest).el.remove();
      cards.delete(oldest);
    }
    return c;
  }

  function showLatency(ev) {
    const t = ev.timings || {};
    const parts = [];
    if (ev.voice_to_voice_ms != null) parts.push(`voice→voice ${Math.round(ev.voice_to_voice_ms)} ms`);
    for (const [k, label] of [['endpoint_ms', 'endpoint'], ['asr_ms', 'asr'], ['llm_ms', 'dLLM'],
                              ['tts_first_ms', 'tts first'], ['total_ms', 'total']]) {
      if (t[k] != null) parts.push(`${label} ${Math.round(t[k])}`);
    }
    card(ev.turn_id).latency.textContent = parts.join(' · ');
  }

  // ----- playback

  function ensurePlayer() {
    if (!player) {
      const ctx = new AudioContext();
      player = { ctx, nextTime: 0, sources: new Set(), rate: 22050 };
    }
    if (player.ctx.state === 'suspended') player.ctx.resume();
    return player;
  }

  function playPcm(buf) {
    const p = ensurePlayer();
    const pcm = new Int16Array(buf);
    if (!pcm.length) return;
    const audio = p.ctx.createBuffer(1, pcm.length, p.rate);
    const ch = audio.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const src = p.ctx.createBufferSource();
    src.buffer = audio;
    src.connect(p.ctx.destination);
    const at = Math.max(p.ctx.currentTime + 0.03, p.nextTime);
    src.start(at);
    p.nextTime = at + audio.duration;
    p.sources.add(src);
    stats.audioChunksScheduled++;
    src.onended = () => {
      if (p.sources.delete(src)) stats.audioChunksPlayed++;
    };
  }

  function flushPlayback() {
    if (!player) return;
    for (const src of player.sources) {
      try { src.stop(); } catch (e) { /* already stopped */ }
    }
    player.sources.clear();
    player.nextTime = 0;
    stats.audioFlushes++;
  }

  // ----- the session

  function onEvent(ev) {
    stats.events.push(ev.type);
    if (stats.events.length > 500) stats.events.splice(0, 100);
    switch (ev.type) {
      case 'session.ready':
        stats.ready = true;
        stats.sessionId = ev.session_id;
        setStatus(mic ? 'listening' : 'connected (typing only)');
        for (const buf of early) sendFrame(buf);
        early = [];
        if (pendingText) { sendText(pendingText); pendingText = null; }
        break;
      case 'vad.speech_started':
        setStatus('hearing you…');
        break;
      case 'vad.speech_stopped':
        setStatus(ev.discarded ? 'listening' : 'thinking…');
        break;
      case 'transcript.partial':
        stats.partials++;
        ui.live.textContent = ev.text;
        break;
      case 'transcript.final':
        ui.live.textContent = '';
        card(ev.turn_id).you.textContent = ev.text || '(nothing understood)';
        break;
      case 'turn.canvas': {  // a draft, step by step, like a photograph developing
        stats.canvases++;
        const c = card(ev.turn_id);
        c.el.classList.add('draft');
        c.cleaned.textContent = ev.cleaned;
        c.reply.textContent = ev.reply;
        c.latency.textContent = `step ${ev.step} of ${ev.steps}`;
        break;
      }
      case 'turn.cleaned':
        card(ev.turn_id).cleaned.textContent = ev.text;
        break;
      case 'turn.reply':
        card(ev.turn_id).el.classList.remove('draft');
        card(ev.turn_id).reply.textContent = ev.text || '(no reply)';
        break;
      case 'audio.start':
        ensurePlayer().rate = ev.sample_rate;
        setStatus('speaking');
        break;
      case 'audio.end':
        break;
      case 'audio.flush':
        flushPlayback();
        break;
      case 'turn.interrupted':
        card(ev.turn_id).el.classList.add('interrupted');
        card(ev.turn_id).latency.textContent = `interrupted (${ev.reason})`;
        break;
      case 'turn.done':
        stats.turnsDone++;
        stats.lastTurn = ev;
        showLatency(ev);
        setStatus(mic ? 'listening' : 'connected (typing only)');
        break;
      case 'error':
        stats.errors.push(ev.code);
        setStatus(`${ev.code}: ${ev.message}`, true);
        break;
    }
  }

  function connect(withMic) {
    return new Promise((resolve, reject) => {
      const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
      ws = new WebSocket(url);
      ws.binaryType = 'arraybuffer';
      ws.onopen = async () => {
        stats.connected = true;
        try {
          if (withMic) await startMic();
        } catch (e) {
          setStatus(`microphone unavailable: ${e.message || e}`, true);
          stats.errors.push('mic');
        }
        const start = { type: 'session.start', sample_rate: mic ? mic.ctx.sampleRate : 16000, canvas: true };
        const knowledge = ui.knowledge.value.trim();
        if (knowledge) start.knowledge = knowledge;
        ws.send(JSON.stringify(start));
        ui.stop.disabled = false;
        ui.hangup.disabled = false;
        ui.start.disabled = true;
        resolve();
      };
      ws.onmessage = (m) => {
        if (typeof m.data === 'string') {
          try { onEvent(JSON.parse(m.data)); } catch (e) { console.error('bad event', e); }
        } else {
          stats.audioChunksReceived++;
          playPcm(m.data);
        }
      };
      ws.onerror = () => setStatus('connection error', true);
      ws.onclose = (e) => {
        stats.connected = stats.ready = false;
        early = [];
        setStatus(`disconnected${e.reason ? ': ' + e.reason : ''}`, e.code !== 1000 && e.code !== 1005);
        stopMic();
        ui.start.disabled = false;
        ui.stop.disabled = ui.hangup.disabled = true;
        ws = null;
        reject(new Error('closed'));
      };
    });
  }

  async function startMic() {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    let ctx;
    try {
      ctx = new AudioContext({ sampleRate: 16000 });
    } catch (e) {
      ctx = new AudioContext();  // the server resamples 8-48 kHz
    }
    await ctx.audioWorklet.addModule('mic-worklet.js');
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, 'mic-capture', {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { frameSamples: Math.round(ctx.sampleRate / 50) },
    });
    node.port.onmessage = (e) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      if (!stats.ready) {  // captured before session.ready: keep the last 2 s, sent once ready
        early.push(e.data);
        if (early.length > 100) early.shift();
        return;
      }
      sendFrame(e.data);
    };
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 512;
    source.connect(node);
    source.connect(analyser);
    const mute = ctx.createGain();  // the worklet must reach the destination to be pulled; silently
    mute.gain.value = 0;
    node.connect(mute).connect(ctx.destination);
    if (ctx.state === 'suspended') await ctx.resume();
    mic = { ctx, stream, node, source, analyser };
    stats.micOn = true;
    meter();
  }

  function meter() {
    if (!mic) { ui.level.style.width = '0'; return; }
    const data = new Float32Array(mic.analyser.fftSize);
    mic.analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const x of data) sum += x * x;
    ui.level.style.width = `${Math.min(100, Math.sqrt(sum / data.length) * 400)}%`;
    requestAnimationFrame(meter);
  }

  function stopMic() {
    if (!mic) return;
    mic.stream.getTracks().forEach((t) => t.stop());
    mic.ctx.close();
    mic = null;
    stats.micOn = false;
  }

  function sendFrame(buf) {
    ws.send(buf);
    stats.framesSent++;
    stats.bytesSent += buf.byteLength;
  }

  function sendText(text) {
    ws.send(JSON.stringify({ type: 'text', text }));
  }

  // ----- controls

  ui.start.addEventListener('click', () => {
    ensurePlayer();  // created on a click, so autoplay rules let it play
    connect(true).catch(() => {});
  });

  ui.stop.addEventListener('click', () => {
    flushPlayback();
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'interrupt' }));
  });

  ui.hangup.addEventListener('click', () => {
    flushPlayback();
    if (ws) ws.close(1000, 'bye');
  });

  ui.typed.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return;
    ui.text.value = '';
    ensurePlayer();
    if (ws && stats.ready) sendText(text);
    else {
      pendingText = text;
      if (!ws) connect(false).catch(() => {});
    }
  });
})();
