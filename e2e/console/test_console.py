"""The web console in real headless Chromium against real broker processes
with real MQTT clients: what a person sees on each page is what the
operations API and the clients say, and what they do there (kick,
unsubscribe, acknowledge, send, publish from the page) happens.

Every test also checks, through the `browse` fixture, that the page logged
no error and sent no request anywhere but the node (consolekit.py)."""

import os
import re
import signal
import threading
import time

import paho.mqtt.client as mqtt
from playwright.sync_api import expect

from consolekit import READ_TOKEN, SINGLE, TOKEN, Node, axe, screenshot, start
from mqttclient import Client

V3, V5 = mqtt.MQTTv311, mqtt.MQTTv5


def watch_disconnect(c: Client) -> threading.Event:
    """An event set when the broker drops `c`, which then stays away (no
    automatic reconnect within the test)."""
    gone = threading.Event()
    c.c.on_disconnect = lambda *a: gone.set()
    c.c.reconnect_delay_set(min_delay=120, max_delay=120)
    return gone


class Publisher:
    """Publishes to a topic ten times a second until stopped: live traffic
    for the TPS charts."""

    def __init__(self, client: Client, topic: str):
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, args=(client, topic), daemon=True)
        self.t.start()

    def run(self, client, topic):
        while not self.stop.is_set():
            client.c.publish(topic, b"tick", qos=0)
            time.sleep(0.1)

    def close(self):
        self.stop.set()
        self.t.join()


def lookup(page, client_id: str):
    page.get_by_test_id("lookup-id").fill(client_id)
    page.get_by_role("button", name="Look up").click()


def test_overview_numbers_equal_the_api_and_the_clients(node, browse):
    a = Client(node.tcp, V3, "ov-a")
    a.subscribe("ov/1", 0)
    a.subscribe("ov/2", 1)
    b = Client(node.tcp, V5, "ov-b")
    b.subscribe("ov/#", 1)
    page = browse.page(node)

    expect(page.get_by_test_id("instance-name")).to_have_text("console-test")
    # Two clients, three subscriptions: the page shows what the clients made…
    expect(page.get_by_test_id("total-connections")).to_have_text("2")
    expect(page.get_by_test_id("total-subscriptions")).to_have_text("3")
    # …and what the API answers.
    _, inst = node.api("/instance")
    assert inst["totals"]["connections"] == 2 and inst["totals"]["subscriptions"] == 3
    expect(page.get_by_test_id("total-topics")).to_have_text(str(inst["totals"]["topics"]))
    # 2 of the declared 3 connections; the alarm mark at 70 % of 3, rounded up to 3.
    expect(page.get_by_test_id("utilization-connections")).to_have_text("66.7 %")
    expect(page.get_by_test_id("gauge-connections")).to_have_attribute(
        "aria-label", "Connections: 66.7 % of capacity, alarm at 100 %"
    )
    expect(page.get_by_test_id("threshold-subscriptions")).to_have_text("14")
    expect(page.get_by_test_id("endpoint-tcp")).to_have_text("mqtt.example.com:1883")
    row = page.get_by_test_id("node-n1")
    expect(row.get_by_test_id("node-state")).to_have_text("running")
    expect(row.get_by_test_id("node-connections")).to_have_text("2")
    expect(row.get_by_test_id("node-subscriptions")).to_have_text("3")

    # Live traffic moves the publish rate and draws the charts.
    traffic = Publisher(a, "ov/1")
    try:
        expect(page.get_by_test_id("total-pub-tps")).not_to_have_text("0.0")
        expect(page.get_by_test_id("total-sub-tps")).not_to_have_text("0.0")
    finally:
        traffic.close()
    expect(page.get_by_test_id("chart-pub").locator("canvas")).to_be_visible()
    a.close()
    expect(page.get_by_test_id("total-connections")).to_have_text("1")
    b.close()


