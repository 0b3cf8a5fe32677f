// Resource report (O6): messages produced and consumed per parent topic,
// subtopic and QoS over a range, and a parent topic's state in Kafka (O7).

import { useEffect, useMemo, useState } from "preact/hooks";
import { type QoS, type ReportRow, api } from "../api";
import { type ChartData, TimeChart } from "../charts";
import { DAY, HOUR, int, time, tps } from "../format";
import { useAction, useQuery } from "../hooks";
import { ErrorNotice, Field, KeyValues, MissingNodes, Paged, type Range, QOS_OPTIONS, RangePicker, Section, Select, Table, resolve } from "../ui";

/** The API's own shortcuts, by span. */
const SHORTCUTS: [string, number, string][] = [
  ["1 hour", HOUR, "1h"],
  ["3 hours", 3 * HOUR, "3h"],
  ["12 hours", 12 * HOUR, "12h"],
  ["1 day", DAY, "1d"],
];

/**
 * Bars in the chart. The report answers totals for a range, so the chart
 * asks for each slice of it: a dozen or so slices of a round number of
 * minutes. The nodes count per minute and a query takes in every minute it
 * touches, so slices start on a minute and end a millisecond before the
 * next: no minute is counted twice.
 */
const MINUTE = 60_000;
const STEPS = [1, 2, 5, 10, 15, 30, 60, 120].map((m) => m * MINUTE);

async function slices(from: number, to: number, parentTopic: string | undefined) {
  const start = Math.floor(from / MINUTE) * MINUTE;
  const step = STEPS.find((s) => (to - start) / s <= 16) ?? STEPS[STEPS.length - 1];
  const starts: number[] = [];
  for (let s = start; s <= to; s += step) starts.push(s);
  return { step, parts: await Promise.all(starts.map((s) => api.report({ from: s, to: s + step - 1, parentTopic }))) };
}

interface Filter {
  subtopic: string;
  qos: "all" | "0" | "1" | "2";
}

function keep(f: Filter) {
  return (r: ReportRow) =>
    (f.subtopic === "" || r.subtopic.includes(f.subtopic)) && (f.qos === "all" || r.qos === (Number(f.qos) as QoS));
}

/**
 * O7: a parent topic as Kafka holds it. `go` changes when a row of the
 * report asks for its parent topic: the state is asked at once.
 */
