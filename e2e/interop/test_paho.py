"""Interoperability with an independent client: Eclipse Paho for Python,
MQTT 3.1.1 and MQTT 5, against the real ringmq-broker binary."""

import queue
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest

from mqttclient import WAIT, Client
from procs import start_broker


@pytest.fixture
def broker():
    """A broker on embedded defaults (anyone may connect)."""
    yield from start_broker()


@pytest.fixture
def signed_broker(tmp_path):
    """A broker with one AccessKey/SecretKey pair and a declared Group ID."""
    creds = tmp_path / "credentials.yaml"
    creds.write_text(
        "access_keys:\n  - access_key: AK_interop\n    secret_key: SK_interop_secret\n"
        "group_ids: [GID_interop]\n"
    )
    yield from start_broker(f"auth:\n  credentials_file: {creds}\n")


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_qos_round_trip_and_wildcards(broker, version):
    sub = Client(broker, version)
    sub.subscribe("paho/+/x", 2)
    pub = Client(broker, version)
    for qos in (0, 1, 2):
        pub.publish("paho/a/x", f"q{qos}".encode(), qos=qos)
        m = sub.message()
        assert (m.topic, m.payload, m.qos) == ("paho/a/x", f"q{qos}".encode(), qos)
    pub.publish("paho/a/y", b"no", qos=1)
    sub.nothing()


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_retained_and_will(broker, version):
    pub = Client(broker, version)
    pub.publish("paho/ret", b"kept", qos=1, retain=True)
    late = Client(broker, version)
    late.subscribe("paho/#", 1)
    m = late.message()
    assert (m.payload, m.retain) == (b"kept", True)
    dying = Client(broker, version, will=("paho/will", b"bye", 1, False))
    dying.drop()
    m = late.message()
    assert (m.topic, m.payload) == ("paho/will", b"bye")


def test_persistent_session_v311(broker):
    cid = "paho-persistent"
    c = Client(broker, mqtt.MQTTv311, client_id=cid, clean=False)
    c.subscribe("paho/off", 1)
    c.close()
    pub = Client(broker, mqtt.MQTTv311)
    pub.publish("paho/off", b"while away", qos=1)
    time.sleep(0.2)
    c = Client(broker, mqtt.MQTTv311, client_id=cid, clean=False)
    assert c.session_present
    assert c.message().payload == b"while away"


def test_v5_session_expiry_properties_and_reason_codes(broker):
    cid = "paho-v5"
    c = Client(broker, mqtt.MQTTv5, client_id=cid, clean=False, expiry=300)
    c.subscribe("paho5/#", 1)
    c.close()
    pub = Client(broker, mqtt.MQTTv5)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("origin", "paho")
    props.ContentType = "text/plain"
    pub.publish("paho5/a", b"props", qos=1, properties=props)
    time.sleep(0.2)
    c = Client(broker, mqtt.MQTTv5, client_id=cid, clean=False, expiry=300)
    assert c.session_present
    m = c.message()
    assert m.payload == b"props"
    assert ("origin", "paho") in m.properties.UserProperty
    assert m.properties.ContentType == "text/plain"
    # A topic over the 64-character limit is refused with Topic Name Invalid.
    info = pub.publish("t" * 65, b"x", qos=1)
    while True:
        mid, rc = pub.acks.get(timeout=WAIT)
        if mid == info.mid:
            break
    assert rc.value == 0x90


def test_v5_shared_subscription(broker):
    a, b = Client(broker, mqtt.MQTTv5), Client(broker, mqtt.MQTTv5)
    a.subscribe("$share/workers/paho/jobs", 1)
    b.subscribe("$share/workers/paho/jobs", 1)
    pub = Client(broker, mqtt.MQTTv5)
    for i in range(10):
        pub.publish("paho/jobs", str(i).encode(), qos=1)
    got = []
    for client in (a, b):
        while True:
            try:
                got.append(int(client.messages.get(timeout=0.7).payload))
            except queue.Empty:
                break
    assert sorted(got) == list(range(10))


def seed_signature(secret_key: str, client_id: str) -> str:
    """The password as the seed's Python sample computes it: the Group ID
    (Client ID before @@@) signed with HmacSHA1 under the SecretKey, Base64."""
    import base64
    import hashlib
    import hmac

    group_id = client_id.split("@@@")[0]
    digest = hmac.new(secret_key.encode(), group_id.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_signature_mode(signed_broker, version):
    cid = "GID_interop@@@device-1"
    c = Client(
        signed_broker, version, client_id=cid,
        credentials=("AK_interop", seed_signature("SK_interop_secret", cid)),
    )
    c.subscribe("sig/#", 1)
    c.publish("sig/a", b"signed", qos=1)
    assert c.message().payload == b"signed"
    with pytest.raises(AssertionError):
        Client(
            signed_broker, version, client_id=cid,
            credentials=("AK_interop", seed_signature("wrong", cid)),
        )
