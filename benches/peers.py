#!/usr/bin/env python3
"""Persistent vector stores side by side, in one run, on the same vectors:

  imagelsh (the release server, through a Python gRPC client), Chroma (PersistentClient),
  LanceDB (local directory), Milvus Lite (local file) and USearch (HNSW, saved to a file).

Vectors: --items 1280-d float32 vectors around --clusters random unit centres with gaussian
noise (--noise = the noise's norm relative to the centre's), normalised, seeded; --queries
held-out queries from the same distribution; ground truth = exact top-10 by cosine (numpy).

Per system, each in a fresh temp directory:
  - durable ingest: vectors/s in batches of --batch, including the system's own
    flush/commit/save at the end (imagelsh: an acknowledged batch is fsynced);
  - fsync?: what the system's writes actually sync, seen with strace on a small ingest
    (fsync/fdatasync/sync_file_range/msync(MS_SYNC)/O_SYNC opens on files under its directory);
  - disk bytes per item of the directory after a clean close;
  - process start to first answered query after a clean close and after SIGKILL right after
    the last batch (and the peer's commit) returned. Peers: a child Python process that
    imports the library, opens the store and answers one query. imagelsh: the server restarted
    on the same data directory, timed until the first Query RPC answers;
  - queries/s and recall@10, one query at a time on one client thread.

Run it with `scripts/bench-peers`, which makes the virtual environment (.venv-peers).
Writes target/bench-peers/results.md.
"""
import argparse
import atexit
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from grpc_stubs import stubs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench-peers")
DIM = 1280
PEERS = ["chroma", "lancedb", "milvus-lite", "usearch"]
PACKAGES = ["numpy", "grpcio", "grpcio-tools", "protobuf", "chromadb", "lancedb", "pyarrow", "pymilvus",
            "milvus-lite", "usearch"]


# ---------------------------------------------------------------------------------------------
# The peers, as the worker processes drive them.

class Chroma:
    NAME = "Chroma"

    @staticmethod
    def load():
        import chromadb  # noqa: F401

    def __init__(self, path, create, opts):
        import chromadb
        from chromadb.config import Settings
        self.client = chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
        if create:
            self.col = self.client.create_collection("bench", embedding_function=None,
                                                     configuration={"hnsw": {"space": "cosine"}})
        else:
            self.col = self.client.get_collection("bench", embedding_function=None)

    def add(self, start, vecs):
        self.col.add(ids=[str(i) for i in range(start, start + len(vecs))], embeddings=vecs)

    def commit(self):
        pass  # no flush API: add() returns after its write to the local store

    def search(self, q):
        r = self.col.query(query_embeddings=q[None], n_results=10, include=[])
        return [int(i) for i in r["ids"][0]]

    def count(self):
        return self.col.count()

    def close(self):
        self.client.close()

    def info(self):
        try:
            conf = self.col.configuration_json.get("hnsw") or {}
        except Exception:  # older layouts of the configuration
            conf = {}
        keys = ["space", "ef_construction", "ef_search", "max_neighbors"]
        return "HNSW (Chroma's, defaults) " + " ".join(f"{k}={conf[k]}" for k in keys if k in conf)


