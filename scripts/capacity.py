#!/usr/bin/env python3
"""Measures what Lockstep's per-user-topic layout costs Apache Kafka (docs/CAPACITY.md).

Run through scripts/capacity, which prepares a throwaway single-node Kafka (KRaft, broker and
controller in one JVM) with scripts/lib.sh and passes its java command line after `--`. This
program starts that broker, then:

1. baseline: no user topic;
2. creates user topics `lockstep.user.<n>` (1 partition, replication 1, retention.ms=-1 and cleanup.policy=delete, as
   Lockstep creates them) with batched CreateTopics up to each count of --topics, measuring
   after each: time, controller metadata log size, broker RSS, live JVM heap (a full GC through
   `jcmd GC.class_histogram`), open file descriptors, memory maps, files on disk per partition,
   idle broker CPU;
3. after the first count: one offset commit for each of --groups device groups
   (`lockstep.device.<n>`, a member-less "simple" commit as Lockstep's group-offsets client
   sends: OffsetCommit v7, generation -1, empty member id, pipelined over several connections),
   then the size of `__consumer_offsets`, the broker's heap, and a broker restart;
4. goes on to the next counts; if the broker stops or refuses, records where and why.

Every figure carries the 1-minute load average when it was taken. Output: a Markdown report
(--out) and the same figures as JSON (--json).
"""

import argparse
import json
import os
import re
import signal
import socket
import struct
import threading
import subprocess
import sys
import time

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def log(message):
    print(f"==> {message}", file=sys.stderr, flush=True)