def test_cluster_overview_lookup_and_kick_from_any_node(cluster, browse):
    n1, n2, n3 = cluster
    clients = {}
    for n in cluster:
        c = Client(n.tcp, V3, f"cl-{n.name}", clean=False)
        c.subscribe(f"cl/{n.name}", 1)
        clients[n.name] = c
    page = browse.page(n1)

    rows = page.get_by_test_id("nodes").locator("tbody tr")
    expect(rows).to_have_count(3)
    for name in ("n1", "n2", "n3"):
        expect(page.get_by_test_id(f"node-{name}").get_by_test_id("node-state")).to_have_text("running")
    expect(page.get_by_test_id("total-connections")).to_have_text("3")
    expect(page.get_by_test_id("total-subscriptions")).to_have_text("3")
    # The table's per-node numbers add up to the totals, as any node's API says.
    per_node = [int(t) for t in page.get_by_test_id("nodes").get_by_test_id("node-connections").all_inner_texts()]
    assert sum(per_node) == 3
    _, inst = n2.api("/instance")
    assert sorted(n["name"] for n in inst["nodes"]) == ["n1", "n2", "n3"]
    assert {n["name"]: n["connections"] for n in inst["nodes"]} == {
        name: int(page.get_by_test_id(f"node-{name}").get_by_test_id("node-connections").inner_text())
        for name in ("n1", "n2", "n3")
    }

    # A client of the third node, looked up and kicked through the first.
    gone = watch_disconnect(clients["n3"])
    page.goto(n1.console("clients?id=cl-n3"))
    detail = page.get_by_test_id("client-detail")
    expect(detail.get_by_test_id("client-online")).to_have_text("online")
    expect(detail.get_by_test_id("subscription-cl/n3")).to_be_visible()
    _, c = n1.api("/clients/cl-n3")
    expect(detail).to_contain_text(f"on node {c['node']}")
    page.get_by_test_id("kick").click()
    page.get_by_test_id("kick-confirm").click()
    expect(page.get_by_test_id("kick-done")).to_be_visible()
    assert gone.wait(10), "the kicked client was not disconnected"
    expect(detail.get_by_test_id("client-online")).to_have_text("offline")

    # A node that dies leaves the table once the others notice.
    n3.kill()
    page.goto(n1.console("overview"))
    expect(rows).to_have_count(2, timeout=20_000)
    page.hygiene.allow(r"ERR_CONNECTION_(REFUSED|RESET)")


def test_a_member_that_does_not_answer_is_named_missing(workdir, browse):
    # A node frozen (SIGSTOP) stays in the ring until the others miss its
    # heartbeats for failure_timeout_ms: meanwhile every answer of the
    # instance lacks its part, and the overview says whose.
    secret = workdir / "cluster-secret"
    secret.write_text("console-test-cluster-secret")
    nodes: list[Node] = []
    try:
        for name in ("n1", "n2"):
            nodes.append(start(workdir, name, SINGLE, peers=list(nodes), secret=secret, failure_timeout_ms=20_000))
        n1, n2 = nodes
        page = browse.page(n1)
        expect(page.get_by_test_id("nodes").locator("tbody tr")).to_have_count(2, timeout=20_000)
        expect(page.get_by_test_id("missing-nodes")).to_have_count(0)
        os.kill(n2.proc.pid, signal.SIGSTOP)
        expect(page.get_by_test_id("missing-nodes")).to_contain_text("n2", timeout=15_000)
        expect(page.get_by_test_id("missing-list")).to_have_text("Missing: n2")
        _, inst = n1.api("/instance")
        assert inst["missingNodes"] == ["n2"], inst
        # The nodes stop below while the page still polls.
        page.hygiene.allow(r"ERR_CONNECTION_(REFUSED|RESET)")
    finally:
        for n in nodes:
            if n.proc and n.proc.poll() is None:
                os.kill(n.proc.pid, signal.SIGCONT)
            n.kill()


