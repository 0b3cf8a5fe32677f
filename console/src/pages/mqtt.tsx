// WebSocket client: an MQTT client in the page (MQTT.js) that connects to
// this node's own WebSocket listener (/mqtt, subprotocol "mqtt"), so a
// person can subscribe and publish without installing anything. It is an
// ordinary MQTT client: the broker asks for its credentials as for any.

import mqtt, { type MqttClient } from "mqtt";
import { useEffect, useRef, useState } from "preact/hooks";
import { type ConsoleConfig, consoleConfig } from "../api";
import { int, time } from "../format";
import { useQuery } from "../hooks";
import { Field, Notice, Paged, QOS_OPTIONS, Section, Select, Table, describe } from "../ui";

/** Received messages kept on the page (oldest dropped first). */
const KEEP = 500;

interface Received {
  n: number;
  at: number;
  topic: string;
  qos: number;
  retain: boolean;
  payload: string;
}

type Status = { state: "disconnected" | "connecting" | "connected"; error?: string };

function randomId(): string {
  const b = crypto.getRandomValues(new Uint8Array(4));
  return `console-${Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("")}`;
}

/** Text if the payload is UTF-8, otherwise its bytes in hex. */
function show(payload: Uint8Array): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(payload);
  } catch {
    return `0x${Array.from(payload, (x) => x.toString(16).padStart(2, "0")).join("")}`;
  }
}

/** The WebSocket address of this node, or null when it has no listener. */
function address(c: ConsoleConfig): string | null {
  // A page served over https may only open wss://.
  if (location.protocol === "https:") return c.wssPort ? `wss://${location.hostname}:${c.wssPort}/mqtt` : null;
  return c.wsPort ? `ws://${location.hostname}:${c.wsPort}/mqtt` : null;
}

