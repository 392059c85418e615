#!/usr/bin/env python3
# A generic proxy benchmark harness written before tendril, copied unchanged but for two
# columns and the topology (see README.md); tendril's targets come in through EXTRA_TARGET,
# started by tendril-up.sh.
"""Proxy anchor benchmark driver.

Runs pgbench against a list of targets (direct PG over TCP, HAProxy, PgBouncer
session/transaction, plus any EXTRA_TARGET), interleaving the targets inside each
test and repeating the whole pass ROUNDS times. Every ratio is computed against the
direct target *of the same round and test*, so slow drift of the machine cancels.

Per run it records: pgbench TPS / average latency / failures, the 1-minute load
average before and after, CPU seconds used by each proxy process, by PostgreSQL
(postmaster + all backends, including ones that exited during the run), by pgbench,
kernel threads, and every other process on the machine ("foreign"), plus steal time.
For the single-client latency test it parses pgbench's per-transaction log (-l) and
computes p50/p90/p99/p99.9.

Environment (all optional):
  TOPOLOGY=local           local | remote: where setup.sh put PostgreSQL (default: what
                           setup.sh recorded in $RUN_DIR/topology, else local); recorded in
                           runs.jsonl and the summary
  PG_HOST=127.0.0.1        PostgreSQL's address, the direct targets' (remote: 10.231.0.2,
                           $NETNS_PG_ADDR); proxies are always reached on 127.0.0.1
  ROUNDS=3                 repetitions of the full interleaved pass
  TESTS=select,tpcb,churn,lat1   subset / order of tests
  TARGETS=direct,haproxy,pgb-session,pgb-txn   subset of built-in targets
  EXTRA_TARGET=name:port[:mode[:pid|pidfile]][,name2:port2...]
                           extra proxies listening on 127.0.0.1:port that forward to
                           PG on $PG_HOST:$PG_PORT. mode = prepared (default) | extended | simple
                           is the pgbench -M used where the test says -M prepared
                           (use extended for proxies that can't carry named prepared
                           statements). pid / pidfile, if given, is sampled for CPU.
  DURATION_SCALE=1.0       multiply every -T (e.g. 0.25 for a smoke test)
  MAX_LOAD=1.0             wait before each round until 1-min load <= MAX_LOAD ...
  LOAD_POLL_S=30           ... polling this often ...
  LOAD_WAIT_MAX_S=2400     ... for at most this long (then run anyway, flagged)
  WAIT_EACH_TEST=0         1 = also wait for load before each test inside a round
  FOREIGN_MAX_PCT=50       a run during which processes that are not ours (not PG,
                           pgbench, the proxies or kernel threads) used more than this
                           % of one core is "contaminated": it is repeated, after
                           waiting until a 3 s idle probe shows foreign CPU below the
                           limit, up to RETRIES=2 times. All attempts are kept in
                           runs.jsonl; the summary uses the least contaminated attempt.
  RETRY_WAIT_BUDGET_S=1200 total time all those retry waits may take (then no more
                           retries; contaminated runs stay flagged in the summary)
  SETTLE_S=2               idle pause between runs
  RESULTS_DIR=...          default: ./results/<UTC timestamp>
  KEEP_TXN_LOGS=0          1 = keep pgbench -l logs (can be large)
  PIN=                     e.g. "pgbench=1" -> taskset -c 1 for pgbench (off by default)

  python3 bench.py --resummarize results/<run>   rebuilds summary.md/.json from runs.jsonl
"""
import json
import os
import re
import statistics
import subprocess
import sys
import time
import resource
import glob
import shutil
import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
E = os.environ
PGBIN = E.get("PGBIN", "/usr/lib/postgresql/15/bin")
ANCHOR_DIR = E.get("ANCHOR_DIR", "/tmp/proxy-anchor")
RUN_DIR = E.get("RUN_DIR", os.path.join(ANCHOR_DIR, "run"))
PG_DATA = E.get("PG_DATA", os.path.join(ANCHOR_DIR, "pg"))
PG_PORT = int(E.get("PG_PORT", 25432))


def _recorded_topology():
    """The topology setup.sh recorded, or None."""
    try:
        with open(os.path.join(RUN_DIR, "topology")) as f:
            return f.read().strip() or None
    except OSError:
        return None