def test_client_lookup_shows_subscriptions_and_unsubscribe_and_kick_act(node, browse):
    # A persistent session: after the kick it stays, offline.
    dev = Client(node.tcp, V3, "GID_test@@@dev1", clean=False)
    dev.subscribe("lk/keep", 1)
    dev.subscribe("lk/drop", 1)
    pub = Client(node.tcp, V3, "lk-pub")
    page = browse.page(node, "clients")
    page.hygiene.allow_status(404)

    lookup(page, "GID_test@@@dev1")
    detail = page.get_by_test_id("client-detail")
    expect(detail.get_by_test_id("client-online")).to_have_text("online")
    expect(detail.get_by_test_id("client-ip")).to_contain_text("127.0.0.1")
    expect(detail.get_by_test_id("subscriptions").locator("tbody tr")).to_have_count(2)
    expect(detail.get_by_test_id("subscription-lk/keep")).to_contain_text("1")
    # The address names the client: the view can be linked to.
    assert "id=GID_test%40%40%40dev1" in page.url

    # Unsubscribe one filter: its messages stop, the other's go on.
    page.get_by_role("button", name="Unsubscribe lk/drop").click()
    expect(page.get_by_test_id("unsubscribe-done")).to_contain_text("lk/drop")
    expect(detail.get_by_test_id("subscription-lk/drop")).to_have_count(0)
    _, c = node.api("/clients/GID_test@@@dev1")
    assert [s["filter"] for s in c["subscriptions"]] == ["lk/keep"]
    pub.publish("lk/drop", b"dropped", qos=1)
    dev.nothing()
    pub.publish("lk/keep", b"kept", qos=1)
    assert dev.message().payload == b"kept"

    # Kick: asked to confirm first, then the real client is disconnected.
    gone = watch_disconnect(dev)
    page.get_by_test_id("kick").click()
    assert not gone.wait(0.5), "kicked before the confirmation"
    page.get_by_test_id("kick-confirm").click()
    expect(page.get_by_test_id("kick-done")).to_be_visible()
    assert gone.wait(10), "the kicked client was not disconnected"
    expect(detail.get_by_test_id("client-online")).to_have_text("offline")

    # An unknown Client ID: the API's answer, not a blank page.
    lookup(page, "nobody-here")
    expect(page.get_by_test_id("lookup-error")).to_have_text("no session for Client ID nobody-here")
    pub.close()


def test_batch_online_and_counts_by_topic_and_group(node, browse):
    ids = ["GID_seven@@@a", "GID_seven@@@b", "GID_eight@@@c"]
    clients = [Client(node.tcp, V3, i) for i in ids]
    for c in clients:
        c.subscribe("grp/t", 0)
    page = browse.page(node, "clients")

    page.get_by_test_id("batch-ids").fill("\n".join(ids + ["GID_nine@@@nobody"]))
    page.get_by_role("button", name="Check").click()
    expect(page.get_by_test_id("batch-summary")).to_have_text("3 of 4 online.")
    expect(page.get_by_test_id("batch-GID_nine@@@nobody")).to_contain_text("offline")
    expect(page.get_by_test_id("batch-GID_seven@@@a")).to_contain_text("online")
    page.get_by_label("offline").check()
    expect(page.get_by_test_id("batch-results").locator("tbody tr")).to_have_count(1)

    # A long list comes in pages of 20.
    many = ids + [f"GID_nine@@@d{i:02}" for i in range(42)]
    page.get_by_test_id("batch-ids").fill(", ".join(many))
    page.get_by_role("button", name="Check").click()
    expect(page.get_by_test_id("batch-summary")).to_have_text("3 of 45 online.")
    page.get_by_label("all").check()
    rows = page.get_by_test_id("batch-results").locator("tbody tr")
    expect(rows).to_have_count(20)
    pager = page.get_by_role("navigation", name="Online status: pages")
    status = pager.get_by_test_id("pager-status")
    expect(status).to_have_text("1–20 of 45")
    pager.get_by_role("button", name="Last page").click()
    expect(status).to_have_text("41–45 of 45")
    expect(rows).to_have_count(5)
    expect(page.get_by_test_id("batch-GID_nine@@@d41")).to_be_visible()

    page.get_by_label("Topic", exact=True).fill("grp/t")
    page.get_by_role("button", name="Count").click()
    expect(page.get_by_test_id("topic-online")).to_have_text("3")

    # The nodes sample Group IDs every second here (every minute by default).
    time.sleep(2.5)
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_test_id("group-GID_seven").locator("td")).to_have_text("2")
    expect(page.get_by_test_id("group-GID_eight").locator("td")).to_have_text("1")
    expect(page.get_by_test_id("groups-chart").locator("canvas")).to_be_visible()
    _, g = node.api("/online/groups")
    assert g["now"] == {"GID_seven": 2, "GID_eight": 1}


