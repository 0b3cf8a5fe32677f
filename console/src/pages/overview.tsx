// Overview (O1): what the instance holds against what it may hold, live.

import { useMemo } from "preact/hooks";
import { type Instance, type Metric, METRICS, api } from "../api";
import { type ChartData, Gauge, TimeChart } from "../charts";
import { int, percent, time, tps } from "../format";
import { useQuery } from "../hooks";
import { ErrorNotice, KeyValues, MissingNodes, Notice, Section, Table } from "../ui";

/** Seconds between two polls of /instance. */
const POLL_MS = 2_000;
/** How much TPS history the charts keep (in this tab's memory only). */
const KEEP_MS = 10 * 60_000;

// Samples outlive the page component: going to another page and back keeps
// the chart's last minutes.
const samples: { x: number[]; pub: number[]; sub: number[] } = { x: [], pub: [], sub: [] };

function record(at: number, i: Instance) {
  if (at <= (samples.x[samples.x.length - 1] ?? 0)) return;
  samples.x.push(at);
  samples.pub.push(i.totals.pubTps);
  samples.sub.push(i.totals.subTps);
  while (samples.x.length && samples.x[0] < at - KEEP_MS) {
    samples.x.shift();
    samples.pub.shift();
    samples.sub.shift();
  }
}

const NAMES: Record<Metric, string> = {
  connections: "Connections",
  subscriptions: "Subscriptions",
  topics: "Topics",
  tps: "TPS (weighted)",
};

function value(i: Instance, m: Metric): number {
  return m === "tps" ? i.totals.tps : i.totals[m];
}

function Capacity(props: { i: Instance; m: Metric }) {
  const { i, m } = props;
  const cap = i.capacity[m];
  const threshold = i.alarmThresholds[m];
  const thresholdPercent = threshold !== null && cap > 0 ? (threshold * 100) / cap : null;
  const v = value(i, m);
  return (
    <div class="gauge-card" data-testid={`capacity-${m}`}>
      <h3>{NAMES[m]}</h3>
      <Gauge label={NAMES[m]} percent={i.utilization[m]} thresholdPercent={thresholdPercent} testid={`gauge-${m}`} />
      <p class="gauge-value">
        <span data-testid={`total-${m}`}>{m === "tps" ? tps(v) : int(v)}</span>
        <span class="muted"> / {cap > 0 ? int(cap) : "no limit"}</span>
      </p>
      <p class="muted">
        <span data-testid={`utilization-${m}`}>{percent(i.utilization[m])}</span> used
        {threshold !== null && (
          <>
            {" "}
            · alarm at <span data-testid={`threshold-${m}`}>{int(threshold)}</span>
            {thresholdPercent !== null && ` (${thresholdPercent.toFixed(0)}\u00a0%)`}
          </>
        )}
      </p>
    </div>
  );
}