TOPOLOGY_RECORDED = _recorded_topology()
TOPOLOGY = E.get("TOPOLOGY") or TOPOLOGY_RECORDED or "local"   # checked in main()
# PostgreSQL's address, for the direct targets; the proxies listen on 127.0.0.1.
PG_HOST = E.get("PG_HOST") or (E.get("NETNS_PG_ADDR", "10.231.0.2") if TOPOLOGY == "remote"
                               else "127.0.0.1")
PROXY_HOST = "127.0.0.1"
PG_DB = E.get("PG_DB", "bench")
PG_USER = E.get("PG_USER", "postgres")
ROUNDS = int(E.get("ROUNDS", 3))
DURATION_SCALE = float(E.get("DURATION_SCALE", 1.0))
MAX_LOAD = float(E.get("MAX_LOAD", 1.0))
LOAD_POLL_S = float(E.get("LOAD_POLL_S", 30))
LOAD_WAIT_MAX_S = float(E.get("LOAD_WAIT_MAX_S", 2400))
WAIT_EACH_TEST = E.get("WAIT_EACH_TEST", "0") == "1"
SETTLE_S = float(E.get("SETTLE_S", 2))
KEEP_TXN_LOGS = E.get("KEEP_TXN_LOGS", "0") == "1"
FOREIGN_MAX_PCT = float(E.get("FOREIGN_MAX_PCT", 50))   # % of one core
RETRIES = int(E.get("RETRIES", 2))
RETRY_WAIT_BUDGET_S = float(E.get("RETRY_WAIT_BUDGET_S", 1200))  # total, whole benchmark
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count()

# ------------------------------------------------------------------ tests
# {mode} is replaced by the target's protocol mode (prepared unless the target says
# otherwise). Tests without {mode} run identically for every target.
TESTS = {
    "select": dict(desc="(a) select-only  -S -M prepared -c16 -j2 -T20",
                   args=["-S", "-M", "{mode}", "-c", "16", "-j", "2", "-T", "20"]),
    "tpcb":   dict(desc="(b) tpcb-like    -M prepared -c16 -j2 -T20",
                   args=["-M", "{mode}", "-c", "16", "-j", "2", "-T", "20"]),
    "churn":  dict(desc="(c) conn churn   -S -C -c8 -j2 -T15",
                   args=["-S", "-C", "-c", "8", "-j", "2", "-T", "15"]),
    "lat1":   dict(desc="(d) 1-client lat -S -M prepared -c1 -j1 -T15 -l",
                   args=["-S", "-M", "{mode}", "-c", "1", "-j", "1", "-T", "15"],
                   txn_log=True),
}


def pidfile(name):
    return os.path.join(RUN_DIR, name + ".pid")


# Built-in targets. "pid" is what gets sampled for proxy CPU; "host" is where pgbench
# connects (PostgreSQL's address for direct, 127.0.0.1 for every proxy).
BUILTIN = [
    dict(name="direct", host=PG_HOST, port=PG_PORT, mode="prepared", pid=None),
    dict(name="haproxy", host=PROXY_HOST, port=int(E.get("HAPROXY_PORT", 25433)), mode="prepared",
         pid=pidfile("haproxy")),
    dict(name="pgb-session", host=PROXY_HOST, port=int(E.get("PGB_SESSION_PORT", 25434)),
         mode="prepared", pid=pidfile("pgb-session")),
    # PgBouncer 1.18 cannot carry named prepared statements in transaction pooling
    # (support arrived in 1.21), so it runs with -M extended (unnamed statements).
    dict(name="pgb-txn", host=PROXY_HOST, port=int(E.get("PGB_TXN_PORT", 25435)), mode="extended",
         pid=pidfile("pgb-txn")),
]


def parse_extra(spec):
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) < 2:
            sys.exit(f"bad EXTRA_TARGET item {item!r}; want name:port[:mode[:pid|pidfile]]")
        t = dict(name=parts[0], host=PROXY_HOST, port=int(parts[1]), mode="prepared", pid=None,
                 extra=True)
        if len(parts) >= 3 and parts[2]:
            if parts[2] not in ("prepared", "extended", "simple"):
                sys.exit(f"bad mode {parts[2]!r} in EXTRA_TARGET")
            t["mode"] = parts[2]
        if len(parts) >= 4 and parts[3]:
            t["pid"] = ":".join(parts[3:])
        out.append(t)
    return out