def test_device_and_message_traces_show_the_tests_traffic(node, browse):
    dev = Client(node.tcp, V3, "tr-dev")
    dev.close()
    time.sleep(0.5)  # the device comes back a moment later
    dev = Client(node.tcp, V3, "tr-dev")
    sub = Client(node.tcp, V3, "tr-sub")
    sub.subscribe("tr/m", 1)
    pub = Client(node.tcp, V3, "tr-pub")
    pub.publish("tr/m", b"traced", qos=1)
    assert sub.message().payload == b"traced"

    page = browse.page(node, "traces?kind=device")
    page.get_by_test_id("device-client-id").fill("tr-dev")
    page.get_by_role("button", name="Search").click()
    events = page.get_by_test_id("device-event")
    # What the API has (a reconnect racing the end of the first connection
    # may add a close or takeover event), in the same order.
    _, t = node.api("/trace/device?clientId=tr-dev")
    expect(events).to_have_count(len(t["events"]))
    assert [e.get_attribute("data-action") for e in events.all()] == [e["action"] for e in t["events"]]
    expect(events.first).to_have_attribute("data-action", "connect")
    expect(events.first).to_have_attribute("data-reason", "accepted")
    left = page.locator("[data-testid=device-event][data-reason='disconnected by client']")
    expect(left).to_have_count(1)
    expect(left).to_contain_text("the client sent DISCONNECT")
    expect(page.locator("[data-testid=device-event][data-action=connect][data-reason=accepted]")).to_have_count(2)
    expect(events.last).to_have_attribute("data-action", "connect")

    # The publisher's messages, then one message's whole way.
    page.get_by_role("link", name="Message trace").click()
    page.get_by_test_id("message-client-id").fill("tr-pub")
    page.get_by_role("button", name="Search").click()
    published = page.get_by_test_id("message-events").get_by_test_id("message-event")
    expect(published).to_have_count(1)
    expect(published).to_have_attribute("data-action", "published")
    _, t = node.api("/trace/message?clientId=tr-pub")
    message_id = t["events"][0]["messageId"]
    page.get_by_role("link", name=re.compile(f"Message {message_id}")).click()
    expect(page.get_by_test_id("message-sent").get_by_test_id("message-event")).to_have_attribute("data-client", "tr-pub")
    expect(page.get_by_test_id("message-delivered").get_by_test_id("message-event")).to_have_attribute(
        "data-client", "tr-sub"
    )
    assert f"messageId={message_id}" in page.url


def test_an_alarm_fired_by_real_connections_can_be_acknowledged(node, browse):
    # Capacity 3 connections, alarm at 70 % rounded up: the third one fires it.
    clients = [Client(node.tcp, V3, f"al-{i}") for i in range(3)]
    page = browse.page(node, "alarms")
    firing = page.get_by_test_id("active-alarms").locator("tr[data-state=firing]")
    expect(firing).to_have_count(1, timeout=20_000)
    expect(firing).to_contain_text("Connections")
    expect(page.get_by_test_id("threshold-connections")).to_contain_text("3")

    firing.get_by_test_id("ack").click()
    expect(page.get_by_test_id("ack-done")).to_be_visible()
    acked = page.get_by_test_id("active-alarms").locator("tr[data-state=acknowledged]")
    expect(acked).to_have_count(1)
    expect(acked.get_by_test_id("ack")).to_have_count(0)
    _, a = node.api("/alarms")
    assert [x["acknowledged"] for x in a["alarms"] if x["metric"] == "connections"] == [True]
    expect(page.get_by_test_id("alarm-records").locator("tbody tr")).to_have_count(1)
    for c in clients:
        c.close()


