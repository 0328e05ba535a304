#!/usr/bin/env python3
"""Where the CPU goes under peer-compare's rps and cps loads, process by process.

peer-compare gives one figure per proxy; on a 2-core machine its three busy
processes (wrk, the nginx backend, the proxy) share two cores, so a ratio can
move because the proxy changed what *the others* spend. This runs the same
loads (wrk -t1 -c50, one nginx worker answering "ok", one proxy thread) through
raftlb and HAProxy, rounds interleaved, and reports for each process its CPU
use and its CPU time per request, its context switches per request, and which
core it ran on (sampled every 100 ms); for the proxy also the user-space part of
its CPU time, and for the whole machine its busy time per request (steal left
out) and the share of time both cores sat idle or were stolen by the host.

    benches/cpu_split.py --bin target/release/raftlb --rounds 4
    benches/cpu_split.py --variant spin=/tmp/raftlb-wrapper --only rps   # a second binary beside it

Loopback only; every wrk run is bounded (--seconds, default 6).
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

WEB, PROXY, ADMIN = 21600, 21610, 21611


def spawn(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    p.wait()


def wait_port(port, timeout=10.0):
    import socket
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def cpu_and_switches(pid):
    """CPU ticks (user + system), context switches and user ticks over all of pid's threads."""
    ticks = switches = user = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
        user += int(fields[11])
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            switches += sum(int(x) for x in re.findall(r"ctxt_switches:\s+(\d+)", f.read()))
    return ticks, switches, user


def machine():
    """The machine's busy (steal left out), idle and stolen ticks, all cores together."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = t
    return user + nice + system + irq + softirq, idle + iowait, steal


def tcp_counters():
    """The machine's TCP segments sent, those carrying new data or a FIN, and delayed ACKs sent."""
    def table(path, prefix):
        with open(path) as f:
            rows = [l.split() for l in f if l.startswith(prefix)]
        out = {}
        for names, values in zip(rows[0::2], rows[1::2]):
            out.update(zip(names[1:], (int(v) for v in values[1:])))
        return out
    tcp = table("/proc/net/snmp", "Tcp:")
    ext = table("/proc/net/netstat", "TcpExt:")
    return tcp["OutSegs"], ext["TCPOrigDataSent"], ext["DelayedACKs"]


def core_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[36]


