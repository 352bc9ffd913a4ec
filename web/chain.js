// Shared by the pack's page extensions; no ComfyUI import, so `node --test` can load it.

// Make `target[name]` call `extra` after whatever it already did, keeping the original's return value.
export function chain(target, name, extra) {
  const original = target[name];
  target[name] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}
