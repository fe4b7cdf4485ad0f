"""imagelsh end to end against raw ONNX Runtime, in one run: the GPU benchmark (scripts/bench-gpu).

On each device (CUDA when a GPU and a CUDA build of ONNX Runtime are at hand, and the CPU):
  1. raw ONNX Runtime (benches/raw_ort.py): images/s of the model alone, batch 64 (and 8);
  2. `imagelsh serve` with its defaults, and `imagelsh ingest` with its defaults, on N JPEG
     photos of 500x375: images/s, the model's busy share and mean batch from /metrics, every
     batch's time from the server's log (median and slowest after warm-up), start -> ready and
     start -> first batch, the server's peak RSS, and GPU utilisation (nvidia-smi) meanwhile;
  3. with both devices: the CPU/CUDA agreement of embeddings (cosine, `imagelsh bench-model
     --embeddings-out`) and of query answers (top-10 overlap of the two servers).
It prints each figure and the ratio end to end / raw, writes them all as JSON, and exits 1 when
a ratio falls below --min-ratio (CI runs the CPU form on a small N with half the target).
"""

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*parts):
    print(*parts, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The photos: N JPEGs of 500x375 (q90), random crops and flips of real photos.

_SOURCES: list = []


def _make_photo(job):
    index, out = job
    from PIL import Image

    rng = random.Random(index)
    src = _SOURCES[index % len(_SOURCES)]
    image = Image.open(src).convert("RGB")
    w, h = image.size
    scale = rng.uniform(0.7, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    folder = os.path.join(out, f"g{index % 16:02d}")
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, f"{index:07d}.jpg"), quality=90)


def usable_photo(path: str) -> bool:
    """A colour photo that decodes whole and is large enough to crop."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.mode in ("RGB", "RGBA", "P", "CMYK") and min(image.size) >= 128
    except Exception:
        return False


def make_photos(patterns: list, out: str, count: int, first: int = 0) -> int:
    global _SOURCES
    _SOURCES = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    _SOURCES = [p for p in _SOURCES if p.lower().endswith((".jpg", ".jpeg", ".png")) and usable_photo(p)]
    if not _SOURCES:
        raise SystemExit(f"no photos match {patterns}")
    with Pool(os.cpu_count()) as pool:
        pool.map(_make_photo, [(i, out) for i in range(first, first + count)], chunksize=64)
    return len(_SOURCES)


# ---------------------------------------------------------------------------------------------
# A server of our own, its metrics and its log.


class Server:
    def __init__(self, binary, device, ort_lib, work, name, extra=()):
        self.grpc, self.http = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.grpc}"
        self.data = os.path.join(work, f"data-{name}")
        self.log_path = os.path.join(work, f"server-{name}.log")
        env = dict(os.environ, RUST_LOG="info,sled=warn,ort=warn,imagelsh::pipeline::batcher=debug",
                   ORT_DYLIB_PATH=ort_lib)
        self.started = time.time()
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [binary, "--log-format", "json", "serve", "--device", device, "--data-dir", self.data,
             "--listen", f"127.0.0.1:{self.grpc}", "--http-listen", f"127.0.0.1:{self.http}", *extra],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.ready_seconds = None

    def wait_ready(self, timeout: float) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}:\n"
                                   + open(self.log_path).read()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=1) as r:
                    if r.status == 200:
                        self.ready_seconds = time.time() - self.started
                        return self.ready_seconds
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s; see {self.log_path}")

    def metrics(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
            if m:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
        return values

    def peak_rss_mb(self) -> float:
        try:
            for line in open(f"/proc/{self.process.pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def batches(self):
        """(seconds since start, rows, size, ms) of every batch the log reports."""
        found = []
        for line in open(self.log_path):
            if '"batch ran"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            fields = event.get("fields", {})
            stamp = event.get("timestamp", "")
            found.append((stamp, fields.get("rows"), fields.get("size"), fields.get("ms")))
        return found

    def settings(self) -> dict:
        for line in open(self.log_path):
            if "inference settings" in line:
                try:
                    return json.loads(line).get("fields", {})
                except ValueError:
                    pass
        return {}

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def iso_seconds(stamp: str) -> float:
    # 2026-12-04T18:38:28.726049Z
    from datetime import datetime, timezone

    stamp = stamp.rstrip("Z")
    if "." in stamp:
        head, frac = stamp.split(".")
        stamp = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()


class GpuSampler(threading.Thread):
    """nvidia-smi's utilisation every 200 ms while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop_event = [], threading.Event()

    def run(self):
        try:
            proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                     "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        while not self.stop_event.is_set():
            line = proc.stdout.readline()
            if not line:
                break
            try:
                util, mem = (float(x) for x in line.split(","))
                self.samples.append((util, mem))
            except ValueError:
                pass
        proc.terminate()


