// Walks the LoRA Lab panel in a real VS Code (code-server, the web build) in headless chromium, as a new user
// would: the first start with a Python that lacks LoRA Lab (one notification that names the fix), the fix by
// a settings change (watched: the panel recovers without a click), plan, calibration progress and cancel, a
// dataset picked in the file dialog, training with the live chart, a window reload in the middle of it (the
// panel follows the running job again), Base and LoRA answers streamed side by side, export to a folder
// chosen in the save dialog, and the panel in the light theme. A screenshot per step goes to SHOTS.
// Run by tests/test_vscode_e2e.py, which sets up code-server and passes one JSON argument:
//   { url, python, dataset, exportTo, shots, steps }
// playwright-core is not a dependency of the extension: PLAYWRIGHT_CORE names its index.mjs.
const { chromium } = await import(process.env.PLAYWRIGHT_CORE ?? "playwright-core");
const cfg = JSON.parse(process.argv[2] ?? "{}");
for (const k of ["url", "python", "dataset", "exportTo", "shots"]) if (!cfg[k]) throw new Error(`missing ${k}`);
const LONG = 240000;
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
                                        args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.on("console", (m) => { if (m.type() === "error" && /loralab|LoRA Lab|webview/i.test(m.text())) log("console:", m.text().slice(0, 300)); });
const shot = (name) => page.screenshot({ path: `${cfg.shots}/${name}.png` });

/** Run a command from the palette: the row whose label is exactly `command` (recently used ones rank first). */
async function palette(command) {
  await page.keyboard.press("F1");
  await page.waitForSelector(".quick-input-widget input", { timeout: 20000 });
  await page.keyboard.type(command);
  await page.waitForTimeout(800);
  await pick(command);
}

async function pick(label) {
  const rows = page.locator(".quick-input-list .monaco-list-row");
  const n = await rows.count();
  for (let i = 0; i < n; i++) {
    const name = (await rows.nth(i).locator(".label-name").first().textContent().catch(() => ""))?.trim();
    if (name === label) { await rows.nth(i).click(); return; }
  }
  await page.keyboard.press("Enter");
}

async function workbench() {
  await page.goto(cfg.url);
  await page.waitForSelector(".monaco-workbench", { timeout: 120000 });
  await page.waitForSelector(".statusbar", { timeout: 60000 });
}

/** The panel's document: the webview's inner frame that has the panel's elements. */
async function panelFrame() {
  for (let i = 0; i < 240; i++) {
    for (const f of page.frames()) {
      try { if (await f.$("#plan-btn")) return f; } catch { /* detached */ }
    }
    await page.waitForTimeout(500);
  }
  throw new Error("the LoRA Lab panel's webview did not appear");
}

const text = (f, sel) => f.textContent(sel).then((t) => (t ?? "").trim());
const statusItem = () => page.locator(".statusbar-item", { hasText: "LoRA Lab" }).first().textContent();

/** Type a path into code-server's simple file dialog (a quick input) and accept it. */
async function fileDialog(path) {
  const input = page.locator(".quick-input-widget input");
  await input.waitFor({ timeout: 20000 });
  await page.waitForTimeout(400);
  await input.fill(path);
  await page.waitForTimeout(700);
  await page.keyboard.press("Enter");
  await page.waitForTimeout(400);
  if (await input.isVisible().catch(() => false)) {  // a folder: Enter opened it; the OK button takes it
    const ok = page.locator(".quick-input-widget .monaco-button", { hasText: /OK|Use|Export|Train/ }).first();
    if (await ok.isVisible().catch(() => false)) await ok.click(); else await page.keyboard.press("Enter");
  }
}

// 1. first start: the configured Python lacks loralabd -------------------------------------------------
await workbench();
await page.waitForFunction(() => [...document.querySelectorAll(".statusbar-item")].some((e) => e.textContent.includes("LoRA Lab")),
                           null, { timeout: 60000 });
log("status bar at startup:", await statusItem());
await palette("LoRA Lab: Open Panel");
let f = await panelFrame();
await page.waitForSelector(".notification-toast", { timeout: LONG });
await page.waitForTimeout(1500);  // any second toast would be here by now
const toasts = await page.$$eval(".notification-toast", (ts) => ts.map((t) =>
  `${t.querySelector(".notification-list-item-message")?.textContent ?? ""} [${[...t.querySelectorAll(".monaco-button")].map((b) => b.textContent).join("|")}]`));
