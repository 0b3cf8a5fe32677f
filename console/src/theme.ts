// Light and dark: the system's preference unless the person chose one with
// the toggle (remembered in localStorage: a theme is no secret). The chosen
// theme is an attribute on <html> that the stylesheet's custom properties
// follow; charts, drawn on canvas, read those properties when they are built.

import { createContext } from "preact";

export type Theme = "light" | "dark";
const KEY = "ringmq-console-theme";
const dark = window.matchMedia("(prefers-color-scheme: dark)");

export function initialTheme(): Theme {
  const chosen = localStorage.getItem(KEY);
  if (chosen === "light" || chosen === "dark") return chosen;
  return dark.matches ? "dark" : "light";
}

export function applyTheme(t: Theme, remember: boolean) {
  document.documentElement.dataset.theme = t;
  if (remember) localStorage.setItem(KEY, t);
}

/** Follows the system while the person has not chosen. */
export function onSystemTheme(f: (t: Theme) => void): () => void {
  const listener = (e: MediaQueryListEvent) => {
    if (!localStorage.getItem(KEY)) f(e.matches ? "dark" : "light");
  };
  dark.addEventListener("change", listener);
  return () => dark.removeEventListener("change", listener);
}

export const ThemeContext = createContext<Theme>("light");

/** A custom property of the current theme, e.g. cssVar("--chart-1"). */
export function cssVar(name: string): string {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}
