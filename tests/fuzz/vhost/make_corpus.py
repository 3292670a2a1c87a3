#!/usr/bin/env python3
"""Writes the seed corpora of the vhost fuzz targets (corpus/message, corpus/chain)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
V = 1  # protocol version flag
NEED_REPLY = 8


def msg(req, payload=b"", flags=V):
    return struct.pack("<III", req, flags, len(payload)) + payload


def u64(v):
    return struct.pack("<Q", v)


def state(i, n):
    return struct.pack("<II", i, n)


def addr(i, desc, used, avail, flags=0, log=0):
    return struct.pack("<IIQQQQ", i, flags, desc, used, avail, log)


def mem_table(regions):
    out = struct.pack("<II", len(regions), 0)
    for r in regions:
        out += struct.pack("<QQQQ", *r)
    return out


UVA = 0x7f0000000000
FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 27) | (1 << 16) | (1 << 15) | (1 << 22) | (1 << 30)


LOG_ALL = 1 << 26
PROTOCOL_LOG = 0b1011  # MQ, LOG_SHMFD, REPLY_ACK


def handshake(queues=4, protocol=0b1001):
    out = msg(1) + msg(15) + msg(16, u64(protocol)) + msg(17) + msg(3) + msg(2, u64(FEATURES))
    out += msg(5, mem_table([(0, 128 << 10, UVA, 0)]), V | NEED_REPLY)
    for q in range(queues):
        base = q * 0x8000
        out += msg(8, state(q, 256)) + msg(10, state(q, 0))
        out += msg(9, addr(q, UVA + base, UVA + base + 0x2000, UVA + base + 0x1000))
        out += msg(12, u64(q)) + msg(13, u64(q)) + msg(14, u64(q)) + msg(18, state(q, 1))
    return out


def log_base(size, offset):
    return msg(6, u64(size) + u64(offset))


def migration(log_size):
    # What QEMU sends when a migration starts and ends: the log, LOG_ALL, the rings' log flags.
    out = handshake(2, PROTOCOL_LOG) + log_base(log_size, 0) + msg(2, u64(FEATURES | LOG_ALL), V | NEED_REPLY)
    for q in range(2):
        base = q * 0x8000
        out += msg(9, addr(q, UVA + base, UVA + base + 0x2000, UVA + base + 0x1000, 1, base + 0x2000))
    return out + msg(2, u64(FEATURES), V | NEED_REPLY)


MESSAGES = {
    "handshake": handshake(),
    "handshake_then_stop": handshake(2) + msg(11, state(1, 0)) + msg(11, state(0, 0)),
    "handshake_then_reset": handshake(2) + msg(4) + handshake(2),
    "no_protocol_features": msg(1) + msg(3) + msg(2, u64(FEATURES & ~(1 << 30))),
    "poll_mode_kick": handshake(0) + msg(8, state(1, 8)) + msg(12, u64(1 | 0x100)),
    "split_regions": msg(5, mem_table([(0, 0x10000, UVA, 0), (0x100000000, 0x10000, UVA + 0x10000, 0x10000)])),
    "bad_version": msg(1, flags=0),
    "reply_flag": msg(1, flags=V | 4),
    "huge_size": struct.pack("<III", 2, V, 0xffffffff),
    "short_features": msg(2, b"\x01\x02\x03"),
    "nine_regions": msg(5, mem_table([(i << 16, 0x1000, UVA + (i << 16), 0) for i in range(9)])),
    "region_past_file": msg(5, mem_table([(0, 1 << 30, UVA, 0)])),
    "overlapping_regions": msg(5, mem_table([(0, 0x2000, UVA, 0), (0x1000, 0x2000, UVA + 0x10000, 0)])),
    "wrapping_region": msg(5, mem_table([(0xfffffffffffff000, 0x2000, UVA, 0)])),
    "ring_index_out_of_range": msg(8, state(200, 256)),
    "ring_size_odd": msg(8, state(0, 300)),
    "ring_addr_outside": handshake(0) + msg(8, state(0, 256)) + msg(9, addr(0, 0x400, 0x600, 0x3000)),
    "kick_unknown_bits": msg(12, u64(1 << 40)),
    "unknown_request": msg(77, b"abc", V | NEED_REPLY),
    "log_base": log_base(0x1000, 0),
    "migration": migration(0x100),
    "migration_log_too_small": migration(1),
    "log_base_past_file": handshake(0, PROTOCOL_LOG) + log_base(1 << 20, 0x10),
    "log_base_wraps": handshake(0, PROTOCOL_LOG) + log_base(0x1000, 0xfffffffffffffff0),
    "log_base_empty": handshake(0, PROTOCOL_LOG) + log_base(0, 0),
    "log_base_short": handshake(0, PROTOCOL_LOG) + msg(6, u64(0x1000)),
    "log_all_unoffered_protocol": handshake(0) + log_base(0x100, 0),
    "enable_bad_value": msg(18, state(0, 7)),
    "truncated": msg(9, addr(0, 1, 2, 3))[:30],
    "unoffered_feature": msg(2, u64(1)),
    "get_config": handshake(0) + msg(24, struct.pack("<III", 0, 6, 0) + bytes(6)),
    "config_past_end": msg(24, struct.pack("<III", 250, 10, 0) + bytes(10)),
    "set_config": msg(25, struct.pack("<III", 32, 1, 0) + b"\x01"),
}


def chain_input(qsize_exp, features, desc_off, avail_off, used_off, start, memory):
    return bytes([qsize_exp, features]) + struct.pack("<IIIH", desc_off, avail_off, used_off, start) + bytes(memory)


GPA = 0x100000


def memory_with(descs, avail_heads, avail_idx=None, indirect=None):
    mem = bytearray(0x1200)
    for i, (a, l, f, n) in enumerate(descs):
        struct.pack_into("<QIHH", mem, i * 16, a, l, f, n)
    idx = len(avail_heads) if avail_idx is None else avail_idx
    struct.pack_into("<HH", mem, 0x400, 0, idx)
    for i, h in enumerate(avail_heads):
        struct.pack_into("<H", mem, 0x404 + 2 * i, h)
    if indirect:
        for i, (a, l, f, n) in enumerate(indirect):
            struct.pack_into("<QIHH", mem, 0x900 + i * 16, a, l, f, n)
    for i in range(0xa00, 0x1200):
        mem[i] = i & 0xff
    return mem


BUF = GPA + 0xa00
CHAINS = {
    "single": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(BUF, 100, 0, 0)], [0])),
    "three": chain_input(6, 0, 0, 0x400, 0x600, 0,
                         memory_with([(BUF, 12, 1, 1), (BUF + 64, 500, 1, 2), (BUF + 1024, 64, 2, 0)], [0])),
    "many_heads": chain_input(4, 2, 0, 0x400, 0x600, 0,
                              memory_with([(BUF + 64 * i, 64, 0, 0) for i in range(16)], list(range(16)))),
    "indirect": chain_input(6, 1, 0, 0x400, 0x600, 0,
                            memory_with([(GPA + 0x900, 32, 4, 0)], [0],
                                        indirect=[(BUF, 12, 1, 1), (BUF + 12, 100, 0, 0)])),
    "indirect_nested": chain_input(6, 1, 0, 0x400, 0x600, 0,
                                   memory_with([(GPA + 0x900, 32, 4, 0)], [0],
                                               indirect=[(GPA + 0x900, 32, 4, 0)])),
    "indirect_unnegotiated": chain_input(6, 0, 0, 0x400, 0x600, 0,
                                         memory_with([(GPA + 0x900, 16, 4, 0)], [0], indirect=[(BUF, 8, 0, 0)])),
    "loop": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(BUF, 8, 1, 1), (BUF, 8, 1, 0)], [0])),
    "out_of_range": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(0x10, 8, 0, 0)], [0])),
    "huge_len": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(BUF, 0xffffffff, 0, 0)], [0])),
    "next_out_of_range": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(BUF, 8, 1, 999)], [0])),
    "head_out_of_range": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(BUF, 8, 0, 0)], [999])),
    "avail_jump": chain_input(6, 0, 0, 0x400, 0x600, 0, memory_with([(BUF, 8, 0, 0)], [0], avail_idx=40000)),
    "write_then_read": chain_input(6, 0, 0, 0x400, 0x600, 0,
                                   memory_with([(BUF, 8, 3, 1), (BUF, 8, 0, 0)], [0])),
    "misaligned_rings": chain_input(6, 0, 1, 0x401, 0x602, 0, memory_with([(BUF, 8, 0, 0)], [0])),
    "rings_past_end": chain_input(6, 0, 0xfff0, 0x400, 0x600, 0, memory_with([], [])),
    "event_idx_unpop": chain_input(3, 7, 0, 0x400, 0x600, 65530,
                                   memory_with([(BUF, 8, 0, 0)] * 8, [0, 1, 2, 3, 4, 5, 6, 7], avail_idx=2)),
}


def write(kind, items):
    d = os.path.join(HERE, "corpus", kind)
    os.makedirs(d, exist_ok=True)
    for name, data in items.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


write("message", MESSAGES)
write("chain", CHAINS)