log("toasts:", JSON.stringify(toasts));
const ours = toasts.filter((t) => t.includes("LoRA Lab"));
if (ours.length !== 1) throw new Error(`expected one LoRA Lab notification, got ${ours.length}: ${JSON.stringify(toasts)}`);
if (!/has no loralabd package/.test(ours[0]) || !/loralab\.pythonPath/.test(ours[0]) || !/Install/.test(ours[0]) ||
    !/Open Settings/.test(ours[0])) throw new Error(`the first-start error does not name the fix: ${ours[0]}`);
await f.waitForFunction(() => document.getElementById("err-daemon")?.textContent?.includes("loralabd"), null, { timeout: 20000 });
log("status bar after the failed start:", await statusItem());
if (!/failed/.test(await statusItem())) throw new Error("the status bar does not say the start failed");
await shot("01-first-start-error");

// The settings editor opens as a modal over the workbench; Escape closes it, but not always on the first press
// (focus may still be in the settings search box): press until the modal's block is gone.
async function closeModal() {
  const block = page.locator(".monaco-modal-editor-block");
  for (let i = 0; i < 20 && await block.isVisible().catch(() => false); i++) {
    if (i % 4 === 3) await block.click({ position: { x: 5, y: 5 }, timeout: 1000 }).catch(() => undefined);
    await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
  }
  if (await block.isVisible().catch(() => false)) throw new Error("the modal settings editor did not close");
}

// 2. the fix, as a user makes it: the notification's Open Settings, the setting's box; the setting is watched,
// and the panel recovers without a click -----------------------------------------------------------------------
await page.locator(".notification-toast .monaco-button", { hasText: "Open Settings" }).first().click();
const box = page.locator(".settings-editor .setting-item-contents input").first();
await box.waitFor({ timeout: 30000 });
await page.waitForTimeout(500);
await box.fill(cfg.python);
await page.keyboard.press("Tab");
await page.waitForTimeout(1500);
await shot("02-settings");
await closeModal();  // the settings editor is modal in VS Code 1.139
await f.waitForFunction(() => document.getElementById("model")?.textContent?.includes("SmolLM2-135M-Instruct"), null, { timeout: LONG });
log("model:", await text(f, "#model"), "| daemon:", await text(f, "#daemon"));
if (await text(f, "#err-daemon")) throw new Error(`a stale error stayed: ${await text(f, "#err-daemon")}`);
await page.locator(".notification-toast .codicon-notifications-clear, .notifications-toasts .codicon-close").first().click({ timeout: 2000 }).catch(() => undefined);
log("status bar:", await statusItem());

// 3. plan (the panel estimates on load), then calibration with progress, cancelled ---------------------------
await f.waitForFunction(() => document.querySelector("#plan table") !== null, null, { timeout: LONG });
const plan = await text(f, "#plan");
log("plan:", plan.slice(0, 400));
if (/\b0 B\b/.test(plan)) throw new Error("the plan lists a part of 0 B");
await shot("03-plan");
await closeModal();
await f.click("#calibrate-btn");
await f.waitForFunction(() => /calibrating: .*(shape|batch)/.test(document.getElementById("calibrating")?.textContent ?? ""),
                        null, { timeout: LONG });
log("calibrating:", await text(f, "#calibrating"));
await shot("04-calibrating");
await f.click("#calibrate-cancel");
await f.waitForFunction(() => document.getElementById("calibrating")?.textContent?.includes("cancelled"), null, { timeout: LONG });
log("after cancel:", await text(f, "#calibrating"));

// 4. dataset from the file dialog, settings, train; reload in the middle; the panel follows the job again ---------
for (const [id, v] of [["adapter", "pirate"], ["steps", String(cfg.steps ?? 4)], ["batch", "1"], ["seq", "64"],
                       ["lr", "0.004"], ["r", "8"], ["eval-every", "2"]]) await f.fill(`#${id}`, v);
