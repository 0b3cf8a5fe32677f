// Time-series charts on uPlot: a few kilobytes, draws thousands of points on
// a canvas without a framework of its own, and takes columnar arrays that a
// poll can append to. Colours come from the theme's custom properties, so a
// chart is rebuilt when the theme changes.

import { useContext, useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { time } from "./format";
import { ThemeContext, cssVar } from "./theme";

export interface Series {
  label: string;
}

/** x: times in ms; ys: one array per series, same length as x. */
export interface ChartData {
  x: number[];
  ys: (number | null)[][];
}

const PALETTE = ["--chart-1", "--chart-2", "--chart-3", "--chart-4", "--chart-5", "--chart-6"];

export function TimeChart(props: {
  title: string;
  series: Series[];
  data: ChartData;
  /** What the chart says, for those who cannot see it. */
  summary: string;
  bars?: boolean;
  height?: number;
  /** The time span to show (ms), when it is not just the data's. */
  span?: [number, number];
  testid?: string;
}) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const theme = useContext(ThemeContext);
  const labels = props.series.map((s) => s.label).join("\u0000");
  const columns = (d: ChartData): uPlot.AlignedData => [d.x.map((t) => t / 1000), ...d.ys];
  // Read by the x scale at each redraw.
  const span = useRef(props.span);
  span.current = props.span;

  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const text = cssVar("--muted");
    const grid = cssVar("--grid");
    const axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    // 24-hour times, as everywhere else on the console; the date once the
    // ticks are a day or more apart.
    const xValues = (u: uPlot, splits: number[], _i: number, _space: number, incr: number) => {
      const long = (u.scales.x.max ?? 0) - (u.scales.x.min ?? 0) > 86_400;
      return splits.map((t) => {
        const s = time(t * 1000, false);
        if (incr >= 86_400) return s.slice(5, 10);
        if (incr < 60) return s.slice(11);
        return long ? `${s.slice(5, 10)} ${s.slice(11, 16)}` : s.slice(11, 16);
      });
    };
    // Bars of two series stand side by side at each time, not on top of each other.
    const bars = (i: number) =>
      props.bars ? uPlot.paths.bars?.({ size: [0.4, 32], align: props.series.length === 2 ? (i === 0 ? -1 : 1) : 0 }) : undefined;
    const u = new uPlot(
      {
        width: Math.max(200, el.clientWidth),
        height: props.height ?? 220,
        scales: {
          x: {
            time: true,
            range: (_u, min, max) => (span.current ? [span.current[0] / 1000, span.current[1] / 1000] : [min, max]),
          },
          y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.1)] },
        },
        series: [
          { value: (_u, v) => (v === null ? "--" : time(v * 1000, false)) },
          ...props.series.map((s, i) => {
            const colour = cssVar(PALETTE[i % PALETTE.length]);
            return {
              label: s.label,
              stroke: colour,
              width: 2,
              fill: props.bars ? colour : undefined,
              paths: bars(i),
              points: { show: false },
            };
          }),
        ],
        axes: [{ ...axis, values: xValues }, { ...axis, size: 56 }],
      },
      columns(props.data),
      el,
    );
    plot.current = u;
    const resize = new ResizeObserver(() => u.setSize({ width: Math.max(200, el.clientWidth), height: props.height ?? 220 }));
    resize.observe(el);
    return () => {
      resize.disconnect();
      u.destroy();
      plot.current = null;
    };
  }, [theme, labels, props.bars, props.height]);

  useEffect(() => {
    plot.current?.setData(columns(props.data));
  }, [props.data]);

  return (
    <figure class="chart" data-testid={props.testid}>
      <figcaption>{props.title}</figcaption>
      <div ref={box} class="chart-box" />
      <p class="visually-hidden">{props.summary}</p>
    </figure>
  );
}

/** A point on the gauge's half circle, `f` from 0 (left) to 1 (right). */
function arcPoint(f: number, r: number): [number, number] {
  const a = Math.PI * (1 - f);
  return [60 + r * Math.cos(a), 60 - r * Math.sin(a)];
}

function arc(to: number, r: number): string {
  const [x0, y0] = arcPoint(0, r);
  const [x1, y1] = arcPoint(to, r);
  return `M ${x0} ${y0} A ${r} ${r} 0 0 1 ${x1.toFixed(2)} ${y1.toFixed(2)}`;
}

/**
 * Utilisation of one capacity as a half-circle gauge with the alarm
 * threshold marked on it (70 % of the capacity unless configured).
 * `percent` null: no capacity declared, nothing to fill.
 */
export function Gauge(props: { label: string; percent: number | null; thresholdPercent: number | null; testid: string }) {
  const f = props.percent === null ? 0 : Math.min(1, props.percent / 100);
  const t = props.thresholdPercent;
  const level =
    props.percent === null || t === null
      ? "ok"
      : props.percent >= t
        ? "crit"
        : props.percent >= t * 0.9
          ? "warn"
          : "ok";
  const [tx0, ty0] = arcPoint(Math.min(1, (t ?? 0) / 100), 40);
  const [tx1, ty1] = arcPoint(Math.min(1, (t ?? 0) / 100), 58);
  const said =
    props.percent === null
      ? `${props.label}: no capacity declared`
      : `${props.label}: ${props.percent.toFixed(1)} % of capacity${t === null ? "" : `, alarm at ${t.toFixed(0)} %`}`;
  return (
    <svg class={`gauge gauge-${level}`} viewBox="0 0 120 66" role="img" aria-label={said} data-testid={props.testid}>
      <path class="gauge-track" d={arc(1, 50)} />
      {f > 0 && <path class="gauge-fill" d={arc(Math.max(f, 0.005), 50)} />}
      {t !== null && <line class="gauge-mark" x1={tx0} y1={ty0} x2={tx1} y2={ty1} />}
    </svg>
  );
}
