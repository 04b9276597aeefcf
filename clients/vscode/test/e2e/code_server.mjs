// Drives the LoRA Lab panel in a real VS Code (code-server, web) with chromium: plan, dataset, train, chat
// (base, then the new LoRA), export. Not part of CI (it needs code-server, Node 24 and chromium); the
// setup is in docs/vscode.md. Usage: node code_server.mjs URL DATASET [SHOTS_DIR]
// playwright-core is not a dependency of the extension: PLAYWRIGHT_CORE names its index.mjs where it lives.
const { chromium } = await import(process.env.PLAYWRIGHT_CORE ?? "playwright-core");
const [url, dataset, shots = "."] = process.argv.slice(2);
if (!url || !dataset) throw new Error("usage: node code_server.mjs URL DATASET [SHOTS_DIR]");
const shot = (p, n) => p.screenshot({ path: `${shots}/${n}.png` });
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
                                        args: ["--headless", "--no-sandbox", "--disable-gpu"] });
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
page.on("console", (m) => { if (m.type() === "error") console.log("console:", m.text().slice(0, 300)); });
await page.goto(url);
await page.waitForSelector(".monaco-workbench", { timeout: 90000 });
await page.waitForTimeout(4000);
await page.keyboard.press("F1");
await page.waitForSelector(".quick-input-widget input", { timeout: 20000 });
await page.keyboard.type("LoRA Lab: Open Panel");
await page.waitForTimeout(1000);
await page.keyboard.press("Enter");
async function panelFrame() {
  for (let i = 0; i < 120; i++) {
    for (const f of page.frames()) {
      try { if (await f.$("#plan-btn")) return f; } catch { /* detached */ }
    }
    await page.waitForTimeout(500);
  }
  throw new Error("panel webview not found");
}
const f = await panelFrame();
console.log("panel found");
await f.waitForFunction(() => document.getElementById("model")?.textContent?.includes("model:"), null, { timeout: 120000 });
console.log(await f.textContent("#daemon"), "|", await f.textContent("#model"));
await f.waitForFunction(() => document.querySelector("#plan table") !== null, null, { timeout: 60000 });
console.log("plan:", (await f.textContent("#plan")).slice(0, 300));
await f.click("#calibrate-btn");
await f.waitForFunction(() => !document.getElementById("calibrate-btn").disabled &&
  !document.getElementById("plan")?.textContent?.includes("not calibrated"), null, { timeout: 180000 });
console.log("calibrated plan:", (await f.textContent("#plan")).slice(0, 300), "| err:", await f.textContent("#err-plan"));
await shot(page, "1-plan");
// training settings
for (const [id, v] of [["adapter", "pirate"], ["steps", "8"], ["batch", "2"], ["seq", "32"], ["lr", "0.01"], ["r", "4"]]) await f.fill(`#${id}`, v);
await f.click("#pick");
await page.waitForSelector(".quick-input-widget input", { timeout: 20000 });
await page.waitForTimeout(500);
await page.fill(".quick-input-widget input", dataset);
await page.waitForTimeout(500);
await page.keyboard.press("Enter");
await f.waitForFunction(() => document.getElementById("dataset")?.textContent?.includes("examples"), null, { timeout: 60000 });
console.log("dataset:", await f.textContent("#dataset"));
await f.click("#train-btn");
await f.waitForFunction(() => document.getElementById("train-stats")?.textContent?.startsWith("step"), null, { timeout: 60000 });
console.log("during:", await f.textContent("#train-stats"));
await f.waitForFunction(() => document.getElementById("train-stats")?.textContent?.includes("completed"), null, { timeout: 120000 });
console.log("after:", await f.textContent("#train-stats"));
console.log("train err:", await f.textContent("#err-train"));
await shot(page, "2-trained");
// chat: base, then the LoRA
await f.fill("#prompt", "the quick brown");
await f.click("#send");
await f.waitForFunction(() => document.querySelectorAll("#transcript .turn").length === 2 && !document.getElementById("send").disabled, null, { timeout: 60000 });
await f.check("#mode-lora");
await f.fill("#prompt", "the quick brown");
await f.click("#send");
await f.waitForFunction(() => document.querySelectorAll("#transcript .turn").length === 4 && !document.getElementById("send").disabled, null, { timeout: 60000 });
console.log("chat:", JSON.stringify(await f.$$eval("#transcript .turn", (ts) => ts.map((t) => t.textContent))));
console.log("chat err:", await f.textContent("#err-chat"));
await f.click("button[data-format=peft]");
await f.waitForFunction(() => document.getElementById("exported")?.textContent?.includes("peft"), null, { timeout: 60000 });
console.log("exported:", await f.textContent("#exported"));
await shot(page, "3-chat-export");
await browser.close();
