#!/usr/bin/env python3
"""Search quality and speed, side by side in one run, on Fashion-MNIST (70k real product photos)
embedded by the default model through imagelsh's own Embed RPC:

  imagelsh through gRPC and through the library, FAISS IndexFlatIP (exact), FAISS IndexLSH at
  several bit counts (+ exact refine), hnswlib (M=16) at several ef, and the original notebook's
  configuration (K=8, L=10, ranked by votes).

1,000 held-out queries (fixed seed), database = the other 69,000; ground truth = exact top-10 by
cosine. Every query runs one at a time on one thread. Run it with `scripts/bench-quality`,
which makes the virtual environment and builds the release binary; it writes BENCHMARKS.md.
"""
import argparse
import atexit
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from grpc_stubs import stubs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench-quality")
FASHION = "/usr/share/datasets/fashion-mnist"
DIM = 1280


class Server:
    def __init__(self, data_dir, *args):
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, "target/release/imagelsh"), "serve", "--listen", "127.0.0.1:0", "--http-listen", "off",
             "--data-dir", data_dir, *args],
            cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "RUST_LOG": "warn"}, text=True)
        self.addr = self.proc.stdout.readline().strip().rsplit(" ", 1)[-1]
        atexit.register(self.stop)  # also when the script fails half-way

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def fashion_mnist():
    images, labels = [], []
    for split in ["train", "t10k"]:
        with gzip.open(f"{FASHION}/{split}-images-idx3-ubyte.gz") as f:
            raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(f"{FASHION}/{split}-labels-idx1-ubyte.gz") as f:
            lab = np.frombuffer(f.read(), np.uint8, offset=8)
        images.append(raw)
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def embed_all(pb, rpc, grpc, images):
    """Embeddings of every image through the Embed RPC, cached in target/bench-quality."""
    cache = os.path.join(WORK, f"fashion-mnist-{len(images)}.f32")
    if os.path.exists(cache):
        return np.fromfile(cache, dtype="<f4").reshape(len(images), DIM)
    from PIL import Image
    data = tempfile.mkdtemp()
    server = Server(data)
    channel = grpc.insecure_channel(server.addr, options=[("grpc.max_receive_message_length", 256 << 20)])
    stub = rpc.ImageIndexStub(channel)

    def requests():
        for start in range(0, len(images), 64):
            pngs = []
            for pixels in images[start:start + 64]:
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                pngs.append(buf.getvalue())
            yield pb.EmbedRequest(batch_id=start, images=pngs)

    out = np.zeros((len(images), DIM), np.float32)
    started = time.time()
    for response in stub.Embed(requests()):
        assert not response.errors, response.errors
        for i, e in enumerate(response.embeddings):
            out[response.batch_id + i] = e.values
        done = response.batch_id + len(response.embeddings)
        if done % 6400 == 0:
            print(f"  embedded {done}/{len(images)} ({done / (time.time() - started):.0f}/s)", file=sys.stderr)
    server.stop()
    shutil.rmtree(data, ignore_errors=True)
    out.tofile(cache)
    return out


