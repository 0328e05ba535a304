#!/usr/bin/env python3
"""Reconnect storm: every client reconnects at once, as kubelets do after a failover.

4 client processes open 5,000 connections in total (all at once, on loopback),
each writes 4 bytes and waits for the echo. The same storm goes through raftlb
and through HAProxy, one after the other (interleaved when --rounds > 1), with
the same listen backlog (4096, raftlb's fixed value) and the same thread count,
in front of the same echo backend. Printed for each proxy: p50/p99/max time from
connect() to the echo, failed connections, and the kernel's ListenOverflows
(TcpExt, /proc/net/netstat) counted during the storm.

Usage (from the project root, after `cargo build --release`):
  benches/reconnect_storm.py [--bin target/release/raftlb] [--connections 5000]
                             [--clients 4] [--threads 1] [--rounds 1]

Loopback only; every connection gives up after --timeout seconds, so a storm is
bounded in time; the open-file limit is raised to its hard limit.
"""
import argparse, asyncio, multiprocessing, os, resource, signal, socket, statistics, struct, subprocess, sys, tempfile, time

# Below the kernel's ephemeral range (32768-60999 by default), so a client socket
# of an earlier run cannot hold one of them.
BACKEND = 29990
PORTS = {"haproxy": 29991, "raftlb": 29992}
ADMIN = 29993
BACKLOG = 4096

ECHO = r'''
import asyncio, sys
async def h(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d: break
            w.write(d); await w.drain()
    except Exception: pass
    w.close()
async def main():
    s = await asyncio.start_server(h, "127.0.0.1", int(sys.argv[1]), backlog=8192)
    await s.serve_forever()
asyncio.run(main())
'''


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def listen_overflows():
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], vals.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return 0


def wait_port(port, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            # A reset, not a FIN: no TIME_WAIT on the port that would stop a rebind.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


async def one(port, timeout):
    start = time.perf_counter()
    try:
        async def go():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"ping")
            got = await r.readexactly(4)
            elapsed = time.perf_counter() - start
            w.close()
            return elapsed if got == b"ping" else None
        return await asyncio.wait_for(go(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return None


def client(port, n, timeout, go, out):
    raise_nofile()

    async def main():
        go.wait()
        return await asyncio.gather(*(one(port, timeout) for _ in range(n)))

    out.put(asyncio.run(main()))


def storm(port, total, clients, timeout):
    go = multiprocessing.Event()
    out = multiprocessing.Queue()
    share = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    procs = [multiprocessing.Process(target=client, args=(port, n, timeout, go, out)) for n in share]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every client process is up and waiting
    before = listen_overflows()
    go.set()
    times = []
    for _ in procs:
        times.extend(out.get(timeout=timeout + 60))
    for p in procs:
        p.join(timeout=10)
    overflows = listen_overflows() - before
    ok = sorted(t for t in times if t is not None)
    failed = len(times) - len(ok)

    def pct(q):
        return ok[min(len(ok) - 1, int(q * len(ok)))] * 1e3 if ok else float("nan")

    return {"p50": pct(0.50), "p99": pct(0.99), "max": ok[-1] * 1e3 if ok else float("nan"),
            "failed": failed, "overflows": overflows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/raftlb")
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()
    if not 1 <= args.connections <= 8000:
        sys.exit("--connections must be between 1 and 8000")
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"{args.bin} is not an executable: build it first (cargo build --release)")
    raise_nofile()
    d = tempfile.mkdtemp(prefix="reconnect-storm-")
    procs = []

    def spawn(name, cmd):
        log = open(os.path.join(d, name + ".log"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)

    hcfg = os.path.join(d, "haproxy.cfg")
    with open(hcfg, "w") as f:
        f.write(f"""global
  maxconn 8000
  nbthread {args.threads}
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend f
  bind 127.0.0.1:{PORTS['haproxy']} backlog {BACKLOG}
  maxconn 8000
  default_backend b
backend b
  server s1 127.0.0.1:{BACKEND}
""")
    rcfg = os.path.join(d, "raftlb.yaml")
    with open(rcfg, "w") as f:
        f.write(f"""admin:
  bind: 127.0.0.1:{ADMIN}
runtime:
  worker_threads: {args.threads}
listeners:
  storm:
    bind: 127.0.0.1:{PORTS['raftlb']}
    pool: echo
    max_connections: 8000
pools:
  echo:
    backends:
      - name: echo-1
        address: 127.0.0.1:{BACKEND}
""")
    results = {"raftlb": [], "haproxy": []}
    try:
        spawn("echo", [sys.executable, "-c", ECHO, str(BACKEND)])
        spawn("haproxy", ["haproxy", "-db", "-f", hcfg])
        spawn("raftlb", [args.bin, "run", "--config", rcfg])
        for port in [BACKEND, *PORTS.values()]:
            if not wait_port(port):
                sys.exit(f"nothing listens on {port}; logs in {d}")
        for r in range(args.rounds):
            order = ["raftlb", "haproxy"] if r % 2 == 0 else ["haproxy", "raftlb"]
            for name in order:
                time.sleep(2.0)  # earlier connections finish closing
                res = storm(PORTS[name], args.connections, args.clients, args.timeout)
                results[name].append(res)
                print(f"round {r + 1} {name}: " + " ".join(
                    f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    print(f"reconnect storm: {args.connections} connections from {args.clients} processes, "
          f"backlog {BACKLOG}, {args.threads} proxy thread(s), {os.cpu_count()} cores, "
          f"medians of {args.rounds} round(s)")
    print("proxy".ljust(10) + "".join(h.rjust(12) for h in ("p50 ms", "p99 ms", "max ms", "failed", "overflows")))
    for name, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in ("p50", "p99", "max", "failed", "overflows")}
        print(name.ljust(10) + f"{med['p50']:12.1f}{med['p99']:12.1f}{med['max']:12.1f}"
              f"{med['failed']:12.0f}{med['overflows']:12.0f}")


if __name__ == "__main__":
    main()
