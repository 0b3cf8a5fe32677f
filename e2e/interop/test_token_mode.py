"""Token mode end to end (SPEC A3) with independent clients: an application
server signing token-service requests the seed's way (urllib + hmac), and
Paho devices uploading tokens to $SYS/uploadToken."""

import base64
import hashlib
import hmac
import json
import queue
import time
import urllib.parse
import urllib.request

import paho.mqtt.client as mqtt
import pytest

from mqttclient import WAIT, Client
from procs import free_port, start_broker

AK, SK = "AK_token", "SK_token_secret"


def sign(params: dict) -> str:
    """Sorted key=value pairs (values of one key sorted, comma-joined) joined
    by '&', HmacSHA1 with the SecretKey, Base64: the seed's request signature."""
    pairs = sorted(f"{k}={','.join(sorted(v.split(',')))}" for k, v in params.items())
    digest = hmac.new(SK.encode(), "&".join(pairs).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class TokenBroker:
    def __init__(self, tcp, admin):
        self.tcp, self.admin = tcp, admin

    def call(self, op, signed, method="POST", signature=None):
        params = dict(signed)
        params["signature"] = signature or sign(signed)
        params["accessKey"] = AK
        if op == "apply":
            params["proxyType"] = "MQTT"
        body = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.admin}/token/{op}"
        if method == "GET":
            req = urllib.request.Request(f"{url}?{body}")
        else:
            req = urllib.request.Request(url, data=body.encode(), method="POST")
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def apply(self, actions, resources, seconds=600, **kw):
        signed = {
            "actions": actions,
            "resources": resources,
            "expireTime": str(int(time.time() * 1000) + seconds * 1000),
            "serviceName": "mq",
        }
        return self.call("apply", signed, **kw)

    def token(self, actions, resources, seconds=600):
        answer = self.apply(actions, resources, seconds)
        assert answer["success"] and answer["code"] == 200, answer
        return answer["tokenData"]


@pytest.fixture
def tb(tmp_path):
    creds = tmp_path / "credentials.yaml"
    creds.write_text(
        f"access_keys:\n  - access_key: {AK}\n    secret_key: {SK}\n"
        "group_ids: [GID_token]\n"
    )
    key = tmp_path / "signing-key"
    key.write_text("a-long-random-signing-key-for-tests")
    admin = free_port()
    extra = (
        f"auth:\n  credentials_file: {creds}\n  token_signing_key_file: {key}\n"
        "  token_min_lifetime_secs: 1\n"
    )
    gen = start_broker(extra, admin=admin)
    tcp = next(gen)
    yield TokenBroker(tcp, admin)
    next(gen, None)


def device(tb, name, version=mqtt.MQTTv5, clean=True, expiry=None):
    c = Client(
        tb.tcp, version, client_id=f"GID_token@@@{name}", clean=clean, expiry=expiry,
        credentials=(f"Token|{AK}|instance-1", None),
    )
    c.closed = queue.Queue()
    c.c.on_disconnect = lambda cl, u, f, rc, p: c.closed.put(rc)
    return c


def upload(c, token, ty):
    return c.c.publish("$SYS/uploadToken", json.dumps({"token": token, "type": ty}), qos=1)


def upload_ok(c, token, ty):
    """Uploads a token and waits for its PUBACK."""
    info = upload(c, token, ty)
    while True:
        mid, rc = c.acks.get(timeout=WAIT)
        if mid == info.mid:
            assert not rc.is_failure, rc
            return


def expect_invalid(c, code, ty):
    m = c.message()
    assert m.topic == "$SYS/tokenInvalidNotice", m.topic
    assert json.loads(m.payload) == {"code": code, "type": ty}
    c.closed.get(timeout=WAIT)


def test_token_service_answers_with_seed_codes(tb):
    assert tb.apply("R,W", "tok/a,tok/b", method="GET")["code"] == 200
    assert tb.apply("W", "tok/a", signature="AAAA")["code"] == 407
    assert tb.apply("X", "tok/a")["code"] == 400
    assert tb.apply("W", "tok/a", seconds=-10)["code"] == 400
    token = tb.token("W", "tok/#")
    assert tb.call("query", {"token": token})["code"] == 200
    assert tb.call("revoke", {"token": token})["code"] == 200
    assert tb.call("query", {"token": token})["code"] == 3
    assert tb.call("query", {"token": "v1.forged.token"})["code"] in (1, 8)


def test_upload_grants_rights_and_refusals_notify_then_close(tb):
    watcher = device(tb, "watcher")
    upload_ok(watcher, tb.token("R", "tok/#"), "R")
    watcher.subscribe("tok/#", 1)

    writer = device(tb, "writer")
    upload_ok(writer, tb.token("W", "tok/out"), "W")
    writer.publish("tok/out", b"granted", qos=1)
    assert watcher.message().payload == b"granted"
    # A topic outside the token: code 4, then the connection closes.
    writer.c.publish("tok/elsewhere", b"x", qos=1)
    expect_invalid(writer, 4, "W")


def test_forged_revoked_and_expired_tokens(tb):
    c = device(tb, "forger")
    upload(c, "v1.e30.AAAA", "W")
    expect_invalid(c, 8, "W")

    token = tb.token("W", "tok/x")
    c = device(tb, "revoked")
    upload_ok(c, token, "W")
    c.publish("tok/x", b"ok", qos=1)
    assert tb.call("revoke", {"token": token})["code"] == 200
    c.c.publish("tok/x", b"after revoke", qos=1)
    expect_invalid(c, 3, "W")

    short = tb.token("W", "tok/x", seconds=2)
    c = device(tb, "expiring")
    upload_ok(c, short, "W")
    # Less than five minutes left: the expiry notice comes at once.
    m = c.message()
    assert m.topic == "$SYS/tokenExpireNotice"
    assert json.loads(m.payload)["type"] == "W"
    time.sleep(2.5)
    c.c.publish("tok/x", b"late", qos=1)
    expect_invalid(c, 2, "W")


def test_offline_messages_wait_for_the_token(tb):
    c = device(tb, "sleepy", clean=False, expiry=300)
    upload_ok(c, tb.token("R", "off/#"), "R")
    c.subscribe("off/#", 1)
    c.close()
    writer = device(tb, "offwriter")
    upload_ok(writer, tb.token("W", "off/#"), "W")
    writer.publish("off/1", b"queued", qos=1)
    time.sleep(0.3)
    c = device(tb, "sleepy", clean=False, expiry=300)
    assert c.session_present
    c.nothing()
    upload_ok(c, tb.token("R", "off/#"), "R")
    assert c.message().payload == b"queued"


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_wrong_action_is_refused_in_both_versions(tb, version):
    c = device(tb, f"reader-{version}", version=version)
    upload_ok(c, tb.token("R", "act/#"), "R")
    c.c.publish("act/x", b"no write token", qos=1)
    expect_invalid(c, 5, "W")