def one_round(args, dir, proxy, kind, log):
    if proxy == "haproxy":
        cmd = ["haproxy", "-db", "-f", f"{dir}/haproxy.cfg"]
    else:
        cmd = [args.bins[proxy], "run", "--config", f"{dir}/raftlb.yaml"]
    px = spawn(cmd, log)
    try:
        wait_port(PROXY)
        close = ["-H", "Connection: close"] if kind == "cps" else []
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c50", f"-d{args.seconds}s", "--latency", *close, f"http://127.0.0.1:{PROXY}/"],
            stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        web_worker = int(subprocess.run(["pgrep", "-P", str(args.web.pid)], capture_output=True, text=True).stdout.split()[0])
        pids = {"wrk": wrk.pid, "nginx": web_worker, "proxy": px.pid}
        before = {k: cpu_and_switches(p) for k, p in pids.items()}
        machine_before = machine()
        tcp_before = tcp_counters()
        cores = {k: {} for k in pids}
        start = time.monotonic()
        for _ in range(int((args.seconds - 2) * 10)):
            for k, p in pids.items():
                c = core_of(p)
                cores[k][c] = cores[k].get(c, 0) + 1
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        after = {k: cpu_and_switches(p) for k, p in pids.items()}
        machine_after = machine()
        tcp_after = tcp_counters()
        out = wrk.communicate(timeout=args.seconds + 30)[0]
    finally:
        kill(px)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    hz = os.sysconf("SC_CLK_TCK")
    row = {"req/s": rate}
    for k in pids:
        cpu = (after[k][0] - before[k][0]) / hz / elapsed
        row[f"{k} cpu"] = cpu
        row[f"{k} us/req"] = cpu * 1e6 / rate
        row[f"{k} cs/req"] = (after[k][1] - before[k][1]) / elapsed / rate
        row[f"{k} cores"] = cores[k]
    row["proxy user us/req"] = (after["proxy"][2] - before["proxy"][2]) / hz / elapsed * 1e6 / rate
    busy, idle, steal = (b - a for a, b in zip(machine_before, machine_after))
    segs, data, delayed = (b - a for a, b in zip(tcp_before, tcp_after))
    row["segs/req"] = segs / elapsed / rate
    row["pure acks/req"] = (segs - data) / elapsed / rate
    row["delayed acks/req"] = delayed / elapsed / rate
    row["machine us/req"] = busy / hz / elapsed * 1e6 / rate
    row["idle %"] = 100 * idle / (busy + idle + steal)
    row["steal %"] = 100 * steal / (busy + idle + steal)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/raftlb")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--only", default="rps,cps")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BIN",
                    help="another raftlb binary (or a wrapper script) to run in the same interleaved rounds")
    args = ap.parse_args()
    args.bins = {"raftlb": args.bin}
    for v in args.variant:
        name, sep, path = v.partition("=")
        if not sep or not name or not path or name in ("haproxy", "raftlb"):
            sys.exit(f"--variant {v}: expected NAME=BIN with a NAME other than haproxy and raftlb")
        args.bins[name] = path
    dir = tempfile.mkdtemp(prefix="cpu-split-")
    with open(f"{dir}/web.conf", "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {dir}/web.pid; error_log {dir}/web.err;
events {{ worker_connections 16384; }}
http {{ access_log off; server {{ listen 127.0.0.1:{WEB} backlog=8192; keepalive_requests 10000000;
  location / {{ return 200 "ok\\n"; }} }} }}
""")
    with open(f"{dir}/haproxy.cfg", "w") as f:
        f.write(f"""global
  maxconn 6000
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  option splice-auto
frontend f
  bind 127.0.0.1:{PROXY}
  default_backend b
backend b
  server s1 127.0.0.1:{WEB}
""")
    with open(f"{dir}/raftlb.yaml", "w") as f:
        f.write(f"""admin:
  bind: 127.0.0.1:{ADMIN}
runtime:
  worker_threads: 1
listeners:
  web:
    bind: 127.0.0.1:{PROXY}
    pool: web
pools:
  web:
    backends:
      - name: web-1
        address: 127.0.0.1:{WEB}
""")
    log = open(f"{dir}/log", "a")
    args.web = spawn(["nginx", "-c", f"{dir}/web.conf"], log)
    rows = {}
    try:
        wait_port(WEB)
        for r in range(args.rounds):
            proxies = ["haproxy", *args.bins]
            proxies = proxies[r % len(proxies):] + proxies[:r % len(proxies)]
            for kind in args.only.split(","):
                for proxy in proxies:
                    row = one_round(args, dir, proxy, kind, log)
                    rows.setdefault((kind, proxy), []).append(row)
                    print(f"round {r + 1} {kind} {proxy}: {row['req/s']:.0f} req/s, cores {row['proxy cores']}", flush=True)
    finally:
        kill(args.web)
    print(f"\nmedians of {args.rounds} rounds (cpu: cores used; us/req: CPU microseconds per request; cs/req: context switches per request;"
          " proxy user: its user-space part; machine: all busy CPU, steal left out; idle and steal: % of both cores' time)")
    for (kind, proxy), rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if not k.endswith("cores")}
        parts = "  ".join(
            f"{p} {med[f'{p} cpu']:.2f} cpu {med[f'{p} us/req']:.1f} us {med[f'{p} cs/req']:.3f} cs" for p in ("wrk", "nginx", "proxy"))
        print(f"{kind} {proxy:10s} {med['req/s']:8.0f} req/s  {parts}  proxy user {med['proxy user us/req']:.1f} us"
              f"  segs {med['segs/req']:.2f} (pure acks {med['pure acks/req']:.2f}, delayed {med['delayed acks/req']:.3f})"
              f"  machine {med['machine us/req']:.1f} us  idle {med['idle %']:.1f}%  steal {med['steal %']:.1f}%")


if __name__ == "__main__":
    main()
