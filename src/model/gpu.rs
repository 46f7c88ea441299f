//! RepLKNet's forward pass resident on a device: the deploy-form layer sequence written once as
//! a program of steps (kernel launches and GEMMs over device addresses), run by one of two
//! back-ends behind the [`Exec`] trait:
//! - **CUDA**: weights uploaded once, activations in four pre-allocated buffers reused across
//!   layers, the depthwise layers on lkconv's tiled kernels (planned by `crate::plan::plan`,
//!   the same plans as `crate::cuda::forward`, with bias), the 1x1 convs and the head's linear
//!   layer as cuBLAS strided-batched GEMMs (per image `Y[Cout x HW] = W[Cout x Cin] X[Cin x
//!   HW]`, batched over N with W shared; f32 accumulation, no TF32), and the element-wise
//!   epilogues, the stem's dense conv and the head's pooling as the small kernels of
//!   `kernels/lk_model.cu`. Everything is queued on one stream; the host waits only for the
//!   final copies out.
//! - **Sim**: the same launches in the kernel simulator, on host buffers (poisoned with NaN when
//!   allocated, so that a read of something never written shows up), the GEMMs on the host
//!   (`crate::cpu::gemm::sgemm`, half-precision operands widened to f32 and the result rounded
//!   back, as cuBLAS does with f32 compute).
//!
//! Storage is f32 (the default) or, for benchmarks, bf16 / f16 end to end (weights,
//! activations, residual stream; arithmetic always in f32).

use std::collections::HashMap;

use super::deploy::{dims_of, Block, DeployModel, Depthwise, Dims, Output, Pointwise};
use crate::cuda::CudaExec;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::{Buf, Executor};
use crate::op::{Impl, Op};
use crate::plan::model::{affine_launch, avgpool_launch, bias_act_launch, dense_conv_launch};
use crate::plan::{plan, Gemm, Launch, ModelAct, Step};
use crate::problem::Problem;
use crate::sim::SimExec;
use crate::tensor::Tensor;

/// `C_i[m x n] = A[m x k] * B_i[k x n]` for `i < batch`, row-major and contiguous, `A` shared
/// by every batch entry (the 1x1 convs per image, the head's linear layer).
fn shared_a_gemm(dtype: DType, [m, k, n, batch]: [usize; 4], [a, b, c]: [u64; 3]) -> Gemm {
    Gemm {
        dtype,
        batch,
        m,
        n,
        k,
        a,
        lda: k,
        stride_a: 0,
        a_trans: false,
        b,
        ldb: n,
        stride_b: k * n,
        b_trans: false,
        c,
        ldc: n,
        stride_c: m * n,
    }
}

// ---- the program: the layer sequence, written once --------------------------------------------

/// Where a model runs on the device path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuTarget {
    /// The kernel simulator (small inputs).
    Sim,
    /// CUDA GPU `ordinal`.
    Cuda(usize),
}

/// A program bound to buffers for one input size and one set of requested outputs.
struct Program {
    key: (Dims, Vec<usize>, bool),
    /// Buffers allocated for this program start at this executor count.
    first_buf: usize,
    input: Buf,
    stages: Vec<(usize, Buf, Dims)>,
    /// `[classes x N]` logits (transposed) and (N, classes).
    logits: Option<(Buf, usize, usize)>,
    steps: Vec<Step>,
}

/// A deploy-form model resident on a device (weights uploaded once) with its last program.
pub struct GpuModel {
    target: GpuTarget,
    dtype: DType,
    exec: Box<dyn Executor>,
    fingerprint: Vec<(usize, usize, u32, u32)>,
    weights: Buf,
    /// (host address, length) of each weight array -> element offset in `weights`.
    offsets: HashMap<(usize, usize), usize>,
    prog: Option<Program>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("device", &self.exec.name())
            .field("dtype", &self.dtype)
            .field("weight_bytes", &self.weights.bytes)
            .field("steps", &self.prog.as_ref().map_or(0, |p| p.steps.len()))
            .finish()
    }
}