def raw_anchor(python, provider, batches, seconds, timeout, model):
    cmd = [python, os.path.join(ROOT, "benches", "raw_ort.py"), "--model", model, "--provider", provider,
           "--batches", batches, "--seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(out.stderr[-2000:])
    if out.returncode != 0:
        raise RuntimeError(f"raw anchor failed: {out.stdout[-500:]} {out.stderr[-1500:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["host"] = {int(k): v for k, v in result["host"].items()}
    result["iobinding"] = {int(k): v for k, v in result["iobinding"].items()}
    return result


def ingest(binary, server, index, folder, timeout, extra=()):
    cmd = [binary, "ingest", "--server", server.url, "--index", index, "--json",
           "--refused-file", os.path.join(os.path.dirname(server.data), f"refused-{index}.jsonl"), *extra, folder]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"ingest failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(args, device, images, count, work, gpu):
    log(f"== imagelsh end to end, --device {device}: serve and ingest with their defaults, {count} JPEGs")
    server = Server(args.imagelsh, device, args.ort_lib, work, device, args.serve_args)
    try:
        ready = server.wait_ready(args.start_timeout)
        before = server.metrics()
        sampler = GpuSampler() if gpu else None
        if sampler:
            sampler.start()
        started = time.time()
        summary = ingest(args.imagelsh, server, "bench", images, args.ingest_timeout, args.ingest_args)
        wall = time.time() - started
        if sampler:
            sampler.stop_event.set()
        after = server.metrics()
        batches = server.batches()
        result = {
            "device": device,
            "images": summary["indexed"],
            "refused": summary["refused"],
            "seconds": summary["seconds"],
            "images_per_s": summary["indexed"] / summary["seconds"],
            "start_to_ready_s": ready,
            "settings": server.settings(),
            "peak_rss_mb": server.peak_rss_mb(),
        }
        busy = after.get("imagelsh_model_busy_seconds_total", 0) - before.get("imagelsh_model_busy_seconds_total", 0)
        n_batches = after.get("imagelsh_inference_batch_images_count", 0) - before.get("imagelsh_inference_batch_images_count", 0)
        rows = after.get("imagelsh_inference_batch_images_sum", 0) - before.get("imagelsh_inference_batch_images_sum", 0)
        padded = after.get("imagelsh_inference_padded_rows_total", 0) - before.get("imagelsh_inference_padded_rows_total", 0)
        result.update({"model_busy_share": busy / wall if wall else 0, "batches": n_batches,
                       "mean_batch": rows / n_batches if n_batches else 0, "padded_rows": padded})
        if batches:
            times = [b[3] for b in batches if b[3] is not None]
            warm = times[len(times) // 10:] if len(times) >= 20 else times
            median = statistics.median(warm)
            result.update({"batch_ms_median": median, "batch_ms_slowest": max(warm),
                           "slowest_over_median": max(warm) / median if median else 0,
                           "start_to_first_batch_s": iso_seconds(batches[0][0]) - server.started})
        if sampler and sampler.samples:
            utils = [u for u, _ in sampler.samples]
            busy_utils = utils[len(utils) // 10:] or utils
            result.update({"gpu_util_mean": statistics.mean(busy_utils), "gpu_mem_mb_max": max(m for _, m in sampler.samples)})
        log(json.dumps(result))
        return result, server
    except Exception:
        server.stop()
        raise


def query_answers(binary, server, index, queries, timeout):
    answers = {}
    for path in queries:
        out = subprocess.run([binary, "query", "--server", server.url, "--index", index, "--top-k", "10", "--json", path],
                             capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if out.returncode == 0:
            answers[path] = json.loads(out.stdout)["hits"]
    return answers


def embeddings(binary, device, ort_lib, photos, out, timeout):
    env = dict(os.environ, ORT_DYLIB_PATH=ort_lib, RUST_LOG="warn")
    cmd = [binary, "bench-model", "--device", device, "--seconds", "0.2", "--sizes", "1", "--json",
           "--embeddings-out", out, *sum((["--images", p] for p in photos), [])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"bench-model --embeddings-out failed: {res.stderr[-1500:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imagelsh", default=os.path.join(ROOT, "target", "release", "imagelsh"))
    parser.add_argument("--ort-lib", required=True, help="libonnxruntime.so.* for the servers")
    parser.add_argument("--python", default=sys.executable, help="a Python whose onnxruntime is the anchor")
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "efficientnet_lite0.onnx"))
    parser.add_argument("--photos", action="append", required=True, help="glob of real photos (repeatable)")
    parser.add_argument("--images", type=int, default=20000, help="JPEGs for the GPU run")
    parser.add_argument("--cpu-images", type=int, default=2000, help="JPEGs for the CPU run and the agreement")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--devices", default="auto", help="auto (cuda when there is a GPU, and cpu), cuda, cpu")
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--start-timeout", type=float, default=180)
    parser.add_argument("--ingest-timeout", type=float, default=600)
    parser.add_argument("--min-ratio", type=float, default=0.0, help="exit 1 below this end-to-end/raw ratio")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[], help="extra serve flag")
    parser.add_argument("--ingest-arg", dest="ingest_args", action="append", default=[], help="extra ingest flag")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="write every figure here (JSON)")
    args = parser.parse_args()

    gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    devices = {"auto": ["cuda", "cpu"] if gpu else ["cpu"], "cuda": ["cuda"], "cpu": ["cpu"]}[args.devices]
    work = args.work or tempfile.mkdtemp(prefix="imagelsh-bench-gpu-")
    os.makedirs(work, exist_ok=True)
    results = {"gpu": None, "devices": devices, "cores": os.cpu_count()}
    if gpu:
        results["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    log(f"machine: {os.cpu_count()} cores; GPU: {results['gpu'] or 'none'}; devices: {', '.join(devices)}")

    started = time.time()
    big = "cuda" in devices
    count = args.images if big else args.cpu_images
    images = os.path.join(work, "images")
    sources = make_photos(args.photos, images, count)
    agree_dir = os.path.join(work, "agree")
    make_photos(args.photos, agree_dir, min(args.cpu_images, count))
    query_dir = os.path.join(work, "queries")
    make_photos(args.photos, query_dir, args.queries, first=10_000_000)
    log(f"{count} JPEGs (500x375) from {sources} photos in {time.time() - started:.1f} s")

    failures = []
    servers = {}
    try:
        for device in devices:
            log(f"== raw ONNX Runtime, {device}")
            raw = raw_anchor(args.python, device, "8,64", args.raw_seconds, 300, args.model)
            results[f"raw_{device}"] = raw
            n = count if device == "cuda" else args.cpu_images
            folder = images if n == count else agree_dir
            e2e, server = end_to_end(args, device, folder, n, work, gpu and device == "cuda")
            servers[device] = server
            results[f"e2e_{device}"] = e2e
            anchor = raw["host"][64]
            ratio = e2e["images_per_s"] / anchor
            results[f"ratio_{device}"] = ratio
            log(f"RESULT {device}: end to end {e2e['images_per_s']:.0f} images/s, raw batch 64 {anchor:.0f} "
                f"(batch 8 {raw['host'][8]:.0f}{', IO binding ' + format(raw['iobinding'].get(64, 0), '.0f') if raw['iobinding'] else ''}) "
                f"-> ratio {ratio:.2f}; model busy {100 * e2e['model_busy_share']:.0f} %, mean batch {e2e['mean_batch']:.1f}"
                + (f", GPU util {e2e['gpu_util_mean']:.0f} %" if "gpu_util_mean" in e2e else "")
                + (f", batch median {e2e['batch_ms_median']:.1f} ms, slowest {e2e['batch_ms_slowest']:.1f} ms" if "batch_ms_median" in e2e else "")
                + f", start -> ready {e2e['start_to_ready_s']:.1f} s"
                + (f", -> first batch {e2e['start_to_first_batch_s']:.1f} s" if "start_to_first_batch_s" in e2e else "")
                + f", peak RSS {e2e['peak_rss_mb']:.0f} MB")
            if ratio < args.min_ratio:
                failures.append(f"{device}: end to end {ratio:.2f}x raw, below {args.min_ratio}")
        if "cuda" in servers and "cpu" in servers:
            log("== agreement of the CUDA and CPU servers")
            ingest(args.imagelsh, servers["cuda"], "agree", agree_dir, args.ingest_timeout)
            queries = sorted(glob.glob(os.path.join(query_dir, "*", "*.jpg")))
            answers = {d: query_answers(args.imagelsh, servers[d], d == "cpu" and "bench" or "agree", queries, 60)
                       for d in ("cpu", "cuda")}
            same = total = 0
            sim_diff = 0.0
            for q in queries:
                cpu_hits, gpu_hits = answers["cpu"].get(q, []), answers["cuda"].get(q, [])
                cpu_ids = {h["id"]: h["similarity"] for h in cpu_hits}
                same += len(cpu_ids.keys() & {h["id"] for h in gpu_hits})
                total += max(len(cpu_hits), 1)
                sim_diff = max([sim_diff] + [abs(h["similarity"] - cpu_ids[h["id"]]) for h in gpu_hits if h["id"] in cpu_ids])
            results["query_overlap"] = same / total if total else 0
            results["query_max_similarity_diff"] = sim_diff
            photos = sorted(glob.glob(os.path.join(agree_dir, "*", "*.jpg")))[:64]
            for device in ("cpu", "cuda"):
                embeddings(args.imagelsh, device, args.ort_lib, photos, os.path.join(work, f"emb-{device}.f32"), 300)
            import numpy as np

            a = np.fromfile(os.path.join(work, "emb-cpu.f32"), dtype="<f4").reshape(len(photos), -1)
            b = np.fromfile(os.path.join(work, "emb-cuda.f32"), dtype="<f4").reshape(len(photos), -1)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            results["embedding_cosine_min"] = float(cos.min())
            results["embedding_cosine_mean"] = float(cos.mean())
            log(f"RESULT agreement: embeddings cosine min {cos.min():.6f} mean {cos.mean():.6f}; "
                f"query top-10 overlap {results['query_overlap']:.3f} ({same}/{total}), max |similarity diff| {sim_diff:.2g}")
    finally:
        for server in servers.values():
            server.stop()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        log(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
