// How numbers and times read on every page. One fixed locale: operators
// paste these into tickets next to ringmqctl's output, so a number should
// look the same in every browser.

const whole = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const rate = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 });
// A trickle (a few messages an hour) would read 0.0: it gets more digits.
const small = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 2 });

export const int = (n: number): string => whole.format(n);
export const tps = (n: number): string => (n > 0 && n < 0.1 ? small.format(n) : rate.format(n));
// A non-breaking space keeps "70 %" on one line.
export const percent = (n: number | null): string => (n === null ? "—" : `${rate.format(n)}\u00a0%`);

const pad = (n: number, w = 2) => String(n).padStart(w, "0");

/** Local time as the seed consoles print it: 2019-10-08 10:42:02.761. */
export function time(ms: number | null | undefined, withMillis = true): string {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const s = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(
    d.getMinutes(),
  )}:${pad(d.getSeconds())}`;
  return withMillis ? `${s}.${pad(d.getMilliseconds(), 3)}` : s;
}

/** The value of an <input type="datetime-local"> for a time. */
export function localInput(ms: number): string {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** A time from an <input type="datetime-local">, or undefined when empty. */
export function fromLocalInput(v: string): number | undefined {
  if (!v) return undefined;
  const ms = new Date(v).getTime();
  return Number.isNaN(ms) ? undefined : ms;
}

export function duration(secs: number): string {
  if (secs < 60) return `${secs} s`;
  const m = Math.floor(secs / 60);
  if (m < 60) return `${m} min ${secs % 60} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

export const HOUR = 3_600_000;
export const DAY = 24 * HOUR;