def build_targets():
    want = E.get("TARGETS")
    targets = [t for t in BUILTIN if not want or t["name"] in want.split(",")]
    if not any(t["name"] == "direct" for t in targets):
        targets.insert(0, BUILTIN[0])  # direct is the baseline; always present
    targets += parse_extra(E.get("EXTRA_TARGET", ""))
    # For every non-prepared protocol mode in use, add a direct baseline in that mode
    # (run right after "direct"), so protocol cost is not charged to the proxy.
    modes = sorted({t["mode"] for t in targets if t["mode"] != "prepared"})
    pos = 1
    for m in modes:
        targets.insert(pos, dict(name=f"direct-{m[:3] if m == 'extended' else m}", host=PG_HOST,
                                 port=PG_PORT, mode=m, pid=None, baseline_for_mode=m,
                                 mode_only=True))
        pos += 1
    return targets


def resolve_pid(p):
    if p is None:
        return None
    if str(p).isdigit():
        return int(p)
    try:
        with open(p) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ /proc sampling
def read_proc_stat_cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    keys = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice"]
    return dict(zip(keys, v + [0] * (len(keys) - len(v))))


def pid_stat(pid):
    """(utime+stime, cutime+cstime, ppid, starttime) in clock ticks, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0]=state rest[1]=ppid rest[11]=utime rest[12]=stime rest[13]=cutime rest[14]=cstime
    # rest[19]=starttime
    return (int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14]), int(rest[1]),
            int(rest[19]))


def all_procs():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = pid_stat(d)
            if st:
                out[int(d)] = st
    return out


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


class CpuSnap:
    """Everything needed to split the machine's CPU time over a run into: PostgreSQL
    (postmaster + children, live or reaped), each proxy, pgbench (our children, via
    rusage), kernel threads, and 'foreign' = every other process (other users of the
    machine; children they reaped during the run are included via cutime)."""

    def __init__(self, proxies, postmaster):
        self.t = time.monotonic()
        self.stat = read_proc_stat_cpu()
        self.procs = all_procs()
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        self.children = ch.ru_utime + ch.ru_stime
        self.me = me.ru_utime + me.ru_stime
        self.proxies = proxies
        self.postmaster = postmaster


def _classify(pid, st, postmaster, proxy_pids, me):
    if pid == 2 or st[2] == 2:
        return "kthread"
    if pid == postmaster or st[2] == postmaster:
        return "pg"
    if pid in proxy_pids:
        return "proxy"
    if pid == me or st[2] == me:
        return "me"   # driver + pgbench (pgbench is measured via rusage)
    return "foreign"


def cpu_delta(a, b):
    """Per-run CPU use, in % of ONE core (so 2 busy cores = 200%)."""
    wall = b.t - a.t
    tick = lambda d: 100.0 * d / CLK_TCK / wall
    sec = lambda d: 100.0 * d / wall
    ds = {k: b.stat[k] - a.stat[k] for k in b.stat}
    busy = ds["user"] + ds["nice"] + ds["system"] + ds["irq"] + ds["softirq"]
    pm, me = a.postmaster, os.getpid()
    proxy_pids = set(a.proxies.values())
    buckets = dict(pg=0, kthread=0, foreign=0, proxy=0, me=0)
    per_proxy_pid = {}
    for pid in set(a.procs) | set(b.procs):
        sa, sb = a.procs.get(pid), b.procs.get(pid)
        if sa and sb and sa[3] != sb[3]:       # pid reused: treat as vanished + new
            cls = _classify(pid, sa, pm, proxy_pids, me)
            buckets[cls] -= sa[0] + sa[1]
            sa = None
        ref = sb or sa
        cls = _classify(pid, ref, pm, proxy_pids, me)
        if sa and sb:
            d = (sb[0] + sb[1]) - (sa[0] + sa[1])
            if cls == "proxy":
                per_proxy_pid[pid] = sb[0] - sa[0]
        elif sb:                                # born during the run
            d = sb[0] + sb[1]
        else:                                   # exited and (normally) reaped: its whole
            d = -(sa[0] + sa[1])                # life shows up in the parent's cutime
        buckets[cls] += d
    out = dict(
        wall_s=round(wall, 2),
        busy_pct=round(tick(busy), 1),
        softirq_pct=round(tick(ds["softirq"]), 1),
        steal_pct=round(tick(ds["steal"]), 1),
        idle_pct=round(tick(ds["idle"] + ds["iowait"]), 1),
        pg_pct=round(tick(buckets["pg"]), 1),
        pgbench_pct=round(sec(b.children - a.children), 1),
        driver_pct=round(sec(b.me - a.me), 1),
        proxy_pct={n: round(tick(per_proxy_pid.get(p, 0)), 1) for n, p in a.proxies.items()},
        kthread_pct=round(tick(buckets["kthread"]), 1),
        foreign_pct=round(max(0.0, tick(buckets["foreign"])), 1),
    )
    ours = (out["pg_pct"] + out["pgbench_pct"] + out["driver_pct"] + tick(buckets["proxy"])
            + out["kthread_pct"] + out["foreign_pct"])
    # busy ticks not attributed to any process (irq/softirq work done while the CPU
    # was otherwise idle, plus tick-sampling vs. precise per-task accounting noise)
    out["unattributed_pct"] = round(out["busy_pct"] - ours, 1)
    return out


def quiet_probe(postmaster, seconds=3.0):
    """Foreign CPU (% of one core) while we are idle."""
    a = CpuSnap({}, postmaster)
    time.sleep(seconds)
    b = CpuSnap({}, postmaster)
    return cpu_delta(a, b)["foreign_pct"]


# ------------------------------------------------------------------ pgbench
RE = {
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
    "lat_avg_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "lat_std_ms": re.compile(r"^latency stddev = ([\d.]+) ms", re.M),
    "txns": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "conn_ms": re.compile(r"^(?:average|initial) connection time = ([\d.]+) ms", re.M),
}


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def txn_log_stats(prefix):
    lat = []
    files = glob.glob(prefix + ".*")
    for fn in files:
        with open(fn) as f:
            for line in f:
                p = line.split()
                if len(p) >= 3 and p[2].isdigit():   # failed txns log "failed"/"skipped"
                    lat.append(int(p[2]))
    lat.sort()
    res = dict(n_logged=len(lat))
    if lat:
        res.update(
            log_mean_us=round(sum(lat) / len(lat), 1),
            p50_us=round(percentile(lat, 0.50), 1),
            p90_us=round(percentile(lat, 0.90), 1),
            p99_us=round(percentile(lat, 0.99), 1),
            p999_us=round(percentile(lat, 0.999), 1),
            max_us=lat[-1],
        )
    if not KEEP_TXN_LOGS:
        for fn in files:
            os.unlink(fn)
    return res


def pin_prefix(what):
    spec = dict(kv.split("=", 1) for kv in filter(None, E.get("PIN", "").split(",")))
    if what in spec and shutil.which("taskset"):
        return ["taskset", "-c", spec[what]]
    return []


def run_pgbench(test, target, logdir, tag):
    args = [a.replace("{mode}", target["mode"]) for a in TESTS[test]["args"]]
    if DURATION_SCALE != 1.0:
        i = args.index("-T")
        args[i + 1] = str(max(1, round(int(args[i + 1]) * DURATION_SCALE)))
    cmd = pin_prefix("pgbench") + [os.path.join(PGBIN, "pgbench"), "-h", target["host"],
                                   "-p", str(target["port"]), "-U", PG_USER] + args
    prefix = None
    if TESTS[test].get("txn_log"):
        prefix = os.path.join(logdir, tag)
        cmd += ["-l", "--log-prefix", prefix]
    cmd.append(PG_DB)
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    res = dict(cmd=" ".join(cmd[cmd.index(os.path.join(PGBIN, "pgbench")):]).replace(PGBIN + "/", ""),
               rc=p.returncode)
    for k, rx in RE.items():
        m = rx.search(out)
        if m:
            res[k] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    if p.returncode != 0 or "tps" not in res:
        res["error_tail"] = out[-800:]
    if prefix:
        res.update(txn_log_stats(prefix))
    return res


def measure(rnd, test, t, eff_mode, attempt, proxies, postmaster, logdir):
    la0 = loadavg()
    a = CpuSnap(proxies, postmaster)
    res = run_pgbench(test, t, logdir, f"r{rnd}-{test}-{t['name']}-a{attempt}")
    time.sleep(0.3)  # let the postmaster reap exiting backends
    b = CpuSnap(proxies, postmaster)
    cpu = cpu_delta(a, b)
    return dict(round=rnd, test=test, target=t["name"], topology=TOPOLOGY,
                target_host=t["host"], port=t["port"], eff_mode=eff_mode,
                baseline_for_mode=t.get("baseline_for_mode"), attempt=attempt,
                contaminated=cpu["foreign_pct"] > FOREIGN_MAX_PCT, load_before=la0,
                load_after=loadavg(), ts=time.time(), cpu=cpu, **res)


def report(rec):
    extra = ""
    if "p99_us" in rec:
        extra = f" p50={rec['p50_us']:.0f}us p99={rec['p99_us']:.0f}us"
    c = rec["cpu"]
    pc = c["proxy_pct"].get(rec["target"])
    print(f"r{rec['round']} {rec['test']:6s} {rec['target']:12s} a{rec['attempt']} "
          f"tps={rec.get('tps', 'ERR')!s:>12} lat={rec.get('lat_avg_ms', '-')}ms{extra} "
          f"proxy={pc}% pg={c['pg_pct']}% pgbench={c['pgbench_pct']}% foreign={c['foreign_pct']}% "
          f"load1={rec['load_before'][0]:.2f}"
          + (" CONTAMINATED" if rec["contaminated"] else "")
          + (f" ERROR rc={rec['rc']}" if "error_tail" in rec else ""), flush=True)
    if "error_tail" in rec:
        print("   " + rec["error_tail"].strip().replace("\n", "\n   "), flush=True)


def wait_quiet(label, postmaster, max_s):
    t0 = time.monotonic()
    seen = []
    while True:
        f = quiet_probe(postmaster)
        seen.append(f)
        if f <= FOREIGN_MAX_PCT or time.monotonic() - t0 + LOAD_POLL_S > max_s:
            break
        print(f"  [{label}] foreign CPU {f:.0f}% of a core; waiting {LOAD_POLL_S:.0f}s", flush=True)
        time.sleep(LOAD_POLL_S)
    return dict(label=label, kind="foreign-cpu probe", waited_s=round(time.monotonic() - t0),
                load_start=seen[0], load_final=seen[-1], gave_up=seen[-1] > FOREIGN_MAX_PCT,
                polls=len(seen))


def wait_for_load(label):
    t0 = time.monotonic()
    seen = []
    while True:
        la = loadavg()
        seen.append(la[0])
        if la[0] <= MAX_LOAD:
            break
        if time.monotonic() - t0 >= LOAD_WAIT_MAX_S:
            print(f"  [{label}] load {la[0]:.2f} still > {MAX_LOAD} after {LOAD_WAIT_MAX_S:.0f}s; running anyway",
                  flush=True)
            break
        print(f"  [{label}] load1={la[0]:.2f} > {MAX_LOAD}; waiting {LOAD_POLL_S:.0f}s", flush=True)
        time.sleep(LOAD_POLL_S)
    return dict(label=label, kind="load1", waited_s=round(time.monotonic() - t0), load_start=seen[0],
                load_final=seen[-1], gave_up=seen[-1] > MAX_LOAD, polls=len(seen))


# ------------------------------------------------------------------ summary
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0):
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


def us_per_txn(r, pct):
    """CPU microseconds per transaction for a CPU % (of one core) measured over a run."""
    if pct is None or not r.get("txns"):
        return None
    return pct / 100.0 * r["cpu"]["wall_s"] / r["txns"] * 1e6


def pick_attempts(runs):
    """One record per (round, test, target): the least contaminated attempt."""
    best = {}
    for r in runs:
        k = (r["round"], r["test"], r["target"])
        if k not in best or r["cpu"]["foreign_pct"] < best[k]["cpu"]["foreign_pct"]:
            best[k] = r
    return sorted(best.values(), key=lambda r: r["ts"])


def summarize(runs, targets, tests):
    runs = pick_attempts(runs)
    by = {}
    for r in runs:
        by.setdefault((r["test"], r["target"]), []).append(r)
    direct_of = {}  # (test, round, mode) -> run of the direct baseline in that mode
    for r in runs:
        if r["target"] == "direct":
            direct_of[(r["test"], r["round"], "prepared")] = r
        elif r.get("baseline_for_mode"):
            direct_of[(r["test"], r["round"], r["baseline_for_mode"])] = r

    rows = []
    for test in tests:
        for t in targets:
            rs = by.get((test, t["name"]))
            if not rs:
                continue
            ratios, ratios_same, lat_ratios, p99_ratios = [], [], [], []
            machine_deltas = []
            for r in rs:
                d = direct_of.get((test, r["round"], "prepared"))
                if d and d.get("tps") and r.get("tps"):
                    ratios.append(r["tps"] / d["tps"])
                    mr, md = us_per_txn(r, r["cpu"]["busy_pct"]), us_per_txn(d, d["cpu"]["busy_pct"])
                    if mr is not None and md is not None:
                        machine_deltas.append(mr - md)
                    if d.get("lat_avg_ms") and r.get("lat_avg_ms"):
                        lat_ratios.append(r["lat_avg_ms"] / d["lat_avg_ms"])
                    if d.get("p99_us") and r.get("p99_us"):
                        p99_ratios.append(r["p99_us"] / d["p99_us"])
                dm = direct_of.get((test, r["round"], r["eff_mode"]))
                if dm and dm.get("tps") and r.get("tps"):
                    ratios_same.append(r["tps"] / dm["tps"])
            pn = t["name"]
            row = dict(
                test=test, target=pn, mode=rs[0]["eff_mode"], n=len(rs),
                failed_runs=sum(1 for r in rs if r.get("rc") != 0 or not r.get("tps")),
                tps_med=med([r.get("tps") for r in rs]),
                tps_all=[r.get("tps") for r in rs],
                lat_avg_ms_med=med([r.get("lat_avg_ms") for r in rs]),
                p50_us_med=med([r.get("p50_us") for r in rs]),
                p99_us_med=med([r.get("p99_us") for r in rs]),
                p999_us_med=med([r.get("p999_us") for r in rs]),
                ratio_tps_med=med(ratios), ratio_tps_all=[round(x, 3) for x in ratios],
                ratio_tps_same_mode_med=med(ratios_same),
                ratio_lat_med=med(lat_ratios), ratio_p99_med=med(p99_ratios),
                proxy_cpu_pct_med=med([r["cpu"]["proxy_pct"].get(pn) for r in rs]),
                proxy_us_per_txn_med=med([us_per_txn(r, r["cpu"]["proxy_pct"].get(pn)) for r in rs]),
                pg_us_per_txn_med=med([us_per_txn(r, r["cpu"]["pg_pct"]) for r in rs]),
                # tendril addition: whole-machine CPU (all of /proc/stat's busy time, so work
                # moved into softirq or kernel workers counts) per transaction, and its excess
                # over direct in the same round.
                machine_us_per_txn_med=med([us_per_txn(r, r["cpu"]["busy_pct"]) for r in rs]),
                machine_delta_us_med=med(machine_deltas),
                pg_cpu_pct_med=med([r["cpu"]["pg_pct"] for r in rs]),
                pgbench_cpu_pct_med=med([r["cpu"]["pgbench_pct"] for r in rs]),
                foreign_cpu_pct_max=max(r["cpu"]["foreign_pct"] for r in rs),
                contaminated_runs=sum(1 for r in rs if r["contaminated"]),
                retried_runs=sum(1 for r in rs if r["attempt"] > 0),
                steal_pct_max=max(r["cpu"]["steal_pct"] for r in rs),
                load1_start=[r["load_before"][0] for r in rs],
            )
            rows.append(row)
    return rows


def write_summary(rows, meta, path_md, path_json):
    with open(path_json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    L = []
    L.append(f"# Proxy anchor results {meta['run_id']}\n")
    # Results from before the topology was recorded are all local.
    topo = meta.get("topology", "local")
    L.append(f"rounds={meta['rounds']}  duration_scale={meta['duration_scale']}  "
             f"host={meta['host']}  ncpu={meta['ncpu']}  topology={topo}\n")
    L.append("topology: " + ("remote: PostgreSQL in a network namespace behind a veth pair "
                             f"({meta.get('pg_host', '?')}), proxies and pgbench here"
                             if topo == "remote" else
                             "local: PostgreSQL, proxies and pgbench all on 127.0.0.1") + "\n")
    L.append("CPU columns are % of one core (2 cores = 200%), medians over rounds; us/txn = CPU "
             "microseconds per transaction (load-insensitive cost); "
             "'foreign max' = the most CPU that processes other than PG/pgbench/proxies/kernel threads "
             "used during any of the runs (other users of the machine).\n")
    L.append("ratio = target/direct within the same round (median of rounds); "
             "ratio(same -M) uses the direct run in the target's protocol mode.\n")
    for test in meta["tests"]:
        L.append(f"\n## {TESTS[test]['desc']}\n")
        lat1 = TESTS[test].get("txn_log")
        hdr = ["target", "-M", "TPS med", "TPS runs", "TPS ratio", "ratio(same -M)",
               "lat avg ms", "lat ratio"]
        if lat1:
            hdr += ["p50 us", "p99 us", "p99.9 us", "p99 ratio"]
        hdr += ["proxy CPU%", "proxy CPU us/txn", "machine CPU us/txn", "machine Δ us/txn",
                "PG CPU us/txn", "pgbench CPU%", "foreign CPU% max", "load1 at start"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for r in rows:
            if r["test"] != test:
                continue
            mode = r["mode"] if "{mode}" in " ".join(TESTS[test]["args"]) else "simple"
            v = [r["target"], mode, fmt(r["tps_med"]),
                 " / ".join(fmt(x) for x in r["tps_all"]),
                 fmt(r["ratio_tps_med"], 3), fmt(r["ratio_tps_same_mode_med"], 3),
                 fmt(r["lat_avg_ms_med"], 3), fmt(r["ratio_lat_med"], 3)]
            if lat1:
                v += [fmt(r["p50_us_med"], 1), fmt(r["p99_us_med"], 1), fmt(r["p999_us_med"], 1),
                      fmt(r["ratio_p99_med"], 3)]
            v += [fmt(r["proxy_cpu_pct_med"], 1), fmt(r["proxy_us_per_txn_med"], 1),
                  fmt(r.get("machine_us_per_txn_med"), 1), fmt(r.get("machine_delta_us_med"), 1),
                  fmt(r["pg_us_per_txn_med"], 1),
                  fmt(r["pgbench_cpu_pct_med"], 1), fmt(r["foreign_cpu_pct_max"], 1),
                  " / ".join(f"{x:.2f}" for x in r["load1_start"])]
            if r["failed_runs"]:
                v[0] += f" ({r['failed_runs']} FAILED)"
            if r["contaminated_runs"]:
                v[0] += f" ({r['contaminated_runs']} contaminated)"
            if r["retried_runs"]:
                v[0] += f" ({r['retried_runs']} retried)"
            L.append("| " + " | ".join(v) + " |")
    L.append("\n## Load waits (load1 before rounds; foreign-CPU probe before retries)\n")
    for w in meta["load_waits"]:
        L.append(f"- {w['label']}: {w['kind']} {w['load_start']:.2f} -> {w['load_final']:.2f}, "
                 f"waited {w['waited_s']} s{' (GAVE UP, ran anyway)' if w['gave_up'] else ''}")
    with open(path_md, "w") as f:
        f.write("\n".join(L) + "\n")


# ------------------------------------------------------------------ main
def versions():
    def sh(c):
        try:
            return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
        except Exception as e:  # noqa
            return str(e)
    return dict(
        postgres=sh(f"{PGBIN}/postgres --version"),
        pgbench=sh(f"{PGBIN}/pgbench --version"),
        haproxy=sh("haproxy -v | head -1"),
        pgbouncer=sh("pgbouncer --version | head -1"),
        kernel=sh("uname -r"),
        cpu=sh("lscpu | grep -m1 'Model name' | sed 's/.*: *//'"),
    )


def resummarize(results_dir):
    """Rebuild summary.md/.json from runs.jsonl (e.g. after changing the summary code)."""
    with open(os.path.join(results_dir, "runs.jsonl")) as f:
        runs = [json.loads(l) for l in f if l.strip()]
    try:
        with open(os.path.join(results_dir, "summary.json")) as f:
            meta = json.load(f)["meta"]
    except OSError:  # interrupted run: rebuild what the summary needs from the runs
        names = list(dict.fromkeys(r["target"] for r in runs))
        meta = dict(run_id=os.path.basename(results_dir.rstrip("/")) + " (interrupted)",
                    topology=runs[0].get("topology", "local"),
                    pg_host=next((r["target_host"] for r in runs
                                  if r["target"] == "direct" and "target_host" in r), "?"),
                    rounds=max(r["round"] for r in runs), duration_scale="?", host=os.uname().nodename,
                    ncpu=NCPU, tests=list(dict.fromkeys(r["test"] for r in runs)),
                    targets=[dict(name=n) for n in names], load_waits=[])
    rows = summarize(runs, meta["targets"], meta["tests"])
    write_summary(rows, meta, os.path.join(results_dir, "summary.md"),
                  os.path.join(results_dir, "summary.json"))
    with open(os.path.join(results_dir, "summary.md")) as f:
        print(f.read())


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--resummarize":
        return resummarize(sys.argv[2])
    if TOPOLOGY not in ("local", "remote"):
        sys.exit(f"TOPOLOGY={TOPOLOGY}: want local or remote")
    if TOPOLOGY_RECORDED and TOPOLOGY_RECORDED != TOPOLOGY:
        # the direct targets would look for PostgreSQL where it is not
        sys.exit(f"TOPOLOGY={TOPOLOGY}, but setup.sh set up {TOPOLOGY_RECORDED} "
                 f"({RUN_DIR}/topology)")
    tests = [t for t in E.get("TESTS", "select,tpcb,churn,lat1").split(",") if t]
    for t in tests:
        if t not in TESTS:
            sys.exit(f"unknown test {t}; known: {','.join(TESTS)}")
    targets = build_targets()
    postmaster = resolve_pid(os.path.join(PG_DATA, "postmaster.pid"))
    if not postmaster:
        sys.exit("PostgreSQL is not running (no postmaster.pid); run setup.sh first")
    proxies = {}
    for t in targets:
        pid = resolve_pid(t.get("pid"))
        if pid:
            proxies[t["name"]] = pid
        elif t.get("pid"):
            print(f"warning: cannot resolve pid for {t['name']} from {t['pid']}", file=sys.stderr)

    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results_dir = E.get("RESULTS_DIR") or os.path.join(HERE, "results", run_id)
    os.makedirs(results_dir, exist_ok=True)
    logdir = os.path.join(ANCHOR_DIR, "txnlogs", run_id)
    os.makedirs(logdir, exist_ok=True)

    meta = dict(run_id=run_id, topology=TOPOLOGY, pg_host=PG_HOST, rounds=ROUNDS,
                duration_scale=DURATION_SCALE, tests=tests,
                targets=targets, proxies_sampled=proxies, versions=versions(),
                host=os.uname().nodename, ncpu=NCPU, max_load=MAX_LOAD, pin=E.get("PIN", ""),
                load_waits=[], started=time.time())
    print(json.dumps(meta["versions"], indent=1), flush=True)
    print(f"topology: {TOPOLOGY} (PostgreSQL on {PG_HOST}:{PG_PORT})", flush=True)
    print("targets:", ", ".join(f"{t['name']}@{t['host']}:{t['port']}(-M {t['mode']})"
                                for t in targets), flush=True)

    runs = []
    retry_budget = RETRY_WAIT_BUDGET_S
    jl = open(os.path.join(results_dir, "runs.jsonl"), "w")

    for rnd in range(1, ROUNDS + 1):
        meta["load_waits"].append(wait_for_load(f"round {rnd}"))
        if rnd == 1:
            # warm-up: every target once, short, not recorded (fills caches and pools)
            for t in targets:
                subprocess.run([os.path.join(PGBIN, "pgbench"), "-h", t["host"], "-p",
                                str(t["port"]), "-U", PG_USER, "-S", "-M", t["mode"], "-c", "16",
                                "-j", "2", "-T", "3", PG_DB], capture_output=True)
        for test in tests:
            if WAIT_EACH_TEST and test != tests[0]:
                meta["load_waits"].append(wait_for_load(f"round {rnd} {test}"))
            has_mode = "{mode}" in " ".join(TESTS[test]["args"])
            for t in targets:
                if t.get("mode_only") and not has_mode:
                    continue  # direct-ext etc. are identical to direct without -M
                eff_mode = t["mode"] if has_mode else "simple"
                for attempt in range(RETRIES + 1):
                    rec = measure(rnd, test, t, eff_mode, attempt, proxies, postmaster, logdir)
                    rec["final"] = True
                    if attempt > 0:
                        runs[-1]["final"] = False
                    runs.append(rec)
                    report(rec)
                    time.sleep(SETTLE_S)
                    if not rec["contaminated"] or attempt == RETRIES or retry_budget <= 0:
                        break
                    w = wait_quiet(f"round {rnd} {test} {t['name']} retry", postmaster, retry_budget)
                    retry_budget -= w["waited_s"]
                    meta["load_waits"].append(w)
                for r in runs[-(attempt + 1):]:
                    jl.write(json.dumps(r) + "\n")
                jl.flush()
    jl.close()
    meta["finished"] = time.time()
    rows = summarize(runs, targets, tests)
    write_summary(rows, meta, os.path.join(results_dir, "summary.md"),
                  os.path.join(results_dir, "summary.json"))
    if not KEEP_TXN_LOGS:
        shutil.rmtree(logdir, ignore_errors=True)
    print(f"\nresults: {results_dir}/summary.md", flush=True)
    with open(os.path.join(results_dir, "summary.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
