// Data loading for the pages: one answer of the API at a time, optionally
// polled, kept on screen while a later poll fails (a stale number with the
// "did not answer" banner says more than an empty page).

import { useCallback, useEffect, useRef, useState } from "preact/hooks";

export interface Loaded<T> {
  data?: T;
  error?: unknown;
  loading: boolean;
  /** When `data` was received (ms since the epoch). */
  at?: number;
  reload: () => void;
}

/**
 * Runs `fetcher` when `deps` change (never while it is null: a form not
 * submitted yet), on `reload`, and every `pollMs` if given. (After a
 * sign-in the shell mounts the page afresh, which asks again.)
 */
export function useQuery<T>(fetcher: (() => Promise<T>) | null, deps: unknown[], pollMs?: number): Loaded<T> {
  const [state, setState] = useState<Omit<Loaded<T>, "reload">>({ loading: fetcher !== null });
  const [tick, setTick] = useState(0);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  // The latest fetcher, so a poll uses the current parameters.
  const latest = useRef(fetcher);
  latest.current = fetcher;
  // The deps of the answer on screen: a reload keeps it until the next one
  // arrives, other parameters clear it (client A's detail must not stand
  // beside client B's error).
  const shown = useRef<unknown[]>(deps);

  useEffect(() => {
    if (!latest.current) {
      setState({ loading: false });
      return;
    }
    if (deps.length !== shown.current.length || deps.some((d, i) => d !== shown.current[i])) {
      shown.current = deps;
      setState({ loading: true });
    }
    let live = true;
    let timer: number | undefined;
    const run = async () => {
      const f = latest.current;
      if (!f) return;
      setState((s) => ({ ...s, loading: true }));
      try {
        const data = await f();
        if (live) setState({ data, loading: false, at: Date.now() });
      } catch (error) {
        if (live) setState((s) => ({ ...s, error, loading: false }));
      }
      if (live && pollMs) timer = window.setTimeout(run, pollMs);
    };
    void run();
    return () => {
      live = false;
      window.clearTimeout(timer);
    };
    // eslint-style exhaustive deps would want `fetcher`; the caller's deps say when it changes.
  }, [...deps, tick, pollMs]);

  return { ...state, reload };
}

export interface Action<A extends unknown[], R> {
  run: (...args: A) => Promise<R | undefined>;
  busy: boolean;
  error?: unknown;
  result?: R;
}

/** A change the person asks for (kick, acknowledge, send): its result or error. */
export function useAction<A extends unknown[], R>(act: (...args: A) => Promise<R>): Action<A, R> {
  const [state, setState] = useState<{ busy: boolean; error?: unknown; result?: R }>({ busy: false });
  const run = useCallback(
    async (...args: A) => {
      setState({ busy: true });
      try {
        const result = await act(...args);
        setState({ busy: false, result });
        return result;
      } catch (error) {
        setState({ busy: false, error });
        return undefined;
      }
    },
    [act],
  );
  return { ...state, run };
}