/// Every weight array of the deploy form, in a fixed order.
fn weight_arrays(m: &DeployModel) -> Vec<&[f32]> {
    let mut v: Vec<&[f32]> = Vec::new();
    let st = &m.stem;
    v.extend([&st.conv0.w[..], &st.conv0.b[..]]);
    v.extend([
        &st.conv1.w[..],
        &st.conv1.b[..],
        &st.conv2.w[..],
        &st.conv2.b[..],
    ]);
    v.extend([&st.conv3.w[..], &st.conv3.b[..]]);
    for stage in &m.stages {
        for b in &stage.blocks {
            match b {
                Block::RepLk(b) => v.extend([
                    &b.pw1.w[..],
                    &b.pw1.b[..],
                    &b.lk.w[..],
                    &b.lk.b[..],
                    &b.pw2.w[..],
                    &b.pw2.b[..],
                ]),
                Block::Ffn(b) => v.extend([&b.pw1.w[..], &b.pw1.b[..], &b.pw2.w[..], &b.pw2.b[..]]),
            }
        }
        if let Some(n) = &stage.norm {
            v.extend([&n.scale[..], &n.shift[..]]);
        }
    }
    for t in &m.transitions {
        v.extend([&t.pw.w[..], &t.pw.b[..], &t.dw.w[..], &t.dw.b[..]]);
    }
    if let Some(h) = &m.head {
        v.extend([&h.norm.scale[..], &h.norm.shift[..], &h.w[..], &h.b[..]]);
    }
    v
}

fn fingerprint(m: &DeployModel) -> Vec<(usize, usize, u32, u32)> {
    weight_arrays(m)
        .iter()
        .map(|a| {
            let first = a.first().map_or(0, |v| v.to_bits());
            let last = a.last().map_or(0, |v| v.to_bits());
            (a.as_ptr() as usize, a.len(), first, last)
        })
        .collect()
}

/// Appends program steps; resolves weight addresses.
struct Builder<'a> {
    dt: DType,
    steps: Vec<Step>,
    weights: Buf,
    offsets: &'a HashMap<(usize, usize), usize>,
}

impl Builder<'_> {
    fn w(&self, a: &[f32]) -> Result<u64> {
        let off = self
            .offsets
            .get(&(a.as_ptr() as usize, a.len()))
            .ok_or_else(|| Error::InvalidArgument("a weight array was not uploaded".into()))?;
        Ok(self.weights.addr + (self.dt.size_bytes() * *off) as u64)
    }

    fn launch(&mut self, mut l: Launch, in0: u64, in1: u64, bias: u64, out: u64) {
        l.args.in0 = in0;
        l.args.in1 = in1;
        l.args.bias = bias;
        l.args.out = out;
        l.args.workspace = 0;
        self.steps.push(Step::Kernel(l));
    }

    /// `y = act(y + bias) + res` over `d` (in place on `y`; `res` 0 for none).
    fn bias_act(&mut self, y: u64, d: Dims, bias: u64, act: ModelAct, res: u64) -> Result<()> {
        let l = bias_act_launch(self.dt, [d.n, d.c, d.h, d.w], act)?;
        self.launch(l, y, res, bias, y);
        Ok(())
    }

    /// `y = act(W x + b)` for a 1x1 conv; with `res`, `res += W x + b` written into `res`
    /// (through `y` as scratch).
    fn pointwise(
        &mut self,
        p: &Pointwise,
        x: u64,
        d: Dims,
        y: u64,
        act: ModelAct,
        res: Option<u64>,
    ) -> Result<Dims> {
        if d.c != p.cin {
            return Err(Error::shape(
                "1x1 conv input",
                format!("{} channels", p.cin),
                &d.to_vec(),
            ));
        }
        let hw = d.hw();
        self.steps.push(Step::Gemm(shared_a_gemm(
            self.dt,
            [p.cout, p.cin, hw, d.n],
            [self.w(&p.w)?, x, y],
        )));
        let od = Dims { c: p.cout, ..d };
        let b = self.w(&p.b)?;
        match res {
            None => self.bias_act(y, od, b, act, 0)?,
            Some(r) => {
                let l = bias_act_launch(self.dt, [od.n, od.c, od.h, od.w], act)?;
                self.launch(l, y, r, b, r);
            }
        }
        Ok(od)
    }

    /// `y = act(dwconv(x) + b)` on the tiled depthwise kernels.
    fn depthwise(&mut self, l: &Depthwise, x: u64, d: Dims, y: u64, act: ModelAct) -> Result<Dims> {
        if d.c != l.c {
            return Err(Error::shape(
                "depthwise layer input",
                format!("{} channels", l.c),
                &d.to_vec(),
            ));
        }
        let conv = l.conv();
        let problem = Problem::for_input(Op::Forward, Impl::Fast, self.dt, &conv, d.to_array())?;
        let shape = *problem.shape();
        let mut plan = plan(&problem)?;
        if plan.workspace_bytes > 0 || plan.gemm.is_some() {
            return Err(Error::Unsupported(
                "depthwise forward plan needs a workspace".into(),
            ));
        }
        plan.bind(x, self.w(&l.w)?, self.w(&l.b)?, y, 0);
        self.steps.extend(plan.steps());
        let od = Dims {
            h: shape.oh,
            w: shape.ow,
            ..d
        };
        if act != ModelAct::None {
            self.bias_act(y, od, 0, act, 0)?;
        }
        Ok(od)
    }
}