def test_a_test_message_reaches_a_real_subscriber_and_its_trace(node, browse):
    sub = Client(node.tcp, V5, "tool-sub")
    sub.subscribe("tools/t", 1)
    page = browse.page(node, "tools")
    page.get_by_test_id("send-topic").fill("tools/t")
    page.get_by_test_id("send-payload").fill("hello from the console")
    page.get_by_test_id("send-qos").select_option("1")
    page.get_by_role("button", name="Send").click()

    expect(page.get_by_test_id("sent-message-id")).to_have_text(re.compile(r"^[0-9a-f]{16}$"))
    expect(page.get_by_test_id("sent-reached")).to_have_text("1")
    m = sub.message()
    assert m.payload == b"hello from the console" and m.topic == "tools/t" and m.qos == 1
    message_id = page.get_by_test_id("sent-message-id").inner_text()

    page.get_by_test_id("sent-trace-link").click()
    expect(page.get_by_test_id("message-delivered").get_by_test_id("message-event")).to_have_attribute(
        "data-client", "tool-sub"
    )
    expect(page.get_by_test_id("message-sent")).to_contain_text(message_id)


def test_the_websocket_client_page_exchanges_messages_with_a_real_client(node, browse):
    peer = Client(node.tcp, V5, "ws-peer")
    peer.subscribe("ws/out", 1)
    page = browse.page(node, "mqtt")
    expect(page.get_by_test_id("ws-url")).to_have_text(f"ws://127.0.0.1:{node.ws}/mqtt")
    page.get_by_test_id("ws-client-id").fill("ws-browser")
    page.get_by_test_id("ws-connect").click()
    expect(page.get_by_test_id("ws-status")).to_have_text("connected")
    # The broker sees an ordinary client.
    _, c = node.api("/clients/ws-browser")
    assert c["online"]

    page.get_by_test_id("ws-filter").fill("ws/in")
    page.get_by_test_id("ws-subscribe").click()
    expect(page.get_by_test_id("ws-subscriptions")).to_contain_text("ws/in")
    peer.publish("ws/in", b"to the browser", qos=1)
    expect(page.get_by_test_id("ws-message-payload").first).to_have_text("to the browser")
    expect(page.get_by_test_id("ws-message-topic").first).to_have_text("ws/in")

    page.get_by_test_id("ws-topic").fill("ws/out")
    page.get_by_test_id("ws-payload").fill("from the browser")
    page.get_by_test_id("ws-publish").click()
    m = peer.message()
    assert m.payload == b"from the browser" and m.topic == "ws/out"
    page.get_by_test_id("ws-connect").click()
    expect(page.get_by_test_id("ws-status")).to_have_text("disconnected")


