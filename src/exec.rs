//! The plan executor: what a back-end that runs plans provides ([`Executor`]), implemented
//! twice — by the kernel simulator (`crate::sim::SimExec`, host buffers) and by the CUDA device
//! (`crate::cuda::CudaExec`, device buffers on one stream) — and used by the convolution API
//! ([`run_host`], the CUDA ops) and by RepLKNet's device program (`crate::model::gpu`).

use crate::dtype::Element;
use crate::error::Result;
use crate::plan::{plan, Step};
use crate::problem::Problem;
use crate::tensor::Tensor;

/// A buffer owned by an executor: its address (device or host) and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub bytes: usize,
}

/// A back-end that runs plans: buffers, copies, and the steps of a plan or a program (kernel
/// launches and GEMMs over addresses).
pub trait Executor: Send {
    /// "sim" or "cuda:N".
    fn name(&self) -> String;
    /// A new buffer of `bytes` (contents unspecified: NaN in the simulator).
    fn alloc(&mut self, bytes: usize) -> Result<Buf>;
    /// Frees every buffer allocated after the first `keep`.
    fn truncate(&mut self, keep: usize);
    /// The number of live buffers.
    fn count(&self) -> usize;
    /// Copies `data` into the start of `dst`.
    fn upload(&mut self, dst: Buf, data: &[u8]) -> Result<()>;
    /// Copies the first `bytes` of `src` to the host (waits for the queued work).
    fn download(&mut self, src: Buf, bytes: usize) -> Result<Vec<u8>>;
    /// Checks every launch against the device and loads its kernel, so that steps that cannot
    /// run fail before anything is queued.
    fn prepare(&mut self, steps: &[Step]) -> Result<()>;
    /// Queues (CUDA) or runs (simulator) the steps in order; the steps must be prepared.
    ///
    /// # Safety
    /// Every address in the steps must be memory of this back-end (device memory of its
    /// context; host memory for the simulator) that holds every element the step touches for
    /// the problem it was planned for, outputs overlapping no input unless the kernel allows it
    /// (the model's in-place epilogues), all alive until the queued work completes and not
    /// accessed through Rust references meanwhile.
    unsafe fn run(&mut self, steps: &[Step]) -> Result<()>;
    /// Milliseconds per run of `steps`: `reps` samples, each the mean of `batch` back-to-back
    /// runs between two timestamps (CUDA events on the GPU, wall time in the simulator), after
    /// one untimed run.
    ///
    /// # Safety
    /// As for [`Executor::run`].
    unsafe fn time(&mut self, steps: &[Step], reps: usize, batch: usize) -> Result<Vec<f64>>;
}

/// The bytes of a host tensor in its storage type (the device layout: little-endian).
pub fn tensor_bytes<T: Element>(t: &Tensor<T>) -> Vec<u8> {
    let v: Vec<f32> = t.data().iter().map(|x| x.to_f32()).collect();
    T::DTYPE.encode(&v)
}

/// Runs a validated problem on host tensors: plans it (so that a problem no kernel handles
/// fails before a device is touched), opens the executor, uploads the inputs, runs the plan
/// into a fresh output and workspace, and downloads the result (the simulator's `--device sim`
/// and the CLI's `--device cuda`). `inputs` are the op's two inputs in binding order
/// (fwd: x, w; dgrad: dy, w; wgrad: x, dy).
pub fn run_host<T: Element, E: Executor>(
    open: impl FnOnce() -> Result<E>,
    p: &Problem,
    inputs: [&Tensor<T>; 2],
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    debug_assert_eq!(p.dtype(), T::DTYPE);
    let mut plan = plan(p)?;
    let mut ex = open()?;
    let mut upload = |t: &Tensor<T>| -> Result<Buf> {
        let bytes = tensor_bytes(t);
        let b = ex.alloc(bytes.len())?;
        ex.upload(b, &bytes)?;
        Ok(b)
    };
    let in0 = upload(inputs[0])?;
    let in1 = upload(inputs[1])?;
    let bias = bias.map(&mut upload).transpose()?;
    let out_bytes = p.output_len() * p.dtype().size_bytes();
    let out = ex.alloc(out_bytes)?;
    let ws = match plan.workspace_bytes {
        0 => None,
        bytes => Some(ex.alloc(bytes)?),
    };
    plan.bind(
        in0.addr,
        in1.addr,
        bias.map_or(0, |b| b.addr),
        out.addr,
        ws.map_or(0, |b| b.addr),
    );
    let steps = plan.steps();
    ex.prepare(&steps)?;
    // SAFETY: every address was bound just above to a buffer of `ex`: the inputs hold the
    // tensors `p` was validated against, the output holds `p.output_len()` elements and the
    // workspace the plan's `workspace_bytes`; the output and the workspace are separate
    // buffers; `ex` owns them until it is dropped, after the download has waited for the work.
    unsafe { ex.run(&steps)? };
    let bytes = ex.download(out, out_bytes)?;
    let data = p
        .dtype()
        .decode(&bytes)
        .into_iter()
        .map(T::from_f32)
        .collect();
    Tensor::from_vec(&p.output_dims(), data)
}
