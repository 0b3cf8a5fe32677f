// Traces (O4, O5): a device's connection history and a message's way from
// its publisher to its receivers, as timelines in plain words.

import { useState } from "preact/hooks";
import { type DeviceEvent, type MessageEvent, api } from "../api";
import { DAY, HOUR, int, time } from "../format";
import { useQuery } from "../hooks";
import { link } from "../route";
import { DAY_SHORTCUTS, ErrorNotice, Field, MissingNodes, Paged, type Range, RangePicker, Section, resolve } from "../ui";

/** Most events one query asks for (the API allows up to 10 000). */
const LIMIT = 1000;

const ACTIONS: Record<string, [string, "start" | "end" | "info" | "refused"]> = {
  connect: ["Connect", "start"],
  resumed: ["Session resumed", "start"],
  subscribed: ["Subscribed", "info"],
  disconnect: ["Disconnect", "end"],
  close: ["Connection closed", "end"],
  discarded: ["Session discarded", "end"],
  takeovered: ["Taken over", "end"],
  publish: ["Publish refused", "refused"],
};

const REASONS: Record<string, string> = {
  accepted: "the broker accepted it",
  "not authorized": "the credentials or the instance's permissions were refused",
  "clientId conflict": "another connection with the same Client ID replaced this one",
  "topic auth failed": "the client has no permission for a topic it used",
  "no heart": "no packet within one and a half keep-alive intervals",
  "closed by client": "the client closed the network connection without sending DISCONNECT",
  "disconnected by client": "the client sent DISCONNECT",
  "quota exceeded": "the instance's capacity was reached",
  kicked: "disconnected from the console or the operations API",
  "session moved": "its session moved to another node (the ring changed)",
  "server shutting down": "the node was stopping",
  "protocol error": "the client broke the MQTT protocol",
  invalid: "the request was invalid",
};

function DeviceTimeline(props: { events: DeviceEvent[] }) {
  return (
    <Paged
      rows={props.events}
      size={50}
      label="Device trace"
      render={(rows) => (
        <ol class="timeline" data-testid="device-timeline">
          {rows.map((e) => {
            const [name, kind] = ACTIONS[e.action] ?? [e.action, "info"];
            // A refusal at connect time ends the attempt: show it as such.
            const k = e.reason !== "accepted" && kind === "start" ? "refused" : kind;
            return (
              <li class={`event event-${k}`} data-testid="device-event" data-action={e.action} data-reason={e.reason}>
                <time dateTime={new Date(e.ts).toISOString()}>{time(e.ts)}</time>
                <div>
                  <strong>{name}</strong> — {e.reason}
                  <span class="muted">: {REASONS[e.reason] ?? e.reason}</span>
                  {e.detail && <div class="detail">{e.detail}</div>}
                  <div class="muted small">
                    connection {e.channelId} · node {e.node}
                  </div>
                </div>
              </li>
            );
          })}
        </ol>
      )}
    />
  );
}

function DeviceTrace(props: { clientId: string | null }) {
  const [clientId, setClientId] = useState(props.clientId ?? "");
  const [range, setRange] = useState<Range>({ span: HOUR });
  const [asked, setAsked] = useState<{ clientId: string; range: Range } | null>(
    props.clientId ? { clientId: props.clientId, range } : null,
  );
  const q = useQuery(asked ? () => api.deviceTrace({ clientId: asked.clientId, ...resolve(asked.range), limit: LIMIT }) : null, [asked]);
  return (
    <Section title="Device trace">
      <form
        onSubmit={(e) => {
          e.preventDefault();
          const id = clientId.trim();
          if (!id) return;
          history.replaceState(null, "", link("traces", { kind: "device", clientId: id }));
          setAsked({ clientId: id, range });
        }}
      >
        <Field label="Client ID" value={clientId} onValue={setClientId} required placeholder="GID_group@@@device" data-testid="device-client-id" />
        <RangePicker shortcuts={DAY_SHORTCUTS} max={DAY} value={range} onChange={setRange} />
        <button type="submit">Search</button>
      </form>
      <ErrorNotice error={q.error} />
      {q.loading && <p>Asking every node…</p>}
      {q.data && (
        <>
          <MissingNodes nodes={q.data.missingNodes} />
          <p data-testid="device-summary">
            {int(q.data.events.length)} event{q.data.events.length === 1 ? "" : "s"} of{" "}
            <a href={link("clients", { id: q.data.clientId })}>{q.data.clientId}</a> from {time(q.data.from, false)} to{" "}
            {time(q.data.to, false)}
            {q.data.events.length >= LIMIT && ` (the first ${int(LIMIT)}: narrow the range to see the rest)`}.
          </p>
          {q.data.events.length > 0 && <DeviceTimeline events={q.data.events} />}
        </>
      )}
    </Section>
  );
}

const MESSAGE_ACTIONS: Record<MessageEvent["action"], string> = {
  published: "Published by",
  from_kafka: "Sent from Kafka (mq2mqtt) as",
  pushed: "Delivered to",
  offline_pushed: "Delivered (offline message) to",
};

const SENT = new Set(["published", "from_kafka"]);

