#!/usr/bin/env python3
"""A PostgreSQL client for stop-start tests of kernel forwarding (raw protocol, trust auth):
runs N queries of 50,000 rows each, reads in odd sizes and stalls for 30 ms now and then, and
checks every row's contents, so a byte out of order shows as the row where it happened.

usage: stop-start-reader.py PORT [N]   (database bench, user postgres, on 127.0.0.1)
"""
import socket, struct, sys, time, random
port = int(sys.argv[1]); nq = int(sys.argv[2]) if len(sys.argv) > 2 else 10
s = socket.create_connection(("127.0.0.1", port))
def send(b): s.sendall(b)
params = b"user\0postgres\0database\0bench\0\0"
send(struct.pack("!II", 8 + len(params), 196608) + params)
buf = bytearray(); total = 0
def need(n):
    global total
    while len(buf) < n:
        if random.random() < 0.02: time.sleep(0.03)   # a reader that stalls now and then
        d = s.recv(random.choice([100, 4096, 65536]))
        if not d: raise SystemExit("EOF")
        total += len(d); buf.extend(d)
def msg():
    need(5); t = buf[0]; (l,) = struct.unpack("!I", buf[1:5])
    if t not in b"RSKZTDCEN1234ntsIl" or l > 10_000_000:
        print("BAD type %r len %d at stream offset %d; next bytes %r" % (chr(t), l, total - len(buf), bytes(buf[:40]))); raise SystemExit(1)
    need(1 + l); body = bytes(buf[5:1 + l]); del buf[:1 + l]; return chr(t), body
while True:
    t, b = msg()
    if t == "Z": break
for q in range(nq):
    sql = b"select repeat('x', 1000) || i from generate_series(1, 50000) i\0"
    send(b"Q" + struct.pack("!I", 4 + len(sql)) + sql)
    rows = 0
    while True:
        t, b = msg()
        if t == "D":
            rows += 1
            (n,) = struct.unpack("!H", b[:2]); (ln,) = struct.unpack("!I", b[2:6]); val = b[6:6 + ln]
            exp = b"x" * 1000 + str(rows).encode()
            if val != exp:
                print("query %d row %d wrong: got row %r (offset %d)" % (q, rows, val[1000:], total - len(buf))); raise SystemExit(1)
        if t == "Z": break
    print("query", q, "rows", rows)
print("ok")
