#!/usr/bin/python3
"""Logs every ARP packet seen on an interface (run inside the client namespace), one line
each:  t op sender_mac sender_ip target_mac target_ip   (t: CLOCK_MONOTONIC seconds at
receipt; op 1 request, 2 reply). A gratuitous ARP has sender_ip == target_ip.
Exits after --max-seconds or on SIGTERM."""
import argparse, signal, socket, struct, sys, time

ap = argparse.ArgumentParser()
ap.add_argument('out')
ap.add_argument('--dev', default='eth0')
ap.add_argument('--max-seconds', type=float, default=3600)
a = ap.parse_args()
ETH_P_ARP = 0x0806
stop = False


def bail(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, bail)
signal.signal(signal.SIGINT, bail)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
s.bind((a.dev, ETH_P_ARP))
s.settimeout(0.2)
out = open(a.out, 'w', buffering=1)
print('ready', flush=True)
mac = lambda b: ':'.join(f'{x:02x}' for x in b)
t_end = time.monotonic() + a.max_seconds
while not stop and time.monotonic() < t_end:
    try:
        pkt = s.recv(128)
    except socket.timeout:
        continue
    except InterruptedError:
        continue
    t = time.monotonic()
    if len(pkt) < 42:
        continue
    op = struct.unpack('!H', pkt[20:22])[0]
    out.write(f'{t:.6f} {op} {mac(pkt[22:28])} {socket.inet_ntoa(pkt[28:32])} '
              f'{mac(pkt[32:38])} {socket.inet_ntoa(pkt[38:42])}\n')