function MessageTimeline(props: { events: MessageEvent[]; testid: string; byMessage: boolean }) {
  const first = props.events[0]?.ts;
  return (
    <Paged
      rows={props.events}
      size={50}
      label="Message trace"
      render={(rows) => (
        <ol class="timeline" data-testid={props.testid}>
          {rows.map((e) => (
            <li
              class={`event ${SENT.has(e.action) ? "event-start" : "event-info"}`}
              data-testid="message-event"
              data-action={e.action}
              data-client={e.clientId}
            >
              <time dateTime={new Date(e.ts).toISOString()}>{time(e.ts)}</time>
              <div>
                <strong>{MESSAGE_ACTIONS[e.action] ?? e.action}</strong>{" "}
                <a href={link("clients", { id: e.clientId })}>{e.clientId}</a> on <code>{e.topic}</code> (QoS {e.qos})
                {props.byMessage && first !== undefined && e.ts > first && <span class="muted"> +{int(e.ts - first)} ms</span>}
                <div class="muted small">
                  {props.byMessage ? (
                    <>Message ID {e.messageId}</>
                  ) : (
                    <a href={link("traces", { kind: "message", messageId: e.messageId })}>Message {e.messageId}: its whole trace</a>
                  )}{" "}
                  · node {e.node}
                </div>
              </div>
            </li>
          ))}
        </ol>
      )}
    />
  );
}

function MessageTrace(props: { clientId: string | null; messageId: string | null }) {
  const [clientId, setClientId] = useState(props.clientId ?? "");
  const [messageId, setMessageId] = useState(props.messageId ?? "");
  const [range, setRange] = useState<Range>({ span: HOUR });
  const initial = props.clientId || props.messageId ? { clientId: props.clientId ?? "", messageId: props.messageId ?? "", range } : null;
  const [asked, setAsked] = useState<{ clientId: string; messageId: string; range: Range } | null>(initial);
  const q = useQuery(
    asked
      ? () =>
          api.messageTrace({
            clientId: asked.clientId || undefined,
            messageId: asked.messageId || undefined,
            ...resolve(asked.range),
            limit: LIMIT,
          })
      : null,
    [asked],
  );
  const badId = messageId.trim() !== "" && !/^[0-9a-fA-F]{1,16}$/.test(messageId.trim());
  const events = q.data?.events ?? [];
  const byMessage = Boolean(asked?.messageId);
  return (
    <Section title="Message trace">
      <form
        onSubmit={(e) => {
          e.preventDefault();
          const c = clientId.trim();
          const m = messageId.trim();
          if ((!c && !m) || badId) return;
          history.replaceState(null, "", link("traces", { kind: "message", clientId: c, messageId: m }));
          setAsked({ clientId: c, messageId: m, range });
        }}
      >
        <div class="row">
          <Field label="Client ID" value={clientId} onValue={setClientId} placeholder="GID_group@@@device" data-testid="message-client-id" />
          <Field
            label="Message ID"
            value={messageId}
            onValue={setMessageId}
            placeholder="16 hex digits"
            aria-invalid={badId}
            data-testid="message-id"
          />
        </div>
        <small class="hint">{badId ? "A Message ID is up to 16 hex digits." : "Give a Client ID, a Message ID or both."}</small>
        <RangePicker shortcuts={DAY_SHORTCUTS} max={DAY} value={range} onChange={setRange} />
        <button type="submit" disabled={(!clientId.trim() && !messageId.trim()) || badId}>
          Search
        </button>
      </form>
      <ErrorNotice error={q.error} />
      {q.loading && <p>Asking every node…</p>}
      {q.data && (
        <>
          <MissingNodes nodes={q.data.missingNodes} />
          <p data-testid="message-summary">
            {int(events.length)} event{events.length === 1 ? "" : "s"} from {time(q.data.from, false)} to {time(q.data.to, false)}
            {events.length >= LIMIT && ` (the first ${int(LIMIT)}: narrow the range to see the rest)`}.
          </p>
          {byMessage ? (
            <div class="columns">
              <div>
                <h3>Sent</h3>
                {events.some((e) => SENT.has(e.action)) ? (
                  <MessageTimeline events={events.filter((e) => SENT.has(e.action))} testid="message-sent" byMessage />
                ) : (
                  <p class="muted">No publish of it in this range.</p>
                )}
              </div>
              <div>
                <h3>Delivered</h3>
                {events.some((e) => !SENT.has(e.action)) ? (
                  <MessageTimeline events={events.filter((e) => !SENT.has(e.action))} testid="message-delivered" byMessage />
                ) : (
                  <p class="muted" data-testid="no-deliveries">
                    Not delivered to any client in this range.
                  </p>
                )}
              </div>
            </div>
          ) : (
            events.length > 0 && <MessageTimeline events={events} testid="message-events" byMessage={false} />
          )}
        </>
      )}
    </Section>
  );
}

export function Traces(props: { params: URLSearchParams }) {
  const p = props.params;
  const kind = p.get("kind") === "message" || (!p.get("kind") && p.get("messageId")) ? "message" : "device";
  return (
    <>
      <div class="page-head">
        <h1>Traces</h1>
        <nav class="tabs" aria-label="Trace kind">
          <a href={link("traces", { kind: "device" })} aria-current={kind === "device" ? "page" : undefined}>
            Device trace
          </a>
          <a href={link("traces", { kind: "message" })} aria-current={kind === "message" ? "page" : undefined}>
            Message trace
          </a>
        </nav>
      </div>
      {kind === "device" ? (
        <DeviceTrace clientId={p.get("clientId")} key={`d${p.get("clientId")}`} />
      ) : (
        <MessageTrace clientId={p.get("clientId")} messageId={p.get("messageId")} key={`m${p.get("clientId")}${p.get("messageId")}`} />
      )}
    </>
  );
}
