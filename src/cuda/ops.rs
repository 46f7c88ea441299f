//! The convolution API on the GPU: the safe ops on device tensors and the raw-pointer entry
//! point, all queued on a [`CudaExec`]'s stream (a caller's stream with
//! [`CudaExec::on_stream`]). Each validates its problem once (a [`Problem`]), plans it, binds the
//! plan and runs it through the executor. Nothing here synchronises the host.

use super::exec::CudaExec;
use super::tensor::{CudaElement, DeviceTensor};
use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::op::{Impl, Op};
use crate::plan::{plan, Plan};
use crate::problem::Problem;

/// Bytes of workspace the op needs (0 for most fast kernels): size the workspace of
/// [`run_raw`] with it.
pub fn workspace_bytes(
    op: Op,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
) -> Result<usize> {
    Ok(plan(&Problem::new(op, imp, dtype, conv, shape)?)?.workspace_bytes)
}

/// Device addresses of one raw-pointer call: the op's two inputs in binding order (fwd: x, w;
/// dgrad: dy, w; wgrad: x, dy), the bias (fwd only; 0 for none), the output, and a workspace of
/// `workspace_bytes` bytes (at least [`workspace_bytes`]; 0/0 when that is 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawOperands {
    pub in0: u64,
    pub in1: u64,
    pub bias: u64,
    pub out: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

/// Checks a plan's pointers and workspace, binds them, and queues it on the executor.
///
/// # Safety
/// As for [`run_raw`].
unsafe fn bind_and_run(
    ex: &mut CudaExec,
    p: &Problem,
    mut plan: Plan,
    o: RawOperands,
) -> Result<()> {
    if plan.workspace_bytes > 0 && (o.workspace == 0 || o.workspace_bytes < plan.workspace_bytes) {
        return Err(Error::BufferLength {
            what: format!("workspace (bytes) for {} {}", p.op().name(), p.imp().name()),
            expected: plan.workspace_bytes,
            got: if o.workspace == 0 {
                0
            } else {
                o.workspace_bytes
            },
        });
    }
    if o.in0 == 0 || o.in1 == 0 || o.out == 0 {
        return Err(Error::InvalidArgument("null tensor pointer".into()));
    }
    // A misaligned element pointer would fault inside a kernel and poison the context.
    let es = p.dtype().size_bytes() as u64;
    let named = [
        ("first input", o.in0),
        ("second input", o.in1),
        ("bias", o.bias),
        ("output", o.out),
    ];
    for (name, ptr) in named {
        if !ptr.is_multiple_of(es) {
            return Err(Error::InvalidArgument(format!(
                "{name} pointer {ptr:#x} is not aligned to its {} elements",
                p.dtype()
            )));
        }
    }
    if !o.workspace.is_multiple_of(16) {
        return Err(Error::InvalidArgument(format!(
            "workspace pointer {:#x} is not 16-byte aligned",
            o.workspace
        )));
    }
    plan.bind(o.in0, o.in1, o.bias, o.out, o.workspace);
    let steps = plan.steps();
    ex.prepare(&steps)?;
    // SAFETY: forwarded from this function's contract.
    unsafe { ex.run(&steps) }
}

/// Runs problem `p` on raw device pointers, queued on `ex`'s stream (for the C ABI and other
/// foreign callers). The problem carries the op, implementation, dtype and shapes; the
/// pointers are checked for null, alignment and workspace size before anything is queued.
///
/// # Safety
/// Every pointer must be a device allocation of `ex`'s context (or memory mapped into it)
/// holding at least the elements of its tensor in `p.dtype()`, the output and the workspace
/// must not overlap any other argument, and all must stay valid until the work queued on the
/// stream completes. Nothing synchronises the host; ordering with other streams is the
/// caller's.
pub unsafe fn run_raw(ex: &mut CudaExec, p: &Problem, operands: RawOperands) -> Result<()> {
    let plan = plan(p)?;
    // SAFETY: forwarded from this function's contract.
    unsafe { bind_and_run(ex, p, plan, operands) }
}

/// Checks that a device tensor lives on the executor's device.
fn check_tensor_device<T: CudaElement>(
    ex: &CudaExec,
    what: &str,
    t: &DeviceTensor<T>,
) -> Result<()> {
    if **t.stream().context() != **ex.device().context() {
        return Err(Error::InvalidArgument(format!(
            "{what} lives on cuda:{}, the op runs on cuda:{}",
            t.ordinal(),
            ex.device().ordinal()
        )));
    }
    Ok(())
}

