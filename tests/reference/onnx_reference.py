"""Independent reference for the embedding tests: Python onnxruntime on a tensor that imagelsh
preprocessed, and Pillow's own preprocessing of the same image for comparison.

usage: onnx_reference.py MODEL IMAGE TENSOR_F32 OUT_F32
writes, as little-endian f32: embedding(1280) ‖ logits(1000) ‖ embedding of Pillow's
preprocessing(1280) ‖ Pillow's tensor(3·224·224)
"""
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

model, image_path, tensor_path, out_path = sys.argv[1:5]
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

x = np.fromfile(tensor_path, dtype="<f4").reshape(1, 3, 224, 224)
embedding, logits = session.run(["embedding", "logits"], {"image": x})

image = Image.open(image_path).convert("RGB")
w, h = image.size
scale = 256 / min(w, h)
image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
left, top = (image.width - 224) // 2, (image.height - 224) // 2
image = image.crop((left, top, left + 224, top + 224))
y = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
(embedding_pil,) = session.run(["embedding"], {"image": y})

np.concatenate([embedding[0], logits[0], embedding_pil[0], y.ravel()]).astype("<f4").tofile(out_path)
