// Small building blocks every page shares: messages, tables with pages,
// labelled fields and the time range picker.

import type { ComponentChildren } from "preact";
import { useEffect, useId, useState } from "preact/hooks";
import { ApiError, SignInNeeded, Unreachable } from "./api";
import { DAY, HOUR, fromLocalInput, int, localInput } from "./format";

export function Notice(props: { kind: "error" | "warn" | "info" | "ok"; children: ComponentChildren; testid?: string }) {
  // Errors interrupt a screen reader; the rest waits its turn.
  return (
    <div
      class={`notice notice-${props.kind}`}
      role={props.kind === "error" ? "alert" : "status"}
      data-testid={props.testid}
    >
      {props.children}
    </div>
  );
}

/** What went wrong, in the words a person can act on. */
export function describe(error: unknown): string {
  if (error instanceof SignInNeeded) return "Sign in to see this.";
  if (error instanceof ApiError) {
    if (error.status === 403) return `Refused by the node: ${error.message}`;
    return error.message;
  }
  if (error instanceof Unreachable) return error.message;
  return error instanceof Error ? error.message : String(error);
}

/** The error of a request, unless it is one the shell already shows. */
export function ErrorNotice(props: { error: unknown; testid?: string }) {
  const { error } = props;
  if (!error || error instanceof SignInNeeded || error instanceof Unreachable) return null;
  return (
    <Notice kind="error" testid={props.testid ?? "error"}>
      {describe(error)}
    </Notice>
  );
}

export function MissingNodes(props: { nodes?: string[] }) {
  if (!props.nodes?.length) return null;
  return (
    <Notice kind="warn" testid="missing-nodes">
      Not in this answer: {props.nodes.join(", ")} did not answer in time. Their part is missing from the numbers
      below.
    </Notice>
  );
}

export function Section(props: { title: string; children: ComponentChildren; id?: string; actions?: ComponentChildren }) {
  const id = useId();
  return (
    <section class="card" aria-labelledby={id} id={props.id}>
      <div class="card-head">
        <h2 id={id}>{props.title}</h2>
        {props.actions}
      </div>
      {props.children}
    </section>
  );
}

/** A list in pages of `size` rows; `render` draws the rows of the page shown. */
export function Paged<T>(props: {
  rows: T[];
  size?: number;
  label: string;
  render: (rows: T[]) => ComponentChildren;
}) {
  const size = props.size ?? 20;
  const pages = Math.max(1, Math.ceil(props.rows.length / size));
  const [page, setPage] = useState(0);
  // New rows (another query) start at the first page; a poll that keeps the
  // count keeps the page.
  useEffect(() => {
    if (page >= pages) setPage(pages - 1);
  }, [pages]);
  const shown = props.rows.slice(page * size, page * size + size);
  return (
    <div class="paged">
      {props.render(shown)}
      {pages > 1 && (
        <nav class="pager" aria-label={`${props.label}: pages`}>
          <button type="button" onClick={() => setPage(0)} disabled={page === 0} aria-label="First page">
            First
          </button>
          <button type="button" onClick={() => setPage(page - 1)} disabled={page === 0} aria-label="Previous page">
            Previous
          </button>
          <span data-testid="pager-status">
            {int(page * size + 1)}–{int(Math.min(props.rows.length, page * size + size))} of {int(props.rows.length)}
          </span>
          <button type="button" onClick={() => setPage(page + 1)} disabled={page >= pages - 1} aria-label="Next page">
            Next
          </button>
          <button type="button" onClick={() => setPage(pages - 1)} disabled={page >= pages - 1} aria-label="Last page">
            Last
          </button>
        </nav>
      )}
    </div>
  );
}

