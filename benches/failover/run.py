#!/usr/bin/python3
"""Failover benchmark: raftlb beside keepalived, same topology, same client, same run.

Rerun (root; iproute2, keepalived, socat, iputils-arping, curl; Python 3 stdlib only):
    cargo build --release
    benches/failover/run.py [--rounds 10] [--bin target/release/raftlb]
        [--settings raftlb-reference,raftlb-fast,raftlb-quick,keepalived-v3_100ms,keepalived-v2_1s]
        [--max-minutes 25]

Topology (rebuilt for every setting; nothing outside these namespaces): netns rfb-sw holds
bridge br0; rfb-r1..r3 (192.0.2.11-13), rfb-cl (client, .100) and rfb-be (backend, .200)
each hang off it by a veth (eth0 inside, <name> on the bridge). VIP 192.0.2.50/24 on eth0.
The backend (backend.py, :8080) answers every connection with `backend <peer-ip>`, so the
client learns which node proxied it. The client (probe.py) opens a new TCP connection to
192.0.2.50:6443 every 20 ms.

raftlb: three `raftlb run` (one per replica namespace, peers on :7400, admin on
127.0.0.1:9090 inside each namespace), listener 192.0.2.50:6443 -> 192.0.2.200:8080,
leader_election with the VIP on eth0 and standby: close_listeners; profiles `reference`
(lease 2s / renew 1500ms / retry 250ms, election_timeout 300ms, heartbeat 100ms) and `fast`
(600ms / 450ms / 100ms, 100ms, 30ms), and `quick` (300ms / 220ms / 50ms, 60ms, 15ms; not in
the default --settings). Variants: kill -9 of the active while it is the
Raft leader (`kill9-leader`), kill -9 of the active after `raftlb ctl raft move-leader` put
Raft leadership on a standby (`kill9-moved`), SIGTERM of the active (`sigterm`). Between
rounds the killed replica restarts on its data_dir and the script waits for the steady
state (one active, the Raft leader unless moved on purpose, sole VIP holder, client
succeeding through it).

keepalived: VRRP on the same three namespaces (r1 prio 150 MASTER, r2 100, r3 50; VRID 51,
preempt), each node running `socat TCP-LISTEN:6443,fork TCP:192.0.2.200:8080` on all
addresses (the L4 proxy keepalived would float a VIP for); variant a: kill -9 of r1's
keepalived (VRRP child and parent), the node's kernel and socat stay up. Then keepalived
restarts on r1, which takes the VIP back (preempt).

Measured per round (CLOCK_MONOTONIC, shared by every namespace):
  failover  = signal -> end of the first probe started after the signal that reached the
              backend through another node than the one signalled;
  overlap   = (old node's VIP gone, from `ip monitor address` in its namespace)
              - (new holder's first gratuitous ARP, captured by arpwatch.py on the client's
              eth0; the new holder's VIP-added event if no ARP was captured);
  vip_3s    = the signalled node's namespace still has the VIP at signal + 3 s (`ip addr`).
Results: $FAILOVER_BENCH_DIR or /tmp/raftlb-failover/<time>/: rounds.json, summary.md,
and per setting the replica/keepalived logs, probe.log, arp.log, vip-events.log.
"""
import argparse, atexit, json, os, random, signal, statistics, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, '..', '..'))
SW = 'rfb-sw'
NODES = ['r1', 'r2', 'r3']
NS = {'r1': 'rfb-r1', 'r2': 'rfb-r2', 'r3': 'rfb-r3', 'cl': 'rfb-cl', 'be': 'rfb-be'}
IP = {'r1': '192.0.2.11', 'r2': '192.0.2.12', 'r3': '192.0.2.13', 'cl': '192.0.2.100', 'be': '192.0.2.200'}
NODE_OF_IP = {v: k for k, v in IP.items()}
VIP, VIP_PREFIX, PORT, BACKEND_PORT, PEER_PORT = '192.0.2.50', 24, 6443, 8080, 7400
ADMIN = 'http://127.0.0.1:9090'
PROFILES = {
    'reference': dict(lease='2s', renew='1500ms', retry='250ms', election_timeout='300ms',
                      heartbeat='100ms', retry_s=0.25, lease_s=2.0),
    'fast': dict(lease='600ms', renew='450ms', retry='100ms', election_timeout='100ms',
                 heartbeat='30ms', retry_s=0.1, lease_s=0.6),
    'quick': dict(lease='300ms', renew='220ms', retry='50ms', election_timeout='60ms',
                  heartbeat='15ms', retry_s=0.05, lease_s=0.3),
}
KA_SETTINGS = {'v3_100ms': (3, '0.1'), 'v2_1s': (2, '1')}
KA_PRIO = {'r1': 150, 'r2': 100, 'r3': 50}
SETTING_NAMES = {
    'raftlb-reference': 'raftlb reference (lease 2 s / renew 1.5 s / retry 250 ms, election 300 ms)',
    'raftlb-fast': 'raftlb fast (lease 600 ms / renew 450 ms / retry 100 ms, election 100 ms)',
    'raftlb-quick': 'raftlb quick (lease 300 ms / renew 220 ms / retry 50 ms, election 60 ms)',
    'keepalived-v3_100ms': 'keepalived VRRPv3, advert 0.1 s',
    'keepalived-v2_1s': 'keepalived VRRPv2, advert 1 s',
}
VARIANT_NAMES = {
    'kill9': 'kill -9 of the active (all rounds)',
    'kill9-leader': 'kill -9, the active is the Raft leader',
    'kill9-moved': 'kill -9, Raft leader moved to a standby',
    'sigterm': 'SIGTERM of the active',
    'a': 'a: kill -9 of keepalived (node stays up)',
}
OBSERVE_S = 3.0          # the VIP check after the signal
FAILOVER_WAIT_S = 15.0   # give up waiting for a failover after this