/// The largest activation (elements) anywhere in the forward pass for input `d`.
fn max_activation(m: &DeployModel, d: Dims) -> Result<usize> {
    let (oh, ow) = m.stem.conv0.out_hw(d.h, d.w)?;
    let d0 = Dims {
        n: d.n,
        c: m.stem.conv0.cout,
        h: oh,
        w: ow,
    };
    let mut cap = d0.len().max(
        Dims {
            c: m.stem.conv2.cout,
            ..d0
        }
        .len(),
    );
    let mut d = m.stem.conv3.out_dims(d0)?;
    for (s, stage) in m.stages.iter().enumerate() {
        cap = cap.max(d.len());
        for b in &stage.blocks {
            let inner = match b {
                Block::RepLk(b) => b.pw1.cout,
                Block::Ffn(b) => b.pw1.cout,
            };
            cap = cap.max(Dims { c: inner, ..d }.len());
        }
        if let Some(t) = m.transitions.get(s) {
            let mid = Dims { c: t.pw.cout, ..d };
            cap = cap.max(mid.len());
            d = t.dw.out_dims(mid)?;
        }
    }
    Ok(cap)
}

impl GpuModel {
    /// Uploads the deploy-form weights to the target (once), stored as `dtype`; activations
    /// are stored as `dtype` too (f32 for results comparable with the CPU engine).
    pub fn new(m: &DeployModel, target: GpuTarget, dtype: DType) -> Result<Self> {
        let mut exec: Box<dyn Executor> = match target {
            GpuTarget::Sim => Box::new(SimExec::new()?),
            GpuTarget::Cuda(i) => Box::new(CudaExec::new(i)?),
        };
        let mut offsets = HashMap::new();
        let mut packed: Vec<f32> = Vec::new();
        for a in weight_arrays(m) {
            offsets
                .entry((a.as_ptr() as usize, a.len()))
                .or_insert_with(|| {
                    // 128-element (256-byte or more) alignment for every array
                    let off = packed.len().next_multiple_of(128);
                    packed.resize(off, 0.0);
                    packed.extend_from_slice(a);
                    off
                });
        }
        let bytes = dtype.encode(&packed);
        drop(packed);
        let weights = exec.alloc(bytes.len())?;
        exec.upload(weights, &bytes)?;
        Ok(GpuModel {
            target,
            dtype,
            exec,
            fingerprint: fingerprint(m),
            weights,
            offsets,
            prog: None,
        })
    }

    /// Where it runs.
    pub fn target(&self) -> GpuTarget {
        self.target
    }