/** A table whose columns scroll sideways on a narrow screen instead of the page. */
export function Table(props: { caption: string; head: string[]; children: ComponentChildren; testid?: string; numeric?: number[] }) {
  return (
    // Focusable so that a keyboard can scroll it sideways on a narrow screen.
    <div class="table-wrap" tabIndex={0} role="region" aria-label={props.caption}>
      <table data-testid={props.testid}>
        <caption class="visually-hidden">{props.caption}</caption>
        <thead>
          <tr>
            {props.head.map((h, i) => (
              <th scope="col" class={props.numeric?.includes(i) ? "num" : undefined}>
                {h}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>{props.children}</tbody>
      </table>
    </div>
  );
}

export function KeyValues(props: { items: [string, ComponentChildren, string?][]; testid?: string }) {
  return (
    <dl class="kv" data-testid={props.testid}>
      {props.items.map(([k, v, testid]) => (
        <div>
          <dt>{k}</dt>
          <dd data-testid={testid}>{v}</dd>
        </div>
      ))}
    </dl>
  );
}

interface InputProps {
  label: string;
  value: string;
  onValue: (v: string) => void;
  hint?: string;
  type?: "text" | "password" | "datetime-local";
  placeholder?: string;
  required?: boolean;
  disabled?: boolean;
  pattern?: string;
  autocomplete?: "off";
  "aria-invalid"?: boolean;
  "data-testid"?: string;
}

/** An input with its label (and hint) tied to it. */
export function Field({ label, value, onValue, hint, ...rest }: InputProps) {
  const id = useId();
  return (
    <div class="field">
      <label for={id}>{label}</label>
      <input
        id={id}
        value={value}
        onInput={(e) => onValue(e.currentTarget.value)}
        aria-describedby={hint ? `${id}-hint` : undefined}
        // Preact's input types tie each `type` to its own attributes; these
        // three kinds share the ones InputProps lists.
        {...(rest as object)}
      />
      {hint && (
        <small id={`${id}-hint`} class="hint">
          {hint}
        </small>
      )}
    </div>
  );
}

/** The choices of a QoS select. */
export const QOS_OPTIONS: ["0" | "1" | "2", string][] = [
  ["0", "0"],
  ["1", "1"],
  ["2", "2"],
];

export function Select<V extends string>(props: {
  label: string;
  value: V;
  options: [V, string][];
  onValue: (v: V) => void;
  testid?: string;
  /** A few short choices (QoS): no need for a wide box. */
  narrow?: boolean;
}) {
  const id = useId();
  return (
    <div class={props.narrow ? "field narrow" : "field"}>
      <label for={id}>{props.label}</label>
      <select id={id} value={props.value} data-testid={props.testid} onChange={(e) => props.onValue(e.currentTarget.value as V)}>
        {props.options.map(([v, text]) => (
          <option value={v}>{text}</option>
        ))}
      </select>
    </div>
  );
}

/** A range ending now (`span` ms long) or a fixed one. */
export type Range = { span: number } | { from: number; to: number };

/** The from/to of a range at the moment of the query. */
export function resolve(r: Range): { from: number; to: number } {
  if ("span" in r) {
    const to = Date.now();
    return { from: to - r.span, to };
  }
  return r;
}

/**
 * A time range: shortcuts ending now (the seed consoles' "last 3 hours /
 * 12 hours / 1 day") or a custom start and end, at most `max` ms apart.
 */
export function RangePicker(props: {
  shortcuts: [string, number][];
  max: number;
  value: Range;
  onChange: (r: Range) => void;
}) {
  const shown = resolve(props.value);
  const [from, setFrom] = useState(localInput(shown.from));
  const [to, setTo] = useState(localInput(shown.to));
  useEffect(() => {
    const r = resolve(props.value);
    setFrom(localInput(r.from));
    setTo(localInput(r.to));
  }, [props.value]);
  const f = fromLocalInput(from);
  const t = fromLocalInput(to);
  const problem =
    f === undefined || t === undefined
      ? "Give a start and an end."
      : f > t
        ? "The start is after the end."
        : t - f > props.max
          ? `The range may span at most ${props.max / HOUR} hours.`
          : null;
  const active = "span" in props.value ? props.value.span : null;
  return (
    <fieldset class="range">
      <legend>Time range</legend>
      <div class="row">
        {props.shortcuts.map(([label, span]) => (
          <button type="button" class="secondary" aria-pressed={active === span} onClick={() => props.onChange({ span })}>
            Last {label}
          </button>
        ))}
        <div class="row">
          <Field label="From" type="datetime-local" value={from} onValue={setFrom} />
          <Field label="To" type="datetime-local" value={to} onValue={setTo} />
          <button
          type="button"
          class="secondary"
          disabled={problem !== null}
          onClick={() =>
            // The inputs count whole minutes: "to" takes in all of its minute.
            f !== undefined && t !== undefined && props.onChange({ from: f, to: Math.min(t + 59_999, f + props.max) })
          }
        >
          Use this range
          </button>
        </div>
      </div>
      {problem && <small class="hint">{problem}</small>}
    </fieldset>
  );
}

/** Whole-range shortcuts, used where the API allows up to a day. */
export const DAY_SHORTCUTS: [string, number][] = [
  ["1 hour", HOUR],
  ["3 hours", 3 * HOUR],
  ["12 hours", 12 * HOUR],
  ["1 day", DAY],
];
