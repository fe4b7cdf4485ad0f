#!/usr/bin/env python3
"""The two bulk-ingest clients side by side, in one run, against one release server with the
model: `imagelsh ingest FOLDER` (Rust) and `Client.ingest_folder` (Python, clients/python), on
the same folder of Fashion-MNIST PNGs (Debian's dataset-fashion-mnist), each into an index of
its own, in alternating rounds (the machine is shared and noisy: compare the ratio).

Also reads the server's /metrics before and after each job: the share of the job's wall time
the model spent in inference (imagelsh_inference_seconds), the figure that says whether the
client keeps the model busy.

Run it with `scripts/bench-clients` (release build, ONNX Runtime, the Python client in .venv).
"""
import argparse
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle-boot"]


def png_gray(width: int, height: int, pixels: bytes) -> bytes:
    """A greyscale 8-bit PNG (no dependency beyond zlib)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + pixels[y * width:(y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write_folder(root: str, n: int) -> str:
    """The first `n` Fashion-MNIST test images as PNGs under root/<class>/; returns the first."""
    with gzip.open(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")) as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051 or n > count:
            sys.exit(f"unexpected IDX images file (magic {magic}, {count} images)")
        images = f.read(n * rows * cols)
    with gzip.open(os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz")) as f:
        f.read(8)
        labels = f.read(n)
    for i in range(n):
        folder = os.path.join(root, CLASSES[labels[i]])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:05}.png"), "wb") as out:
            out.write(png_gray(cols, rows, images[i * rows * cols:(i + 1) * rows * cols]))
    return os.path.join(root, CLASSES[labels[0]], "00000.png")


def inference_seconds(http: str) -> float:
    text = urllib.request.urlopen(f"http://{http}/metrics", timeout=10).read().decode()
    match = re.search(r"^imagelsh_inference_seconds_sum(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "imagelsh"))
    args = parser.parse_args()

    from imagelsh import Client

    with tempfile.TemporaryDirectory(prefix="imagelsh-bench-clients-") as work:
        folder = os.path.join(work, "photos")
        first = write_folder(folder, args.images)
        server = subprocess.Popen([args.binary, "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                                   "--data-dir", os.path.join(work, "data")],
                                  cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "RUST_LOG": "warn"}, text=True)
        try:
            grpc_addr = server.stdout.readline().strip().removeprefix("imagelsh listening on ")
            http_addr = server.stdout.readline().strip().removeprefix("imagelsh http on ")
            url = f"http://{grpc_addr}"
            rows = []
            with Client(url) as client:
                # A warm-up: the model's first batch pays its start-up, outside the rounds.
                with open(first, "rb") as image:
                    client.embed([image.read()])
                for round_ in range(args.rounds):
                    for name in (["rust", "python"] if round_ % 2 == 0 else ["python", "rust"]):
                        index = f"{name}-{round_}"
                        busy_before = inference_seconds(http_addr)
                        if name == "rust":
                            out = subprocess.run([args.binary, "ingest", "--server", url, "--index", index, "--json",
                                                  "--refused-file", os.path.join(work, "refused.jsonl"), folder],
                                                 check=True, capture_output=True, text=True,
                                                 env={**os.environ, "RUST_LOG": "warn"})
                            summary = json.loads(out.stdout)
                            indexed, seconds = summary["indexed"], summary["seconds"]
                        else:
                            summary = client.ingest_folder(index, folder, progress=False)
                            indexed, seconds = summary.indexed, summary.seconds
                        busy = inference_seconds(http_addr) - busy_before
                        if indexed != args.images:
                            sys.exit(f"{name} indexed {indexed} of {args.images}")
                        rows.append((name, round_, indexed, seconds, busy))
                        print(f"{name:6} round {round_}: {indexed} images in {seconds:.1f} s "
                              f"({indexed / seconds:.1f} images/s), model busy {100 * busy / seconds:.1f} %",
                              flush=True)
        finally:
            server.terminate()
            server.wait(30)

    def total(name):
        picked = [r for r in rows if r[0] == name]
        return sum(r[2] for r in picked) / sum(r[3] for r in picked), sum(r[4] for r in picked) / sum(r[3] for r in picked)

    rust_rate, rust_busy = total("rust")
    python_rate, python_busy = total("python")
    print(f"\nover {args.rounds} rounds of {args.images} images each (defaults: 4 streams, 4 batches of 64 in flight):")
    print(f"  imagelsh ingest        {rust_rate:7.1f} images/s, model busy {100 * rust_busy:.1f} %")
    print(f"  Client.ingest_folder   {python_rate:7.1f} images/s, model busy {100 * python_busy:.1f} %")
    print(f"  Python / Rust rate     {python_rate / rust_rate:.3f}")


if __name__ == "__main__":
    main()