    /// The storage type of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when this holds `m`'s weights (same arrays, same values at their ends).
    pub fn holds(&self, m: &DeployModel) -> bool {
        self.fingerprint == fingerprint(m)
    }

    /// Builds (or reuses) the program for input `d` and the requested outputs.
    fn program(
        &mut self,
        m: &DeployModel,
        d: Dims,
        indices: &[usize],
        want_logits: bool,
    ) -> Result<()> {
        let key = (d, indices.to_vec(), want_logits);
        if self.prog.as_ref().is_some_and(|p| p.key == key) {
            return Ok(());
        }
        if let Some(p) = self.prog.take() {
            self.exec.truncate(p.first_buf);
        }
        let first_buf = self.exec.count();
        let r = self.build(m, d, indices, want_logits, first_buf);
        match r {
            Ok(p) => {
                self.prog = Some(p);
                Ok(())
            }
            Err(e) => {
                self.exec.truncate(first_buf);
                Err(e)
            }
        }
    }

    fn build(
        &mut self,
        m: &DeployModel,
        d: Dims,
        indices: &[usize],
        want_logits: bool,
        first_buf: usize,
    ) -> Result<Program> {
        let d_in = d;
        let dt = self.dtype;
        let es = dt.size_bytes();
        let cap = max_activation(m, d)?
            .checked_mul(es)
            .ok_or_else(|| Error::Overflow("activation buffer".into()))?;
        let ex = &mut self.exec;
        let input = ex.alloc(d.len() * es)?;
        let (ba, bb, t1, t2) = (
            ex.alloc(cap)?,
            ex.alloc(cap)?,
            ex.alloc(cap)?,
            ex.alloc(cap)?,
        );
        let mut bl = Builder {
            dt,
            steps: Vec::new(),
            weights: self.weights,
            offsets: &self.offsets,
        };
        // Stem: dense 3x3/2 + ReLU, dw 3x3 + ReLU, 1x1 + ReLU, dw 3x3/2 + ReLU.
        let st = &m.stem;
        let c0 = &st.conv0;
        let l = dense_conv_launch(dt, [d.n, d.c, d.h, d.w], c0.shape(), ModelAct::Relu)?;
        let (oh, ow) = c0.out_hw(d.h, d.w)?;
        bl.launch(l, input.addr, bl.w(&c0.w)?, bl.w(&c0.b)?, ba.addr);
        let d0 = Dims {
            n: d.n,
            c: c0.cout,
            h: oh,
            w: ow,
        };
        let d1 = bl.depthwise(&st.conv1, ba.addr, d0, bb.addr, ModelAct::Relu)?;
        let d2 = bl.pointwise(&st.conv2, bb.addr, d1, ba.addr, ModelAct::Relu, None)?;
        let mut d = bl.depthwise(&st.conv3, ba.addr, d2, bb.addr, ModelAct::Relu)?;
        let cur = bb.addr;
        let ns = m.stages.len();
        let last_needed = if want_logits {
            ns - 1
        } else {
            indices.iter().copied().max().unwrap_or(0)
        };
        let mut stage_bufs = Vec::new();
        for (s, stage) in m.stages.iter().enumerate() {
            if d.c != m.config.channels[s] {
                return Err(Error::shape(
                    format!("stage {s} input"),
                    format!("{} channels", m.config.channels[s]),
                    &d.to_vec(),
                ));
            }
            for block in &stage.blocks {
                match block {
                    Block::RepLk(b) => {
                        let di = bl.pointwise(&b.pw1, cur, d, t1.addr, ModelAct::Relu, None)?;
                        bl.depthwise(&b.lk, t1.addr, di, t2.addr, ModelAct::Relu)?;
                        bl.pointwise(&b.pw2, t2.addr, di, t1.addr, ModelAct::None, Some(cur))?;
                    }
                    Block::Ffn(b) => {
                        let di = bl.pointwise(&b.pw1, cur, d, t1.addr, ModelAct::Gelu, None)?;
                        bl.pointwise(&b.pw2, t1.addr, di, t2.addr, ModelAct::None, Some(cur))?;
                    }
                }
            }
            if indices.contains(&s) {
                let out = ex.alloc(d.len() * es)?;
                let l = affine_launch(dt, [d.n, d.c, d.h, d.w])?;
                let (scale, shift) = match &stage.norm {
                    Some(n) => (bl.w(&n.scale)?, bl.w(&n.shift)?),
                    None => (0, 0),
                };
                bl.launch(l, cur, scale, shift, out.addr);
                stage_bufs.push((s, out, d));
            }
            if s == last_needed {
                break;
            }
            if let Some(t) = m.transitions.get(s) {
                let mid = bl.pointwise(&t.pw, cur, d, t1.addr, ModelAct::Relu, None)?;
                d = bl.depthwise(&t.dw, t1.addr, mid, cur, ModelAct::Relu)?;
            }
        }
        let logits = if want_logits {
            let head = m
                .head
                .as_ref()
                .ok_or_else(|| Error::Unsupported("the model has no head".into()))?;
            let feat = ex.alloc(d.n * d.c * es)?;
            let out = ex.alloc(d.n * head.classes * es)?;
            let l = avgpool_launch(dt, [d.n, d.c, d.h, d.w], true)?;
            bl.launch(
                l,
                cur,
                bl.w(&head.norm.scale)?,
                bl.w(&head.norm.shift)?,
                feat.addr,
            );
            // logits^T [classes x N] = W [classes x C] * feat^T [C x N]
            bl.steps.push(Step::Gemm(shared_a_gemm(
                dt,
                [head.classes, d.c, d.n, 1],
                [bl.w(&head.w)?, feat.addr, out.addr],
            )));
            let hb = bl.w(&head.b)?;
            bl.bias_act(
                out.addr,
                Dims {
                    n: 1,
                    c: head.classes,
                    h: 1,
                    w: d.n,
                },
                hb,
                ModelAct::None,
                0,
            )?;
            Some((out, d.n, head.classes))
        } else {
            None
        };
        let steps = bl.steps;
        ex.prepare(&steps)?;
        Ok(Program {
            key: (d_in, indices.to_vec(), want_logits),
            first_buf,
            input,
            stages: stage_bufs,
            logits,
            steps,
        })
    }

