// Clients (O2, O3): one Client ID in detail (kick, unsubscribe), the online
// status of a pasted list, and online counts by topic and by Group ID.

import { useMemo, useState } from "preact/hooks";
import { ApiError, type Client, api } from "../api";
import { type ChartData, TimeChart } from "../charts";
import { DAY, HOUR, int, time } from "../format";
import { useAction, useQuery } from "../hooks";
import { link } from "../route";
import { ErrorNotice, Field, KeyValues, MissingNodes, Notice, Paged, type Range, RangePicker, Section, Table, resolve } from "../ui";

/** Most Client IDs one batch query takes (the API's limit). */
const MAX_BATCH = 1000;

function Detail(props: { c: Client; reload: () => void; kicked: (id: string) => void }) {
  const { c } = props;
  const [confirming, setConfirming] = useState(false);
  const kick = useAction(async () => {
    const r = await api.kick(c.clientId);
    setConfirming(false);
    props.kicked(r.clientId);
    props.reload();
    return r;
  });
  const unsubscribe = useAction(async (filter: string) => {
    const r = await api.unsubscribe(c.clientId, filter);
    props.reload();
    return r;
  });
  return (
    <div data-testid="client-detail">
      <MissingNodes nodes={c.missingNodes} />
      <p>
        <span class={`state ${c.online ? "state-running" : "state-offline"}`} data-testid="client-online">
          {c.online ? "online" : "offline"}
        </span>{" "}
        <strong>{c.clientId}</strong> on node {c.node}
      </p>
      <KeyValues
        items={[
          ["IP address", c.ip ?? "—", "client-ip"],
          ["Protocol", c.protocol ?? "—", "client-protocol"],
          ["Connection ID", c.channelId ?? "—"],
          ["Connected at", time(c.connectedAt)],
          ["Disconnected at", time(c.disconnectedAt)],
          ["Clean session", c.cleanSession ? "yes" : "no"],
          ["User", c.user ?? "—"],
          ["Messages sent to it", int(c.messagesSent), "client-sent"],
          ["Messages received from it", int(c.messagesReceived), "client-received"],
          ["Offline messages queued", int(c.offlineMessages)],
        ]}
      />
      <p class="links">
        <a href={link("traces", { kind: "device", clientId: c.clientId })}>Device trace</a>
        <a href={link("traces", { kind: "message", clientId: c.clientId })}>Message trace</a>
      </p>
      <div class="actions">
        {c.online && !confirming && (
          <button type="button" class="danger" onClick={() => setConfirming(true)} data-testid="kick">
            Kick
          </button>
        )}
        {confirming && (
          <>
            <span>Disconnect {c.clientId} now?</span>
            <button type="button" class="danger" onClick={() => kick.run()} disabled={kick.busy} data-testid="kick-confirm">
              Disconnect
            </button>
            <button type="button" class="secondary" onClick={() => setConfirming(false)}>
              Cancel
            </button>
          </>
        )}
      </div>
      <ErrorNotice error={kick.error} />
      <h3>Subscriptions ({int(c.subscriptionCount)})</h3>
      {unsubscribe.result && (
        <Notice kind="ok" testid="unsubscribe-done">
          Removed the subscription {unsubscribe.result.filter}.
        </Notice>
      )}
      <ErrorNotice error={unsubscribe.error} />
      {c.subscriptions.length === 0 ? (
        <p data-testid="no-subscriptions">No subscriptions.</p>
      ) : (
        <Paged
          rows={c.subscriptions}
          label="Subscriptions"
          render={(rows) => (
            <Table caption="Subscriptions of the client" testid="subscriptions" head={["Topic filter", "QoS", "Action"]}>
              {rows.map((s) => (
                <tr data-testid={`subscription-${s.filter}`}>
                  <th scope="row">
                    <code>{s.filter}</code>
                  </th>
                  <td>{s.qos}</td>
                  <td>
                    <button
                      type="button"
                      class="secondary"
                      disabled={unsubscribe.busy}
                      onClick={() => unsubscribe.run(s.filter)}
                      aria-label={`Unsubscribe ${s.filter}`}
                    >
                      Unsubscribe
                    </button>
                  </td>
                </tr>
              ))}
            </Table>
          )}
        />
      )}
    </div>
  );
}

/** How often a client's detail is asked again while it is shown. */
const DETAIL_POLL_MS = 5_000;

