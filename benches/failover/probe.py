#!/usr/bin/python3
"""Client probe (adapted from the keepalived-failover bench's probe.py): every INTERVAL s
open a NEW TCP connection to VIP:PORT (connect timeout 200 ms, read timeout 300 ms) and
read one line, the backend's answer `backend <peer-ip>` (peer-ip: the node that proxied
the connection). Probes start on a fixed cadence and run concurrently, so a hanging
connect does not delay the next one. Bounded: stops after --max-seconds or --max-probes,
or on SIGTERM/SIGINT.

Output, one line per probe:  seq t_start t_end result via   (CLOCK_MONOTONIC seconds)
result: ok | ctimeout | cerr_<ERRNO> | rtimeout | rerr_<ERRNO> | empty | bad
"""
import argparse, asyncio, errno, signal, time

ap = argparse.ArgumentParser()
ap.add_argument('out')
ap.add_argument('--vip', default='192.0.2.50')
ap.add_argument('--port', type=int, default=6443)
ap.add_argument('--interval', type=float, default=0.020)
ap.add_argument('--max-seconds', type=float, default=900)
ap.add_argument('--max-probes', type=int, default=60000)
a = ap.parse_args()
CT, RT = 0.200, 0.300
out = open(a.out, 'w', buffering=1)


async def probe(seq):
    t0 = time.monotonic()
    res, via = 'ok', '-'
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(a.vip, a.port), CT)
    except asyncio.TimeoutError:
        res = 'ctimeout'
    except OSError as e:
        res = 'cerr_' + errno.errorcode.get(e.errno, str(e.errno))
    else:
        try:
            line = (await asyncio.wait_for(r.readline(), RT)).decode(errors='replace').split()
            if not line:
                res = 'empty'
            elif len(line) == 2 and line[0] == 'backend':
                via = line[1]
            else:
                res = 'bad'
        except asyncio.TimeoutError:
            res = 'rtimeout'
        except OSError as e:
            res = 'rerr_' + errno.errorcode.get(e.errno, str(e.errno))
        finally:
            w.close()
    out.write(f'{seq} {t0:.6f} {time.monotonic():.6f} {res} {via}\n')


async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    t_end = time.monotonic() + a.max_seconds
    nxt = time.monotonic()
    seq = 0
    tasks = set()
    while not stop.is_set() and seq < a.max_probes and time.monotonic() < t_end:
        t = asyncio.create_task(probe(seq))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        seq += 1
        nxt += a.interval
        d = nxt - time.monotonic()
        if d < 0:  # fell behind: resync, don't burst
            nxt = time.monotonic()
            d = 0
        try:
            await asyncio.wait_for(stop.wait(), d)
        except asyncio.TimeoutError:
            pass
    if tasks:
        await asyncio.wait(tasks, timeout=1)

asyncio.run(main())
