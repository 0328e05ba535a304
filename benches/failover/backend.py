#!/usr/bin/python3
"""The backend: answers every TCP connection with `backend <peer-ip>\\n` and closes it, so
the client learns which node proxied it. Exits after --max-seconds or on SIGTERM."""
import argparse, asyncio, signal

ap = argparse.ArgumentParser()
ap.add_argument('--bind', default='0.0.0.0')
ap.add_argument('--port', type=int, default=8080)
ap.add_argument('--max-seconds', type=float, default=3600)
a = ap.parse_args()


async def handle(r, w):
    try:
        w.write(f'backend {w.get_extra_info("peername")[0]}\n'.encode())
        await w.drain()
    except OSError:
        pass
    finally:
        w.close()


async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    srv = await asyncio.start_server(handle, a.bind, a.port, reuse_address=True, backlog=512)
    print('listening', a.bind, a.port, flush=True)
    try:
        await asyncio.wait_for(stop.wait(), a.max_seconds)
    except asyncio.TimeoutError:
        pass
    srv.close()

asyncio.run(main())