export function Overview() {
  const q = useQuery(api.instance, [], POLL_MS);
  const i = q.data;
  // Each answer is a sample, taken before the charts copy them (a new
  // object per poll tells a chart to redraw).
  const [pub, sub]: ChartData[] = useMemo(() => {
    if (i && q.at) record(q.at, i);
    return [
      { x: [...samples.x], ys: [[...samples.pub]] },
      { x: [...samples.x], ys: [[...samples.sub]] },
    ];
  }, [q.at]);
  // The window grows with the samples (at least half a minute) up to KEEP_MS.
  const end = q.at ?? Date.now();
  const span: [number, number] = [Math.max(end - KEEP_MS, Math.min(samples.x[0] ?? end, end - 30_000)), end];

  return (
    <>
      <div class="page-head">
        <h1>Overview</h1>
        {i && (
          <p class="muted">
            Instance <strong data-testid="instance-name">{i.name}</strong> · capacity mode{" "}
            <span data-testid="capacity-mode">{i.capacity.mode === "enforce" ? "enforced" : "alarm only"}</span>
            {q.at && <> · updated {time(q.at, false)}</>}
          </p>
        )}
      </div>
      <ErrorNotice error={q.error} />
      {!i && q.loading && <p>Loading the instance…</p>}
      {i && (
        <>
          <MissingNodes nodes={i.missingNodes} />
          {i.activeAlarms > 0 && (
            <Notice kind="warn" testid="active-alarms">
              {i.activeAlarms === 1 ? "1 alarm is" : `${i.activeAlarms} alarms are`} active. <a href="#/alarms">See alarms</a>
            </Notice>
          )}
          <Section title="Capacity and utilisation">
            <div class="gauges">
              {METRICS.map((m) => (
                <Capacity i={i} m={m} />
              ))}
            </div>
          </Section>
          <Section title="Messages per second (weighted: QoS 0 ×1, QoS 1 ×2, QoS 2 ×10)">
            <div class="charts">
              <TimeChart
                title="Received from publishers (pub TPS)"
                series={[{ label: "pub TPS" }]}
                data={pub}
                span={span}
                summary={`Publish rate now ${tps(i.totals.pubTps)} messages per second.`}
                testid="chart-pub"
              />
              <TimeChart
                title="Sent to subscribers (sub TPS)"
                series={[{ label: "sub TPS" }]}
                data={sub}
                span={span}
                summary={`Delivery rate now ${tps(i.totals.subTps)} messages per second.`}
                testid="chart-sub"
              />
            </div>
            <p class="muted">
              What this tab has watched (up to {KEEP_MS / 60_000} minutes), a sample every {POLL_MS / 1000} s.
            </p>
          </Section>
          <div class="columns">
            <Section title="Totals">
              <KeyValues
                testid="totals"
                items={[
                  ["Connections", int(i.totals.connections)],
                  ["Subscriptions", int(i.totals.subscriptions)],
                  ["Topics", int(i.totals.topics)],
                  ["Pub TPS", tps(i.totals.pubTps), "total-pub-tps"],
                  ["Sub TPS", tps(i.totals.subTps), "total-sub-tps"],
                  ["Active alarms", int(i.activeAlarms), "total-active-alarms"],
                ]}
              />
            </Section>
            <Section title="Endpoints">
              {Object.keys(i.endpoints).length === 0 ? (
                <p class="muted">No endpoints configured (instance.endpoints).</p>
              ) : (
                <KeyValues
                  testid="endpoints"
                  items={Object.entries(i.endpoints).map(([kind, url]) => [kind, <code>{url}</code>, `endpoint-${kind}`])}
                />
              )}
            </Section>
          </div>
          <Section title={`Nodes (${i.nodes.length})`}>
            <Table
              caption="Nodes of the instance"
              testid="nodes"
              head={["Node", "State", "Connections", "Max connections", "Subscriptions", "Subscribers", "Sessions", "Under-replicated", "Topics", "Pub TPS", "Sub TPS"]}
              numeric={[2, 3, 4, 5, 6, 7, 8, 9, 10]}
            >
              {i.nodes.map((n) => (
                <tr data-testid={`node-${n.name}`}>
                  <th scope="row">
                    {n.name}
                    {n.alarmEvaluator && <span class="tag" title="This node evaluates the instance's alarms">alarms</span>}
                  </th>
                  <td>
                    <span class={`state state-${n.state}`} data-testid="node-state">
                      {n.state}
                    </span>
                  </td>
                  <td class="num" data-testid="node-connections">
                    {int(n.connections)}
                  </td>
                  <td class="num">{int(n.maxConnections)}</td>
                  <td class="num" data-testid="node-subscriptions">
                    {int(n.subscriptions)}
                  </td>
                  <td class="num">{int(n.subscribers)}</td>
                  <td class="num">{int(n.sessions)}</td>
                  <td class="num" data-testid="node-under-replicated" title="Persistent sessions this node owns with fewer copies than the replication factor asks">
                    {int(n.underReplicatedSessions)}
                  </td>
                  <td class="num">{int(n.topics)}</td>
                  <td class="num">{tps(n.pubTps)}</td>
                  <td class="num">{tps(n.subTps)}</td>
                </tr>
              ))}
            </Table>
            {i.missingNodes.length > 0 && (
              <p data-testid="missing-list">
                Missing: <strong>{i.missingNodes.join(", ")}</strong>
              </p>
            )}
          </Section>
        </>
      )}
    </>
  );
}
