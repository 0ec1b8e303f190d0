"""No key ever reaches a log line, a monitor message or a command reply.

A real network (harness) runs with every service at ``--log-level debug``;
the operator rotates the session keys, CC_LAN, AK and CC_LOCALE, reads a
meter through the head-end and opens a handheld (TSP) session, a handheld
with a wrong CC_LOCALE is refused; hostile clients inject garbage on the WAN and PLC topics and a malformed command, so
that the error paths log too.  Everything observable is kept: every process's
output, every message on ``ami/v1/monitor/#`` and ``ami/v1/control/replies/#``,
and the output of every command.

Then every key that existed is searched for in all of it, in every form a
careless log call produces: hex (lower, upper, with separators), base64
(standard and URL-safe, padded or not), the Python bytes repr (plain and
JSON-escaped), the list of ints, bytes-as-latin-1 in JSON, and raw bytes, including inside longer
hex/base64 runs and bytes literals.  The keys: the factory keys, every row of
the head-end store unwrapped with the KEK (expired ones too), every session
key ever transported (recovered from the captured AARQs with ``ami attack``),
the KEK itself; the bus passwords are searched as text.

``test_search_finds_planted_keys`` shows the search is not vacuous.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import paho.mqtt.client as paho
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import AMI, REPO, Collector, Network, free_port, wait_port, wait_until  # noqa: E402

from ami.tools import attack  # noqa: E402
from ami.protocol.errors import AssociationRejected  # noqa: E402
from ami.protocol.messages import Batch, encode_batch  # noqa: E402
from ami.runtime.network import iter_factory_keys, load_network  # noqa: E402
from ami.tools.tsp import tsp_session  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

METERS, CONCENTRATORS = 12, 2
ENV = {"AMI__METERS__TIME_COMPRESSION": "1800", "AMI__HEADEND__SESSION_MAX_FRAMES": "6",
       "AMI__MONITOR__METRICS_INTERVAL_S": "0.5"}


# --------------------------------------------------------------------------
# the search


def text_forms(key: bytes) -> dict[str, str]:
    r = repr(bytes(key))
    forms = {
        "hex": key.hex(),
        "HEX": key.hex().upper(),
        "hex:": key.hex(":"),
        "hex ": key.hex(" "),
        "b64": base64.b64encode(key).decode(),
        "b64-nopad": base64.b64encode(key).decode().rstrip("="),
        "b64url": base64.urlsafe_b64encode(key).decode(),
        "b64url-nopad": base64.urlsafe_b64encode(key).decode().rstrip("="),
        "repr": r,
        "repr-inner": r[2:-1],
        "repr-json": json.dumps(r)[1:-1],
        "repr-inner-json": json.dumps(r[2:-1])[1:-1],
        "ints": repr(list(key)),
        "latin1-json": json.dumps(key.decode("latin-1"))[1:-1],  # bytes decoded to str, then logged as JSON
    }
    return forms


HEX_RUN = re.compile(rb"[0-9a-fA-F]{32,}")
B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{22,}")
BYTES_LIT = re.compile(rb"""b'(?:[^'\\\n]|\\.){1,400}'|b"(?:[^"\\\n]|\\.){1,400}\"""")