class Broker:
    def __init__(self, command, data_dir, log_path, port):
        self.command = command
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port
        self.proc = None

    def start(self, timeout=600):
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        started = time.monotonic()
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Kafka exited at start (code {self.proc.returncode}); see {self.log_path}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                if b"Kafka Server started" in f.read():
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"Kafka did not start within {timeout} s; see {self.log_path}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout=120):
        if not self.alive():
            return None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - started

    def fault_since(self, offset):
        """(the first metadata publishing fault the broker logged after byte offset with its cause, or
        None; the offset to look from next time)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return None, offset
        lines = data.decode(errors="replace").splitlines()
        for index, line in enumerate(lines):
            if "metadata publishing fault" in line:
                cause = next((l.strip() for l in lines[index + 1 : index + 4] if "Exception" in l), "")
                return f"{line.strip()[:200]} {cause[:200]}".strip(), offset
        # Look again from the last complete line on.
        return None, offset + max(0, data.rfind(b"\n") + 1)

    def log_tail_errors(self, limit=5):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return []
        hits = [line.strip() for line in lines if re.search(r"ERROR|FATAL|Too many open files|OutOfMemory|Map failed", line)]
        return hits[-limit:]


def proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def nofile_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3]), int(line.split()[4])
    return None


def live_heap(pid):
    """Live heap in bytes after a full GC (GC.class_histogram collects first), and the JVM's view."""
    live = committed = None
    try:
        histogram = subprocess.run(["jcmd", str(pid), "GC.class_histogram"], capture_output=True, text=True, timeout=300)
        info = subprocess.run(["jcmd", str(pid), "GC.heap_info"], capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        # jcmd attaches through a socket the JVM opens: a broker out of file descriptors cannot.
        return None, None
    for line in histogram.stdout.splitlines()[::-1]:
        if line.startswith("Total"):
            live = int(line.split()[2])
            break
    match = re.search(r"garbage-first heap\s+total (\d+)K, used (\d+)K", info)
    committed = int(match.group(1)) * 1024 if match else None
    return live, committed


def dir_usage(path):
    """(files, apparent bytes, allocated bytes) under path."""
    files = apparent = allocated = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            files += 1
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return files, apparent, allocated


def log_bytes(path):
    """Bytes of the segments (.log) and snapshots (.checkpoint) under path: the data itself, without the
    index files Kafka preallocates (sparse, 10 MiB apparent each for an active segment)."""
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            if name.endswith(".log") or name.endswith(".checkpoint"):
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def partition_dirs(data_dir, prefix):
    return [name for name in os.listdir(data_dir) if name.startswith(prefix)]


def snapshot(broker, label, idle_seconds, extra=None):
    """The broker's figures now (with load averages), after a full GC."""
    pid = broker.pid
    figure = {"label": label, "load_before": loadavg()}
    live, committed = live_heap(pid)
    time.sleep(2)
    status = proc_status(pid)
    figure["rss_kib"] = int(status["VmRSS"].split()[0])
    figure["threads"] = int(status["Threads"])
    figure["heap_live_bytes"] = live
    figure["heap_committed_bytes"] = committed
    figure["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        figure["maps"] = sum(1 for _ in f)
    user_dirs = partition_dirs(broker.data_dir, "lockstep.user.")
    figure["user_partition_dirs"] = len(user_dirs)
    if user_dirs:
        figure["partition_files"] = sorted(os.listdir(os.path.join(broker.data_dir, user_dirs[0])))
    files = apparent = allocated = 0
    for name in user_dirs:
        f_, a_, b_ = dir_usage(os.path.join(broker.data_dir, name))
        files, apparent, allocated = files + f_, apparent + a_, allocated + b_
    figure["user_files"] = files
    figure["user_bytes_apparent"] = apparent
    figure["user_bytes_allocated"] = allocated
    meta = dir_usage(os.path.join(broker.data_dir, "__cluster_metadata-0"))
    figure["metadata_files"], figure["metadata_apparent"], figure["metadata_allocated"] = meta
    figure["metadata_bytes"] = log_bytes(os.path.join(broker.data_dir, "__cluster_metadata-0"))
    offsets = [dir_usage(os.path.join(broker.data_dir, d)) for d in partition_dirs(broker.data_dir, "__consumer_offsets-")]
    figure["offsets_bytes"] = sum(o[1] for o in offsets)
    figure["offsets_allocated"] = sum(o[2] for o in offsets)
    figure["offsets_log_bytes"] = sum(
        log_bytes(os.path.join(broker.data_dir, d)) for d in partition_dirs(broker.data_dir, "__consumer_offsets-")
    )
    if idle_seconds:
        load = loadavg()
        before = cpu_seconds(pid)
        time.sleep(idle_seconds)
        figure["idle_cpu_percent"] = 100.0 * (cpu_seconds(pid) - before) / idle_seconds
        figure["idle_seconds"] = idle_seconds
        figure["load_idle"] = (load + loadavg()) / 2
    figure["load_after"] = loadavg()
    if extra:
        figure.update(extra)
    log(f"{label}: " + json.dumps({k: v for k, v in figure.items() if k != "label"}))
    return figure


def create_topics(admin, broker, start, end, batch):
    """Creates lockstep.user.<start..end-1>; returns (created, seconds, seconds until on disk, error)."""
    started = time.monotonic()
    created = 0
    error = None
    broker.log_size_at_start = os.path.getsize(broker.log_path)
    load = loadavg()
    n = start
    while n < end:
        if not broker.alive():
            error = "the broker exited"
            break
        names = [f"lockstep.user.{i:07d}" for i in range(n, min(end, n + batch))]
        topics = [NewTopic(name, num_partitions=1, replication_factor=1, config={"retention.ms": "-1", "cleanup.policy": "delete"}) for name in names]
        futures = admin.create_topics(topics, operation_timeout=120, request_timeout=180)
        failures = []
        for name, future in futures.items():
            try:
                future.result()
                created += 1
            except Exception as e:  # noqa: BLE001  (KafkaException: reported, not raised)
                failures.append(f"{name}: {e}")
        if failures:
            error = f"{len(failures)} of {len(names)} failed in the batch from {names[0]}; first: {failures[0]}"
            break
        n += len(names)
        if (n - start) % (batch * 10) == 0:
            log(f"  {n} user topics created ({time.monotonic() - started:.1f} s, load {loadavg():.2f})")
    acked = time.monotonic() - started
    # KRaft: CreateTopics returns once the controller committed the records; the broker then
    # creates each partition's log from the metadata it replays. Wait until they are on disk.
    on_disk = None
    seen, progress_at = -1, time.monotonic()
    log_offset = broker.log_size_at_start
    while time.monotonic() - progress_at < 120 and broker.alive():
        fault, log_offset = broker.fault_since(log_offset)
        if fault:
            error = error or f"the broker stopped applying metadata: {fault}"
            break
        have = len(partition_dirs(broker.data_dir, "lockstep.user."))
        if have >= start + created:
            on_disk = time.monotonic() - started
            break
        if have != seen:
            seen, progress_at = have, time.monotonic()
        time.sleep(2)
    return {
        "from": start,
        "to": start + created,
        "created": created,
        "seconds_acked": acked,
        "seconds_on_disk": on_disk,
        "topics_per_second": created / acked if acked else None,
        "load_at_start": load,
        "load_at_end": loadavg(),
        "error": error,
    }


# --- OffsetCommit v7 (non-flexible), as Lockstep's member-less commit -------------------------


def kstring(s):
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def offset_commit_v7(correlation_id, group, topic, offset):
    body = kstring(group) + struct.pack(">i", -1) + kstring("") + struct.pack(">h", -1)
    body += struct.pack(">i", 1) + kstring(topic)
    body += struct.pack(">i", 1) + struct.pack(">iqi", 0, offset, -1) + struct.pack(">h", -1)
    header = struct.pack(">hhi", 8, 7, correlation_id) + kstring("lockstep-capacity")
    message = header + body
    return struct.pack(">i", len(message)) + message


def read_exact(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the broker closed the connection")
        data += chunk
    return bytes(data)


def read_commit_response(sock):
    size = struct.unpack(">i", read_exact(sock, 4))[0]
    data = read_exact(sock, size)
    correlation_id = struct.unpack_from(">i", data, 0)[0]
    pos = 8  # correlation id, throttle time
    errors = []
    (topics,) = struct.unpack_from(">i", data, pos)
    pos += 4
    for _ in range(topics):
        (length,) = struct.unpack_from(">h", data, pos)
        pos += 2 + length
        (partitions,) = struct.unpack_from(">i", data, pos)
        pos += 4
        for _ in range(partitions):
            _partition, error = struct.unpack_from(">ih", data, pos)
            pos += 6
            if error:
                errors.append(error)
    return correlation_id, errors


def find_coordinator(port, group, timeout=120):
    """FindCoordinator v2 until it answers without error (the first one creates __consumer_offsets)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            message = struct.pack(">hhi", 10, 2, 1) + kstring("lockstep-capacity") + kstring(group) + struct.pack(">b", 0)
            sock.sendall(struct.pack(">i", len(message)) + message)
            size = struct.unpack(">i", read_exact(sock, 4))[0]
            data = read_exact(sock, size)
        (error,) = struct.unpack_from(">h", data, 8)
        if error == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"FindCoordinator still fails with error {error}")
        time.sleep(0.5)


def commit_pass(port, numbers, topics, window):
    """One commit for each lockstep.device.<n>; returns {error code: [n, …]} of those that failed."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    failed = {}
    sent = received = 0
    while received < len(numbers):
        burst = b""
        while sent < len(numbers) and sent - received < window:
            n = numbers[sent]
            burst += offset_commit_v7(sent, f"lockstep.device.{n:07d}", f"lockstep.user.{n % topics:07d}", 0)
            sent += 1
        if burst:
            sock.sendall(burst)
        correlation_id, errs = read_commit_response(sock)
        received += 1
        for error in errs:
            failed.setdefault(error, []).append(numbers[correlation_id])
    sock.close()
    return failed


def commit_groups(port, groups, topics, window, connections):
    """One member-less commit per group lockstep.device.<n> on lockstep.user.<n % topics>, offset 0.

    Retries the commits answered with a retriable error (the coordinator still loading)."""
    find_coordinator(port, "lockstep.device.0000000")
    load = loadavg()
    started = time.monotonic()
    numbers = list(range(groups))
    retried = {}
    for _attempt in range(20):
        # Kafka handles one request of a connection at a time: spread the groups over connections.
        slices = [numbers[i::connections] for i in range(connections)]
        answers = [None] * connections

        def run(index):
            answers[index] = commit_pass(port, slices[index], topics, window)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(connections) if slices[i]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = {}
        for answer in answers:
            for error, ns in (answer or {}).items():
                failed.setdefault(error, []).extend(ns)
        if not failed:
            break
        for error, ns in failed.items():
            retried[error] = retried.get(error, 0) + len(ns)
        numbers = sorted(n for ns in failed.values() for n in ns)
        log(f"  {len(numbers)} commits to retry: {dict((e, len(ns)) for e, ns in failed.items())}")
        time.sleep(1)
    seconds = time.monotonic() - started
    return {
        "groups": groups,
        "connections": connections,
        "seconds": seconds,
        "commits_per_second": groups / seconds,
        "retried": retried,
        "failed": len(numbers) if failed else 0,
        "load_at_start": load,
        "load_at_end": loadavg(),
    }


def offsets_records(port):
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "lockstep-capacity-reader"})
    metadata = consumer.list_topics("__consumer_offsets", timeout=30)
    total = 0
    for partition in metadata.topics["__consumer_offsets"].partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition("__consumer_offsets", partition), timeout=30)
        total += high - low
    consumer.close()
    return total, len(metadata.topics["__consumer_offsets"].partitions)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the broker's log.dirs")
    parser.add_argument("--log", required=True, help="the broker's log file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topics", default="10000,50000", help="user-topic counts, ascending, comma-separated")
    parser.add_argument("--groups", type=int, default=100000, help="device groups to commit once each (0: none)")
    parser.add_argument("--batch", type=int, default=1000, help="topics per CreateTopics request")
    parser.add_argument("--window", type=int, default=100, help="OffsetCommit requests in flight per connection")
    parser.add_argument("--connections", type=int, default=16, help="connections the commits are spread over")
    parser.add_argument("--idle-seconds", type=int, default=30)
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--machine", default="", help="a Markdown block describing the machine")
    parser.add_argument("--command-line", default="scripts/capacity")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the broker's java command line")
    args = parser.parse_args()
    command = args.command[1:] if args.command and args.command[0] == "--" else args.command
    counts = [int(c) for c in args.topics.split(",") if c]

    # SIGTERM (and Ctrl-C) stop the broker too: it runs in a session of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    broker = Broker(command, args.data_dir, args.log, args.port)
    results = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "snapshots": [], "creations": []}
    run_started = time.monotonic()
    try:
        results["first_start_seconds"] = broker.start()
        results["nofile_limit"] = nofile_limit(broker.pid)
        results["max_map_count"] = int(open("/proc/sys/vm/max_map_count").read())
        admin_config = {"bootstrap.servers": f"127.0.0.1:{args.port}", "socket.timeout.ms": 180000, "log_level": 2}
        admin = AdminClient(admin_config)
        results["snapshots"].append(snapshot(broker, "no user topic", args.idle_seconds))
        have = 0
        for index, count in enumerate(counts):
            log(f"creating user topics {have}..{count} (batches of {args.batch})")
            creation = create_topics(admin, broker, have, count, args.batch)
            results["creations"].append(creation)
            have = creation["to"]
            if not broker.alive():
                results["stopped"] = {
                    "at_topics": have,
                    "log": broker.log_tail_errors(),
                    "exit_code": broker.proc.returncode,
                }
                log(f"the broker exited after {have} user topics: {results['stopped']['log']}")
                break
            on_disk = len(partition_dirs(broker.data_dir, "lockstep.user."))
            label = f"{have} user topics" if on_disk >= have else f"{have} user topics accepted, {on_disk} with a log"
            results["snapshots"].append(snapshot(broker, label, args.idle_seconds))
            if creation["error"]:
                results["stopped"] = {"at_topics": have, "error": creation["error"], "log": broker.log_tail_errors()}
                log(f"creation stopped at {have}: {creation['error']}")
                break
            if index == 0 and args.groups:
                log(f"committing one offset for each of {args.groups} device groups")
                commits = commit_groups(args.port, args.groups, have, args.window, args.connections)
                records, partitions = offsets_records(args.port)
                commits["offsets_records"] = records
                commits["offsets_partitions"] = partitions
                results["commits"] = commits
                results["snapshots"].append(
                    snapshot(broker, f"{have} user topics, {args.groups} device groups", args.idle_seconds)
                )
                log("restarting the broker")
                load = loadavg()
                stop = broker.stop()
                start = broker.start()
                results["restart"] = {
                    "topics": have,
                    "groups": args.groups,
                    "stop_seconds": stop,
                    "start_seconds": start,
                    "load": (load + loadavg()) / 2,
                }
                results["snapshots"].append(
                    snapshot(broker, f"{have} user topics, {args.groups} device groups, after a restart", 0)
                )
                # A client of the broker before the restart waits for a controller it no longer finds.
                admin = AdminClient(admin_config)
    finally:
        results["run_seconds"] = time.monotonic() - run_started
        if broker.alive():
            broker.stop()
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        with open(args.out, "w") as f:
            f.write(report(results, args))
    log(f"report in {args.out}, figures in {args.json} ({results['run_seconds']:.0f} s)")


