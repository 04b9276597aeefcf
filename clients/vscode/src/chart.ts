// Loss chart geometry, pure: the webview only strokes the points this returns onto a canvas.
import type { LossPoint } from "./state";

export interface Tick {
  value: number;
  pos: number;  // pixel
}

export interface ChartLayout {
  raw: Array<[number, number]>;     // (x, y) pixels of each loss point
  smooth: Array<[number, number]>;  // EMA-smoothed loss
  xTicks: Tick[];
  yTicks: Tick[];
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

/** Round tick values (1, 2, 5 times a power of ten) covering [lo, hi]. */
export function niceTicks(lo: number, hi: number, count: number): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(count, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= raw) ?? 10 * mag;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

export function layoutChart(points: LossPoint[], width: number, height: number, pad = 32, maxPoints = 400): ChartLayout {
  const pts = downsample(points, maxPoints);
  if (pts.length === 0) return { raw: [], smooth: [], xTicks: [], yTicks: [] };
  const x0 = pts[0].step, x1 = Math.max(pts[pts.length - 1].step, x0 + 1);
  let lo = Math.min(...pts.map((p) => p.loss)), hi = Math.max(...pts.map((p) => p.loss));
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const margin = (hi - lo) * 0.05;
  lo -= margin; hi += margin;
  const px = (s: number): number => pad + ((s - x0) / (x1 - x0)) * (width - 2 * pad);
  const py = (l: number): number => height - pad - ((l - lo) / (hi - lo)) * (height - 2 * pad);
  const sm = ema(pts.map((p) => p.loss), 0.6);
  return {
    raw: pts.map((p) => [px(p.step), py(p.loss)]),
    smooth: pts.map((p, i) => [px(p.step), py(sm[i])]),
    xTicks: niceTicks(x0, x1, 5).map((v) => ({ value: v, pos: px(v) })),
    yTicks: niceTicks(lo, hi, 4).map((v) => ({ value: v, pos: py(v) })),
  };
}

export function formatBytes(n: number | null): string {
  if (n === null) return "unknown";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0, v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function formatSeconds(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return "-";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}
