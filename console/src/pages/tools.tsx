// Tools (O8): send a test message through the broker, as the seed consoles
// do to check a topic, and follow it in the message trace.

import { useState } from "preact/hooks";
import { type QoS, api } from "../api";
import { int } from "../format";
import { useAction } from "../hooks";
import { link } from "../route";
import { ErrorNotice, Field, KeyValues, Notice, Section, Select } from "../ui";

export function Tools() {
  const [topic, setTopic] = useState("");
  const [payload, setPayload] = useState("");
  const [encoding, setEncoding] = useState<"utf8" | "base64">("utf8");
  const [qos, setQos] = useState<"0" | "1" | "2">("1");
  const [retain, setRetain] = useState(false);
  const send = useAction(() =>
    api.send({ topic: topic.trim(), payload, payloadEncoding: encoding, qos: Number(qos) as QoS, retain }),
  );
  const sent = send.result;
  return (
    <>
      <div class="page-head">
        <h1>Tools</h1>
      </div>
      <Section title="Send a test message">
        <p class="muted">
          The node publishes it as the client <code>ringmq-api</code>: subscribers receive it, Kafka stores it when its parent
          topic is bound, and the message trace shows where it went.
        </p>
        <form
          onSubmit={(e) => {
            e.preventDefault();
            if (topic.trim()) void send.run();
          }}
        >
          <Field label="Topic" value={topic} onValue={setTopic} required placeholder="parent/subtopic" data-testid="send-topic" />
          <div class="field">
            <label for="send-payload">Payload</label>
            <textarea id="send-payload" rows={4} value={payload} onInput={(e) => setPayload(e.currentTarget.value)} data-testid="send-payload" />
          </div>
          <div class="row">
            <Select
              label="Payload encoding"
              value={encoding}
              options={[
                ["utf8", "text (UTF-8)"],
                ["base64", "bytes (base64)"],
              ]}
              onValue={setEncoding}
            />
            <Select
              label="QoS"
              value={qos}
              options={[
                ["0", "0 (at most once)"],
                ["1", "1 (at least once)"],
                ["2", "2 (exactly once)"],
              ]}
              onValue={setQos}
              testid="send-qos"
            />
            <label class="check">
              <input type="checkbox" checked={retain} onChange={(e) => setRetain(e.currentTarget.checked)} /> Retain
            </label>
          </div>
          <button type="submit" disabled={send.busy || !topic.trim()}>
            Send
          </button>
        </form>
        <ErrorNotice error={send.error} testid="send-error" />
        {sent && (
          <Notice kind="ok" testid="send-result">
            <KeyValues
              items={[
                ["Message ID", <code>{sent.messageId}</code>, "sent-message-id"],
                ["Topic", <code>{sent.topic}</code>],
                ["Subscribers reached", int(sent.reached), "sent-reached"],
              ]}
            />
            <a href={link("traces", { kind: "message", messageId: sent.messageId })} data-testid="sent-trace-link">
              Trace this message
            </a>
          </Notice>
        )}
      </Section>
    </>
  );
}
