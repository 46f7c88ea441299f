//! The safe ops (device tensors, caller's stream) and the raw-pointer entry points.
//!
//! Every op: validates the problem with the checks of `crate::conv` (typed errors), asks
//! `kernels::plan` which kernels to run, checks every launch configuration against the device,
//! fetches every kernel, and only then queues the launches on the caller's stream. Nothing here
//! synchronises the host.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::gemm;
use super::kernels::{self, DwArgs, Plan};
use super::tensor::{CudaElement, DeviceTensor, Workspace};
use crate::conv::{dims4, ConvShape, DwConv2d};
use crate::device::{Impl, Op};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Bytes of workspace the op needs (0 for most fast kernels); size a workspace for the raw
/// entry points with it.
pub fn workspace_bytes(
    op: Op,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
) -> Result<usize> {
    check_problem(imp, conv, shape)?;
    Ok(kernels::plan(op, imp, dtype, conv, shape)?.workspace_bytes)
}

fn check_impl(imp: Impl) -> Result<()> {
    if imp == Impl::Reference {
        return Err(Error::Unsupported(
            "the f64 reference runs on the CPU only (use fast, naive or im2col on cuda)".into(),
        ));
    }
    Ok(())
}

/// Checks that a caller-provided shape is the one `conv` resolves for its input.
fn check_problem(imp: Impl, conv: &DwConv2d, shape: &ConvShape) -> Result<()> {
    check_impl(imp)?;
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    if s != *shape {
        return Err(Error::InvalidArgument(format!(
            "shape {shape:?} is inconsistent with the convolution: its output is {}x{}",
            s.oh, s.ow
        )));
    }
    Ok(())
}

fn check_element<T: CudaElement>() -> Result<()> {
    if std::mem::size_of::<T>() != T::DTYPE.size_bytes() {
        return Err(Error::Unsupported(format!(
            "element type of {} bytes does not match its dtype {}",
            std::mem::size_of::<T>(),
            T::DTYPE
        )));
    }
    Ok(())
}

fn check_dims(what: &str, got: &[usize], expected: [usize; 4]) -> Result<()> {
    if got != expected {
        return Err(Error::shape(what, format!("{expected:?}"), got));
    }
    Ok(())
}

fn check_tensor_device<T: CudaElement>(
    dev: &CudaDevice,
    what: &str,
    t: &DeviceTensor<T>,
) -> Result<()> {
    if **t.stream().context() != **dev.context() {
        return Err(Error::InvalidArgument(format!(
            "{what} lives on cuda:{}, the op runs on cuda:{}",
            t.ordinal(),
            dev.ordinal()
        )));
    }
    Ok(())
}

/// Checks every launch of a plan against the device's limits and fetches its kernels, so
/// that a plan that cannot run fails before anything is queued.
fn prepare(dev: &CudaDevice, plan: &Plan) -> Result<Vec<cudarc::driver::CudaFunction>> {
    prepare_launches(dev, &plan.launches)
}

/// [`prepare`] for a list of launches.
pub(crate) fn prepare_launches(
    dev: &CudaDevice,
    launches: &[kernels::Launch],
) -> Result<Vec<cudarc::driver::CudaFunction>> {
    let info = dev.info();
    launches
        .iter()
        .map(|l| {
            let (gx, gy, gz) = l.grid;
            let (bx, by, bz) = l.block;
            let threads = bx as u64 * by as u64 * bz as u64;
            let grid_ok = gx >= 1
                && gx <= i32::MAX as u32
                && (1..=65535).contains(&gy)
                && (1..=65535).contains(&gz);
            let block_ok = threads >= 1
                && threads <= info.max_threads_per_block as u64
                && bx <= 1024
                && by <= 1024
                && bz <= 64;
            if !grid_ok || !block_ok {
                return Err(Error::Unsupported(format!(
                    "launch of '{}' with grid {:?} and block {:?} exceeds the limits of {}",
                    l.kernel, l.grid, l.block, info.name
                )));
            }
            crate::tensor_core::check_device(l.kernel, info.compute_capability, &info.name)?;
            dev.kernel(l.kernel, l.shared_bytes)
        })
        .collect()
}

/// One queued step of a bound plan.
enum Step {
    Kernel {
        func: CudaFunction,
        name: &'static str,
        cfg: LaunchConfig,
        args: DwArgs,
    },
    Gemm(gemm::BatchedGemm),
}

