"""A paho client with its received messages in a queue, shared by the
end-to-end suites."""

import queue
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest

WAIT = 5.0


class Client:
    """A paho client with its received messages in a queue."""

    def __init__(
        self, port, version, client_id=None, clean=True, will=None, expiry=None, credentials=None
    ):
        self.messages = queue.Queue()
        self.acks = queue.Queue()
        self.connected = queue.Queue()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"paho-{uuid.uuid4().hex[:8]}",
            protocol=version,
            clean_session=clean if version == mqtt.MQTTv311 else None,
        )
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.put((f, rc))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.acks.put((mid, rcs))
        if will:
            self.c.will_set(*will)
        if credentials:
            self.c.username_pw_set(*credentials)
        props = None
        if version == mqtt.MQTTv5 and expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        if version == mqtt.MQTTv5:
            self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        flags, rc = self.connected.get(timeout=WAIT)
        assert not rc.is_failure, rc
        self.session_present = flags.session_present

    def subscribe(self, topic, qos):
        self.c.subscribe(topic, qos)
        _, rcs = self.acks.get(timeout=WAIT)
        return rcs

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            info.wait_for_publish(timeout=WAIT)
        return info

    def message(self):
        return self.messages.get(timeout=WAIT)

    def nothing(self):
        with pytest.raises(queue.Empty):
            self.messages.get(timeout=0.7)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT."""
        self.c.loop_stop()
        self.c.socket().close()


def probe(port, client_id):
    """A connected MQTT 3.1.1 client that has sent itself one QoS 1 message,
    so that a broker's totals, traces and reports are not all empty."""
    c = Client(port, mqtt.MQTTv311, client_id=client_id)
    c.subscribe("probe/#", 1)
    c.publish("probe/1", b"x", qos=1)
    c.message()
    return c
