// The console's shell: navigation, theme, sign-in, the "did not answer"
// banner, and the page the address names.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { apiEvents, signIn, signOut, storedToken } from "./api";
import { Alarms } from "./pages/alarms";
import { Clients } from "./pages/clients";
import { MqttPage } from "./pages/mqtt";
import { Overview } from "./pages/overview";
import { Report } from "./pages/report";
import { Tools } from "./pages/tools";
import { Traces } from "./pages/traces";
import { useRoute } from "./route";
import "./styles.css";
import { type Theme, ThemeContext, applyTheme, initialTheme, onSystemTheme } from "./theme";
import { Field, Notice } from "./ui";

interface Page {
  path: string;
  title: string;
  view: (p: { params: URLSearchParams }) => preact.JSX.Element;
}

const PAGES: Page[] = [
  { path: "overview", title: "Overview", view: Overview },
  { path: "alarms", title: "Alarms", view: Alarms },
  { path: "clients", title: "Clients", view: Clients },
  { path: "traces", title: "Traces", view: Traces },
  { path: "report", title: "Resource report", view: Report },
  { path: "tools", title: "Tools", view: Tools },
  { path: "mqtt", title: "WebSocket client", view: MqttPage },
];

function SignIn(props: { message?: string }) {
  const [token, setToken] = useState("");
  return (
    <section class="card signin" aria-labelledby="signin-title">
      <h1 id="signin-title">Sign in</h1>
      <p>
        This instance has an admin token. Give it (or its read-only token) to use the console. It is kept in this tab only,
        until you sign out or close it.
      </p>
      {props.message && (
        <Notice kind="error" testid="signin-error">
          {props.message}
        </Notice>
      )}
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (token.trim()) signIn(token.trim());
        }}
      >
        <Field label="Admin token" type="password" value={token} onValue={setToken} required autocomplete="off" data-testid="token" />
        <button type="submit">Sign in</button>
      </form>
    </section>
  );
}

function App() {
  const route = useRoute();
  const [theme, setTheme] = useState<Theme>(initialTheme);
  const [signin, setSignin] = useState<{ message?: string } | null>(null);
  const [down, setDown] = useState<string | null>(null);
  const [hasToken, setHasToken] = useState(storedToken() !== null);
  const [menuOpen, setMenuOpen] = useState(false);
  // Bumped to mount the page afresh (after signing in or out).
  const [epoch, setEpoch] = useState(0);

  useEffect(() => applyTheme(theme, false), []);
  useEffect(() => onSystemTheme((t) => {
    applyTheme(t, false);
    setTheme(t);
  }), []);

  useEffect(() => {
    const on = (kind: string, f: (e: CustomEvent<string | undefined>) => void) => {
      const l = (e: Event) => f(e as CustomEvent<string | undefined>);
      apiEvents.addEventListener(kind, l);
      return () => apiEvents.removeEventListener(kind, l);
    };
    const offs = [
      on("signin-needed", (e) => {
        setHasToken(false);
        setSignin({ message: e.detail });
      }),
      on("signed-in", () => {
        setHasToken(true);
        setSignin(null);
        setEpoch((n) => n + 1);
      }),
      on("signed-out", () => {
        // Only a 401 ever asked for the token: the form is what comes next.
        setHasToken(false);
        setSignin({});
      }),
      on("down", (e) => setDown(e.detail ?? "the operations API did not answer")),
      on("up", () => setDown(null)),
    ];
    return () => offs.forEach((off) => off());
  }, []);

  const page = PAGES.find((p) => p.path === route.page);
  useEffect(() => {
    document.title = `${page?.title ?? "Not found"} · ringmq console`;
    setMenuOpen(false);
  }, [route.page]);

  const toggleTheme = () => {
    const next = theme === "dark" ? "light" : "dark";
    applyTheme(next, true);
    setTheme(next);
  };

  return (
    <ThemeContext.Provider value={theme}>
      <a class="skip" href="#content" onClick={(e) => {
        // The hash is the router's: move focus without changing it.
        e.preventDefault();
        document.getElementById("content")?.focus();
      }}>
        Skip to content
      </a>
      <div class="shell">
        <header class="sidebar">
          <div class="brand">
            <span class="logo" aria-hidden="true">◎</span> ringmq console
            <button
              type="button"
              class="menu-toggle secondary"
              aria-expanded={menuOpen}
              aria-controls="nav"
              onClick={() => setMenuOpen(!menuOpen)}
            >
              Menu
            </button>
          </div>
          <nav id="nav" class={menuOpen ? "open" : undefined} aria-label="Pages">
            <ul>
              {PAGES.map((p) => (
                <li>
                  <a href={`#/${p.path}`} aria-current={p.path === route.page ? "page" : undefined} data-testid={`nav-${p.path}`}>
                    {p.title}
                  </a>
                </li>
              ))}
            </ul>
          </nav>
          <div class={`tools-bar${menuOpen ? " open" : ""}`}>
            <button type="button" class="secondary" onClick={toggleTheme} data-testid="theme-toggle">
              {theme === "dark" ? "Light theme" : "Dark theme"}
            </button>
            {hasToken && (
              <button type="button" class="secondary" onClick={signOut} data-testid="sign-out">
                Sign out
              </button>
            )}
          </div>
        </header>
        <main id="content" tabIndex={-1}>
          {down && (
            <Notice kind="error" testid="api-down">
              <strong>{down[0].toUpperCase() + down.slice(1)}.</strong> The page keeps trying; check that the node runs and
              that this address reaches its admin port.
            </Notice>
          )}
          {signin ? (
            <SignIn message={signin.message} />
          ) : page ? (
            <page.view params={route.params} key={`${page.path}-${epoch}`} />
          ) : (
            <>
              <h1>Not found</h1>
              <p>
                There is no page {route.page}. <a href="#/overview">Go to the overview</a>.
              </p>
            </>
          )}
        </main>
      </div>
    </ThemeContext.Provider>
  );
}

const root = document.getElementById("app")!;
// The "Loading" text index.html shows until the script runs.
root.textContent = "";
render(<App />, root);
