// The demo page the server embeds (src/demo/app.js) is the bundle of the
// current sources: rebuilding it gives the same bytes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

test("the committed demo bundle is up to date", () => {
  const dir = mkdtempSync(join(tmpdir(), "switchboard-demo-"));
  try {
    const fresh = join(dir, "app.js");
    execFileSync(process.execPath, [fileURLToPath(new URL("../scripts/bundle-demo.mjs", import.meta.url)), "--outfile", fresh]);
    const committed = readFileSync(fileURLToPath(new URL("../../../src/demo/app.js", import.meta.url)));
    assert.ok(
      readFileSync(fresh).equals(committed),
      "src/demo/app.js is stale: run `npm run bundle-demo` in clients/js and commit it",
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