function KafkaState(props: { bound: string | undefined; parent: string; setParent: (p: string) => void; go: number }) {
  const [group, setGroup] = useState("");
  const state = useAction((p: string, g: string) => api.topicState(p, g || undefined));
  useEffect(() => {
    if (props.go > 0) {
      void state.run(props.parent, group.trim());
      document.getElementById("kafka")?.scrollIntoView();
    }
  }, [props.go]);
  const s = state.result;
  if (!props.bound) {
    return (
      <Section title="Parent topic in Kafka" id="kafka">
        <p data-testid="kafka-none">No Kafka cluster is bound to this instance (the configuration's <code>kafka:</code>).</p>
      </Section>
    );
  }
  return (
    <Section title={`Parent topic in Kafka (${props.bound})`} id="kafka">
      <form
        class="row"
        onSubmit={(e) => {
          e.preventDefault();
          if (props.parent.trim()) void state.run(props.parent.trim(), group.trim());
        }}
      >
        <Field label="Parent topic" value={props.parent} onValue={props.setParent} required pattern="[A-Za-z0-9._\-]+" data-testid="kafka-topic" />
        <Field label="Consumer group" value={group} onValue={setGroup} hint="Optional: its backlog per partition" />
        <button type="submit" disabled={state.busy}>
          Show
        </button>
      </form>
      <ErrorNotice error={state.error} testid="kafka-error" />
      {s && (
        <>
          <KeyValues
            items={[
              ["Topic", s.topic],
              ["Messages", int(s.messages), "kafka-messages"],
              ["Backlog" + (s.group ? ` of ${s.group}` : ""), s.backlog === null ? "— (give a consumer group)" : int(s.backlog), "kafka-backlog"],
              ["Kafka brokers", s.brokers.map((b) => `${b.id}: ${b.host}:${b.port}`).join(", ")],
            ]}
          />
          <Table
            caption="Partitions"
            testid="partitions"
            head={["Partition", "Leader", "Start offset", "End offset", "Messages", "Committed", "Backlog"]}
            numeric={[0, 1, 2, 3, 4, 5, 6]}
          >
            {s.partitions.map((p) => (
              <tr>
                <td class="num">{p.partition}</td>
                <td class="num">{p.leader}</td>
                <td class="num">{int(p.low)}</td>
                <td class="num">{int(p.high)}</td>
                <td class="num">{int(p.messages)}</td>
                <td class="num">{p.committed === null ? "—" : int(p.committed)}</td>
                <td class="num">{p.backlog === null ? "—" : int(p.backlog)}</td>
              </tr>
            ))}
          </Table>
        </>
      )}
    </Section>
  );
}

export function Report() {
  const [range, setRange] = useState<Range>({ span: HOUR });
  const [parent, setParent] = useState("");
  const [asked, setAsked] = useState({ range, parent: "" });
  const [filter, setFilter] = useState<Filter>({ subtopic: "", qos: "all" });
  const [kafka, setKafka] = useState({ parent: "", go: 0 });
  // Kafka is bound when the instance names its bootstrap servers.
  const instance = useQuery(api.instance, []);
  const bound = instance.data?.endpoints.kafka;
  const ask = (r: Range, p = parent) => setAsked({ range: r, parent: p.trim() });

  const report = useQuery(() => {
    const r = asked.range;
    const shortcut = "span" in r ? SHORTCUTS.find((s) => s[1] === r.span)?.[2] : undefined;
    const parentTopic = asked.parent || undefined;
    return shortcut ? api.report({ range: shortcut, parentTopic }) : api.report({ ...resolve(r), parentTopic });
  }, [asked]);
  const answered = report.data;
  const sliced = useQuery(answered ? () => slices(answered.from, answered.to, asked.parent || undefined) : null, [answered]);

  const rows = useMemo(
    () => (report.data?.rows ?? []).filter(keep(filter)).sort((a, b) => b.produced + b.consumed - (a.produced + a.consumed)),
    [report.data, filter],
  );
  const chart = useMemo(() => {
    if (!sliced.data?.parts.length) return null;
    const { step, parts } = sliced.data;
    const f = keep(filter);
    const sum = (pick: (r: ReportRow) => number) => parts.map((s) => s.rows.filter(f).reduce((n, r) => n + pick(r), 0));
    const data: ChartData = { x: parts.map((s) => s.from + step / 2), ys: [sum((r) => r.produced), sum((r) => r.consumed)] };
    const span: [number, number] = [parts[0].from, parts[parts.length - 1].from + step];
    return { data, span, minutes: step / MINUTE };
  }, [sliced.data, filter]);
  const t = report.data?.totals;
  const filtered = filter.subtopic !== "" || filter.qos !== "all";
  const sums = rows.reduce((s, r) => ({ produced: s.produced + r.produced, consumed: s.consumed + r.consumed }), {
    produced: 0,
    consumed: 0,
  });

  return (
    <>
      <div class="page-head">
        <h1>Resource report</h1>
        <p class="muted">Messages received from publishers (produced) and sent to subscribers (consumed), by topic and QoS.</p>
      </div>
      <Section title="Query">
        <form
          class="row"
          onSubmit={(e) => {
            e.preventDefault();
            ask(range);
          }}
        >
          <Field label="Parent topic" value={parent} onValue={setParent} placeholder="every parent topic" data-testid="report-parent" />
          <Field label="Subtopic contains" value={filter.subtopic} onValue={(subtopic) => setFilter({ ...filter, subtopic })} />
          <Select
            label="QoS"
            narrow
            value={filter.qos}
            options={[["all", "all"], ...QOS_OPTIONS]}
            onValue={(qos) => setFilter({ ...filter, qos })}
          />
          <button type="submit">Query</button>
        </form>
        <RangePicker
          shortcuts={SHORTCUTS.map(([label, span]) => [label, span])}
          max={DAY}
          value={range}
          onChange={(r) => {
            setRange(r);
            ask(r);
          }}
        />
      </Section>
      <ErrorNotice error={report.error} />
      {report.data && t && (
        <>
          <MissingNodes nodes={report.data.missingNodes} />
          <Section title={`From ${time(report.data.from, false)} to ${time(report.data.to, false)}`}>
            <div class="report-summary">
              <KeyValues
                testid="report-totals"
                items={
                  filtered
                    ? [
                        ["Produced (filtered)", int(sums.produced), "report-produced"],
                        ["Consumed (filtered)", int(sums.consumed), "report-consumed"],
                      ]
                    : [
                        ["Produced", int(t.produced), "report-produced"],
                        ["Consumed", int(t.consumed), "report-consumed"],
                        ["Produced TPS", tps(t.producedTps)],
                        ["Consumed TPS", tps(t.consumedTps)],
                        ["Weighted pub TPS", tps(t.weightedPubTps)],
                        ["Weighted sub TPS", tps(t.weightedSubTps)],
                      ]
                }
              />
              {chart ? (
                <TimeChart
                  title={chart.minutes === 1 ? "Messages per minute" : `Messages per ${chart.minutes} minutes`}
                  series={[{ label: "produced" }, { label: "consumed" }]}
                  data={chart.data}
                  span={chart.span}
                  bars
                  height={180}
                  summary={`Produced ${int(sums.produced)} and consumed ${int(sums.consumed)} messages in the range.`}
                  testid="report-chart"
                />
              ) : (
                <ErrorNotice error={sliced.error} />
              )}
            </div>
          </Section>
          <Section title={`By topic (${rows.length} rows)`}>
            {rows.length === 0 ? (
              <p data-testid="report-empty">No message in this range{asked.parent && ` under ${asked.parent}`}.</p>
            ) : (
              <Paged
                rows={rows}
                label="Report rows"
                render={(page) => (
                  <Table
                    caption="Messages by parent topic, subtopic and QoS"
                    testid="report-rows"
                    head={["Parent topic", "Subtopic", "QoS", "Produced", "Consumed", "Produced TPS", "Consumed TPS", ...(bound ? ["Kafka"] : [])]}
                    numeric={[2, 3, 4, 5, 6]}
                  >
                    {page.map((r) => (
                      <tr data-testid={`report-${r.parentTopic}/${r.subtopic}/${r.qos}`}>
                        <th scope="row">{r.parentTopic}</th>
                        <td>{r.subtopic || "—"}</td>
                        <td class="num">{r.qos}</td>
                        <td class="num" data-testid="row-produced">
                          {int(r.produced)}
                        </td>
                        <td class="num" data-testid="row-consumed">
                          {int(r.consumed)}
                        </td>
                        <td class="num">{tps(r.producedTps)}</td>
                        <td class="num">{tps(r.consumedTps)}</td>
                        {bound && (
                          <td>
                            <button
                              type="button"
                              class="link"
                              onClick={() => setKafka({ parent: r.parentTopic, go: kafka.go + 1 })}
                              aria-label={`Kafka state of ${r.parentTopic}`}
                            >
                              state
                            </button>
                          </td>
                        )}
                      </tr>
                    ))}
                  </Table>
                )}
              />
            )}
          </Section>
        </>
      )}
      <KafkaState bound={bound} parent={kafka.parent} setParent={(parent) => setKafka({ ...kafka, parent })} go={kafka.go} />
    </>
  );
}