    /// Runs the forward pass (the model must be the one uploaded: see [`GpuModel::holds`]).
    pub fn run(
        &mut self,
        m: &DeployModel,
        x: &Tensor<f32>,
        indices: &[usize],
        want_logits: bool,
    ) -> Result<Output> {
        self.load_input(m, x, indices, want_logits)?;
        let p = self.prog.as_ref().expect("built by load_input");
        let dt = self.dtype;
        let es = dt.size_bytes();
        // SAFETY: every address in the program was bound by `build` to a buffer of this
        // executor (the packed weights, the input, the four activation buffers, the outputs)
        // sized for the layer's problem; `program` rebuilds the program whenever the input
        // size or the requested outputs change, and the buffers live as long as the program.
        unsafe { self.exec.run(&p.steps)? };
        let mut stages = Vec::new();
        for &(s, buf, sd) in &p.stages {
            let v = dt.decode(&self.exec.download(buf, sd.len() * es)?);
            stages.push((s, Tensor::from_vec(&sd.to_vec(), v)?));
        }
        let stages = indices
            .iter()
            .filter_map(|&i| stages.iter().find(|(s, _)| *s == i).cloned())
            .collect();
        let logits = match p.logits {
            Some((buf, n, classes)) => {
                let t = dt.decode(&self.exec.download(buf, n * classes * es)?);
                let mut v = vec![0f32; n * classes];
                for j in 0..classes {
                    for i in 0..n {
                        v[i * classes + j] = t[j * n + i];
                    }
                }
                Some(Tensor::from_vec(&[n, classes], v)?)
            }
            None => None,
        };
        Ok(Output { logits, stages })
    }