function Lookup(props: { id: string | null }) {
  const [input, setInput] = useState(props.id ?? "");
  const id = props.id;
  const q = useQuery(id ? () => api.client(id) : null, [id], DETAIL_POLL_MS);
  // A session that is gone (a clean session disconnected, or kicked) must
  // not stay on screen as it was.
  const gone = q.error instanceof ApiError && q.error.status === 404;
  // Said above the detail: a kicked clean session's detail is gone at the next answer.
  const [kicked, setKicked] = useState<string | null>(null);
  return (
    <Section title="Look up a Client ID">
      <form
        class="row"
        onSubmit={(e) => {
          e.preventDefault();
          const v = input.trim();
          // The Client ID goes into the address: the result can be linked to.
          if (v) location.hash = link("clients", { id: v });
        }}
      >
        <Field label="Client ID" value={input} onValue={setInput} placeholder="GID_group@@@device" required data-testid="lookup-id" />
        <button type="submit">Look up</button>
      </form>
      {q.loading && !q.data && <p>Asking every node…</p>}
      <ErrorNotice error={q.error} testid="lookup-error" />
      {kicked && (
        <Notice kind="ok" testid="kick-done">
          {kicked} was disconnected.
        </Notice>
      )}
      {q.data && !gone && <Detail c={q.data} reload={q.reload} kicked={setKicked} />}
    </Section>
  );
}

function parseIds(text: string): string[] {
  return [...new Set(text.split(/[\s,;]+/).filter((s) => s.length > 0))];
}

function Batch() {
  const [text, setText] = useState("");
  const [filter, setFilter] = useState<"all" | "online" | "offline">("all");
  const ids = parseIds(text);
  const check = useAction((list: string[]) => api.online(list));
  const rows = useMemo(
    () =>
      Object.entries(check.result?.online ?? {}).filter(
        ([, on]) => filter === "all" || (filter === "online") === on,
      ),
    [check.result, filter],
  );
  const onlineCount = Object.values(check.result?.online ?? {}).filter(Boolean).length;
  return (
    <Section title="Online status of many Client IDs">
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (ids.length > 0 && ids.length <= MAX_BATCH) void check.run(ids);
        }}
      >
        <div class="field">
          <label for="batch-ids">Client IDs</label>
          <textarea
            id="batch-ids"
            rows={4}
            value={text}
            onInput={(e) => setText(e.currentTarget.value)}
            aria-describedby="batch-hint"
            data-testid="batch-ids"
          />
          <small id="batch-hint" class="hint">
            One per line (or separated by commas or spaces), at most {int(MAX_BATCH)}. {ids.length > 0 && `${int(ids.length)} given.`}
          </small>
        </div>
        {ids.length > MAX_BATCH && <Notice kind="error">At most {int(MAX_BATCH)} Client IDs per query.</Notice>}
        <button type="submit" disabled={ids.length === 0 || ids.length > MAX_BATCH || check.busy}>
          Check
        </button>
      </form>
      <ErrorNotice error={check.error} />
      {check.result && (
        <>
          <MissingNodes nodes={check.result.missingNodes} />
          <p data-testid="batch-summary">
            {int(onlineCount)} of {int(Object.keys(check.result.online).length)} online.
          </p>
          <fieldset class="inline">
            <legend>Show</legend>
            {(["all", "online", "offline"] as const).map((f) => (
              <label>
                <input type="radio" name="batch-filter" checked={filter === f} onChange={() => setFilter(f)} /> {f}
              </label>
            ))}
          </fieldset>
          <Paged
            rows={rows}
            label="Online status"
            render={(page) => (
              <Table caption="Online status by Client ID" testid="batch-results" head={["Client ID", "Status"]}>
                {page.map(([id, on]) => (
                  <tr data-testid={`batch-${id}`}>
                    <th scope="row">
                      <a href={link("clients", { id })}>{id}</a>
                    </th>
                    <td>
                      <span class={`state ${on ? "state-running" : "state-offline"}`}>{on ? "online" : "offline"}</span>
                    </td>
                  </tr>
                ))}
              </Table>
            )}
          />
        </>
      )}
    </Section>
  );
}

