#!/usr/bin/env python3
"""A NetFlow v5 test collector: listens on UDP PORT for SECONDS and prints, as JSON, the packet and
byte totals per (src, dst, proto) over all records received."""
import json, socket, struct, sys, time

port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", port))
s.settimeout(0.2)
totals, datagrams, bad = {}, 0, 0
end = time.time() + seconds
while time.time() < end:
    try:
        data, _ = s.recvfrom(65535)
    except socket.timeout:
        continue
    version, count = struct.unpack(">HH", data[:4])
    if version != 5 or len(data) != 24 + 48 * count:
        bad += 1
        continue
    datagrams += 1
    for i in range(count):
        r = data[24 + 48 * i: 24 + 48 * (i + 1)]
        src, dst = socket.inet_ntoa(r[0:4]), socket.inet_ntoa(r[4:8])
        pkts, octets = struct.unpack(">II", r[16:24])
        proto = r[38]
        key = f"{src}>{dst}/{proto}"
        t = totals.setdefault(key, [0, 0])
        t[0] += pkts
        t[1] += octets
print(json.dumps({"datagrams": datagrams, "bad": bad, "flows": totals}))
