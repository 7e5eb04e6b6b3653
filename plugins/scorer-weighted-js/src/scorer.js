// The reference scorer in JavaScript: ranks candidates by a weighted sum of the kernel's health
// score, spare capacity, latency and error rate. Weights can be tuned per tenant through
// `storage` (key `weights`: four little-endian f32 for health, load, latency, errors).
//
// It is `plugins/scorer-weighted` operation for operation: every intermediate result is
// rounded to f32 with `Math.fround`, so both return the same scores, bit for bit.

import { get } from 'nops:plugin/storage@0.1.0';

const f32 = Math.fround;

/** Default weights: health, spare capacity, latency, errors. */
const DEFAULT_WEIGHTS = [f32(0.4), f32(0.3), f32(0.2), f32(0.1)];
/** Latency at which the latency term halves, in milliseconds. */
const LATENCY_HALF_MS = 100;
/** In-flight tasks at which the load term halves. */
const IN_FLIGHT_HALF = 4;

/** `f32::max(x, 0.0)`: NaN gives 0. */
const maxZero = (x) => (x > 0 ? x : 0);
/** `f32::clamp(x, 0.0, 1.0)`: NaN stays NaN. */
const clamp01 = (x) => (x < 0 ? 0 : x > 1 ? 1 : x);

/** The tenant's weights from `storage`, or the defaults if unset, malformed or unreadable. */
function weights() {
  let bytes;
  try {
    bytes = get('weights');
  } catch {
    return DEFAULT_WEIGHTS;
  }
  if (bytes == null || bytes.length !== 16) {
    return DEFAULT_WEIGHTS;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return [0, 4, 8, 12].map((offset) => view.getFloat32(offset, true));
}

export const scoring = {
  score(_task, candidates) {
    const [wHealth, wLoad, wLatency, wErrors] = weights();
    return candidates.map((c) => {
      // `>>> 0` reads the u32 as unsigned even if the bindings hand it over as a signed i32.
      const inFlight = f32(c.inFlight >>> 0);
      const load = f32(1 / f32(1 + f32(inFlight / IN_FLIGHT_HALF)));
      const latency = f32(1 / f32(1 + f32(maxZero(c.latencyMs) / LATENCY_HALF_MS)));
      const errors = f32(1 - clamp01(c.errorRate));
      let score = f32(wHealth * clamp01(c.health));
      score = f32(score + f32(wLoad * load));
      score = f32(score + f32(wLatency * latency));
      return f32(score + f32(wErrors * errors));
    });
  },
};