await f.click("#pick");
await fileDialog(cfg.dataset);
await f.waitForFunction(() => document.getElementById("dataset")?.textContent?.includes("examples"), null, { timeout: LONG });
log("dataset:", await text(f, "#dataset"));
await f.click("#train-btn");
await f.waitForFunction(() => /step [1-9]\d*\//.test(document.getElementById("train-stats")?.textContent ?? ""), null, { timeout: LONG });
log("training:", await text(f, "#train-stats"), "|", await text(f, "#train-time"));
log("status bar:", await statusItem());
if (!/training \d+%/.test(await statusItem())) throw new Error("the status bar does not show the training");
await shot("05-training");
const before = await text(f, "#train-stats");
await palette("Developer: Reload Window");
await page.waitForTimeout(3000);
await page.waitForSelector(".monaco-workbench", { timeout: 120000 });
f = await panelFrame();
await f.waitForFunction((b) => {
  const t = document.getElementById("train-stats")?.textContent ?? "";
  return t.startsWith("pirate: step") && t !== b;
}, before, { timeout: LONG });
log("after the reload:", await text(f, "#train-stats"));
await f.waitForFunction(() => document.getElementById("dataset")?.textContent?.includes("examples"), null, { timeout: 60000 });
if (!(await text(f, "#jobs")).includes("pirate")) throw new Error("the job list does not show the job");
await shot("06-reattached");
await f.waitForFunction(() => document.getElementById("train-message")?.textContent?.startsWith("completed"), null, { timeout: LONG });
log("trained:", await text(f, "#train-stats"), "|", await text(f, "#train-time"), "|", await text(f, "#train-message"));

// 5. compare: Base beside the new adapter, streamed -----------------------------------------------------------
await f.waitForFunction(() => document.querySelectorAll("#columns .column").length === 2, null, { timeout: 60000 });
await f.fill("#prompt", "What is the capital of France?");
await f.click("#send");
await f.waitForFunction(() => document.querySelector("#columns .turn.streaming") !== null ||
  [...document.querySelectorAll("#columns .turn.assistant")].some((t) => t.textContent.length > 0), null, { timeout: LONG });
await f.waitForFunction(() => !document.getElementById("send").disabled &&
  [...document.querySelectorAll("#columns .column")].every((c) => c.querySelector(".turn.assistant")?.textContent?.includes("tok/s")),
  null, { timeout: LONG });
const answers = await f.$$eval("#columns .column", (cs) => cs.map((c) => `${c.dataset.adapter}: ${c.querySelector(".turn.assistant")?.textContent}`));
log("answers:", JSON.stringify(answers));
if (await text(f, "#err-chat")) throw new Error(`chat error: ${await text(f, "#err-chat")}`);
await shot("07-trained-and-compared");

// 6. export to a folder chosen in the save dialog -------------------------------------------------------------
await f.selectOption("#export-adapter", "pirate");
await f.click("button[data-format=peft]");
await fileDialog(cfg.exportTo);
await f.waitForFunction(() => document.getElementById("exported")?.textContent?.includes("peft"), null, { timeout: LONG });
log("exported:", await text(f, "#exported"));
await page.waitForSelector(".notification-toast", { timeout: 20000 });
await shot("08-exported");

// 7. the panel in both themes, for docs/vscode.md ---------------------------------------------------------------
await page.locator(".notifications-toasts .codicon-close, .notification-toast .codicon-notifications-clear").first().click({ timeout: 2000 }).catch(() => undefined);
await f.evaluate(() => document.getElementById("sec-train").scrollIntoView());
await page.waitForTimeout(500);
const webview = page.locator("iframe.webview.ready, iframe.webview").first();
await webview.screenshot({ path: `${cfg.shots}/panel-dark.png` });
await palette("Preferences: Color Theme");
await page.waitForTimeout(800);
await page.keyboard.type("Light Modern");
await page.waitForTimeout(800);
await pick("Light Modern");
await page.waitForFunction(() => document.querySelector(".monaco-workbench")?.classList.contains("vs"), null, { timeout: 60000 })
  .catch(async (e) => { await shot("09-theme-picker"); throw e; });
await page.waitForTimeout(1500);
await webview.screenshot({ path: `${cfg.shots}/panel-light.png` });
await shot("09-light-theme");
log("done");
await browser.close();