procs = []               # every Popen we started, for cleanup by pid
T0 = time.monotonic()


def log(*a):
    print(f'[{time.monotonic() - T0:8.3f}]', *a, flush=True)


def sh(cmd, check=True, timeout=20):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f'{cmd}: rc={r.returncode} {r.stderr.strip()}')
    return r.stdout


def popen(args, logf, mode='a'):
    f = open(logf, mode)
    p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    f.close()
    procs.append(p)
    return p


def stop_proc(p, timeout=5.0):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)
    except ProcessLookupError:
        pass


def kill_all():
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def cleanup_net():
    subprocess.run([os.path.join(HERE, 'cleanup.sh')], timeout=60)


# ---------------------------------------------------------------- topology
def setup_net():
    cleanup_net()
    sh(f'ip netns add {SW}')
    sh(f'ip -n {SW} link set lo up')
    sh(f'ip -n {SW} link add br0 type bridge stp_state 0 mcast_snooping 0')
    sh(f'ip -n {SW} link set br0 up')
    for n in NODES + ['cl', 'be']:
        ns = NS[n]
        sh(f'ip netns add {ns}')
        sh(f'ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 '
           f'net.ipv6.conf.default.disable_ipv6=1')
        sh(f'ip -n {ns} link set lo up')
        sh(f'ip link add {n} netns {SW} type veth peer name eth0 netns {ns}')
        sh(f'ip -n {SW} link set {n} master br0 up')
        sh(f'ip -n {ns} addr add {IP[n]}/24 dev eth0')
        sh(f'ip -n {ns} link set eth0 up')


def vip_holders():
    return [n for n in NODES if f' {VIP}/' in sh(f'ip -n {NS[n]} -4 -o addr show dev eth0', False)]


def neigh():
    return sh(f'ip -n {NS["cl"]} neigh show {VIP}', False).strip()


def macs():
    return {n: sh(f'ip -n {NS[n]} -o link show eth0').split('link/ether ')[1].split()[0] for n in NODES}


