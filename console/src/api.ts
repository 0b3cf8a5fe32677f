// The operations API (/api/v1, broker/src/ops/openapi.json): typed answers
// and the one fetch wrapper every page uses. The wrapper turns each way a
// call can fail into something the page can say: a refused token asks for
// sign-in, a node that does not answer raises the "did not answer" banner,
// and any other refusal carries the API's own message.

export type Metric = "connections" | "subscriptions" | "topics" | "tps";
export const METRICS: Metric[] = ["connections", "subscriptions", "topics", "tps"];
// What an alarm watches: the capacity metrics, and persistent sessions left
// with fewer copies than the replication factor asks (no capacity).
export type AlarmMetric = Metric | "under_replicated_sessions";
export type QoS = 0 | 1 | 2;

export interface NodeInfo {
  name: string;
  state: "running" | "joining" | "leaving" | "stopping";
  connections: number;
  maxConnections: number;
  subscriptions: number;
  subscribers: number;
  sessions: number;
  topics: number;
  pubTps: number;
  subTps: number;
  underReplicatedSessions: number;
  replicaSessions: number;
  alarmEvaluator: boolean;
}

/** Every merged answer lists the ring members that did not answer in time. */
interface Merged {
  missingNodes: string[];
}

export interface Instance extends Merged {
  name: string;
  capacity: Record<Metric, number> & { mode: "enforce" | "alarm_only" };
  endpoints: Record<string, string>;
  totals: {
    connections: number;
    subscriptions: number;
    topics: number;
    pubTps: number;
    subTps: number;
    tps: number;
  };
  utilization: Record<Metric, number | null>;
  alarmThresholds: Record<AlarmMetric, number | null>;
  activeAlarms: number;
  underReplicatedSessions: number;
  nodes: NodeInfo[];
}

export interface Subscription {
  filter: string;
  qos: QoS;
}

export interface Client extends Merged {
  clientId: string;
  node: string;
  online: boolean;
  ip: string | null;
  protocol: string | null;
  channelId: string | null;
  connectedAt: number | null;
  disconnectedAt: number | null;
  cleanSession: boolean;
  user: string | null;
  subscriptionCount: number;
  subscriptions: Subscription[];
  messagesSent: number;
  messagesReceived: number;
  offlineMessages: number;
}

export interface DeviceEvent {
  ts: number;
  clientId: string;
  channelId: string;
  action: string;
  reason: string;
  detail?: string;
  node: string;
}

export interface MessageEvent {
  ts: number;
  messageId: string;
  clientId: string;
  action: "published" | "pushed" | "from_kafka" | "offline_pushed";
  topic: string;
  qos: QoS;
  node: string;
}

export interface Trace<E> extends Merged {
  from: number;
  to: number;
  events: E[];
}

export interface Alarm {
  id: string;
  metric: AlarmMetric;
  value: number;
  peak: number;
  threshold: number;
  state: "firing" | "acknowledged" | "resolved";
  acknowledged: boolean;
  start: number;
  end: number | null;
  durationSecs: number;
  node: string;
}

export interface ReportRow {
  parentTopic: string;
  subtopic: string;
  qos: QoS;
  produced: number;
  consumed: number;
  producedTps: number;
  consumedTps: number;
}

export interface Report extends Merged {
  from: number;
  to: number;
  rows: ReportRow[];
  totals: {
    produced: number;
    consumed: number;
    producedTps: number;
    consumedTps: number;
    weightedPubTps: number;
    weightedSubTps: number;
  };
}

export interface Groups extends Merged {
  now: Record<string, number>;
  from: number;
  to: number;
  history: { ts: number; groups: Record<string, number> }[];
}

export interface TopicState {
  topic: string;
  group: string | null;
  brokers: { id: number; host: string; port: number }[];
  partitions: {
    partition: number;
    leader: number;
    low: number;
    high: number;
    messages: number;
    committed: number | null;
    backlog: number | null;
  }[];
  messages: number;
  backlog: number | null;
}

export interface Sent {
  messageId: string;
  topic: string;
  reached: number;
}

/** What the node tells the page besides the API: its WebSocket listeners. */
export interface ConsoleConfig {
  wsPort: number | null;
  wssPort: number | null;
}

/** The API refused the request; `message` is its own reason. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** 401: the instance has an admin token and this session has none (or a wrong one). */
export class SignInNeeded extends Error {}

/** No answer at all, or a server error: the node or its peers are in trouble. */
export class Unreachable extends Error {}

