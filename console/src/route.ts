// Hash routing (#/page?param=value): the console is one document, so the
// node serves the same three files whatever page is asked, and every view
// a person may want to send to a colleague (a client, a trace) is a link.

import { useEffect, useState } from "preact/hooks";

export interface Route {
  page: string;
  params: URLSearchParams;
}

function parse(hash: string): Route {
  const h = hash.replace(/^#\/?/, "");
  const q = h.indexOf("?");
  const page = (q < 0 ? h : h.slice(0, q)) || "overview";
  return { page, params: new URLSearchParams(q < 0 ? "" : h.slice(q + 1)) };
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parse(location.hash));
  useEffect(() => {
    const changed = () => setRoute(parse(location.hash));
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  return route;
}

/** The address of a page with parameters, e.g. link("clients", {id}). */
export function link(page: string, params: Record<string, string | undefined> = {}): string {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) p.set(k, v);
  const s = p.toString();
  return `#/${page}${s ? `?${s}` : ""}`;
}