class VipMonitor:
    """`ip -n NS -4 -o monitor address` per replica namespace, read by one thread each;
    an event is stamped when its line is read. Keeps (t, node, 'add'|'del') transitions."""

    def __init__(self, sdir):
        self.events = []
        self.present = {}
        self.lock = threading.Lock()
        self.logf = open(f'{sdir}/vip-events.log', 'w', buffering=1)
        self.ps = []
        for n in NODES:
            p = subprocess.Popen(['ip', '-n', NS[n], '-4', '-o', 'monitor', 'address'],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            procs.append(p)
            self.ps.append(p)
            threading.Thread(target=self._read, args=(n, p), daemon=True).start()
        time.sleep(0.2)
        for n in NODES:   # state before the first event
            with self.lock:
                self.present.setdefault(n, f' {VIP}/' in sh(f'ip -n {NS[n]} -4 -o addr show dev eth0', False))

    def _read(self, n, p):
        for line in p.stdout:
            t = time.monotonic()
            if f' {VIP}/' not in line:
                continue
            gone = line.startswith('Deleted')
            with self.lock:
                was = self.present.get(n, False)
                self.present[n] = not gone
                if gone != (not was):
                    kind = 'del' if gone else 'add'
                    self.events.append((t, n, kind))
                    self.logf.write(f'{t:.6f} {n} {kind}\n')

    def first(self, node, kind, after, before=float('inf')):
        with self.lock:
            return next((t for (t, n, k) in self.events if n == node and k == kind and after <= t < before), None)

    def first_other_add(self, old, after, before=float('inf')):
        with self.lock:
            return next(((t, n) for (t, n, k) in self.events if n != old and k == 'add' and after <= t < before),
                        (None, None))

    def holds(self, node):
        with self.lock:
            return self.present.get(node, False)

    def stop(self):
        for p in self.ps:
            stop_proc(p, 2)


# ---------------------------------------------------------------- client, backend, ARP
class ProbeLog:
    def __init__(self, path):
        self.path, self.f, self.rows, self.buf = path, None, [], ''

    def poll(self):
        if self.f is None:
            if not os.path.exists(self.path):
                return
            self.f = open(self.path)
        self.buf += self.f.read()
        lines = self.buf.split('\n')
        self.buf = lines.pop()
        for l in lines:
            s = l.split()
            if len(s) == 5:
                self.rows.append((int(s[0]), float(s[1]), float(s[2]), s[3], NODE_OF_IP.get(s[4], s[4])))

    def recent_ok_via(self, node, stable=1.0):
        now = time.monotonic()
        recent = [r for r in self.rows if r[1] > now - stable - 0.3 and r[2] < now]
        return len(recent) >= int(stable / 0.02 * 0.6) and all(r[3] == 'ok' and r[4] == node for r in recent)

    def first_other(self, old, after):
        return next((r for r in self.rows if r[3] == 'ok' and r[4] != old and r[1] >= after), None)


def start_support(sdir, max_seconds):
    """Backend, ARP watcher and client probe for one setting."""
    be = popen(['ip', 'netns', 'exec', NS['be'], sys.executable, f'{HERE}/backend.py',
                '--port', str(BACKEND_PORT), '--max-seconds', str(max_seconds + 60)], f'{sdir}/backend.log')
    arp = popen(['ip', 'netns', 'exec', NS['cl'], sys.executable, f'{HERE}/arpwatch.py', f'{sdir}/arp.log',
                 '--max-seconds', str(max_seconds + 60)], f'{sdir}/arpwatch.stderr')
    for _ in range(100):
        if 'listening' in open(f'{sdir}/backend.log').read() and os.path.exists(f'{sdir}/arp.log'):
            break
        time.sleep(0.05)
    probe = popen(['ip', 'netns', 'exec', NS['cl'], sys.executable, f'{HERE}/probe.py', f'{sdir}/probe.log',
                   '--vip', VIP, '--port', str(PORT), '--max-seconds', str(max_seconds),
                   '--max-probes', str(int(max_seconds * 50) + 100)], f'{sdir}/probe.stderr')
    return [probe, arp, be]


def read_arp(path):
    rows = []
    try:
        for l in open(path):
            s = l.split()
            if len(s) == 6:
                rows.append((float(s[0]), int(s[1]), s[2], s[3], s[4], s[5]))
    except FileNotFoundError:
        pass
    return rows


# ---------------------------------------------------------------- raftlb
class Replica:
    def __init__(self, node, sdir, profile, binary):
        self.node, self.id, self.bin = node, int(node[1:]), binary
        self.p = None
        self.logf = f'{sdir}/raftlb-{node}.log'
        self.conf = f'{sdir}/raftlb-{node}.yaml'
        pr = PROFILES[profile]
        peers = ', '.join(f'{int(m[1:])}: {IP[m]}:{PEER_PORT}' for m in NODES)
        with open(self.conf, 'w') as f:
            f.write(f"""node: {{ name: {node} }}
admin: {{ bind: 127.0.0.1:9090 }}
runtime: {{ shutdown_grace: 5s }}
cluster:
  cluster_id: failover-bench
  node_id: {self.id}
  initial_state: new
  bind: {IP[node]}:{PEER_PORT}
  data_dir: {sdir}/data-{node}
  peers: {{ {peers} }}
  heartbeat_interval: {pr['heartbeat']}
  election_timeout: {pr['election_timeout']}
leader_election:
  lease_duration: {pr['lease']}
  renew_deadline: {pr['renew']}
  retry_period: {pr['retry']}
  standby: close_listeners
  vip: {{ address: {VIP}/{VIP_PREFIX}, interface: eth0 }}
listeners:
  api: {{ bind: {VIP}:{PORT}, pool: backend }}
pools:
  backend:
    backends:
      - {{ name: be, address: {IP['be']}:{BACKEND_PORT} }}
""")

    def start(self):
        with open(self.logf, 'a') as f:
            f.write(f'===== bench: start at monotonic {time.monotonic():.6f}\n')
        self.p = popen(['ip', 'netns', 'exec', NS[self.node], self.bin, 'run', '--config', self.conf,
                        '--log-level', 'info'], self.logf)

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def signal(self, sig):
        os.kill(self.p.pid, sig)

    def wait_exit(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def status(self):
        out = sh(f'ip netns exec {NS[self.node]} curl -s -m 1 {ADMIN}/api/v1/status', False, timeout=5)
        try:
            return json.loads(out)
        except ValueError:
            return None

    def ctl(self, *args):
        r = subprocess.run(['ip', 'netns', 'exec', NS[self.node], self.bin, 'ctl', '--server', ADMIN, *args],
                           capture_output=True, text=True, timeout=20)
        return r.returncode, (r.stdout + r.stderr).strip()


def cluster_view(reps):
    """{node: (role, leader_id)} of every replica that answers."""
    v = {}
    for n, r in reps.items():
        s = r.status() if r.alive() else None
        if s:
            v[n] = (s.get('role'), (s.get('cluster') or {}).get('leader_id'))
        else:
            v[n] = (None, None)
    return v


def raftlb_steady(reps, pl, leader=None, timeout=60.0):
    """One active, the others standby, every replica agrees on the Raft leader, which is
    the active (or `leader`, a node_id, when moved on purpose); the VIP only on the active;
    the last second of probes all answered through it. The active's name or None."""
    t_end = time.monotonic() + timeout
    last = None
    while time.monotonic() < t_end:
        for n, r in reps.items():
            if not r.alive():
                raise RuntimeError(f'raftlb on {n} exited (rc {r.p.returncode}); see {r.logf}')
        v = cluster_view(reps)
        pl.poll()
        act = [n for n, (role, _) in v.items() if role == 'active']
        last = (v, vip_holders())
        if (len(act) == 1 and all(role in ('active', 'standby') for role, _ in v.values())):
            a = act[0]
            want = leader if leader is not None else reps[a].id
            if (all(lid == want for _, lid in v.values()) and last[1] == [a]
                    and pl.recent_ok_via(a)):
                return a
        time.sleep(0.2)
    log('not steady; last view', last)
    return None


def observe(rec, t_sig, old, pl, proc):
    """After the signal: the first probe answered through another node (up to
    FAILOVER_WAIT_S), the signalled process's exit time, which namespaces hold the VIP at
    t_sig + OBSERVE_S and at failover + OBSERVE_S (returns after the latter, or after
    FAILOVER_WAIT_S without a failover). (first probe row or None, exit time or None)"""
    got, t_exit, checked, t_second = None, None, False, None
    while True:
        now = time.monotonic()
        if t_exit is None and proc.poll() is not None:
            t_exit = now
        if got is None:
            pl.poll()
            got = pl.first_other(old, t_sig)
            if got is not None:
                t_second = max(t_sig, got[2]) + OBSERVE_S
        if not checked and now >= t_sig + OBSERVE_S:
            rec['vip_holders_3s'] = vip_holders()
            rec['vip_on_old_3s'] = old in rec['vip_holders_3s']
            checked = True
        if checked and t_second is not None and now >= t_second:
            rec['vip_holders_failover_3s'] = vip_holders()
            rec['vip_on_old_failover_3s'] = old in rec['vip_holders_failover_3s']
            break
        if checked and got is None and now >= t_sig + FAILOVER_WAIT_S:
            break
        nxt = t_sig + OBSERVE_S if not checked else (t_second or now + 0.02)
        time.sleep(min(0.02, max(0.0, nxt - now)))
    rec['seen_failover'] = got is not None
    return got, t_exit


def prepare(run_dir, setting, deadline):
    """One setting's results dir, fresh namespaces, the VIP monitor, the MACs, the
    backend and client support processes, and the probe log: the same for every side."""
    sdir = f'{run_dir}/{setting}'
    os.makedirs(sdir)
    setup_net()
    mon = VipMonitor(sdir)
    mac = macs()
    budget = min(deadline - time.monotonic() + 30, 1800)
    support = start_support(sdir, budget)
    pl = ProbeLog(f'{sdir}/probe.log')
    return sdir, mon, mac, support, pl


def run_raftlb(profile, rounds, run_dir, binary, deadline):
    setting = f'raftlb-{profile}'
    sdir, mon, mac, support, pl = prepare(run_dir, setting, deadline)
    pr = PROFILES[profile]
    reps = {n: Replica(n, sdir, profile, binary) for n in NODES}
    for r in reps.values():
        r.start()
    out = []
    # half the kill -9 rounds with the active as Raft leader, half after moving leadership
    # away, alternating; then the SIGTERM rounds
    sched = [('kill9-leader' if i % 2 == 0 else 'kill9-moved') for i in range(rounds)] + ['sigterm'] * rounds
    try:
        active = raftlb_steady(reps, pl, timeout=60)
        if not active:
            raise RuntimeError(f'{setting}: the cluster did not settle (one active, Raft leader, VIP, client ok)')
        log(setting, 'settled: active', active, 'macs', mac)
        for i, variant in enumerate(sched):
            if time.monotonic() > deadline:
                log(setting, 'time budget used up: stopping after', i, 'rounds')
                break
            active = raftlb_steady(reps, pl, timeout=60)
            if not active:
                raise RuntimeError(f'{setting} round {i}: no steady state within 60 s')
            rec = {'setting': setting, 'variant': variant, 'round': i, 'old': active}
            leader = reps[active].id
            if variant == 'kill9-moved':
                to = random.choice([n for n in NODES if n != active])
                rc, msg = reps[active].ctl('raft', 'move-leader', str(reps[to].id))
                rec['move_leader'] = {'to': to, 'rc': rc, 'out': msg[-300:]}
                a2 = raftlb_steady(reps, pl, leader=reps[to].id, timeout=20)
                if a2 != active:
                    log(setting, i, 'move-leader to', to, 'did not settle:', rc, msg, 'active now', a2)
                    rec['move_leader']['settled'] = False
                leader = reps[to].id
            rec['raft_leader_before'] = leader
            time.sleep(1.0 + random.uniform(0, pr['retry_s']))   # random phase vs the renew timer
            rec['neigh_before'] = neigh()
            old = reps[active]
            sig = signal.SIGTERM if variant == 'sigterm' else signal.SIGKILL
            t_sig = time.monotonic()
            old.signal(sig)
            rec['t_sig'] = t_sig
            got, t_exit = observe(rec, t_sig, active, pl, old.p)
            rc = old.p.returncode if t_exit is not None else old.wait_exit(10)
            if rc is not None and t_exit is None:
                t_exit = time.monotonic()
            rec['exit_code'] = rc
            rec['exited_s'] = t_exit - t_sig if t_exit is not None else None
            if rc is None:
                log(setting, i, active, 'did not exit', f'{time.monotonic() - t_sig:.1f} s after', sig.name, '-> kill -9')
                old.signal(signal.SIGKILL)
                old.wait_exit(5)
            # let the killed holder's VIP expire by itself before the restart removes it
            while mon.holds(active) and time.monotonic() < t_sig + 8.0:
                time.sleep(0.05)
            rec['neigh_after'] = neigh()
            rec['t_restart'] = time.monotonic()
            old.start()
            out.append(rec)
            log(setting, i, variant, 'old', active, 'failover seen' if got else 'NO FAILOVER',
                f'{got[2] - t_sig:.3f}s via {got[4]}' if got else '', 'holders@3s', rec['vip_holders_3s'])
        active = raftlb_steady(reps, pl, timeout=60)
        log(setting, 'final state: active', active)
        time.sleep(0.5)
    finally:
        for r in reps.values():      # all at once: no chain of hand-overs at the end
            if r.alive():
                r.signal(signal.SIGTERM)
        for r in reps.values():      # a second SIGTERM would mean "exit at once"
            if r.p is not None and r.wait_exit(8) is None:
                r.p.kill()
                r.wait_exit(5)
        for p in support:
            stop_proc(p, 3)
        pl.poll()
        mon.stop()
        cleanup_net()
    analyse(out, pl.rows, mon, read_arp(f'{sdir}/arp.log'), mac)
    return out


# ---------------------------------------------------------------- keepalived
class KA:
    def __init__(self, node, sdir, setting):
        self.node, self.dir = node, sdir
        self.p = None
        ver, adv = KA_SETTINGS[setting]
        self.conf = f'{sdir}/ka-{node}.conf'
        with open(self.conf, 'w') as f:
            f.write(f"""global_defs {{
    router_id {node}
    vrrp_version {ver}
    script_user root
}}
vrrp_instance VI_1 {{
    state {'MASTER' if node == 'r1' else 'BACKUP'}
    interface eth0
    virtual_router_id 51
    priority {KA_PRIO[node]}
    advert_int {adv}
    virtual_ipaddress {{
        {VIP}/{VIP_PREFIX} dev eth0
    }}
}}
""")

    def pidf(self, k):
        return f'{self.dir}/ka-{self.node}.{k}.pid'

    def start(self):
        for k in ('main', 'vrrp', 'chk', 'bfd'):
            try:
                os.unlink(self.pidf(k))
            except FileNotFoundError:
                pass
        self.p = popen(['ip', 'netns', 'exec', NS[self.node], 'keepalived', '-n', '-l', '-D',
                        '-G', '--vrrp', '-f', self.conf, '-p', self.pidf('main'),
                        '-r', self.pidf('vrrp'), '-c', self.pidf('chk'), '-b', self.pidf('bfd')],
                       f'{self.dir}/ka-{self.node}.log')
        for _ in range(250):
            try:
                self.child = int(open(self.pidf('vrrp')).read())
                return
            except (FileNotFoundError, ValueError):
                time.sleep(0.02)
        raise RuntimeError(f'keepalived {self.node} did not start')

    def kill9(self):
        """SIGKILL the VRRP child then the parent: neither can clean up."""
        os.kill(self.child, signal.SIGKILL)
        os.kill(self.p.pid, signal.SIGKILL)

    def stop(self):
        stop_proc(self.p, 5)


def ka_settled(pl, master='r1', timeout=60.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        time.sleep(0.1)
        pl.poll()
        if vip_holders() == [master] and pl.recent_ok_via(master):
            return True
    return False


def run_keepalived(kset, rounds, run_dir, deadline):
    setting = f'keepalived-{kset}'
    sdir, mon, mac, support, pl = prepare(run_dir, setting, deadline)
    fwd = [popen(['ip', 'netns', 'exec', NS[n], 'socat', f'TCP-LISTEN:{PORT},fork,reuseaddr',
                  f'TCP:{IP["be"]}:{BACKEND_PORT},connect-timeout=1'], f'{sdir}/socat-{n}.log') for n in NODES]
    kas = {n: KA(n, sdir, kset) for n in NODES}
    for n in NODES:
        kas[n].start()
    adv = float(KA_SETTINGS[kset][1])
    out = []
    try:
        if not ka_settled(pl, timeout=60):
            raise RuntimeError(f'{setting}: initial election did not settle on r1')
        log(setting, 'settled; macs', mac)
        for i in range(rounds):
            if time.monotonic() > deadline:
                log(setting, 'time budget used up: stopping after', i, 'rounds')
                break
            if not ka_settled(pl, timeout=60):
                raise RuntimeError(f'{setting} round {i}: did not settle on r1')
            time.sleep(1.0 + random.uniform(0, adv))     # random phase vs the advert timer
            rec = {'setting': setting, 'variant': 'a', 'round': i, 'old': 'r1', 'neigh_before': neigh()}
            t_sig = time.monotonic()
            kas['r1'].kill9()
            rec['t_sig'] = t_sig
            got, _ = observe(rec, t_sig, 'r1', pl, kas['r1'].p)
            try:
                kas['r1'].p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            rec['neigh_after'] = neigh()
            rec['t_restart'] = time.monotonic()
            kas['r1'].start()
            out.append(rec)
            log(setting, i, 'a', 'failover seen' if got else 'NO FAILOVER',
                f'{got[2] - t_sig:.3f}s via {got[4]}' if got else '', 'holders@3s', rec['vip_holders_3s'])
        ka_settled(pl, timeout=30)
        time.sleep(0.5)
    finally:
        for n in NODES:
            kas[n].stop()
        for p in fwd + support:
            stop_proc(p, 3)
        pl.poll()
        mon.stop()
        cleanup_net()
    analyse(out, pl.rows, mon, read_arp(f'{sdir}/arp.log'), mac)
    return out


# ---------------------------------------------------------------- analysis
def analyse(recs, rows, mon, arp, mac):
    node_of_mac = {m: n for n, m in mac.items()}
    for rec in recs:
        t, old, t_end = rec['t_sig'], rec['old'], rec['t_restart']
        win = [r for r in rows if t <= r[1] < t_end]
        first = next((r for r in win if r[3] == 'ok' and r[4] != old), None)
        rec['failover_s'] = first[2] - t if first else None
        rec['failover_start_s'] = first[1] - t if first else None
        rec['new_via'] = first[4] if first else None
        rec['old_answers_after_signal'] = sum(1 for r in win if r[3] == 'ok' and r[4] == old)
        rec['last_old_answer_s'] = max((r[2] - t for r in win if r[3] == 'ok' and r[4] == old), default=None)
        rec['failed_probes'] = sum(1 for r in win if r[3] != 'ok')
        kinds = {}
        for r in win:
            if r[3] != 'ok':
                kinds[r[3]] = kinds.get(r[3], 0) + 1
        rec['fail_kinds'] = kinds
        rec['failed_after_first_success'] = (sum(1 for r in win if r[3] != 'ok' and r[1] > first[1])
                                             if first else None)
        succ = sorted(r[2] for r in rows if r[3] == 'ok' and t - 1 <= r[2] < t_end)
        gaps = [b - a for a, b in zip(succ, succ[1:])]
        rec['max_gap_between_successes_s'] = max(gaps) if gaps else None
        rec['probes_in_window'] = len(win)
        # the VIP
        t_add, new = mon.first_other_add(old, t, t_end + 1)
        rec['new_holder'] = new
        rec['vip_added_s'] = t_add - t if t_add else None
        t_del = mon.first(old, 'del', t, t_end)
        rec['old_vip_gone_s'] = t_del - t if t_del else None
        garps = [a for a in arp if a[0] >= t and a[3] == VIP and a[5] == VIP and a[0] < t_end]
        rec['garps'] = [(round(a[0] - t, 4), node_of_mac.get(a[2], a[2])) for a in garps]
        g_new = next((a[0] for a in garps if node_of_mac.get(a[2]) == new), None) if new else None
        rec['first_garp_s'] = g_new - t if g_new else None
        if g_new is not None:
            rec['announce_s'], rec['announce_source'] = g_new - t, 'gratuitous ARP'
        elif t_add is not None:
            rec['announce_s'], rec['announce_source'] = t_add - t, 'VIP added'
        else:
            rec['announce_s'], rec['announce_source'] = None, None
        if rec['announce_s'] is None:
            rec['overlap_s'], rec['overlap_kind'] = None, None
        elif t_del is not None:
            rec['overlap_s'], rec['overlap_kind'] = rec['old_vip_gone_s'] - rec['announce_s'], 'exact'
        else:   # the old node still held it when it was restarted: a lower bound
            rec['overlap_s'], rec['overlap_kind'] = (t_end - t) - rec['announce_s'], 'at least (kept until restart)'


def fmt_s(x):
    return '-' if x is None else f'{x:.2f} s'


def summarize(recs):
    rows = []
    order = ['raftlb-reference', 'raftlb-fast', 'raftlb-quick', 'keepalived-v3_100ms', 'keepalived-v2_1s']
    for s in sorted({r['setting'] for r in recs}, key=lambda x: order.index(x) if x in order else 99):
        rr = [r for r in recs if r['setting'] == s]
        groups = []
        if s.startswith('raftlb'):
            groups.append(('kill9', [r for r in rr if r['variant'].startswith('kill9')]))
            groups += [(v, [r for r in rr if r['variant'] == v]) for v in ('kill9-leader', 'kill9-moved', 'sigterm')]
        else:
            groups.append(('a', rr))
        for v, g in groups:
            if not g:
                continue
            fo = [r['failover_s'] for r in g if r.get('failover_s') is not None]
            ov = [r['overlap_s'] for r in g if r.get('overlap_s') is not None]
            lower = any((r.get('overlap_kind') or '').startswith('at least') for r in g if r.get('overlap_s') is not None)
            ex = [r['exited_s'] for r in g if r.get('exited_s') is not None]
            rows.append({
                'setting': SETTING_NAMES.get(s, s), 'variant': VARIANT_NAMES.get(v, v), 'n': len(g),
                'median': fmt_s(statistics.median(fo)) if fo else '-',
                'min': fmt_s(min(fo)) if fo else '-',
                'max': fmt_s(max(fo)) if fo else '-',
                'no_failover': len(g) - len(fo),
                'overlap': (('≥ ' if lower else '') + f'{statistics.median(ov):+.2f} / {max(ov):+.2f} s') if ov else '-',
                'vip3': f'{sum(1 for r in g if r.get("vip_on_old_3s"))} of {len(g)}',
                'vip3f': f'{sum(1 for r in g if r.get("vip_on_old_failover_3s"))} of '
                         f'{sum(1 for r in g if "vip_on_old_failover_3s" in r)}',
                'failed': sum(r.get('failed_probes') or 0 for r in g),
                'failed_after': sum(r.get('failed_after_first_success') or 0 for r in g),
                'old_after': sum(r.get('old_answers_after_signal') or 0 for r in g),
                'gap': fmt_s(max((r['max_gap_between_successes_s'] for r in g
                                  if r.get('max_gap_between_successes_s') is not None), default=None)),
                'exit': f'{statistics.median(ex):.2f} / {max(ex):.2f} s' if ex else '-',
            })
    lines = ['| setting | variant | rounds | failover median | max | VIP overlap median / max | '
             'VIP still on the killed node 3 s later |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        med = r['median'] + (f' ({r["no_failover"]} rounds without failover)' if r['no_failover'] else '')
        lines.append(f'| {r["setting"]} | {r["variant"]} | {r["n"]} | {med} | {r["max"]} | '
                     f'{r["overlap"]} | {r["vip3"]} |')
    srcs = sorted({r['announce_source'] for r in recs if r.get('announce_source')})
    lines += ['', 'Failover: signal -> end of the first probe (started after the signal) that the backend answered '
              'through another node. VIP overlap: (the signalled node loses the address) - (the new holder\'s '
              f'announcement, measured as: {", ".join(srcs) or "-"}); negative = no overlap (a gap); '
              '"≥" = the old node kept the VIP until it was restarted (a lower bound).', '',
              '| setting | variant | min failover | longest gap between successes | failed probes (all rounds) | '
              'failed after the first success | answers via the signalled node after the signal | '
              'VIP on the killed node 3 s after the failover | signalled process exited after (median / max) |',
              '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["setting"]} | {r["variant"]} | {r["min"]} | {r["gap"]} | {r["failed"]} | '
                     f'{r["failed_after"]} | {r["old_after"]} | {r["vip3f"]} | {r["exit"]} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--bin', default=os.path.join(REPO, 'target', 'release', 'raftlb'))
    ap.add_argument('--settings', default='raftlb-reference,raftlb-fast,keepalived-v3_100ms,keepalived-v2_1s')
    ap.add_argument('--max-minutes', type=float, default=25.0, help='no new round starts after this')
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit('needs root (network namespaces)')
    settings = a.settings.split(',')
    for s in settings:
        if not ((s.startswith('raftlb-') and s[7:] in PROFILES) or
                (s.startswith('keepalived-') and s[11:] in KA_SETTINGS)):
            sys.exit(f'unknown setting {s}')
    binary = os.path.abspath(a.bin)
    if any(s.startswith('raftlb') for s in settings) and not os.access(binary, os.X_OK):
        sys.exit(f'{binary}: not found (cargo build --release, or --bin)')
    base = os.environ.get('FAILOVER_BENCH_DIR') or os.path.join('/tmp/raftlb-failover', time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(base, exist_ok=True)
    deadline = time.monotonic() + a.max_minutes * 60
    load_before = open('/proc/loadavg').read().split()[:3]
    ka_ver = sh('keepalived --version 2>&1', False).splitlines()[:1]
    log('results in', base, '| keepalived', ka_ver, '| raftlb', binary)

    def bail(sig, frm):
        raise KeyboardInterrupt(f'signal {sig}')
    signal.signal(signal.SIGTERM, bail)
    signal.signal(signal.SIGHUP, bail)
    atexit.register(lambda: (kill_all(), cleanup_net()))
    recs = []
    failures = []
    try:
        for s in settings:
            try:
                if s.startswith('raftlb-'):
                    recs += run_raftlb(s[7:], a.rounds, base, binary, deadline)
                else:
                    recs += run_keepalived(s[11:], a.rounds, base, deadline)
            except RuntimeError as e:
                log('FAILED', s, e)
                failures.append(f'{s}: {e}')
            json.dump(recs, open(f'{base}/rounds.json', 'w'), indent=1)
    finally:
        kill_all()
        cleanup_net()
    json.dump(recs, open(f'{base}/rounds.json', 'w'), indent=1)
    summ = summarize(recs)
    if failures:
        summ += '\n\nFailed settings:\n' + '\n'.join(f'- {f}' for f in failures)
    meta = (f'Run {time.strftime("%Y-%m-%d %H:%M")}, --rounds {a.rounds}, {os.cpu_count()} cores, '
            f'load average before {load_before}, after {open("/proc/loadavg").read().split()[:3]}, '
            f'{(time.monotonic() - T0) / 60:.1f} min, keepalived {ka_ver}')
    open(f'{base}/summary.md', 'w').write(meta + '\n\n' + summ + '\n')
    print(meta)
    print(summ)
    left = sh("ip netns list | grep -E '^rfb-' || true", False).strip()
    if left:
        print('WARN: namespaces left:', left)
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()
