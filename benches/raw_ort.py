"""The raw ONNX Runtime anchor of scripts/bench-gpu: images/s of the model alone, from Python's
onnxruntime with its default session options, on float32 batches already preprocessed.

    python benches/raw_ort.py --model models/efficientnet_lite0.onnx --provider cuda --batches 8,64

For each batch size: the input from host memory (what a plain client of ONNX Runtime gets),
and on CUDA with IO binding (the input already on the GPU: the device's own limit). One JSON
object on stdout.
"""

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def rate(run, batch: int, seconds: float) -> float:
    for _ in range(3):
        run()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 3:
        run()
        runs += 1
    return runs * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--provider", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--batches", default="64", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args()

    providers = ["CUDAExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(json.dumps({"error": f"onnxruntime {ort.__version__} has no CUDA provider"}))
        return 2
    started = time.perf_counter()
    session = ort.InferenceSession(args.model, providers=providers)
    result = {
        "onnxruntime": ort.__version__,
        "provider": session.get_providers()[0],
        "session_seconds": time.perf_counter() - started,
        "host": {},
        "iobinding": {},
    }
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(7)
    for batch in [int(b) for b in args.batches.split(",") if b]:
        x = rng.random((batch, 3, 224, 224), dtype=np.float32)
        result["host"][batch] = rate(lambda: session.run(["embedding"], {name: x}), batch, args.seconds)
        print(f"raw {args.provider} batch {batch}: {result['host'][batch]:.0f} images/s (host input)", file=sys.stderr)
        if args.provider == "cuda":
            on_gpu = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            binding = session.io_binding()
            binding.bind_ortvalue_input(name, on_gpu)
            binding.bind_output("embedding", "cuda")
            result["iobinding"][batch] = rate(lambda: session.run_with_iobinding(binding), batch, args.seconds)
            print(f"raw cuda batch {batch}: {result['iobinding'][batch]:.0f} images/s (input on the GPU)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