class Lance:
    NAME = "LanceDB"

    @staticmethod
    def load():
        import lancedb  # noqa: F401
        import pyarrow  # noqa: F401

    def __init__(self, path, create, opts):
        import lancedb
        import pyarrow as pa
        self.pa = pa
        self.db = lancedb.connect(path)
        self.table = None if create else self.db.open_table("bench")
        self.index = opts.get("lance_index", "none")
        self.index_secs = 0.0

    def add(self, start, vecs):
        pa = self.pa
        data = pa.table({"id": pa.array(np.arange(start, start + len(vecs)), pa.int64()),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), DIM)})
        if self.table is None:
            self.table = self.db.create_table("bench", data=data)
        else:
            self.table.add(data)  # each add commits a new version (data file + manifest)

    def commit(self):
        # Nothing to flush; the ANN index (when asked for) is built here, so its time counts.
        if self.index != "none":
            t = time.perf_counter()
            self.table.create_index(metric="cosine", vector_column_name="vector", index_type=self.index)
            self.index_secs = time.perf_counter() - t

    def search(self, q):
        r = (self.table.search(q, vector_column_name="vector").distance_type("cosine").limit(10)
             .select(["id"]).to_arrow())
        return r["id"].to_pylist()

    def count(self):
        return self.table.count_rows()

    def close(self):
        close = getattr(self.db, "close", None)
        if close:
            close()

    def info(self):
        indices = list(self.table.list_indices())
        if not indices:
            return "no ANN index: flat (exact) scan of every row"
        return "ANN index " + ", ".join(f"{i.index_type}" for i in indices) + " (defaults, built after the ingest)"

    def note(self):
        return f"ANN index built in {self.index_secs:.1f} s (counted in ingest)" if self.index_secs else ""


class Milvus:
    NAME = "Milvus Lite"

    @staticmethod
    def load():
        import pymilvus  # noqa: F401

    def __init__(self, path, create, opts):
        from pymilvus import MilvusClient
        self.c = MilvusClient(os.path.join(path, "milvus.db"))
        if create:
            self.c.create_collection("bench", dimension=DIM, metric_type="COSINE")  # quick setup: AUTOINDEX
        else:
            self.c.load_collection("bench")

    def add(self, start, vecs):
        self.c.insert("bench", [{"id": start + i, "vector": v} for i, v in enumerate(vecs.tolist())])

    def commit(self):
        self.c.flush("bench")

    def search(self, q):
        return [int(h["id"]) for h in self.c.search("bench", data=[q.tolist()], limit=10)[0]]

    def count(self):
        return int(self.c.query("bench", output_fields=["count(*)"])[0]["count(*)"])

    def close(self):
        self.c.close()

    def info(self):
        try:
            names = self.c.list_indexes("bench")
            d = self.c.describe_index("bench", names[0]) if names else {}
            return f"{d.get('index_type', '?')} metric {d.get('metric_type', '?')} (quick-setup defaults)"
        except Exception as e:
            return f"index unknown ({e})"


class USearch:
    NAME = "USearch"

    @staticmethod
    def load():
        import usearch.index  # noqa: F401

    def __init__(self, path, create, opts):
        from usearch.index import Index
        self.file = os.path.join(path, "index.usearch")
        self.index = Index(ndim=DIM, metric="cos") if create else Index.restore(self.file)

    def add(self, start, vecs):
        self.index.add(np.arange(start, start + len(vecs)), vecs)  # threads: all cores (its default)

    def commit(self):
        self.index.save(self.file)  # the only durable step: nothing is on disk before it

    def search(self, q):
        return [int(k) for k in self.index.search(q, 10).keys]

    def count(self):
        return len(self.index)

    def close(self):
        pass

    def info(self):
        i = self.index
        return (f"in-process HNSW, defaults: dtype {i.dtype}, connectivity {i.connectivity}, "
                f"expansion_add {i.expansion_add}, expansion_search {i.expansion_search}; loaded into memory")


CLASSES = {"chroma": Chroma, "lancedb": Lance, "milvus-lite": Milvus, "usearch": USearch}