def test_sign_in_refuses_a_wrong_token_and_signs_out(node, browse):
    c = Client(node.tcp, V3, "si-dev")
    page = browse.page(node, signed_in=False)
    page.hygiene.allow_status(401, 403)
    token = page.get_by_test_id("token")
    expect(token).to_have_attribute("type", "password")
    expect(page.get_by_test_id("instance-name")).to_have_count(0)

    token.fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("signin-error")).to_have_text("The node refused this token.")
    expect(page.get_by_test_id("instance-name")).to_have_count(0)

    token.fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("instance-name")).to_have_text("console-test")
    # Kept for this tab only.
    assert page.evaluate("sessionStorage.getItem('ringmq-console-token')") == TOKEN
    assert TOKEN not in page.evaluate("JSON.stringify(localStorage)")

    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("token")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ringmq-console-token')") is None

    # A read-only token reads, and a change is refused with the node's reason.
    page.get_by_test_id("token").fill(READ_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.goto(node.console("clients?id=si-dev"))
    expect(page.get_by_test_id("client-online")).to_have_text("online")
    page.get_by_test_id("kick").click()
    page.get_by_test_id("kick-confirm").click()
    expect(page.get_by_role("alert")).to_contain_text("Refused by the node")
    _, detail = node.api("/clients/si-dev")
    assert detail["online"]
    c.close()


def test_an_instance_without_token_opens_without_sign_in(open_node, browse):
    page = browse.page(open_node, signed_in=False)
    expect(page.get_by_test_id("instance-name")).to_have_text("console-test")
    expect(page.get_by_test_id("token")).to_have_count(0)
    expect(page.get_by_test_id("sign-out")).to_have_count(0)


def test_a_node_that_stops_answering_shows_a_clear_message(node, browse):
    page = browse.page(node)
    expect(page.get_by_test_id("instance-name")).to_have_text("console-test")
    node.kill()
    page.hygiene.allow(r"ERR_CONNECTION_(REFUSED|RESET)|Failed to fetch")
    banner = page.get_by_test_id("api-down")
    expect(banner).to_contain_text("The operations API did not answer")
    expect(banner).to_have_attribute("role", "alert")
    # The last numbers stay on the page under the banner.
    expect(page.get_by_test_id("total-connections")).to_be_visible()


def test_resource_report_counts_the_tests_messages(node, browse):
    sub = Client(node.tcp, V3, "rep-sub")
    sub.subscribe("rep/#", 1)
    pub = Client(node.tcp, V3, "rep-pub")
    for _ in range(5):
        pub.publish("rep/a", b"x", qos=1)
    for _ in range(3):
        pub.publish("rep/b", b"y", qos=0)
    for _ in range(8):
        sub.message()
    # The nodes add a second's counts to the report at the next tick.
    deadline = time.time() + 5
    while node.api("/report?range=1h")[1]["totals"]["produced"] < 8 and time.time() < deadline:
        time.sleep(0.2)
    page = browse.page(node, "report")

    a = page.get_by_test_id("report-rep/a/1")
    expect(a.get_by_test_id("row-produced")).to_have_text("5")
    expect(a.get_by_test_id("row-consumed")).to_have_text("5")
    expect(page.get_by_test_id("report-rep/b/0").get_by_test_id("row-produced")).to_have_text("3")
    _, r = node.api("/report?range=1h")
    expect(page.get_by_test_id("report-produced")).to_have_text(str(r["totals"]["produced"]))
    expect(page.get_by_test_id("report-chart").locator("canvas")).to_be_visible()

    # The shortcuts query again; a filter narrows the rows.
    page.get_by_role("button", name="Last 12 hours").click()
    expect(page.get_by_role("button", name="Last 12 hours")).to_have_attribute("aria-pressed", "true")
    expect(a.get_by_test_id("row-produced")).to_have_text("5")
    page.get_by_label("QoS", exact=True).select_option("0")
    expect(a).to_have_count(0)
    expect(page.get_by_test_id("report-produced")).to_have_text("3")

    # No Kafka bound here: the page says so instead of offering its state.
    expect(page.get_by_test_id("kafka-none")).to_contain_text("No Kafka cluster is bound")
    expect(page.get_by_role("button", name=re.compile("Kafka state of"))).to_have_count(0)


def test_phone_sized_screen_has_a_menu_and_no_sideways_scrolling(node, browse):
    Client(node.tcp, V3, "phone-dev").subscribe("phone/t", 0)
    page = browse.page(node, viewport=(390, 844))
    expect(page.get_by_test_id("instance-name")).to_be_visible()
    nav = page.get_by_test_id("nav-alarms")
    expect(nav).to_be_hidden()
    menu = page.get_by_role("button", name="Menu")
    menu.click()
    expect(menu).to_have_attribute("aria-expanded", "true")
    nav.click()
    expect(page.get_by_role("heading", name="Alarms", level=1)).to_be_visible()
    expect(nav).to_be_hidden()
    for route in ("overview", "alarms", "clients?id=phone-dev", "traces", "report", "tools", "mqtt"):
        page.goto(node.console(route))
        page.wait_for_timeout(600)
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"{route} scrolls sideways: {width}"
        found = axe(page)
        assert not found, f"{route} on a phone: {found}"


def test_every_page_passes_axe_in_both_themes(node, browse):
    """A tour of the pages with real data on them: axe-core finds no serious
    or critical issue in the light or the dark theme; with
    CONSOLE_SCREENSHOTS=1 it also saves the README's screenshots."""
    Client(node.tcp, V3, "GID_tour@@@device-0").close()  # a device trace with a reconnect
    clients = [Client(node.tcp, V3, f"GID_tour@@@device-{i}") for i in range(3)]
    clients[0].subscribe("tour/#", 1)
    clients[1].subscribe("tour/status", 0)
    traffic = Publisher(clients[2], "tour/telemetry")
    clients[2].publish("tour/status", b"ready", qos=1)
    page = browse.page(node)
    try:
        expect(page.get_by_test_id("total-pub-tps")).not_to_have_text("0.0")
        page.wait_for_timeout(12_000)  # samples on the live charts
        tour(page, node)
    finally:
        traffic.close()


def check_both_themes(page, name: str):
    """axe in the theme shown, then in the other (switched with the toggle), back again."""
    html = page.locator("html")
    for _ in range(2):
        theme = html.get_attribute("data-theme")
        found = axe(page)
        assert not found, f"{name} ({theme} theme): {found}"
        page.get_by_test_id("theme-toggle").click()
        expect(html).not_to_have_attribute("data-theme", theme)


def tour(page, node):
    html = page.locator("html")
    expect(html).to_have_attribute("data-theme", "light")

    expect(page.get_by_test_id("active-alarms")).to_be_visible(timeout=20_000)
    screenshot(page, "overview")
    check_both_themes(page, "overview")
    page.get_by_test_id("theme-toggle").click()
    expect(html).to_have_attribute("data-theme", "dark")
    screenshot(page, "overview-dark")
    # The choice is remembered across a reload.
    page.reload()
    expect(html).to_have_attribute("data-theme", "dark")
    page.get_by_test_id("theme-toggle").click()
    expect(html).to_have_attribute("data-theme", "light")

    page.get_by_test_id("nav-alarms").click()
    expect(page.get_by_test_id("active-alarms").locator("tbody tr")).to_have_count(1, timeout=20_000)
    screenshot(page, "alarms")
    check_both_themes(page, "alarms")

    page.goto(node.console("clients?id=GID_tour@@@device-0"))
    expect(page.get_by_test_id("subscriptions")).to_be_visible()
    screenshot(page, "clients")
    check_both_themes(page, "clients")

    page.goto(node.console("traces?kind=device&clientId=GID_tour@@@device-0"))
    expect(page.get_by_test_id("device-event").first).to_be_visible()
    screenshot(page, "traces")
    check_both_themes(page, "traces")
    page.goto(node.console("traces?kind=message&clientId=GID_tour@@@device-0"))
    expect(page.get_by_test_id("message-event").first).to_be_visible()
    check_both_themes(page, "message trace")

    page.goto(node.console("report"))
    expect(page.get_by_test_id("report-rows")).to_be_visible()
    expect(page.get_by_test_id("report-chart").locator("canvas")).to_be_visible()
    screenshot(page, "report")
    check_both_themes(page, "report")

    page.goto(node.console("tools"))
    page.get_by_test_id("send-topic").fill("tour/status")
    page.get_by_test_id("send-payload").fill('{"maintenance": false}')
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("sent-reached")).to_have_text("2")
    screenshot(page, "tools")
    check_both_themes(page, "tools")

    page.goto(node.console("mqtt"))
    page.get_by_test_id("ws-client-id").fill("GID_tour@@@console")
    page.get_by_test_id("ws-connect").click()
    expect(page.get_by_test_id("ws-status")).to_have_text("connected")
    page.get_by_test_id("ws-filter").fill("tour/#")
    page.get_by_test_id("ws-subscribe").click()
    expect(page.get_by_test_id("ws-message").first).to_be_visible()
    page.get_by_test_id("ws-topic").fill("tour/status")
    page.get_by_test_id("ws-payload").fill("hello from the browser")
    page.get_by_test_id("ws-publish").click()
    expect(page.get_by_test_id("ws-published")).to_be_visible()
    screenshot(page, "mqtt")
    check_both_themes(page, "mqtt")

    # The sign-in form, as a person without a token meets it.
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("token")).to_be_visible()
    page.hygiene.allow_status(401)
    check_both_themes(page, "sign-in")
