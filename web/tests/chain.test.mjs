import test from "node:test";
import assert from "node:assert/strict";

import { chain } from "../chain.js";

test("chain runs the original first, then the extra, with the same this and arguments", () => {
  const calls = [];
  const proto = {
    onDraw(x) {
      calls.push(["original", this.id, x]);
      return "drawn";
    },
  };
  chain(proto, "onDraw", function (x) {
    calls.push(["extra", this.id, x]);
  });
  const node = Object.assign(Object.create(proto), { id: 7 });
  assert.equal(node.onDraw(3), "drawn");
  assert.deepEqual(calls, [["original", 7, 3], ["extra", 7, 3]]);
});

test("chain works where the prototype had no such method", () => {
  const proto = {};
  let seen = null;
  chain(proto, "onRemoved", function (...args) {
    seen = args;
  });
  assert.equal(proto.onRemoved(1, 2), undefined);
  assert.deepEqual(seen, [1, 2]);
});