def emit(**event):
    event["wall"] = time.time()
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def worker(args):
    try:
        cls = CLASSES[args.worker]
        opts = json.loads(args.opts)
        t = time.perf_counter()
        cls.load()
        import_secs = time.perf_counter() - t
        if args.phase == "ingest":
            base = np.load(os.path.join(args.data, "base.npy"), mmap_mode="r")
            n = args.limit or len(base)
            h = cls(args.dir, True, opts)
            t0 = time.perf_counter()
            emit(event="adding")
            for start in range(0, n, args.batch):
                h.add(start, np.ascontiguousarray(base[start:min(n, start + args.batch)]))
            t1 = time.perf_counter()
            emit(event="committing")
            h.commit()
            t2 = time.perf_counter()
            note = h.note() if hasattr(h, "note") else ""
            emit(event="ingested", secs=t2 - t0, commit_secs=t2 - t1, items=n, info=h.info(), note=note)
            if args.hang:  # the parent SIGKILLs us now
                while True:
                    time.sleep(3600)
            h.close()
            emit(event="closed", close_secs=time.perf_counter() - t2)
        else:
            queries = np.load(os.path.join(args.data, "queries.npy"))
            t = time.perf_counter()
            h = cls(args.dir, False, opts)
            open_secs = time.perf_counter() - t
            t = time.perf_counter()
            h.search(queries[0])
            emit(event="first", import_secs=import_secs, open_secs=open_secs, query_secs=time.perf_counter() - t)
            count = h.count()
            if args.first_only:
                emit(event="done", count=count)
            else:
                t = time.perf_counter()
                ids = [h.search(q) for q in queries]
                qps = len(queries) / (time.perf_counter() - t)
                emit(event="done", count=count, qps=qps, ids=ids, info=h.info())
            h.close()
    except BaseException as e:
        emit(event="error", error=f"{type(e).__name__}: {e}")
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# The parent: data, children, imagelsh, the table.

CLEANUP = []  # callables, run at exit in reverse order


@atexit.register
def _cleanup():
    while CLEANUP:
        try:
            CLEANUP.pop()()
        except Exception:
            pass


def tempdir(args, name):
    d = tempfile.mkdtemp(prefix=f"bench-peers-{name}-", dir=args.tmp)
    CLEANUP.append(lambda: shutil.rmtree(d, ignore_errors=True))
    return d


def dir_bytes(path):
    total = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except FileNotFoundError:
                pass
    return total