/// A plan with its buffer addresses bound, its launches checked against the device and its
/// kernels fetched: ready to be queued (any number of times) with [`BoundPlan::enqueue`].
pub(crate) struct BoundPlan {
    steps: Vec<Step>,
}

impl BoundPlan {
    /// Binds `plan` to the given device addresses. Checks (no launch): non-null inputs and
    /// output, a workspace when one is needed, the GEMM inside the workspace, every launch
    /// configuration within the device's limits, every kernel present.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dev: &CudaDevice,
        mut plan: Plan,
        in0: u64,
        in1: u64,
        bias: u64,
        out: u64,
        workspace: u64,
    ) -> Result<Self> {
        if plan.workspace_bytes > 0 && workspace == 0 {
            return Err(Error::InvalidArgument(format!(
                "this op needs a workspace of {} bytes",
                plan.workspace_bytes
            )));
        }
        if in0 == 0 || in1 == 0 || out == 0 {
            return Err(Error::InvalidArgument("null tensor pointer".into()));
        }
        plan.bind(in0, in1, bias, out, workspace);
        let funcs = prepare(dev, &plan)?;
        let gemm = plan
            .gemm
            .as_ref()
            .map(|g| {
                gemm_of_step(g, workspace, plan.workspace_bytes)
                    .map(|b| (gemm_position(g, plan.launches.len()), b))
            })
            .transpose()?;
        let mut steps = Vec::with_capacity(plan.launches.len() + 1);
        for (i, (launch, func)) in plan.launches.iter().zip(funcs).enumerate() {
            if let Some((at, g)) = &gemm {
                if *at == i {
                    steps.push(Step::Gemm(*g));
                }
            }
            steps.push(Step::Kernel {
                func,
                name: launch.kernel,
                cfg: LaunchConfig {
                    grid_dim: launch.grid,
                    block_dim: launch.block,
                    shared_mem_bytes: launch.shared_bytes,
                },
                args: launch.args,
            });
        }
        if let Some((at, g)) = gemm {
            if at >= plan.launches.len() {
                steps.push(Step::Gemm(g));
            }
        }
        Ok(BoundPlan { steps })
    }

    /// Queues every step on `stream`, in order. Stops at the first failed launch.
    ///
    /// # Safety
    /// At the time of the call, the bound addresses must be device memory of `dev`'s context
    /// for the problem the plan was made for: inputs and output (and bias unless 0) valid for
    /// their full tensors, the workspace valid for the plan's `workspace_bytes`, the output and
    /// the workspace overlapping nothing else, all kept alive until the queued work completes.
    pub(crate) unsafe fn enqueue(&self, dev: &CudaDevice, stream: &Arc<CudaStream>) -> Result<()> {
        dev.check_stream(stream)?;
        for step in &self.steps {
            match step {
                // SAFETY: the GEMM's operands lie inside the bound workspace (checked in
                // `new`), which satisfies this function's contract.
                Step::Gemm(g) => unsafe { gemm::run(dev, stream, g) }?,
                Step::Kernel {
                    func,
                    name,
                    cfg,
                    args,
                } => {
                    // SAFETY: every kernel is `extern "C" __global__ void NAME(const DwArgs
                    // args)`: one by-value parameter of the repr(C) `DwArgs` (see the
                    // DeviceRepr impl). The launch configuration was checked against the device
                    // and the kernel's shared memory in `new`; the addresses inside `args`
                    // satisfy this function's contract, and the planner sized the grid for the
                    // problem, so the kernel stays inside them.
                    unsafe { stream.launch_builder(func).arg(args).launch(*cfg) }.map_err(|e| {
                        Error::Cuda(format!(
                            "launching '{name}' (grid {:?}, block {:?}, {} B shared): {e}",
                            cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Binds the pointers into the plan and queues it once on `stream`.
///
/// # Safety
/// As for [`BoundPlan::enqueue`].
#[allow(clippy::too_many_arguments)]
unsafe fn execute(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    plan: Plan,
    in0: u64,
    in1: u64,
    bias: u64,
    out: u64,
    workspace: u64,
) -> Result<()> {
    dev.check_stream(stream)?;
    let bound = BoundPlan::new(dev, plan, in0, in1, bias, out, workspace)?;
    // SAFETY: forwarded from this function's contract.
    unsafe { bound.enqueue(dev, stream) }
}

/// Where the GEMM goes among the launches: before launch `i` (`i == len`: after the last).
/// The planner runs it after `launches[after_launch]`.
fn gemm_position(step: &kernels::GemmStep, launches: usize) -> usize {
    step.after_launch.saturating_add(1).min(launches)
}

/// Translates the planner's GEMM (row-major f32 matrices at element offsets into the
/// workspace) into the cuBLAS call, checking that every matrix lies inside the workspace.
pub(crate) fn gemm_of_step(
    step: &kernels::GemmStep,
    workspace: u64,
    workspace_bytes: usize,
) -> Result<gemm::BatchedGemm> {
    let overflow = || Error::Overflow("GEMM extent".into());
    // One past the last element a stored rows x cols matrix batch touches.
    let end = |offset: usize, stride: usize, rows: usize, cols: usize, ld: usize| {
        step.batch
            .checked_sub(1)
            .and_then(|b| b.checked_mul(stride))
            .and_then(|v| v.checked_add(offset))
            .and_then(|v| v.checked_add(rows.checked_sub(1)?.checked_mul(ld)?))
            .and_then(|v| v.checked_add(cols))
    };
    let (ar, ac) = if step.a_trans {
        (step.k, step.m)
    } else {
        (step.m, step.k)
    };
    let (br, bc) = if step.b_trans {
        (step.n, step.k)
    } else {
        (step.k, step.n)
    };
    let ends = [
        end(step.a_offset, step.stride_a, ar, ac, step.lda),
        end(step.b_offset, step.stride_b, br, bc, step.ldb),
        end(step.c_offset, step.stride_c, step.m, step.n, step.ldc),
    ];
    let len = workspace_bytes / 4;
    for e in ends {
        let e = e.ok_or_else(overflow)?;
        if e > len {
            return Err(Error::BufferLength {
                what: "GEMM operand inside the workspace (f32 elements)".into(),
                expected: e,
                got: len,
            });
        }
    }
    let addr = |offset: usize| -> Result<u64> {
        (offset as u64)
            .checked_mul(4)
            .and_then(|b| workspace.checked_add(b))
            .ok_or_else(overflow)
    };
    Ok(gemm::BatchedGemm {
        trans_a: step.a_trans,
        trans_b: step.b_trans,
        m: step.m,
        n: step.n,
        k: step.k,
        a: addr(step.a_offset)?,
        lda: step.lda,
        stride_a: step.stride_a,
        a_type: DType::F32,
        b: addr(step.b_offset)?,
        ldb: step.ldb,
        stride_b: step.stride_b,
        b_type: DType::F32,
        c: addr(step.c_offset)?,
        ldc: step.ldc,
        stride_c: step.stride_c,
        c_type: DType::F32,
        batch: step.batch,
        alpha: 1.0,
        beta: 0.0,
    })
}

/// Runs a plan for a safe op with the workspace handling shared by the three ops.
fn run_safe(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    plan: Plan,
    ptrs: [u64; 4],
    workspace: Option<&mut Workspace>,
) -> Result<()> {
    let mut local = Workspace::new();
    let ws = workspace.unwrap_or(&mut local);
    ws.ensure(stream, plan.workspace_bytes)?;
    let wsp = if plan.workspace_bytes > 0 {
        ws.ptr(stream)
    } else {
        None
    };
    let [in0, in1, bias, out] = ptrs;
    let ws_ptr = wsp.as_ref().map_or(0, |(p, _)| *p);
    // SAFETY: the pointers come from live DeviceTensors of this device whose shapes were
    // checked against the problem the plan was made for; the workspace is at least
    // `workspace_bytes` long; `out` is a distinct, mutably borrowed tensor; the tensors and
    // the workspace outlive the queued work because cudarc frees device memory only after the
    // stream (through event tracking) has finished using it.
    let r = unsafe { execute(dev, stream, plan, in0, in1, bias, out, ws_ptr) };
    drop(wsp);
    r
}

/// Forward: `y = conv(x, w) + bias` on `stream`. No host synchronisation.
///
/// `x` is `[N, C, H, W]`, `w` `[C, 1, KH, KW]`, `bias` `[C]`, `y` `[N, C, OH, OW]`; any
/// mismatch is a typed error before anything is launched. Without `workspace`, an op that
/// needs one (im2col; the fast weight gradient) allocates it on `stream` and frees it
/// stream-ordered when done (on a device without stream-ordered allocation cudarc synchronises
/// the stream to free it: pass a reusable [`Workspace`] to avoid both the allocation and that).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: CudaElement>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    imp: Impl,
    conv: &DwConv2d,
    x: &DeviceTensor<T>,
    w: &DeviceTensor<T>,
    bias: Option<&DeviceTensor<T>>,
    y: &mut DeviceTensor<T>,
    workspace: Option<&mut Workspace>,
) -> Result<()> {
    check_impl(imp)?;
    check_element::<T>()?;
    let shape = conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    check_dims("output y", y.shape(), shape.output_dims())?;
    dev.check_stream(stream)?;
    check_tensor_device(dev, "input x", x)?;
    check_tensor_device(dev, "weight w", w)?;
    if let Some(b) = bias {
        check_tensor_device(dev, "bias", b)?;
    }
    check_tensor_device(dev, "output y", y)?;
    let plan = kernels::plan(Op::Forward, imp, T::DTYPE, conv, &shape)?;
    let (xp, _gx) = x.read_ptr(stream);
    let (wp, _gw) = w.read_ptr(stream);
    let bg = bias.map(|b| b.read_ptr(stream));
    let bp = bg.as_ref().map_or(0, |(p, _)| *p);
    let (yp, _gy) = y.write_ptr(stream);
    run_safe(dev, stream, plan, [xp, wp, bp, yp], workspace)
}

/// Data gradient: `dx = conv_transpose(dy, w)` on `stream`. No host synchronisation.
///
/// `dy` is `[N, C, OH, OW]`, `w` `[C, 1, KH, KW]`, `dx` `[N, C, H, W]`: `dx`'s extents give
/// the input size, and `dy` must be the output of that input.
#[allow(clippy::too_many_arguments)]
pub fn data_grad<T: CudaElement>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    imp: Impl,
    conv: &DwConv2d,
    dy: &DeviceTensor<T>,
    w: &DeviceTensor<T>,
    dx: &mut DeviceTensor<T>,
    workspace: Option<&mut Workspace>,
) -> Result<()> {
    check_impl(imp)?;
    check_element::<T>()?;
    let [_, _, h, wd] = dims4("input gradient dx", dx.shape())?;
    let shape = conv.check_data_grad(dy.shape(), w.shape(), (h, wd))?;
    check_dims("input gradient dx", dx.shape(), shape.input_dims())?;
    dev.check_stream(stream)?;
    check_tensor_device(dev, "output gradient dy", dy)?;
    check_tensor_device(dev, "weight w", w)?;
    check_tensor_device(dev, "input gradient dx", dx)?;
    let plan = kernels::plan(Op::DataGrad, imp, T::DTYPE, conv, &shape)?;
    let (dyp, _gdy) = dy.read_ptr(stream);
    let (wp, _gw) = w.read_ptr(stream);
    let (dxp, _gdx) = dx.write_ptr(stream);
    run_safe(dev, stream, plan, [dyp, wp, 0, dxp], workspace)
}

/// Weight gradient: `dw[c] = sum_n corr(x[n, c], dy[n, c])` on `stream`, deterministic (the
/// kernels reduce in a fixed order). No host synchronisation.
///
/// `x` is `[N, C, H, W]`, `dy` `[N, C, OH, OW]`, `dw` `[C, 1, KH, KW]`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad<T: CudaElement>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    imp: Impl,
    conv: &DwConv2d,
    x: &DeviceTensor<T>,
    dy: &DeviceTensor<T>,
    dw: &mut DeviceTensor<T>,
    workspace: Option<&mut Workspace>,
) -> Result<()> {
    check_impl(imp)?;
    check_element::<T>()?;
    let shape = conv.check_weight_grad(x.shape(), dy.shape())?;
    let expected = conv.weight_dims(shape.c);
    if dw.shape() != expected {
        return Err(Error::shape(
            "weight gradient dw",
            format!("{expected:?} ([C, 1, KH, KW])"),
            dw.shape(),
        ));
    }
    dev.check_stream(stream)?;
    check_tensor_device(dev, "input x", x)?;
    check_tensor_device(dev, "output gradient dy", dy)?;
    check_tensor_device(dev, "weight gradient dw", dw)?;
    let plan = kernels::plan(Op::WeightGrad, imp, T::DTYPE, conv, &shape)?;
    let (xp, _gx) = x.read_ptr(stream);
    let (dyp, _gdy) = dy.read_ptr(stream);
    let (dwp, _gdw) = dw.write_ptr(stream);
    run_safe(dev, stream, plan, [xp, dyp, 0, dwp], workspace)
}

/// Checks a raw-pointer problem and its workspace, and binds its plan (nothing is queued).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bind_raw(
    dev: &CudaDevice,
    op: Op,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
    ptrs: [u64; 4],
    workspace: u64,
    workspace_len: usize,
) -> Result<BoundPlan> {
    check_problem(imp, conv, shape)?;
    let plan = kernels::plan(op, imp, dtype, conv, shape)?;
    if plan.workspace_bytes > 0 && (workspace == 0 || workspace_len < plan.workspace_bytes) {
        return Err(Error::BufferLength {
            what: format!("workspace (bytes) for {} {}", op.name(), imp.name()),
            expected: plan.workspace_bytes,
            got: if workspace == 0 { 0 } else { workspace_len },
        });
    }
    // A misaligned element pointer would fault inside a kernel and poison the context.
    let names = ["first input", "second input", "bias", "output"];
    for (name, p) in names.iter().zip(ptrs) {
        if !p.is_multiple_of(dtype.size_bytes() as u64) {
            return Err(Error::InvalidArgument(format!(
                "{name} pointer {p:#x} is not aligned to its {dtype} elements"
            )));
        }
    }
    if !workspace.is_multiple_of(16) {
        return Err(Error::InvalidArgument(format!(
            "workspace pointer {workspace:#x} is not 16-byte aligned"
        )));
    }
    let [in0, in1, bias, out] = ptrs;
    BoundPlan::new(dev, plan, in0, in1, bias, out, workspace)
}

/// Checks the raw problem and queues its plan once (shared by the three raw entry points).
///
/// # Safety
/// As for [`BoundPlan::enqueue`].
#[allow(clippy::too_many_arguments)]
unsafe fn run_raw(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    op: Op,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
    ptrs: [u64; 4],
    workspace: u64,
    workspace_len: usize,
) -> Result<()> {
    dev.check_stream(stream)?;
    let bound = bind_raw(
        dev,
        op,
        imp,
        dtype,
        conv,
        shape,
        ptrs,
        workspace,
        workspace_len,
    )?;
    // SAFETY: forwarded from the caller's contract (see the raw entry points).
    unsafe { bound.enqueue(dev, stream) }
}

/// Forward on raw device pointers (for the C ABI): NCHW `x` `[N, C, H, W]`, `w`
/// `[C, 1, KH, KW]`, `bias` `[C]` or 0 for none, `y` `[N, C, OH, OW]`, all of `dtype`, and a
/// workspace of `workspace_len` bytes (at least [`workspace_bytes`]; 0/0 when that is 0).
/// `shape` must be what `conv.resolve(n, c, h, w)` gives.
///
/// # Safety
/// Every pointer must be a device allocation of `dev`'s context (or memory mapped into it)
/// holding at least the elements of its tensor in `dtype`, `y` and the workspace must not
/// overlap any other argument, and all must stay valid until the work queued on `stream`
/// completes. Nothing synchronises the host; ordering with other streams is the caller's.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward_raw(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
    x: u64,
    w: u64,
    bias: u64,
    y: u64,
    workspace: u64,
    workspace_len: usize,
) -> Result<()> {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        run_raw(
            dev,
            stream,
            Op::Forward,
            imp,
            dtype,
            conv,
            shape,
            [x, w, bias, y],
            workspace,
            workspace_len,
        )
    }
}

/// Data gradient on raw device pointers: `dy` `[N, C, OH, OW]`, `w` `[C, 1, KH, KW]`, `dx`
/// `[N, C, H, W]` (see [`forward_raw`]).
///
/// # Safety
/// As for [`forward_raw`], with `dx` the output.
#[allow(clippy::too_many_arguments)]
pub unsafe fn data_grad_raw(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
    dy: u64,
    w: u64,
    dx: u64,
    workspace: u64,
    workspace_len: usize,
) -> Result<()> {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        run_raw(
            dev,
            stream,
            Op::DataGrad,
            imp,
            dtype,
            conv,
            shape,
            [dy, w, 0, dx],
            workspace,
            workspace_len,
        )
    }
}

/// Weight gradient on raw device pointers: `x` `[N, C, H, W]`, `dy` `[N, C, OH, OW]`, `dw`
/// `[C, 1, KH, KW]` (see [`forward_raw`]).
///
/// # Safety
/// As for [`forward_raw`], with `dw` the output.
#[allow(clippy::too_many_arguments)]
pub unsafe fn weight_grad_raw(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
    x: u64,
    dy: u64,
    dw: u64,
    workspace: u64,
    workspace_len: usize,
) -> Result<()> {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        run_raw(
            dev,
            stream,
            Op::WeightGrad,
            imp,
            dtype,
            conv,
            shape,
            [x, dy, 0, dw],
            workspace,
            workspace_len,
        )
    }
}