def derived_bytes(hay: bytes) -> bytes:
    """Bytes hidden in longer encodings: every hex run (both nibble
    alignments), every base64 run (all four alignments, both alphabets) and
    every bytes literal, decoded."""
    out: list[bytes] = []
    for m in HEX_RUN.finditer(hay):
        run = m.group()
        for off in (0, 1):
            seg = run[off:]
            out.append(bytes.fromhex(seg[: len(seg) // 2 * 2].decode()))
    for m in B64_RUN.finditer(hay):
        run = m.group().replace(b"-", b"+").replace(b"_", b"/")
        for off in range(4):
            seg = run[off:]
            seg = seg[: len(seg) // 4 * 4]
            if seg:
                out.append(base64.b64decode(seg))
    for m in BYTES_LIT.finditer(hay):
        try:
            value = ast.literal_eval(m.group().decode("latin-1"))
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, bytes):
            out.append(value)
    return b"\x00".join(out)


def unescaped(hay: bytes, levels: int = 3) -> list[bytes]:
    """``hay`` and its JSON-unescaped versions (a repr inside a JSON string
    inside another JSON string has its backslashes doubled twice)."""
    out = [hay]
    for _ in range(levels):
        nxt = out[-1].replace(b"\\\\", b"\\").replace(b'\\"', b'"')
        if nxt == out[-1]:
            break
        out.append(nxt)
    return out


def find_secrets(hay: bytes, keys: dict[bytes, str], passwords: dict[str, str] | None = None) -> list[str]:
    """Every (key label, form) found in ``hay``."""
    variants = unescaped(hay)
    texts = [v.decode("latin-1") for v in variants]  # byte-for-byte, so ASCII forms match exactly
    hidden = b"\x00".join(derived_bytes(v) for v in variants)
    hits = []
    for key, label in keys.items():
        if key in hay:
            hits.append(f"{label}: raw")
        if key in hidden:
            hits.append(f"{label}: inside a longer hex/base64/bytes literal")
        for name, form in text_forms(key).items():
            if any(form in text for text in texts):
                hits.append(f"{label}: {name}")
    for user, password in (passwords or {}).items():
        if any(password in text for text in texts):
            hits.append(f"bus password of {user}")
    return hits


def test_search_finds_planted_keys() -> None:
    """The search is not vacuous: a key planted in any form is found."""
    key = secrets.token_bytes(16)
    while b"'" in key or b'"' in key:  # keep the repr cases simple to read
        key = secrets.token_bytes(16)
    keys = {key: "planted"}
    assert find_secrets(b'{"event": "ok", "n": 3}\n', keys) == []
    for name, form in text_forms(key).items():
        # As a structlog JSON line would carry it (escaped), and as bare text.
        assert find_secrets(json.dumps({"event": "oops", "value": form}).encode(), keys), name
        assert f"planted: {name}" in find_secrets(b"x " + form.encode() + b" y", keys), name
    # What a logger does with bytes left as they are.
    for line in (json.dumps({"k": str(key)}), json.dumps({"k": key.decode("latin-1")}), f"key={key!r}",
                 f"key={key.hex()}", f"key={list(key)}"):
        assert find_secrets(line.encode(), keys), line
    # Raw, in binary.
    assert "planted: raw" in find_secrets(b"\x00\x01" + key + b"\xff", keys)
    # Hidden at an odd offset inside longer encodings.
    blob = secrets.token_bytes(7) + key + secrets.token_bytes(9)
    for enc in (base64.b64encode(blob), base64.urlsafe_b64encode(blob).rstrip(b"="), blob.hex().encode(),
                blob.hex().upper().encode(), repr(blob).encode(), json.dumps(repr(blob)).encode()):
        assert "planted: inside a longer hex/base64/bytes literal" in find_secrets(b"data=" + enc + b";", keys), enc
    # A password as text.
    assert find_secrets(b"login pw=s3cr3t-Pass", {}, {"relay-c0001": "s3cr3t-Pass"}) == ["bus password of relay-c0001"]


# --------------------------------------------------------------------------
# the run


def paho_client(port: int, user: str | None, password: str | None) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"leak-{user}-{secrets.token_hex(3)}")
    if user:
        c.username_pw_set(user, password)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def inject_garbage(net: Network, meter: str, title: bytes) -> int:
    """Hostile input on every path that logs or counts errors."""
    creds = net.credentials()
    n = 0
    relay = paho_client(net.port, "relay-c0001", creds.get("relay-c0001"))
    plc = paho_client(net.port, "plc-c0001", creds.get("plc-c0001"))
    op = paho_client(net.port, "operator", creds.get("operator"))
    bad_dc = bytes((0xDC, 8)) + title + bytes((0x1D, 0x30)) + (0xFFFFFFF0).to_bytes(4, "big") + secrets.token_bytes(24)
    bad_db = bytes((0xDB, 8)) + title + bytes((0x1D, 0x30)) + (5).to_bytes(4, "big") + secrets.token_bytes(24)
    frames = [(meter, bad_dc), (meter, bad_db), (meter, secrets.token_bytes(40)), (meter, b"\x61\x03\x00"),
              ("m999999", bad_dc), (meter, bad_dc[:20])]
    msgs = [
        (relay, "ami/v1/wan/c0001/up", b"\x00not a batch"),
        (relay, "ami/v1/wan/c0001/up", encode_batch(Batch("c0001", 900001, tuple(frames)))),
        (relay, "ami/v1/wan/c0001/up", encode_batch(Batch("c0002", 900002, ((meter, bad_dc),)))),  # wrong segment
        (relay, f"ami/v1/plc/c0001/down/{meter}", secrets.token_bytes(33)),
        (relay, f"ami/v1/plc/c0001/down/{meter}", bad_dc),
        (plc, f"ami/v1/plc/c0001/up/{meter}", bad_dc),
        (plc, f"ami/v1/plc/c0001/up/{meter}", b"\x60\x02\xa1\x00"),
        (plc, f"ami/v1/plc/c0001/up/{meter}", secrets.token_bytes(5000)),
        (op, "ami/v1/control/headend/commands", b"{not json"),
        (op, "ami/v1/control/headend/commands", json.dumps({"op": "rotate", "key": "ccc", "meters": "all",
                                                            "id": "x", "reply": "ami/v1/control/replies/x"}).encode()),
    ]
    for client, topic, payload in msgs:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
        n += 1
    for c in (relay, plc, op):
        c.loop_stop()
        c.disconnect()
    return n


def cli(net: Network, outputs: list[bytes], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(AMI + [*args, "--broker", net.broker, "--data", str(net.data)],
                          cwd=REPO, env=net.env, capture_output=True, timeout=timeout)
    outputs += [proc.stdout, proc.stderr]
    return proc


def stored(net: Network) -> int:
    try:
        with closing(net.db()) as db:
            return db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_no_key_in_logs_monitor_messages_or_replies(tmp_path: Path) -> None:
    net = Network(tmp_path, meters=METERS, concentrators=CONCENTRATORS, env=ENV)
    net.provision()
    net.port = free_port()
    net.start("broker", "broker", "--log-level", "debug")
    wait_port(net.port)
    creds = net.credentials()
    observer = Collector("127.0.0.1", net.port, user="operator", password=creds["operator"],
                         topics=("ami/v1/monitor/#", "ami/v1/control/replies/#"))
    cap_path = tmp_path / "capture.msgpack"
    cap = subprocess.Popen(
        [sys.executable, "-m", "ami.tools.attack", "capture", "--broker", net.broker, "--data", str(net.data),
         "--out", str(cap_path), "--duration", "300", "--user", "relay-c0001", "--user", "relay-c0002"],
        cwd=REPO, env=net.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    outputs: list[bytes] = [cap.stdout.readline()]
    try:
        for name in ("headend", "concentrator", "meters"):
            net.start(name, name, "--log-level", "debug")
        wait_until(lambda: stored(net) >= 3 * METERS, 40, what="first readings")
        for key in ("session", "cc_lan", "ak", "cc_locale"):
            proc = cli(net, outputs, "keys", "rotate", "--all", "--key", key, "--timeout", "40")
            assert proc.returncode == 0, (key, proc.stdout, proc.stderr)
            assert json.loads(proc.stdout.splitlines()[-1])["done"]
        proc = cli(net, outputs, "read", "m000001")
        assert proc.returncode == 0 and b"energy_wh" in proc.stdout, proc.stdout + proc.stderr
        proc = cli(net, outputs, "keys", "handheld", "--meter", "m000001")  # the handheld's own material
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = cli(net, outputs, "tsp", "m000001")
        assert proc.returncode == 0 and b"energy_wh" in proc.stdout, proc.stdout + proc.stderr
        # A handheld with a wrong CC_LOCALE gets a rejected (unciphered) AARE.
        with pytest.raises(AssociationRejected):
            asyncio.run(tsp_session(net.broker, net.data, "m000002", cc_locale=secrets.token_bytes(16),
                                    ak=secrets.token_bytes(16), key_version=999))
        n = stored(net)
        network = load_network(net.data)
        injected = inject_garbage(net, "m000001", network.titles["m000001"])
        # The head-end saw and counted the garbage, and traffic went on.
        wait_until(lambda: sum(1 for e in observer.events() if e.get("kind") == "rejected") >= 5, 20,
                   what="rejection events")
        wait_until(lambda: stored(net) >= n + METERS, 30, what="readings after the garbage")
        cap.send_signal(signal.SIGTERM)
        out, err = cap.communicate(timeout=30)
        outputs += [out, err]
        codes = net.stop_all()
        assert all(c == 0 for c in codes.values()), codes
    except BaseException:
        if cap.poll() is None:
            cap.kill()
        net.kill_all()
        raise
    finally:
        observer.close()

    # ---- everything observable
    logs = {name: path.read_bytes() for name, path in net.logs.items()}
    with observer.lock:
        messages = list(observer.messages)
    replies = [p for t, p, _ in messages if t.startswith("ami/v1/control/replies/")]
    events = [json.loads(p) for t, p, _ in messages if t == "ami/v1/monitor/headend/events"]
    reasons = {e.get("reason") for e in events if e.get("kind") == "rejected"}
    assert injected >= 10 and len(reasons) >= 2, reasons  # the error paths ran
    assert len(replies) >= 4 and any(b"unknown key" in r for r in replies)  # the bad command got its error
    assert sum(1 for e in events if e.get("kind") == "key_change") >= 3 * METERS
    assert all(logs.values()), [n for n, b in logs.items() if not b]
    artifacts = {f"log:{n}": b for n, b in logs.items()}
    artifacts.update({f"bus:{i}:{t}": p for i, (t, p, _r) in enumerate(messages)})
    artifacts.update({f"cli:{i}": b for i, b in enumerate(outputs)})

    # ---- every key that existed
    keys: dict[bytes, str] = {}
    for rec in iter_factory_keys(net.data):
        for kt in ("ccc", "ak", "cc_lan", "cc_locale"):
            keys[bytes.fromhex(rec[kt])] = f"factory {rec['meter']} {kt}"
    kek = (net.data / "headend.kek").read_bytes()
    keys[kek] = "head-end KEK"
    frames, _ = attack.frames_from_records(attack.read_capture(cap_path))
    with tempfile.TemporaryDirectory() as tmp:
        dump = attack.read_dump(attack.steal(net.data / "headend.db", Path(tmp)))
        unwrapped = attack.unwrap_dump(dump, attack.RawKekVault(kek))
    for (meter, kt, version), (state, key) in unwrapped.keys.items():
        keys[bytes(key)] = f"store {meter} {kt.value} v{version} {state}"
    for meter, pending, key in unwrapped.sessions:
        keys[bytes(key)] = f"store {meter} {'pending' if pending else 'current'} session"
    ring = unwrapped.ring()
    traffic = attack.decrypt_traffic(frames, ring)
    for meter, sessions in ring.sessions.items():
        for s in sessions:
            keys.setdefault(s.key, f"{meter} session ({s.origin})")
    # Every session key ever transported (boot, the session rotation, renewals), from the AARQs.
    aarqs = sum(1 for f in frames if f.direction == "down" and attack.kind_of(f.data) == "aarq")
    assert traffic.sessions_recovered == aarqs > METERS
    rotated = {label.split()[2] for label in keys.values() if label.startswith("store") and " v2 " in label}
    assert rotated == {"cc_lan", "ak", "cc_locale"}, rotated  # the reprogrammed keys are in the search
    assert len(keys) > 8 * METERS

    # ---- the search (first on a canary: a real log with one real key appended)
    some_key, label = next(iter(keys.items()))
    canary = logs["headend"] + json.dumps({"event": "canary", "k": some_key.hex()}).encode()
    hits = find_secrets(canary, keys, creds)
    assert f"{label}: hex" in hits and all(h.startswith(label) for h in hits), hits
    leaks = {name: hits for name, blob in artifacts.items() if (hits := find_secrets(blob, keys, creds))}
    assert leaks == {}, json.dumps(leaks, indent=1)[:4000]
    size = sum(len(b) for b in artifacts.values())
    print(f"searched {len(keys)} keys x {len(text_forms(kek)) + 2} forms in {len(artifacts)} artifacts "
          f"({size} bytes: {len(logs)} process logs, {len(messages)} bus messages, {len(outputs)} command outputs)")
    assert size > 30_000, size