    /// Milliseconds of each of `reps` logits-only forward passes on `x` (after one warm-up;
    /// CUDA events on the GPU).
    pub fn time_forward(
        &mut self,
        m: &DeployModel,
        x: &Tensor<f32>,
        reps: usize,
    ) -> Result<Vec<f64>> {
        self.load_input(m, x, &[], true)?;
        let p = self.prog.as_ref().expect("built by load_input");
        // SAFETY: as in `run`.
        unsafe { self.exec.time(&p.steps, reps.max(1), 1) }
    }

    /// Checks the input, builds the program for it, copies it in.
    fn load_input(
        &mut self,
        m: &DeployModel,
        x: &Tensor<f32>,
        indices: &[usize],
        want_logits: bool,
    ) -> Result<()> {
        let d = dims_of("input", x.shape())?;
        self.program(m, d, indices, want_logits)?;
        let p = self.prog.as_ref().expect("just built");
        let input = p.input;
        self.exec.upload(input, &self.dtype.encode(x.data()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::gelu;
    use crate::rng::Rng;

    fn random(len: usize, scale: f32, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| scale * rng.uniform_pm1()).collect()
    }

    /// Uploads `data` into a new simulator buffer.
    fn buf(ex: &mut SimExec, data: &[f32]) -> Buf {
        let b = ex.alloc(4 * data.len()).unwrap();
        ex.upload(b, &DType::F32.encode(data)).unwrap();
        b
    }

    /// The first `len` f32 values of a buffer.
    fn get(ex: &mut SimExec, b: Buf, len: usize) -> Vec<f32> {
        DType::F32.decode(&ex.download(b, 4 * len).unwrap())
    }

    fn bind(mut l: Launch, in0: u64, in1: u64, bias: u64, out: u64) -> Step {
        l.args.in0 = in0;
        l.args.in1 = in1;
        l.args.bias = bias;
        l.args.out = out;
        Step::Kernel(l)
    }

    /// Runs steps whose addresses are buffers of `ex` sized for their launches.
    fn run(ex: &mut SimExec, steps: &[Step]) {
        // SAFETY: every test below binds its launches to buffers it allocated from `ex` for
        // exactly the launch's tensor sizes.
        unsafe { ex.run(steps) }.unwrap();
    }

    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Every element-wise kernel of `kernels/lk_model.cu` in the simulator against a host
    /// computation (the CPU engine's GELU), on random data with partial blocks.
    #[test]
    fn model_kernels_in_the_simulator() {
        assert!(
            crate::sim::available(),
            "the kernel simulator was not built"
        );
        let mut ex = SimExec::new().unwrap();
        let mut rng = Rng::new(9);
        let (n, c, h, w) = (2, 5, 7, 9);
        let hw = h * w;
        let len = n * c * hw;
        let x = random(len, 6.0, &mut rng);
        let res = random(len, 1.0, &mut rng);
        let bias = random(c, 1.0, &mut rng);
        let scale = random(c, 2.0, &mut rng);
        let (bx, bres, bb, bs) = (
            buf(&mut ex, &x),
            buf(&mut ex, &res),
            buf(&mut ex, &bias),
            buf(&mut ex, &scale),
        );
        let ch = |i: usize| (i / hw) % c;
        for act in [ModelAct::None, ModelAct::Relu, ModelAct::Gelu] {
            for with_res in [false, true] {
                let y = buf(&mut ex, &x);
                let l = bias_act_launch(DType::F32, [n, c, h, w], act).unwrap();
                let r = if with_res { bres.addr } else { 0 };
                run(&mut ex, &[bind(l, y.addr, r, bb.addr, y.addr)]);
                let want: Vec<f32> = (0..len)
                    .map(|i| {
                        let v = x[i] + bias[ch(i)];
                        let v = match act {
                            ModelAct::None => v,
                            ModelAct::Relu => v.max(0.0),
                            ModelAct::Gelu => gelu(v),
                        };
                        v + if with_res { res[i] } else { 0.0 }
                    })
                    .collect();
                let got = get(&mut ex, y, len);
                close(
                    &format!("bias_act {act:?} res {with_res}"),
                    &got,
                    &want,
                    1e-6,
                );
            }
        }
        // affine, with and without scale/shift
        for (sc, sh) in [(true, true), (false, true), (true, false), (false, false)] {
            let y = ex.alloc(4 * len).unwrap();
            let l = affine_launch(DType::F32, [n, c, h, w]).unwrap();
            let (ps, pt) = (if sc { bs.addr } else { 0 }, if sh { bb.addr } else { 0 });
            run(&mut ex, &[bind(l, bx.addr, ps, pt, y.addr)]);
            let want: Vec<f32> = (0..len)
                .map(|i| {
                    let s = if sc { scale[ch(i)] } else { 1.0 };
                    let t = if sh { bias[ch(i)] } else { 0.0 };
                    x[i] * s + t
                })
                .collect();
            close("affine", &get(&mut ex, y, len), &want, 1e-6);
        }
        // average pool, both layouts
        for transposed in [false, true] {
            let y = ex.alloc(4 * n * c).unwrap();
            let l = avgpool_launch(DType::F32, [n, c, h, w], transposed).unwrap();
            run(&mut ex, &[bind(l, bx.addr, bs.addr, bb.addr, y.addr)]);
            let mut want = vec![0f32; n * c];
            for i in 0..n {
                for j in 0..c {
                    let p = &x[(i * c + j) * hw..(i * c + j + 1) * hw];
                    let mean = p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
                    let o = if transposed { j * n + i } else { i * c + j };
                    want[o] = (mean * scale[j] as f64 + bias[j] as f64) as f32;
                }
            }
            close("avgpool", &get(&mut ex, y, n * c), &want, 1e-5);
        }
        // dense conv 3x3 stride 2 pad 1 + ReLU against the CPU engine's stem conv
        let cout = 4;
        let k = 3;
        let wt = random(cout * c * k * k, 0.5, &mut rng);
        let bw = buf(&mut ex, &wt);
        let dc = crate::model::deploy::DenseConv {
            cin: c,
            cout,
            k,
            stride: 2,
            pad: 1,
            w: wt.clone(),
            b: bias[..cout].to_vec(),
        };
        let (oh, ow) = dc.out_hw(h, w).unwrap();
        let y = ex.alloc(4 * n * cout * oh * ow).unwrap();
        let l = dense_conv_launch(DType::F32, [n, c, h, w], dc.shape(), ModelAct::Relu).unwrap();
        run(&mut ex, &[bind(l, bx.addr, bw.addr, bb.addr, y.addr)]);
        let mut want = vec![0f32; n * cout * oh * ow];
        for i in 0..n {
            for co in 0..cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * 2 + ky) as isize - 1;
                                    let ix = (ox * 2 + kx) as isize - 1;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    acc += x[(i * c + ci) * hw + iy as usize * w + ix as usize]
                                        as f64
                                        * wt[((co * c + ci) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                        want[((i * cout + co) * oh + oy) * ow + ox] = acc.max(0.0) as f32;
                    }
                }
            }
        }
        close("dense conv", &get(&mut ex, y, want.len()), &want, 1e-5);
        // the host GEMM: batched, A shared
        let (m, kk, nn, batch) = (3, 4, 5, 2);
        let a = random(m * kk, 1.0, &mut rng);
        let b = random(batch * kk * nn, 1.0, &mut rng);
        let (ba, bbm) = (buf(&mut ex, &a), buf(&mut ex, &b));
        let cbuf = ex.alloc(4 * batch * m * nn).unwrap();
        run(
            &mut ex,
            &[Step::Gemm(shared_a_gemm(
                DType::F32,
                [m, kk, nn, batch],
                [ba.addr, bbm.addr, cbuf.addr],
            ))],
        );
        let mut want = vec![0f32; batch * m * nn];
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..nn {
                    want[bt * m * nn + i * nn + j] = (0..kk)
                        .map(|p| a[i * kk + p] * b[bt * kk * nn + p * nn + j])
                        .sum();
                }
            }
        }
        close("gemm", &get(&mut ex, cbuf, want.len()), &want, 1e-5);
    }
}
