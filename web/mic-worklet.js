// Microphone capture for the voice page, as an AudioWorklet processor.
//
// Runs on the audio rendering thread. The page creates its AudioContext at
// 16 kHz, so the samples arriving here are already at the rate the server
// wants; this processor only converts float32 [-1, 1] to 16-bit PCM and cuts
// it into fixed frames (20 ms by default), each posted to the page as a
// transferable ArrayBuffer that the page sends as one binary WebSocket frame.

class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.frameSamples = opts.frameSamples || 320;
    this.buffer = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.enabled = true;
    this.port.onmessage = (e) => {
      if (e.data && typeof e.data.enabled === 'boolean') this.enabled = e.data.enabled;
    };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel || !this.enabled) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.buffer[this.filled++] = s < 0 ? s * 32768 : s * 32767;
      if (this.filled === this.frameSamples) {
        this.port.postMessage(this.buffer.buffer, [this.buffer.buffer]);
        this.buffer = new Int16Array(this.frameSamples);
        this.filled = 0;
      }
    }
    return true; // keep running while the page lives
  }
}

registerProcessor('mic-capture', MicCapture);
