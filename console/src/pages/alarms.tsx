// Alarms (L4): what fires now, what fired lately, the thresholds, and the
// acknowledgement ("ignore") of a firing alarm.

import { type Alarm, type AlarmMetric, METRICS, api } from "../api";
import { duration, int, time } from "../format";
import { useAction, useQuery } from "../hooks";
import { ErrorNotice, MissingNodes, Notice, Paged, Section, Table } from "../ui";

const POLL_MS = 3_000;

const METRIC_NAMES: Record<AlarmMetric, string> = {
  connections: "Connections",
  subscriptions: "Subscriptions",
  topics: "Topics",
  tps: "TPS (weighted)",
  under_replicated_sessions: "Under-replicated sessions",
};

const STATE_NAMES: Record<Alarm["state"], string> = {
  firing: "firing",
  acknowledged: "acknowledged",
  resolved: "resolved",
};

function AlarmRow(props: { a: Alarm; ack?: (id: string) => void; busy?: boolean }) {
  const { a } = props;
  return (
    <tr data-testid={`alarm-${a.id}`} data-state={a.state}>
      <th scope="row">{METRIC_NAMES[a.metric]}</th>
      <td>
        <span class={`state state-${a.state}`} data-testid="alarm-state">
          {STATE_NAMES[a.state]}
        </span>
      </td>
      <td class="num">{int(a.value)}</td>
      <td class="num">{int(a.peak)}</td>
      <td class="num">{int(a.threshold)}</td>
      <td>{time(a.start, false)}</td>
      <td>{a.end === null ? "—" : time(a.end, false)}</td>
      <td>{duration(a.durationSecs)}</td>
      <td>{a.node}</td>
      {props.ack && (
        <td>
          {a.state === "firing" && !a.acknowledged ? (
            <button type="button" onClick={() => props.ack?.(a.id)} disabled={props.busy} data-testid="ack">
              Acknowledge
            </button>
          ) : (
            <span class="muted">—</span>
          )}
        </td>
      )}
    </tr>
  );
}

const HEAD = ["Metric", "State", "Value", "Peak", "Threshold", "Since", "Ended", "Duration", "Node"];

export function Alarms() {
  const alarms = useQuery(api.alarms, [], POLL_MS);
  const instance = useQuery(api.instance, []);
  const ack = useAction(async (id: string) => {
    const r = await api.ack(id);
    alarms.reload();
    return r;
  });
  const all = alarms.data?.alarms ?? [];
  const active = all.filter((a) => a.state !== "resolved");
  const i = instance.data;

  return (
    <>
      <div class="page-head">
        <h1>Alarms</h1>
        <p class="muted">
          An alarm fires when an instance total stays at or above its threshold for the hold time, and resolves once it
          stays below it by the hysteresis. Acknowledging keeps the record but stops it from counting as active.
        </p>
      </div>
      <ErrorNotice error={alarms.error} />
      <MissingNodes nodes={alarms.data?.missingNodes} />
      {ack.result && (
        <Notice kind="ok" testid="ack-done">
          Alarm {ack.result.id} acknowledged.
        </Notice>
      )}
      <ErrorNotice error={ack.error} testid="ack-error" />
      <Section title={`Active (${active.length})`}>
        {alarms.data && active.length === 0 && (
          <p data-testid="no-active-alarms">Nothing fires: every metric is below its threshold.</p>
        )}
        {active.length > 0 && (
          <Table caption="Active alarms" testid="active-alarms" head={[...HEAD, "Action"]} numeric={[2, 3, 4]}>
            {active.map((a) => (
              <AlarmRow a={a} ack={ack.run} busy={ack.busy} />
            ))}
          </Table>
        )}
      </Section>
      <Section title="Thresholds">
        <ErrorNotice error={instance.error} />
        {i && (
          <Table caption="Alarm thresholds" testid="thresholds" head={["Metric", "Capacity", "Threshold", "Of capacity"]} numeric={[1, 2, 3]}>
            {METRICS.map((m) => {
              const cap = i.capacity[m];
              const t = i.alarmThresholds[m];
              return (
                <tr data-testid={`threshold-${m}`}>
                  <th scope="row">{METRIC_NAMES[m]}</th>
                  <td class="num">{cap > 0 ? int(cap) : "no limit"}</td>
                  <td class="num">{t === null ? "off" : int(t)}</td>
                  <td class="num">{t !== null && cap > 0 ? `${((t * 100) / cap).toFixed(0)}\u00a0%` : "—"}</td>
                </tr>
              );
            })}
            <tr data-testid="threshold-under_replicated_sessions">
              <th scope="row">{METRIC_NAMES.under_replicated_sessions}</th>
              <td class="num">no capacity</td>
              <td class="num">{i.alarmThresholds.under_replicated_sessions === null ? "off" : int(i.alarmThresholds.under_replicated_sessions)}</td>
              <td class="num">—</td>
            </tr>
          </Table>
        )}
        <p class="muted">
          Thresholds come from the node's configuration (<code>alarms:</code>, 70 % of each capacity by default; under-replicated sessions: any, held for <code>hold_secs</code>).
        </p>
      </Section>
      <Section title={`Records (${all.length})`}>
        {alarms.data && all.length === 0 && <p>No alarm has fired within the retention.</p>}
        {all.length > 0 && (
          <Paged
            rows={all}
            label="Alarm records"
            render={(rows) => (
              <Table caption="Alarm records, newest first" testid="alarm-records" head={HEAD} numeric={[2, 3, 4]}>
                {rows.map((a) => (
                  <AlarmRow a={a} />
                ))}
              </Table>
            )}
          />
        )}
      </Section>
    </>
  );
}
