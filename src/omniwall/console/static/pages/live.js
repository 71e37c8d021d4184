// Polled pages: fetch, and rebuild the page only when the answer changed (keeps scroll and selection).

import { errorBox, replace } from "../dom.js";

export function poll(ctx, root, ms, load, build) {
  let last = null;
  let busy = false;
  ctx.every(ms, async () => {
    if (busy) return;
    busy = true;
    try {
      const data = await load();
      const text = JSON.stringify(data);
      if (text !== last) {
        last = text;
        replace(root, build(data));
      }
      root.dataset.loaded = String(Date.now());
    } catch (err) {
      if (!ctx.signal.aborted) { last = null; replace(root, errorBox(err)); }
    } finally {
      busy = false;
    }
  });
}

// An optional route (the flow API may be absent on an older manager): its answer, or null.
export async function optional(promise) {
  try { return await promise; } catch (_) { return null; }
}