// The token lives in sessionStorage only: it is gone when the tab closes,
// and never written anywhere the next person at this browser would find it.
const TOKEN_KEY = "ringmq-console-token";

export function storedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** The shell listens to these to show the sign-in form and the banner. */
export const apiEvents = new EventTarget();
type ApiEvent = "signin-needed" | "signed-in" | "signed-out" | "down" | "up";

function emit(kind: ApiEvent, detail?: string) {
  apiEvents.dispatchEvent(new CustomEvent(kind, { detail }));
}

export function signIn(token: string) {
  sessionStorage.setItem(TOKEN_KEY, token);
  emit("signed-in");
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  emit("signed-out");
}

type Query = Record<string, string | number | undefined | null>;

function queryString(query?: Query): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query ?? {})) {
    if (v !== undefined && v !== null && v !== "") params.set(k, String(v));
  }
  const s = params.toString();
  return s ? `?${s}` : "";
}

async function reason(res: Response): Promise<string> {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text) as { error?: unknown };
    if (typeof body.error === "string") return body.error;
  } catch {
    // Not JSON: the admin layer answers 401/403 in plain text.
  }
  return text.trim() || `${res.status} ${res.statusText}`;
}

async function call<T>(method: "GET" | "POST", path: string, query?: Query, body?: unknown): Promise<T> {
  const headers: Record<string, string> = {};
  const token = storedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res: Response;
  try {
    res = await fetch(`/api/v1${path}${queryString(query)}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    const msg = `the operations API did not answer: ${e instanceof Error ? e.message : String(e)}`;
    emit("down", msg);
    throw new Unreachable(msg);
  }
  if (res.status === 401) {
    // A stored token that is refused is wrong (or was rotated): forget it.
    const hadToken = token !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    emit("signin-needed", hadToken ? "The node refused this token." : undefined);
    throw new SignInNeeded("sign in with the instance's admin token");
  }
  if (res.status >= 500) {
    const msg = `the operations API did not answer: ${res.status} ${await reason(res)}`;
    emit("down", msg);
    throw new Unreachable(msg);
  }
  emit("up");
  if (!res.ok) throw new ApiError(res.status, await reason(res));
  return (await res.json()) as T;
}

const seg = encodeURIComponent;

export const api = {
  instance: () => call<Instance>("GET", "/instance"),
  client: (id: string) => call<Client>("GET", `/clients/${seg(id)}`),
  kick: (id: string) => call<{ clientId: string; kicked: boolean }>("POST", `/clients/${seg(id)}/kick`),
  unsubscribe: (id: string, filter: string) =>
    call<{ clientId: string; filter: string; unsubscribed: boolean }>(
      "POST",
      `/clients/${seg(id)}/unsubscribe`,
      undefined,
      { filter },
    ),
  online: (clientIds: string[]) =>
    call<Merged & { online: Record<string, boolean> }>("POST", "/online/clients", undefined, { clientIds }),
  topicOnline: (topic: string) => call<Merged & { topic: string; online: number }>("GET", "/online/topic", { topic }),
  groups: (q: { from?: number; to?: number; groupId?: string }) => call<Groups>("GET", "/online/groups", q),
  deviceTrace: (q: { clientId: string; from?: number; to?: number; limit?: number }) =>
    call<Trace<DeviceEvent> & { clientId: string }>("GET", "/trace/device", q),
  messageTrace: (q: { clientId?: string; messageId?: string; from?: number; to?: number; limit?: number }) =>
    call<Trace<MessageEvent>>("GET", "/trace/message", q),
  report: (q: { range?: string; from?: number; to?: number; parentTopic?: string }) =>
    call<Report>("GET", "/report", q),
  topicState: (parent: string, group?: string) => call<TopicState>("GET", `/topics/${seg(parent)}`, { group }),
  alarms: () => call<Merged & { alarms: Alarm[] }>("GET", "/alarms"),
  ack: (id: string) => call<{ id: string; acknowledged: boolean }>("POST", `/alarms/${seg(id)}/ack`),
  send: (m: { topic: string; payload: string; payloadEncoding: "utf8" | "base64"; qos: QoS; retain: boolean }) =>
    call<Sent>("POST", "/messages", undefined, m),
};

/** The node's console settings; served with the assets, no token needed. */
export async function consoleConfig(): Promise<ConsoleConfig> {
  const res = await fetch("config.json", { cache: "no-store" });
  if (!res.ok) throw new ApiError(res.status, await reason(res));
  return (await res.json()) as ConsoleConfig;
}