export function MqttPage() {
  const config = useQuery(consoleConfig, []);
  const url = config.data ? address(config.data) : null;
  const client = useRef<MqttClient | null>(null);
  const [status, setStatus] = useState<Status>({ state: "disconnected" });
  const [clientId, setClientId] = useState(randomId);
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const [version, setVersion] = useState<"4" | "5">("5");
  const [filter, setFilter] = useState("");
  const [subQos, setSubQos] = useState<"0" | "1" | "2">("0");
  const [subs, setSubs] = useState<{ filter: string; qos: number }[]>([]);
  const [subError, setSubError] = useState<string | null>(null);
  const [topic, setTopic] = useState("");
  const [payload, setPayload] = useState("");
  const [pubQos, setPubQos] = useState<"0" | "1" | "2">("0");
  const [retain, setRetain] = useState(false);
  const [pubResult, setPubResult] = useState<{ ok: boolean; text: string } | null>(null);
  const [received, setReceived] = useState<Received[]>([]);
  const count = useRef(0);

  // Leaving the page ends the connection: it belongs to this page.
  useEffect(() => () => void client.current?.end(true), []);

  const connect = () => {
    if (!url) return;
    client.current?.end(true);
    setStatus({ state: "connecting" });
    setSubs([]);
    const c = mqtt.connect(url, {
      clientId,
      username: username || undefined,
      password: password || undefined,
      protocolVersion: version === "5" ? 5 : 4,
      clean: true,
      keepalive: 30,
      connectTimeout: 10_000,
      // One attempt: a refusal is reported, not retried in a loop.
      reconnectPeriod: 0,
      // The default ("worker") runs timers in a Worker made from a blob: URL,
      // which the console's Content-Security-Policy does not allow.
      timerVariant: "native",
    });
    client.current = c;
    c.on("connect", () => c === client.current && setStatus({ state: "connected" }));
    c.on("error", (e) => c === client.current && setStatus({ state: "disconnected", error: e.message }));
    c.on("close", () =>
      setStatus((s) => (c === client.current ? { state: "disconnected", error: s.error ?? (s.state === "connecting" ? "the connection closed before the broker accepted it" : undefined) } : s)),
    );
    c.on("message", (t, p, packet) => {
      count.current += 1;
      const m: Received = { n: count.current, at: Date.now(), topic: t, qos: packet.qos, retain: packet.retain, payload: show(p) };
      setReceived((list) => [m, ...list].slice(0, KEEP));
    });
  };

  const disconnect = () => {
    client.current?.end();
    setStatus({ state: "disconnected" });
  };

  const subscribe = () => {
    const c = client.current;
    const f = filter.trim();
    if (!c || !f) return;
    setSubError(null);
    c.subscribe(f, { qos: Number(subQos) as 0 | 1 | 2 }, (err, granted) => {
      const g = granted?.[0];
      if (err || !g || g.qos > 2) {
        setSubError(err ? err.message : `the broker refused ${f} (SUBACK ${g?.qos ?? "?"})`);
        return;
      }
      setSubs((s) => [...s.filter((x) => x.filter !== f), { filter: f, qos: g.qos }]);
    });
  };

  const unsubscribe = (f: string) => {
    client.current?.unsubscribe(f, () => setSubs((s) => s.filter((x) => x.filter !== f)));
  };

  const publish = () => {
    const c = client.current;
    const t = topic.trim();
    if (!c || !t) return;
    setPubResult(null);
    c.publish(t, payload, { qos: Number(pubQos) as 0 | 1 | 2, retain }, (err) =>
      setPubResult(err ? { ok: false, text: `Not published: ${err.message}` } : { ok: true, text: `Published to ${t}.` }),
    );
  };

  const connected = status.state === "connected";
  return (
    <>
      <div class="page-head">
        <h1>WebSocket client</h1>
        <p class="muted">An MQTT client in this page, connected to this node's WebSocket listener. It disconnects when you leave the page.</p>
      </div>
      {config.error !== undefined && <Notice kind="error">Could not read the node's settings: {describe(config.error)}</Notice>}
      {config.data && !url && (
        <Notice kind="warn" testid="no-ws">
          This node has no WebSocket listener{location.protocol === "https:" ? " for TLS (listeners.wss)" : " (listeners.ws)"}: there is
          nothing to connect to.
        </Notice>
      )}
      <Section
        title="Connection"
        actions={
          <span class={`state state-${connected ? "running" : status.state === "connecting" ? "joining" : "offline"}`} role="status" data-testid="ws-status">
            {status.state}
          </span>
        }
      >
        <form
          onSubmit={(e) => {
            e.preventDefault();
            connected ? disconnect() : connect();
          }}
        >
          <p>
            Address <code data-testid="ws-url">{url ?? "—"}</code>
          </p>
          <div class="row">
            <Field label="Client ID" value={clientId} onValue={setClientId} required disabled={status.state !== "disconnected"} data-testid="ws-client-id" />
            <Field label="User name" value={username} onValue={setUsername} autocomplete="off" disabled={status.state !== "disconnected"} />
            <Field
              label="Password"
              type="password"
              value={password}
              onValue={setPassword}
              autocomplete="off"
              disabled={status.state !== "disconnected"}
            />
            <Select
              label="MQTT version"
              narrow
              value={version}
              options={[
                ["5", "5"],
                ["4", "3.1.1"],
              ]}
              onValue={setVersion}
            />
            <button type="submit" disabled={!url || status.state === "connecting"} data-testid="ws-connect">
              {connected ? "Disconnect" : "Connect"}
            </button>
          </div>
        </form>
        {status.error && (
          <Notice kind="error" testid="ws-error">
            {status.error}
          </Notice>
        )}
      </Section>
      <div class="columns">
        <Section title="Subscribe">
          <form
            class="row"
            onSubmit={(e) => {
              e.preventDefault();
              subscribe();
            }}
          >
            <Field label="Topic filter" value={filter} onValue={setFilter} required placeholder="parent/#" data-testid="ws-filter" />
            <Select
              label="QoS"
              narrow
              value={subQos}
              options={QOS_OPTIONS}
              onValue={setSubQos}
            />
            <button type="submit" disabled={!connected} data-testid="ws-subscribe">
              Subscribe
            </button>
          </form>
          {subError && <Notice kind="error">{subError}</Notice>}
          {subs.length > 0 && (
            <ul class="plain" data-testid="ws-subscriptions">
              {subs.map((s) => (
                <li>
                  <code>{s.filter}</code> (QoS {s.qos}){" "}
                  <button type="button" class="secondary" onClick={() => unsubscribe(s.filter)} disabled={!connected} aria-label={`Unsubscribe ${s.filter}`}>
                    Unsubscribe
                  </button>
                </li>
              ))}
            </ul>
          )}
        </Section>
        <Section title="Publish">
          <form
            onSubmit={(e) => {
              e.preventDefault();
              publish();
            }}
          >
            <Field label="Topic" value={topic} onValue={setTopic} required placeholder="parent/subtopic" data-testid="ws-topic" />
            <div class="field">
              <label for="ws-payload">Payload</label>
              <textarea id="ws-payload" rows={2} value={payload} onInput={(e) => setPayload(e.currentTarget.value)} data-testid="ws-payload" />
            </div>
            <div class="row">
              <Select label="QoS" narrow value={pubQos} options={QOS_OPTIONS} onValue={setPubQos} />
              <label class="check">
                <input type="checkbox" checked={retain} onChange={(e) => setRetain(e.currentTarget.checked)} /> Retain
              </label>
              <button type="submit" disabled={!connected} data-testid="ws-publish">
                Publish
              </button>
            </div>
          </form>
          {pubResult && (
            <Notice kind={pubResult.ok ? "ok" : "error"} testid="ws-published">
              {pubResult.text}
            </Notice>
          )}
        </Section>
      </div>
      <Section
        title={`Received (${int(received.length)})`}
        actions={
          received.length > 0 && (
            <button type="button" class="secondary" onClick={() => setReceived([])}>
              Clear
            </button>
          )
        }
      >
        {received.length === 0 ? (
          <p class="muted">Nothing received yet. Messages appear here, newest first (the last {KEEP}).</p>
        ) : (
          <Paged
            rows={received}
            label="Received messages"
            render={(rows) => (
              <Table caption="Received messages, newest first" testid="ws-received" head={["#", "Time", "Topic", "QoS", "Retained", "Payload"]}>
                {rows.map((m) => (
                  <tr data-testid="ws-message">
                    <td>{m.n}</td>
                    <td>{time(m.at)}</td>
                    <td>
                      <code data-testid="ws-message-topic">{m.topic}</code>
                    </td>
                    <td>{m.qos}</td>
                    <td>{m.retain ? "yes" : "no"}</td>
                    <td class="payload" data-testid="ws-message-payload">
                      {m.payload}
                    </td>
                  </tr>
                ))}
              </Table>
            )}
          />
        )}
      </Section>
    </>
  );
}