def measure(search, queries, truth, qlabels, base_labels):
    found = same = 0
    started = time.perf_counter()
    results = [search(q) for q in queries]
    qps = len(queries) / (time.perf_counter() - started)
    for q, ids in enumerate(results):
        found += len(set(ids[:10]) & set(truth[q]))
        same += sum(1 for i in ids[:5] if base_labels[i] == qlabels[q])
    return found / (10 * len(queries)), same / (5 * len(queries)), qps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--images", type=int, default=70000)
    parser.add_argument("--grpc-configs", default="8:10:0:none:votes,12:16:2:model:sketch100,12:16:2:model:auto",
                        help="K:L:PROBES:CENTER:RANKING, comma-separated (RANKING: votes, all, sketchN, scanN, or auto: "
                             "a query that sets nothing but top_k)")
    parser.add_argument("--lib-configs", default=(
        # The notebook, then exact re-ranking of every candidate (before sketches), then sketch
        # pre-ranking at several depths, probes and sketch sizes; other centers and shapes; then
        # the full-scan plan at several depths and sketch sizes.
        "8:10:0:none:votes,8:10:0:none:all,12:16:4:model:all,"
        "12:16:0:model:sketch100,12:16:1:model:sketch100,12:16:2:model:sketch50,12:16:2:model:sketch100,"
        "12:16:2:model:sketch200,12:16:4:model:sketch100,12:16:2:model:sketch100:512:2,"
        "12:16:2:model:sketch200:256,12:16:2:model:sketch100:1024,12:16:2:model:estimate,"
        "12:16:2:none:sketch100,12:16:2:data:sketch100,10:16:2:model:sketch100,14:20:4:model:sketch100,"
        "12:16:2:model:scan25,12:16:2:model:scan50,12:16:2:model:scan75,12:16:2:model:scan100,12:16:2:model:scan200,"
        "12:16:2:model:scan100:256,12:16:2:model:scan200:256,"
        "12:16:2:model:scan25:1024,12:16:2:model:scan50:1024,12:16:2:model:scan100:1024"),
        help="K:L:PROBES:CENTER:RANKING[:SKETCH_BITS[:MIN_VOTES]], see benches/quality.rs")
    args = parser.parse_args()
    os.makedirs(WORK, exist_ok=True)
    import grpc
    pb, rpc = stubs(WORK)
    import faiss
    import hnswlib

    images, labels = fashion_mnist()
    images, labels = images[:args.images], labels[:args.images]
    print(f"embedding {len(images)} Fashion-MNIST images through the Embed RPC (cached after the first run)", file=sys.stderr)
    vectors = embed_all(pb, rpc, grpc, images)

    rng = np.random.default_rng(0)
    query_rows = rng.choice(len(vectors), args.queries, replace=False)
    mask = np.ones(len(vectors), bool)
    mask[query_rows] = False
    base, base_labels = vectors[mask], labels[mask]
    queries, qlabels = vectors[query_rows], labels[query_rows]
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    base_n, queries_n = unit(base), unit(queries)
    truth = np.argsort(-(queries_n @ base_n.T), axis=1)[:, :10]

    data = os.path.join(WORK, "lib-data")
    os.makedirs(data, exist_ok=True)
    base.astype("<f4").tofile(f"{data}/base.f32")
    base_labels.astype(np.uint8).tofile(f"{data}/base_labels.u8")
    queries.astype("<f4").tofile(f"{data}/queries.f32")
    qlabels.astype(np.uint8).tofile(f"{data}/query_labels.u8")
    truth.astype("<u4").tofile(f"{data}/truth.u32")
    base.mean(axis=0).astype("<f4").tofile(f"{data}/data_center.f32")
    open(f"{data}/dim.txt", "w").write(str(DIM))

    rows = []

    def row(system, config, recall, precision, qps, build, bytes_per_vector, note=""):
        rows.append(dict(system=system, config=config, recall10=recall, precision5=precision, qps=qps,
                         build_per_s=build, bytes_per_vector=bytes_per_vector, note=note))
        print(f"  {system:<20} {config:<40} recall@10 {recall:.3f}  p@5 {precision:.3f}  {qps:8.1f} q/s", file=sys.stderr)

    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatIP(DIM)
    t = time.perf_counter(); flat.add(base_n); build = len(base) / (time.perf_counter() - t)
    r, p, q = measure(lambda v: flat.search(v[None], 10)[1][0], queries_n, truth, qlabels, base_labels)
    row("FAISS", "IndexFlatIP (exact)", r, p, q, build, 4 * DIM)
    flat_qps = q

    for nbits in [256, 512, 1024]:
        lsh = faiss.IndexLSH(DIM, nbits)
        refine = faiss.IndexRefineFlat(lsh)
        t = time.perf_counter(); refine.add(base_n); build = len(base) / (time.perf_counter() - t)
        # ×5, ×10, ×20: the 50, 100 and 200 nearest by Hamming distance compared exactly, the
        # exact work of imagelsh's scan50, scan100 and scan200 (which first re-score 4× as many
        # by the asymmetric estimate).
        for k_factor in [5, 10, 20]:
            refine.k_factor = k_factor
            r, p, q = measure(lambda v: refine.search(v[None], 10)[1][0], queries_n, truth, qlabels, base_labels)
            row("FAISS", f"IndexLSH {nbits} bits + refine ×{k_factor}", r, p, q, build, nbits // 8 + 4 * DIM)
        lsh_only = faiss.IndexLSH(DIM, nbits)
        lsh_only.add(base_n)
        r, p, q = measure(lambda v: lsh_only.search(v[None], 10)[1][0], queries_n, truth, qlabels, base_labels)
        row("FAISS", f"IndexLSH {nbits} bits (Hamming only)", r, p, q, build, nbits // 8)

    hnsw = hnswlib.Index(space="cosine", dim=DIM)
    hnsw.init_index(max_elements=len(base), M=16, ef_construction=200)
    hnsw.set_num_threads(1)
    t = time.perf_counter(); hnsw.add_items(base, np.arange(len(base))); build = len(base) / (time.perf_counter() - t)
    with tempfile.NamedTemporaryFile() as f:
        hnsw.save_index(f.name)
        hnsw_bytes = os.path.getsize(f.name) / len(base)
    for ef in [10, 20, 50, 100]:
        hnsw.set_ef(ef)
        r, p, q = measure(lambda v: hnsw.knn_query(v[None], k=10)[0][0], queries, truth, qlabels, base_labels)
        row("hnswlib", f"M=16 ef_construction=200 ef={ef}", r, p, q, build, hnsw_bytes)

    # imagelsh, library path: one JSON line per configuration.
    lib = subprocess.run(["cargo", "bench", "--quiet", "--bench", "quality", "--", data, *args.lib_configs.split(",")],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in lib.splitlines():
        if line.startswith("{"):
            m = json.loads(line)
            row(m["system"], m["config"], m["recall10"], m["precision5"], m["qps"], m["build_per_s"], m["bytes_per_vector"],
                f"{m['candidates']:.0f} candidates/query")

    # imagelsh through gRPC (the release server, vectors over one Ingest stream).
    for config in args.grpc_configs.split(","):
        k, l, probes, center, ranking = config.split(":")
        data_dir = tempfile.mkdtemp()
        server = Server(data_dir)
        stub = rpc.ImageIndexStub(grpc.insecure_channel(server.addr, options=[("grpc.max_send_message_length", 64 << 20)]))
        request = pb.CreateIndexRequest(name="q", dim=DIM, hash_bits=int(k), tables=int(l), seed=1)
        if center == "none":
            request.no_center = True
        elif center == "data":
            request.center.extend(base.mean(axis=0).tolist())
        stub.CreateIndex(request)  # "model": the index takes the model card's center by default

        def batches():
            for start in range(0, len(base), 256):
                items = [pb.Item(id=str(start + i), label=str(base_labels[start + i]), embedding=pb.Embedding(values=v))
                         for i, v in enumerate(base[start:start + 256].tolist())]
                yield pb.IngestRequest(index="q", batch_id=start, items=items)

        t = time.perf_counter()
        indexed = sum(r.indexed for r in stub.Ingest(batches()))
        build = indexed / (time.perf_counter() - t)
        assert indexed == len(base)

        if ranking == "auto":
            options = {}  # what a client that sets nothing gets: the server's defaults and plan
        else:
            depth = {"votes": 0, "all": 100000}.get(ranking)
            if depth is None:
                depth = int(ranking.removeprefix("sketch").removeprefix("scan"))
            plan = pb.SEARCH_PLAN_SCAN if ranking.startswith("scan") else pb.SEARCH_PLAN_TABLES
            options = dict(probes=int(probes), rerank=ranking != "votes", rerank_depth=depth, plan=plan)
        plans = set()

        def search(v):
            response = stub.Query(pb.QueryRequest(index="q", embedding=pb.Embedding(values=v.tolist()), top_k=10, **options))
            plans.add(pb.SearchPlan.Name(response.plan))
            return [int(h.id) for h in response.hits]

        r, p, q = measure(search, queries, truth, qlabels, base_labels)
        server.stop()
        row("imagelsh (gRPC)", f"K={k} L={l} probes={probes} center={center} {ranking}", r, p, q, build,
            dir_bytes(data_dir) / len(base), "plan " + ", ".join(sorted(p.removeprefix("SEARCH_PLAN_") for p in plans)))
        shutil.rmtree(data_dir, ignore_errors=True)

    # This script owns the file's first section only; the sections after it (the write path,
    # the peers) come from other benchmarks and are kept.
    path = os.path.join(ROOT, "BENCHMARKS.md")
    rest = ""
    if os.path.exists(path):
        old = open(path).read()
        later = old.find("\n# ", 1)
        rest = old[later:] if later >= 0 else ""
    with open(path, "w") as f:
        f.write("# Search quality benchmark\n\n")
        f.write(f"`scripts/bench-quality` ({time.strftime('%Y-%m-%d')}; one run on a 2-core shared VM, no GPU). "
                f"Fashion-MNIST ({len(vectors)} images) embedded by EfficientNet-Lite0 through imagelsh's Embed RPC; "
                f"{len(queries)} held-out queries (seed 0), database {len(base)}; ground truth = exact top-10 by cosine. "
                "Queries one at a time, one thread. recall@10 against the exact top-10; p@5 = share of the top 5 "
                "with the query's class. Bytes per vector: index memory (FAISS, hnswlib) or data directory on disk "
                "(imagelsh: sled + vector file + sketch file). Build: vectors added per second (imagelsh: durable "
                "ingest). imagelsh rankings: `votes` = by votes (the notebook's); `all` = exact cosine of every "
                "candidate; `sketchN` = every candidate ranked by sketch Hamming distance, the 4N nearest re-scored by "
                "the asymmetric estimate (the query's projections against the sketch's signs), the best N of them "
                "re-ranked exactly; `estimate` = an index without stored embeddings, ranked by the sketch's estimated cosine; "
                "all of these read the LSH tables (plan TABLES). `scanN` = plan SCAN: every live item's sketch "
                "scanned, then as `sketchN` (probes then only decide the votes reported). `auto` = a "
                "gRPC query that sets nothing but top_k: the server's defaults, whose plan is in the note. "
                "Centers: `model` = the model card's (the default), `data` = mean of the database, `none`.\n\n")
        f.write("| system | configuration | recall@10 | p@5 | queries/s | × FlatIP q/s | build vectors/s | bytes/vector | note |\n")
        f.write("|---|---|---|---|---|---|---|---|---|\n")
        for m in rows:
            f.write(f"| {m['system']} | {m['config']} | {m['recall10']:.3f} | {m['precision5']:.3f} | {m['qps']:.0f} | "
                    f"{m['qps'] / flat_qps:.1f} | {m['build_per_s']:.0f} | {m['bytes_per_vector']:.0f} | {m['note']} |\n")
        f.write(rest)
    print(open(path).read().split("\n# ", 1)[0])


if __name__ == "__main__":
    main()