function ByTopic() {
  const [topic, setTopic] = useState("");
  const count = useAction((t: string) => api.topicOnline(t));
  return (
    <Section title="Subscribers online for a topic">
      <form
        class="row"
        onSubmit={(e) => {
          e.preventDefault();
          if (topic.trim()) void count.run(topic.trim());
        }}
      >
        <Field label="Topic" value={topic} onValue={setTopic} placeholder="parent/subtopic" required hint="A topic name, as a device would publish to it" />
        <button type="submit" disabled={count.busy}>
          Count
        </button>
      </form>
      <ErrorNotice error={count.error} />
      {count.result && (
        <>
          <MissingNodes nodes={count.result.missingNodes} />
          <KeyValues
            items={[
              ["Topic", <code>{count.result.topic}</code>],
              ["Subscribers online", int(count.result.online), "topic-online"],
            ]}
          />
        </>
      )}
    </Section>
  );
}

/** Most Group IDs drawn in the chart (the table lists them all). */
const CHART_GROUPS = 6;

function ByGroup() {
  const [group, setGroup] = useState("");
  const [asked, setAsked] = useState<{ group: string; range: Range } | null>(null);
  const [range, setRange] = useState<Range>({ span: 2 * HOUR });
  const q = useQuery(
    asked ? () => api.groups({ ...resolve(asked.range), groupId: asked.group || undefined }) : null,
    [asked],
  );
  const g = q.data;
  const now = useMemo(() => Object.entries(g?.now ?? {}).sort((a, b) => b[1] - a[1]), [g]);
  const chart = useMemo(() => {
    if (!g) return null;
    // The busiest groups over the range.
    const peak = new Map<string, number>();
    for (const s of g.history) for (const [k, v] of Object.entries(s.groups)) peak.set(k, Math.max(peak.get(k) ?? 0, v));
    const names = [...peak.entries()].sort((a, b) => b[1] - a[1]).slice(0, CHART_GROUPS).map(([k]) => k);
    const data: ChartData = {
      x: g.history.map((s) => s.ts),
      ys: names.map((n) => g.history.map((s) => s.groups[n] ?? 0)),
    };
    return { names, data };
  }, [g]);
  return (
    <Section title="Online by Group ID">
      <form
        onSubmit={(e) => {
          e.preventDefault();
          setAsked({ group: group.trim(), range });
        }}
      >
        <Field label="Group ID" value={group} onValue={setGroup} hint="Empty: every Group ID" data-testid="group-id" />
        <RangePicker
          shortcuts={[
            ["2 hours", 2 * HOUR],
            ["12 hours", 12 * HOUR],
            ["1 day", DAY],
            ["2 days", 2 * DAY],
          ]}
          max={2 * DAY}
          value={range}
          onChange={setRange}
        />
        <button type="submit">Show</button>
      </form>
      <ErrorNotice error={q.error} />
      {g && (
        <>
          <MissingNodes nodes={g.missingNodes} />
          {now.length === 0 ? (
            <p data-testid="groups-empty">No client of {asked?.group ? `Group ID ${asked.group}` : "any Group ID"} is online now.</p>
          ) : (
            <Paged
              rows={now}
              label="Online by Group ID"
              render={(rows) => (
                <Table caption="Online now by Group ID" testid="groups-now" head={["Group ID", "Online now"]} numeric={[1]}>
                  {rows.map(([k, v]) => (
                    <tr data-testid={`group-${k}`}>
                      <th scope="row">{k}</th>
                      <td class="num">{int(v)}</td>
                    </tr>
                  ))}
                </Table>
              )}
            />
          )}
          {chart && chart.data.x.length > 0 ? (
            <TimeChart
              title={`Online connections, ${time(g.from, false)} to ${time(g.to, false)}`}
              series={chart.names.map((label) => ({ label }))}
              data={chart.data}
              summary={`${chart.data.x.length} samples of ${chart.names.length} Group IDs.`}
              testid="groups-chart"
            />
          ) : (
            <p class="muted">No samples in this range yet: the nodes take one a minute.</p>
          )}
        </>
      )}
    </Section>
  );
}

export function Clients(props: { params: URLSearchParams }) {
  const id = props.params.get("id");
  return (
    <>
      <div class="page-head">
        <h1>Clients</h1>
        <p class="muted">Every node is asked; the answer is the instance's.</p>
      </div>
      <Lookup id={id} key={id ?? ""} />
      <Batch />
      <ByTopic />
      <ByGroup />
    </>
  );
}