def make_data(args):
    """Base, queries and exact top-10, cached under target/bench-peers/data-…"""
    tag = f"{args.items}-{args.queries}-{args.clusters}-{args.noise}-{args.seed}"
    out = os.path.join(WORK, f"data-{tag}")
    if os.path.exists(os.path.join(out, "truth.npy")):
        return out
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    rng = np.random.default_rng([args.seed, 0])
    centres = rng.standard_normal((args.clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = args.noise / np.sqrt(DIM)

    def draw(gen, n, target):
        assign, noise = np.random.default_rng([args.seed, gen, 0]), np.random.default_rng([args.seed, gen, 1])
        for s in range(0, n, 50_000):
            m = min(n, s + 50_000) - s
            x = centres[assign.integers(0, args.clusters, m)] + sigma * noise.standard_normal((m, DIM), np.float32)
            target[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)

    base = np.lib.format.open_memmap(os.path.join(out, "base.npy"), "w+", np.float32, (args.items, DIM))
    draw(1, args.items, base)
    queries = np.zeros((args.queries, DIM), np.float32)
    draw(2, args.queries, queries)
    np.save(os.path.join(out, "queries.npy"), queries)
    best_s = np.full((args.queries, 10), -np.inf, np.float32)
    best_i = np.zeros((args.queries, 10), np.int64)
    for s in range(0, args.items, 20_000):
        sims = queries @ base[s:s + 20_000].T
        k = min(10, sims.shape[1])
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + s], 1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    base.flush()
    del base
    np.save(os.path.join(out, "truth.npy"), best_i)
    print(f"data: {args.items} base + {args.queries} queries, exact top-10, in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    return out


def recall(ids, truth):
    return sum(len(set(r[:10]) & set(t)) for r, t in zip(ids, truth.tolist())) / (10 * len(truth))


class Child:
    """A worker process (own process group), its stdout read as JSON events by a thread."""

    def __init__(self, argv, log, env=None):
        self.log = open(log, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
                                     start_new_session=True, env=env)
        self.events = queue.Queue()
        self.logname = log
        threading.Thread(target=self._read, daemon=True).start()
        CLEANUP.append(self.kill)

    def _read(self):
        for line in self.proc.stdout:
            self.events.put((time.perf_counter(), line))
        self.events.put((time.perf_counter(), None))

    def expect(self, name, timeout):
        deadline = time.perf_counter() + timeout
        while True:
            try:
                at, line = self.events.get(timeout=max(0.01, deadline - time.perf_counter()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for '{name}'")
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"exited ({self.proc.returncode}) before '{name}': {self.tail()}")
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["event"] == "error":
                raise RuntimeError(event["error"])
            if event["event"] == name:
                event["at"] = at
                return event

    def tail(self):
        self.log.flush()
        with open(self.logname, errors="replace") as f:
            lines = [x.strip() for x in f.read().splitlines() if x.strip()]
        return " / ".join(lines[-3:])[-400:] or "no output"

    def wait(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"did not exit within {timeout:.0f} s")

    def kill(self):
        """SIGKILL to the whole group (Milvus Lite's server process is in it)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # strays of an exited leader
            except (ProcessLookupError, PermissionError):
                pass


SYNC_RE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(fsync|fdatasync|sync_file_range2?|msync|syncfs|sync|openat)\((.*)$")


def strace_syncs(trace, data_dir, phases):
    """Sync calls on files under data_dir in a strace -f -ttt -y log, by the phase they fell in.

    phases: [(name, start_wall)] ascending; a call belongs to the last phase started before it."""
    real = os.path.realpath(data_dir)
    counts = {name: 0 for name, _ in phases}
    files = set()
    with open(trace, errors="replace") as f:
        for line in f:
            m = SYNC_RE.match(line)
            if not m or "resumed>" in line:
                continue
            when, call, rest = float(m.group(2)), m.group(3), m.group(4)
            if call == "openat":
                if real not in rest or not re.search(r"O_(D)?SYNC", rest):
                    continue
            elif call == "msync":
                if "MS_SYNC" not in rest:
                    continue
            elif call not in ("sync", "syncfs") and real not in rest:
                continue
            phase = None
            for name, start in phases:
                if when >= start:
                    phase = name
            if phase:
                counts[phase] += 1
                p = re.search(r"<([^>]*)>", rest)
                files.add(os.path.relpath(p.group(1), real) if p and p.group(1).startswith(real) else call)
    return counts, sorted(files)


def describe_syncs(counts, batches, files):
    adds, commit, close = counts.get("adding", 0), counts.get("committing", 0), counts.get("closing", 0)
    where = (f"{adds} during {batches} batch writes, {commit} in the flush/commit/save, {close} at close"
             + (f"; files: {', '.join(files[:6])}" + (" …" if len(files) > 6 else "") if files else ""))
    if adds >= batches:
        short = "yes, every batch"
    elif adds:
        short = f"some batches ({adds} syncs / {batches} batches)"
    elif commit:
        short = "at flush/commit only"
    elif close:
        short = "at close only"
    else:
        short = "never"
    return short, where


# ---------------------------------------------------------------------------------------------
# imagelsh through gRPC.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(tag, payload):
    return bytes([tag]) + varint(len(payload)) + payload


def ingest_request(index, batch_id, start, vecs):
    """IngestRequest{index, batch_id, items: [Item{id, embedding{values}}]} in wire format, built
    from the array's bytes (the generated classes' per-float conversion would make the Python
    client the bottleneck)."""
    raw = np.ascontiguousarray(vecs, "<f4")
    items = [field(0x1A, field(0x0A, str(start + i).encode()) + field(0x2A, field(0x0A, raw[i].tobytes())))
             for i in range(len(raw))]
    return field(0x0A, index.encode()) + b"\x10" + varint(batch_id) + b"".join(items)


class Imagelsh:
    def __init__(self, args, pb, rpc, grpc):
        self.args, self.pb, self.rpc, self.grpc = args, pb, rpc, grpc
        self.binary = os.path.join(ROOT, "target/release/imagelsh")
        self.proc = None

    def start(self, data_dir, log, wrap=()):
        self.port = free_port()
        self.wrapped = bool(wrap)
        self.log = open(log, "a")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*wrap, self.binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--http-listen", "off", "--data-dir", data_dir,
             *self.args.imagelsh_args.split()],
            cwd=ROOT, stdout=self.log, stderr=self.log, start_new_session=True,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        proc = self.proc
        CLEANUP.append(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))

    def wait_port(self, timeout=120):
        """Polls the port until it accepts (the server binds only after its indexes are open)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"imagelsh exited ({self.proc.returncode}) during start; see {self.log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.002)
        else:
            raise RuntimeError("imagelsh did not listen in time")
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channels = [self.grpc.insecure_channel(f"127.0.0.1:{self.port}", options=opts)
                         for _ in range(max(1, self.args.streams))]
        self.stub = self.rpc.ImageIndexStub(self.channels[0])

    def query(self, q):
        r = self.stub.Query(self.pb.QueryRequest(index="bench", embedding=self.pb.Embedding(values=q.tolist()), top_k=10),
                            timeout=60)
        self.plans.add(self.pb.SearchPlan.Name(r.plan).removeprefix("SEARCH_PLAN_"))
        return [int(h.id) for h in r.hits]

    def first_answer_ms(self, q):
        self.wait_port()
        self.plans = set()
        self.query(q)
        return (time.perf_counter() - self.started) * 1000

    def ingest(self, base, n):
        """Creates the index and ingests over --streams concurrent Ingest streams; seconds."""
        # dim 1280 is the served model's, so by default the index would subtract the model's
        # center (the mean of its post-ReLU features); these vectors are centred at 0 already.
        self.stub.CreateIndex(self.pb.CreateIndexRequest(name="bench", dim=DIM, seed=1,
                                                         no_center=self.args.imagelsh_center == "none"))
        batch, streams = self.args.batch, max(1, self.args.streams)
        starts = list(range(0, n, batch))
        errors, indexed = [], [0] * streams

        def one(k):
            try:
                call = self.channels[k].stream_stream("/imagelsh.v1.ImageIndex/Ingest", request_serializer=None,
                                                      response_deserializer=self.pb.IngestResponse.FromString)
                reqs = (ingest_request("bench", s, s, base[s:min(n, s + batch)]) for s in starts[k::streams])
                for r in call(reqs, timeout=3600):
                    if r.errors:
                        raise RuntimeError(f"ingest refused items: {r.errors[0].message}")
                    indexed[k] += r.indexed
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        secs = time.perf_counter() - t
        if errors:
            raise errors[0]
        if sum(indexed) != n:
            raise RuntimeError(f"{sum(indexed)} of {n} items acknowledged")
        return secs

    def items(self):
        return self.stub.GetIndex(self.pb.GetIndexRequest(name="bench"), timeout=60).items

    def close_channels(self):
        for c in self.channels:
            c.close()

    def stop(self, timeout=300):
        self.close_channels()
        t = time.perf_counter()
        pid = self.proc.pid
        if self.wrapped:  # under strace: signal the server it traces, not strace
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise RuntimeError("imagelsh did not stop on SIGTERM")
        if self.proc.returncode != 0:
            raise RuntimeError(f"imagelsh exited {self.proc.returncode} on SIGTERM")
        return (time.perf_counter() - t) * 1000

    def kill(self):
        self.close_channels()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def run_imagelsh(args, data, row, logs):
    import grpc
    pb, rpc = stubs(WORK)
    # The hand-built wire format must be what the generated classes parse.
    v = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM)
    m = pb.IngestRequest.FromString(ingest_request("bench", 7, 5, v))
    assert m.index == "bench" and m.batch_id == 7 and [i.id for i in m.items] == ["5", "6"]
    assert np.array_equal(np.array(m.items[1].embedding.values, np.float32), v[1])

    base = np.load(os.path.join(data, "base.npy"), mmap_mode="r")
    queries = np.load(os.path.join(data, "queries.npy"))
    truth = np.load(os.path.join(data, "truth.npy"))
    n = len(base)
    server = Imagelsh(args, pb, rpc, grpc)
    center = "no center (no_center: the vectors are zero-mean)" if args.imagelsh_center == "none" else "the model's center"
    row["config"] = f"index: dim {DIM}, default K/L/sketch bits, stored embeddings, {center}; {args.streams} Ingest streams"

    if args.fsync_probe:
        probe_n = min(n, 3 * args.batch)
        d = tempdir(args, "imagelsh-probe")
        trace = os.path.join(logs, "imagelsh-strace.txt")
        server.start(d, os.path.join(logs, "imagelsh-probe.log"),
                     ["strace", "-f", "-qq", "-ttt", "-y", "-o", trace,
                      "-e", "trace=fsync,fdatasync,sync_file_range,msync,syncfs,sync,openat"])
        server.wait_port()
        t_add = time.time()
        server.ingest(base, probe_n)
        t_close = time.time()
        server.stop()
        counts, files = strace_syncs(trace, d, [("adding", t_add), ("closing", t_close)])
        row["fsync"], where = describe_syncs(counts, -(-probe_n // args.batch), files)
        row["fsync_how"] = f"strace of the server over a {probe_n}-item ingest then SIGTERM: {where}"
        shutil.rmtree(d, ignore_errors=True)

    # Clean: ingest, SIGTERM, disk, start → first answer, then the queries on that server.
    d = tempdir(args, "imagelsh")
    log = os.path.join(logs, "imagelsh-server.log")
    server.start(d, log)
    server.wait_port()
    secs = server.ingest(base, n)
    row["ingest"] = n / secs
    stop_ms = server.stop()
    row["disk"] = dir_bytes(d) / n
    server.start(d, log)
    row["clean_ms"] = server.first_answer_ms(queries[0])
    t = time.perf_counter()
    ids = [server.query(q) for q in queries]
    row["qps"] = len(queries) / (time.perf_counter() - t)
    row["recall"] = recall(ids, truth)
    row["index"] = f"LSH + sketch + exact re-rank, server's default query (plan {', '.join(sorted(server.plans))})"
    server.stop()
    shutil.rmtree(d, ignore_errors=True)

    # SIGKILL right after the last acknowledgement, restart, first answer.
    d = tempdir(args, "imagelsh-kill")
    server.start(d, log)
    server.wait_port()
    server.ingest(base, n)
    server.kill()
    server.start(d, log)
    row["kill_ms"] = server.first_answer_ms(queries[0])
    items = server.items()
    server.stop()
    shutil.rmtree(d, ignore_errors=True)
    row["notes"] = (f"Python gRPC client, server in its own process (queries include the loopback round trip); "
                    f"start includes loading ONNX Runtime + the model; SIGTERM stop took {stop_ms:.0f} ms; "
                    f"after SIGKILL {items}/{n} items present")


def run_peer(args, system, data, row, logs, install_failures):
    if system in install_failures:
        raise RuntimeError(f"install failed: {install_failures[system]}")
    truth = np.load(os.path.join(data, "truth.npy"))
    n = len(np.load(os.path.join(data, "base.npy"), mmap_mode="r"))
    opts = {}
    if system == "lancedb":
        kind = args.lance_index
        if kind == "auto":
            kind = "IVF_PQ" if n >= args.lance_index_min_items else "none"
        opts["lance_index"] = kind
    me = [sys.executable, os.path.abspath(__file__), "--worker", system, "--data", data, "--batch", str(args.batch),
          "--opts", json.dumps(opts)]
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    to = args.child_timeout

    if args.fsync_probe:
        probe_n = min(n, 3 * args.batch)
        d = tempdir(args, f"{system}-probe")
        trace = os.path.join(logs, f"{system}-strace.txt")
        c = Child(["strace", "-f", "-qq", "-ttt", "-y", "-o", trace,
                   "-e", "trace=fsync,fdatasync,sync_file_range,msync,syncfs,sync,openat",
                   *me, "--phase", "ingest", "--dir", d, "--limit", str(probe_n)],
                  os.path.join(logs, f"{system}-probe.log"), env)
        phases = [(e, c.expect(e, to)["wall"]) for e in ["adding", "committing"]]
        phases.append(("closing", c.expect("ingested", to)["wall"]))
        c.expect("closed", to)
        c.wait(to)
        counts, files = strace_syncs(trace, d, phases)
        row["fsync"], where = describe_syncs(counts, -(-probe_n // args.batch), files)
        row["fsync_how"] = f"strace of a {probe_n}-item ingest in batches of {args.batch}: {where}"
        shutil.rmtree(d, ignore_errors=True)

    # Clean: ingest + commit + close, disk, then start → first answer and the queries.
    d = tempdir(args, system)
    c = Child([*me, "--phase", "ingest", "--dir", d], os.path.join(logs, f"{system}-ingest.log"), env)
    ing = c.expect("ingested", to)
    closed = c.expect("closed", to)
    c.wait(to)
    row["ingest"] = n / ing["secs"]
    row["disk"] = dir_bytes(d) / n
    c = Child([*me, "--phase", "query", "--dir", d], os.path.join(logs, f"{system}-query.log"), env)
    first = c.expect("first", to)
    row["clean_ms"] = (first["at"] - c.started) * 1000
    done = c.expect("done", to)
    c.wait(to)
    row["qps"], row["recall"], row["index"] = done["qps"], recall(done["ids"], truth), done["info"]
    shutil.rmtree(d, ignore_errors=True)
    notes = [f"flush/commit/save {ing['commit_secs'] * 1000:.0f} ms, close {closed['close_secs'] * 1000:.0f} ms",
             f"clean start: import {first['import_secs'] * 1000:.0f} ms, open {first['open_secs'] * 1000:.0f} ms, "
             f"first query {first['query_secs'] * 1000:.0f} ms"]
    if ing.get("note"):
        notes.append(ing["note"])
    if done["count"] != n:
        notes.append(f"{done['count']}/{n} items visible after a clean close")

    # SIGKILL right after the commit returned, then a fresh process.
    d = tempdir(args, f"{system}-kill")
    c = Child([*me, "--phase", "ingest", "--dir", d, "--hang"], os.path.join(logs, f"{system}-kill.log"), env)
    c.expect("ingested", to)
    c.kill()
    c = Child([*me, "--phase", "query", "--dir", d, "--first-only"], os.path.join(logs, f"{system}-recover.log"), env)
    first = c.expect("first", to)
    row["kill_ms"] = (first["at"] - c.started) * 1000
    done = c.expect("done", to)
    c.wait(to)
    notes.append(f"after SIGKILL {done['count']}/{n} items present")
    shutil.rmtree(d, ignore_errors=True)
    row["notes"] = "; ".join(notes)


def versions():
    from importlib import metadata
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(rows):
    out = ["| system | ingest vec/s | fsync? | disk B/item | start→first clean ms | start→first after SIGKILL ms | q/s | recall@10 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            out.append(f"| {r['system']} | failed: {r['failed']} | | | | | | |")
            continue
        out.append(f"| {r['system']} | {fmt(r.get('ingest'), ',.0f')} | {r.get('fsync', 'not measured')} | "
                   f"{fmt(r.get('disk'), ',.0f')} | {fmt(r.get('clean_ms'), ',.0f')} | {fmt(r.get('kill_ms'), ',.0f')} | "
                   f"{fmt(r.get('qps'), ',.0f')} | {fmt(r.get('recall'), '.3f')} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--streams", type=int, default=4, help="concurrent Ingest streams for imagelsh")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.3, help="noise norm relative to the unit centre")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--systems", default="imagelsh," + ",".join(PEERS))
    p.add_argument("--lance-index", default="auto", choices=["auto", "none", "IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ"],
                   help="auto: IVF_PQ from --lance-index-min-items up, else flat search")
    p.add_argument("--lance-index-min-items", type=int, default=100_000)
    p.add_argument("--imagelsh-center", default="none", choices=["none", "model"],
                   help="none: CreateIndex with no_center (the synthetic vectors are zero-mean); model: the default, "
                        "which subtracts the served model's center from indexes of its dimension")
    p.add_argument("--imagelsh-args", default="", help="extra flags for imagelsh serve")
    p.add_argument("--no-fsync-probe", dest="fsync_probe", action="store_false",
                   help="skip the strace runs that show what each system syncs")
    p.add_argument("--child-timeout", type=float, default=3600, help="seconds per child step")
    p.add_argument("--tmp", default=None, help="where the temp directories go (default: the system's)")
    # Worker mode (the children).
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--hang", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    started = time.perf_counter()
    os.makedirs(WORK, exist_ok=True)
    logs = os.path.join(WORK, "logs")
    os.makedirs(logs, exist_ok=True)
    if args.fsync_probe and not shutil.which("strace"):
        print("strace not found: the fsync column is not measured", file=sys.stderr)
        args.fsync_probe = False
    install_failures = {}
    failed_file = os.path.join(WORK, "install-failed.txt")
    if os.path.exists(failed_file):
        for line in open(failed_file):
            name, _, why = line.strip().partition(": ")
            if name:
                install_failures[name] = why
    data = make_data(args)
    rows = []
    for system in args.systems.split(","):
        row = {"system": {"imagelsh": "imagelsh", **{k: c.NAME for k, c in CLASSES.items()}}.get(system, system)}
        rows.append(row)
        t = time.perf_counter()
        print(f"{row['system']} …", file=sys.stderr)
        try:
            if system == "imagelsh":
                if not os.path.exists(os.path.join(ROOT, "target/release/imagelsh")):
                    raise RuntimeError("target/release/imagelsh missing")
                run_imagelsh(args, data, row, logs)
            elif system in CLASSES:
                run_peer(args, system, data, row, logs, install_failures)
            else:
                raise RuntimeError("unknown system")
        except Exception as e:
            row["failed"] = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]
        row["secs"] = time.perf_counter() - t
        print(f"  {row['system']}: " + (f"FAILED {row['failed']}" if row.get("failed") else
              f"{row['ingest']:.0f} vec/s, {row['disk']:.0f} B/item, clean {row['clean_ms']:.0f} ms, "
              f"kill {row['kill_ms']:.0f} ms, {row['qps']:.0f} q/s, recall {row['recall']:.3f}")
              + f" ({row['secs']:.0f} s)", file=sys.stderr)

    total = time.perf_counter() - started
    vs = versions()
    lines = [
        "# Persistent vector stores side by side",
        "",
        f"`scripts/bench-peers --items {args.items} --queries {args.queries}` ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs, one run, {total:.0f} s). {args.items:,} clustered {DIM}-d float32 vectors "
        f"({args.clusters} unit centres, gaussian noise {args.noise} of the centre's norm, normalised, seed {args.seed}); "
        f"{args.queries} held-out queries; recall@10 against the exact top-10 by cosine. Ingest in batches of "
        f"{args.batch}, including each system's own flush/commit/save; imagelsh over {args.streams} concurrent "
        "Ingest streams from a Python gRPC client (an acknowledged batch is fsynced). Disk: bytes of the "
        "directory after a clean close / items. Start→first: process start (peers: a fresh Python process that "
        "imports the library and opens the store; imagelsh: the server process) to the first answered query, after "
        "a clean close and after SIGKILL right after the last batch (peers: after their flush/commit/save). Queries "
        "one at a time on one client thread (the engines' own threads unrestricted).",
        "",
        table(rows),
        "",
        "Index and notes per system:",
        "",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"- **{r['system']}**: failed ({r['failed']})")
            continue
        config = f"{r['config']}; " if r.get("config") else ""
        lines.append(f"- **{r['system']}**: {config}{r.get('index', '')}. {r.get('notes', '')}.")
        if r.get("fsync_how"):
            lines.append(f"  fsync: {r['fsync_how']}.")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in vs.items()) + f", Python {sys.version.split()[0]}.", ""]
    text = "\n".join(lines)
    with open(os.path.join(WORK, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
