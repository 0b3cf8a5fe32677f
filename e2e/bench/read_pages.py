"""Memory held by retained messages that arrive between other traffic.

    python3 e2e/bench/read_pages.py PORT ROUNDS FILLER BROKER_PID

Each round publishes one retained message (a 100-byte payload, its own
topic) and then FILLER 64-byte QoS 0 messages nobody receives, over one raw
MQTT 3.1.1 connection. Prints the broker's resident memory growth per
retained message: a broker that keeps each retained message as a slice of
the buffer it was read into keeps that whole buffer alive.
"""

import socket
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for {pid}")


def remaining_length(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def string(x):
    return struct.pack(">H", len(x)) + x


def publish(topic, payload, retain):
    body = string(topic) + payload
    return bytes([0x30 | (1 if retain else 0)]) + remaining_length(len(body)) + body


def main():
    port, rounds, filler, pid = (int(a) for a in sys.argv[1:5])
    sock = socket.create_connection(("127.0.0.1", port))
    body = string(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + string(b"read-pages")
    sock.sendall(bytes([0x10]) + remaining_length(len(body)) + body)
    if sock.recv(4)[:1] != b"\x20":
        raise SystemExit("no CONNACK")
    before = rss_kib(pid)
    fill = publish(b"read-pages/filler", b"p" * 64, False) * filler
    for i in range(rounds):
        payload = b"retained-%d-" % i + b"r" * 100
        sock.sendall(publish(b"read-pages/retained/%d" % i, payload, True) + fill)
    # PINGREQ: its PINGRESP comes once everything before it has been read.
    sock.sendall(b"\xc0\x00")
    while sock.recv(2) != b"\xd0\x00":
        pass
    time.sleep(1)
    after = rss_kib(pid)
    print(
        f"rounds {rounds} filler {filler}: RSS {before} -> {after} KiB, "
        f"{(after - before) / rounds:.2f} KiB per retained message"
    )
    # Empty retained payloads clear what this run left behind.
    sock.sendall(b"".join(publish(b"read-pages/retained/%d" % i, b"", True) for i in range(rounds)))
    sock.close()


if __name__ == "__main__":
    main()