/// Runs a validated problem on device tensors: the executor's plan workspace grows as needed.
fn run_tensors<T: CudaElement>(
    ex: &mut CudaExec,
    p: &Problem,
    inputs: [(&str, &DeviceTensor<T>); 2],
    bias: Option<&DeviceTensor<T>>,
    out: (&str, &mut DeviceTensor<T>),
) -> Result<()> {
    if std::mem::size_of::<T>() != T::DTYPE.size_bytes() {
        return Err(Error::Unsupported(format!(
            "element type of {} bytes does not match its dtype {}",
            std::mem::size_of::<T>(),
            T::DTYPE
        )));
    }
    p.check_output(out.0, out.1.shape())?;
    for (what, t) in inputs {
        check_tensor_device(ex, what, t)?;
    }
    if let Some(b) = bias {
        check_tensor_device(ex, "bias", b)?;
    }
    check_tensor_device(ex, out.0, out.1)?;
    let plan = plan(p)?;
    let (ws, ws_bytes) = ex.plan_workspace(plan.workspace_bytes)?;
    let stream = ex.stream().clone();
    let (in0, _g0) = inputs[0].1.read_ptr(&stream);
    let (in1, _g1) = inputs[1].1.read_ptr(&stream);
    let bg = bias.map(|b| b.read_ptr(&stream));
    let (outp, _go) = out.1.write_ptr(&stream);
    let operands = RawOperands {
        in0,
        in1,
        bias: bg.as_ref().map_or(0, |(p, _)| *p),
        out: outp,
        workspace: ws,
        workspace_bytes: ws_bytes,
    };
    // SAFETY: the pointers come from live DeviceTensors of this device whose shapes were
    // validated into `p` (inputs) or checked against it (output); the workspace is the
    // executor's own, at least `workspace_bytes` long and used only on its stream; `out` is a
    // distinct, mutably borrowed tensor; the guards record the uses on the stream when they drop,
    // and cudarc frees device memory only after the stream has finished using it.
    unsafe { bind_and_run(ex, p, plan, operands) }
}

/// Forward: `y = conv(x, w) + bias` on `ex`'s stream. No host synchronisation.
///
/// `x` is `[N, C, H, W]`, `w` `[C, 1, KH, KW]`, `bias` `[C]`, `y` `[N, C, OH, OW]`; any
/// mismatch is a typed error before anything is launched. An op that needs a workspace
/// (im2col; the fast weight gradient) uses the executor's, which grows to the largest request.
pub fn forward<T: CudaElement>(
    ex: &mut CudaExec,
    imp: Impl,
    conv: &DwConv2d,
    x: &DeviceTensor<T>,
    w: &DeviceTensor<T>,
    bias: Option<&DeviceTensor<T>>,
    y: &mut DeviceTensor<T>,
) -> Result<()> {
    let p = Problem::forward(
        imp,
        T::DTYPE,
        conv,
        x.shape(),
        w.shape(),
        bias.map(|b| b.shape()),
    )?;
    run_tensors(
        ex,
        &p,
        [("input x", x), ("weight w", w)],
        bias,
        ("output y", y),
    )
}

/// Data gradient: `dx = conv_transpose(dy, w)` on `ex`'s stream. No host synchronisation.
///
/// `dy` is `[N, C, OH, OW]`, `w` `[C, 1, KH, KW]`, `dx` `[N, C, H, W]`: `dx`'s extents give
/// the input size, and `dy` must be the output of that input.
pub fn data_grad<T: CudaElement>(
    ex: &mut CudaExec,
    imp: Impl,
    conv: &DwConv2d,
    dy: &DeviceTensor<T>,
    w: &DeviceTensor<T>,
    dx: &mut DeviceTensor<T>,
) -> Result<()> {
    let p = Problem::data_grad_into(imp, T::DTYPE, conv, dy.shape(), w.shape(), dx.shape())?;
    run_tensors(
        ex,
        &p,
        [("output gradient dy", dy), ("weight w", w)],
        None,
        ("input gradient dx", dx),
    )
}

/// Weight gradient: `dw[c] = sum_n corr(x[n, c], dy[n, c])` on `ex`'s stream, deterministic
/// (the kernels reduce in a fixed order). No host synchronisation.
///
/// `x` is `[N, C, H, W]`, `dy` `[N, C, OH, OW]`, `dw` `[C, 1, KH, KW]`.
pub fn weight_grad<T: CudaElement>(
    ex: &mut CudaExec,
    imp: Impl,
    conv: &DwConv2d,
    x: &DeviceTensor<T>,
    dy: &DeviceTensor<T>,
    dw: &mut DeviceTensor<T>,
) -> Result<()> {
    let p = Problem::weight_grad(imp, T::DTYPE, conv, x.shape(), dy.shape())?;
    run_tensors(
        ex,
        &p,
        [("input x", x), ("output gradient dy", dy)],
        None,
        ("weight gradient dw", dw),
    )
}
