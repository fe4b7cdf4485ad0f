//! A batch of model inputs in the memory the model reads: page-locked host memory on CUDA (the
//! copy to the device is one DMA, no staging copy), ordinary memory on the CPU. The batcher
//! fills one while the model runs another.

use ort::value::Tensor;

pub struct InputBatch {
    storage: Storage,
    size: usize,
    row_len: usize,
}

enum Storage {
    /// Allocated by ONNX Runtime (pinned for CUDA), bound to a session as it is.
    Ort(Tensor<f32>),
    /// Plain memory, for embedders that are not ONNX Runtime sessions.
    Host(Vec<f32>),
}

impl InputBatch {
    /// `tensor` holds `size` rows of `row_len` values; it is zeroed here, so that padded rows
    /// are finite values from the start.
    pub(crate) fn ort(mut tensor: Tensor<f32>, size: usize, row_len: usize) -> Self {
        tensor.extract_tensor_mut().1.fill(0.0);
        Self { storage: Storage::Ort(tensor), size, row_len }
    }

    /// A batch in ordinary memory.
    pub fn host(size: usize, row_len: usize) -> Self {
        Self { storage: Storage::Host(vec![0f32; size * row_len]), size, row_len }
    }

    /// Rows the model runs on (the batch shape).
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Every row, back to back.
    pub fn values(&self) -> &[f32] {
        match &self.storage {
            Storage::Ort(tensor) => tensor.extract_tensor().1,
            Storage::Host(values) => values,
        }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Ort(tensor) => tensor.extract_tensor_mut().1,
            Storage::Host(values) => values,
        }
    }

    /// Row `row`, to be filled with one image's input.
    pub fn row_mut(&mut self, row: usize) -> &mut [f32] {
        let len = self.row_len;
        &mut self.values_mut()[row * len..][..len]
    }

    /// Row `row`.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.values()[row * self.row_len..][..self.row_len]
    }

    /// The ONNX Runtime tensor, when the batch lives in one.
    pub(crate) fn tensor(&self) -> Option<&Tensor<f32>> {
        match &self.storage {
            Storage::Ort(tensor) => Some(tensor),
            Storage::Host(_) => None,
        }
    }
}
