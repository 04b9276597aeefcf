// Loss chart geometry, pure: the webview only strokes the points this returns onto a canvas.
import type { Point } from "./jobs";

export interface Tick {
  value: number;
  pos: number;  // pixel
}

export interface Plot {
  left: number;
  right: number;
  top: number;
  bottom: number;
}

export interface ChartLayout {
  plot: Plot;                       // the drawing area inside the axes
  raw: Array<[number, number]>;     // (x, y) pixels of each training loss point
  smooth: Array<[number, number]>;  // EMA-smoothed training loss
  val: Array<[number, number]>;     // validation losses (same axis as the loss)
  lr: Array<[number, number]>;      // learning rate, on the right axis
  xTicks: Tick[];                   // steps: integers only
  yTicks: Tick[];                   // loss
  lrTicks: Tick[];                  // learning rate (empty without lr points)
}

export interface Series {
  loss: Point[];
  val: Point[];
  lr: Point[];
}

/** Exponential moving average with TensorBoard's debiasing (the first values are not pulled to 0). */
export function ema(values: number[], weight: number): number[] {
  const out: number[] = [];
  let acc = 0;
  values.forEach((v, i) => {
    acc = weight * acc + (1 - weight) * v;
    out.push(acc / (1 - Math.pow(weight, i + 1)));
  });
  return out;
}

/** At most n points, evenly over the run, always keeping the first and the last. */
export function downsample<T>(xs: T[], n: number): T[] {
  if (xs.length <= n || n < 2) return xs.slice();
  const out: T[] = [];
  for (let i = 0; i < n; i++) out.push(xs[Math.round((i * (xs.length - 1)) / (n - 1))]);
  return out;
}

/** Round tick values (1, 2, 5 times a power of ten, at least minStep apart) covering [lo, hi]. */
export function niceTicks(lo: number, hi: number, count: number, minStep = 0): number[] {
  if (!(hi > lo)) return [lo];
  const raw = Math.max((hi - lo) / Math.max(count, 1), minStep);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= raw) ?? 10 * mag;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function span(values: number[], pad: number): [number, number] {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) { const d = Math.abs(hi) * 0.1 || 0.5; lo -= d; hi += d; }
  const m = (hi - lo) * pad;
  return [lo - m, hi + m];
}

export function layoutChart(s: Series, width: number, height: number, maxPoints = 400): ChartLayout {
  const loss = downsample(s.loss, maxPoints), val = s.val, lr = downsample(s.lr, maxPoints);
  const hasLr = lr.length > 0;
  const plot: Plot = { left: 48, right: width - (hasLr ? 56 : 12), top: 10, bottom: height - 34 };
  const empty: ChartLayout = { plot, raw: [], smooth: [], val: [], lr: [], xTicks: [], yTicks: [], lrTicks: [] };
  const losses = [...loss, ...val];
  if (losses.length === 0 && !hasLr) return empty;
  const steps = [...losses, ...lr].map((p) => p.step);
  const x0 = Math.min(...steps), x1 = Math.max(Math.max(...steps), x0 + 1);
  const [lo, hi] = losses.length ? span(losses.map((p) => p.value), 0.05) : [0, 1];
  const [lrLo, lrHi] = hasLr ? span(lr.map((p) => p.value), 0.05) : [0, 1];
  const px = (step: number): number => plot.left + ((step - x0) / (x1 - x0)) * (plot.right - plot.left);
  const py = (v: number, a: number, b: number): number => plot.bottom - ((v - a) / (b - a)) * (plot.bottom - plot.top);
  const sm = ema(loss.map((p) => p.value), 0.6);
  const xt = niceTicks(x0, x1, Math.max(2, Math.floor((plot.right - plot.left) / 70)), 1);  // steps are whole
  return {
    plot,
    raw: loss.map((p) => [px(p.step), py(p.value, lo, hi)]),
    smooth: loss.map((p, i) => [px(p.step), py(sm[i], lo, hi)]),
    val: val.map((p) => [px(p.step), py(p.value, lo, hi)]),
    lr: lr.map((p) => [px(p.step), py(p.value, lrLo, lrHi)]),
    xTicks: xt.map((v) => ({ value: v, pos: px(v) })),
    yTicks: losses.length ? niceTicks(lo, hi, 4).map((v) => ({ value: v, pos: py(v, lo, hi) })) : [],
    lrTicks: hasLr ? niceTicks(lrLo, lrHi, 5).map((v) => ({ value: v, pos: py(v, lrLo, lrHi) })) : [],
  };
}

export function formatBytes(n: number | null): string {
  if (n === null) return "unknown";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0, v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** 42 s, 2 min 5 s, 1 h 3 min: rounded once, then split (never "2 min 60 s"). */
export function formatSeconds(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return "-";
  const t = Math.round(Math.max(0, s));
  if (t < 60) return `${t} s`;
  if (t < 3600) return t % 60 ? `${Math.floor(t / 60)} min ${t % 60} s` : `${t / 60} min`;
  const m = Math.round(t / 60);
  return m % 60 ? `${Math.floor(m / 60)} h ${m % 60} min` : `${m / 60} h`;
}