def mib(b):
    return f"{b / 1048576:,.1f}" if b is not None else "—"


def report(results, args):
    out = [
        "# Capacity measurement (scripts/capacity)",
        "",
        f"Run {results['started_at']}, `{args.command_line}`, {results['run_seconds']:.0f} s in all. One Apache Kafka node "
        "(KRaft, broker and controller in one JVM), every topic 1 partition at **replication factor 1**. "
        "Times are upper bounds: the machine is shared, and the 1-minute load average is given next to each figure.",
        "",
        args.machine.replace("\\n", "\n"),
        "",
        f"Broker process: open-files limit {results.get('nofile_limit')}, vm.max_map_count {results.get('max_map_count')}, "
        f"first start {results.get('first_start_seconds', 0):.1f} s.",
        "",
        "## Creating user topics (batched CreateTopics)",
        "",
        "| topics | created | acknowledged, s | on disk, s | topics/s | load at start → end | error |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in results["creations"]:
        on_disk = f"{c['seconds_on_disk']:.1f}" if c["seconds_on_disk"] is not None else "—"
        rate = f"{c['topics_per_second']:.0f}" if c["topics_per_second"] else "—"
        out.append(
            f"| {c['from']:,} → {c['to']:,} | {c['created']:,} | {c['seconds_acked']:.1f} | {on_disk} | {rate} | "
            f"{c['load_at_start']:.2f} → {c['load_at_end']:.2f} | {c['error'] or ''} |"
        )
    out += [
        "",
        "## The broker after each step (after a full GC)",
        "",
        "| state | RSS, MiB | live heap, MiB | heap committed, MiB | threads | open fds | memory maps | user files (per partition) | user topics on disk, MiB | metadata log, MiB (files) | `__consumer_offsets`, MiB | idle CPU, % of a core | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in results["snapshots"]:
        dirs = s["user_partition_dirs"]
        per = f" ({s['user_files'] / dirs:.1f})" if dirs else ""
        idle = f"{s['idle_cpu_percent']:.1f}" if "idle_cpu_percent" in s else "—"
        load = f"{s['load_before']:.2f}" + (f" (idle: {s['load_idle']:.2f})" if "load_idle" in s else "")
        out.append(
            f"| {s['label']} | {s['rss_kib'] / 1024:,.0f} | {mib(s['heap_live_bytes'])} | {mib(s['heap_committed_bytes'])} | "
            f"{s['threads']} | {s['fds']:,} | {s['maps']:,} | {s['user_files']:,}{per} | {mib(s['user_bytes_allocated'])} | "
            f"{mib(s['metadata_bytes'])} ({s['metadata_files']}) | {mib(s['offsets_log_bytes'])} | {idle} | {load} |"
        )
    files = next((s["partition_files"] for s in results["snapshots"] if s.get("partition_files")), None)
    if files:
        out += ["", "The files of one user partition: " + ", ".join(f"`{f}`" for f in files) + ". "
                "User topics on disk: allocated blocks; the metadata log and `__consumer_offsets`: bytes of their segments and snapshots "
                "(Kafka preallocates each active segment's index files sparsely, 10 MiB apparent each)."]
    if "commits" in results:
        c = results["commits"]
        out += [
            "",
            "## Device groups: one offset commit each",
            "",
            f"{c['groups']:,} groups `lockstep.device.<n>`, one member-less OffsetCommit v7 each (generation -1, as "
            f"Lockstep's group-offsets client), over {c['connections']} connections with up to {args.window} in flight on each: **{c['seconds']:.1f} s, "
            f"{c['commits_per_second']:,.0f} commits/s** (load {c['load_at_start']:.2f} → {c['load_at_end']:.2f}); "
            f"retried (error code: count): {c['retried'] or 'none'}; failed: {c['failed']}. `__consumer_offsets` ({c['offsets_partitions']} partitions) then holds "
            f"{c['offsets_records']:,} records.",
        ]
    if "restart" in results:
        r = results["restart"]
        out += [
            "",
            f"Restart with {r['topics']:,} user topics and {r['groups']:,} device groups: stop {r['stop_seconds']:.1f} s, "
            f"start until 'Kafka Server started' {r['start_seconds']:.1f} s (load {r['load']:.2f}).",
        ]
    if "stopped" in results:
        s = results["stopped"]
        out += ["", f"## Where it stopped: {s['at_topics']:,} user topics", ""]
        if s.get("error"):
            out.append(f"CreateTopics: {s['error']}")
        if s.get("exit_code") is not None:
            out.append(f"The broker exited (code {s['exit_code']}).")
        if s.get("log"):
            out += ["", "The broker's log:", "", "```text"] + [line[:400] for line in s["log"]] + ["```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
