//! The C ABI of lkconv (`include/lkconv.h`, generated from this file by cbindgen).
//!
//! cuDNN's conventions: a handle, an `lk_status` from every call, outputs through pointers, the
//! caller's CUDA stream, a workspace the caller allocates after asking for its size, and no
//! hidden synchronisation. Enumerations cross the boundary as `int32_t` with named constants,
//! so that an out-of-range value from C is an `LK_STATUS_INVALID_ARGUMENT`, never undefined
//! behaviour in Rust. No panic crosses the boundary: every entry point runs inside [`guard`].
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use half::{bf16, f16};
use lkconv_core::cuda::CudaDevice;
use lkconv_core::{ConvShape, DType, Device, DwConv2d, Element, Error, Impl, Op, Padding, Tensor};

/// The result of every call. `lk_status_string` names it; `lk_last_error` says what failed.
pub type lk_status = i32;
/// Success.
pub const LK_STATUS_OK: lk_status = 0;
/// A NULL pointer, a misaligned pointer, a negative or zero size, a size that overflows, a
/// descriptor that leaves no output, a workspace smaller than asked for, an unknown enum value.
pub const LK_STATUS_INVALID_ARGUMENT: lk_status = 1;
/// A valid request this build or device cannot serve (a stream on a CPU handle, ...).
pub const LK_STATUS_UNSUPPORTED: lk_status = 2;
/// No CUDA driver, no such device, or a library built without CUDA kernels.
pub const LK_STATUS_CUDA_UNAVAILABLE: lk_status = 3;
/// A CUDA driver call or kernel launch failed.
pub const LK_STATUS_CUDA_ERROR: lk_status = 4;
/// Host or device memory could not be allocated.
pub const LK_STATUS_OUT_OF_MEMORY: lk_status = 5;
/// A bug in lkconv (a caught panic, a simulator failure).
pub const LK_STATUS_INTERNAL: lk_status = 6;

/// Where a handle runs its work.
pub type lk_device = i32;
/// The CPU engine; host pointers; runs synchronously in the calling thread.
pub const LK_DEVICE_CPU: lk_device = 0;
/// A CUDA GPU; device pointers; work is queued on the handle's stream.
pub const LK_DEVICE_CUDA: lk_device = 1;
/// lkconv's CUDA kernels run on the CPU by its kernel simulator; host pointers; synchronous.
pub const LK_DEVICE_SIM: lk_device = 2;

/// Element type of every tensor of a call (f16 and bf16: 16-bit storage, f32 accumulation).
pub type lk_dtype = i32;
pub const LK_DTYPE_F32: lk_dtype = 0;
pub const LK_DTYPE_F16: lk_dtype = 1;
pub const LK_DTYPE_BF16: lk_dtype = 2;

/// The pass asked about by `lk_workspace_size`.
pub type lk_op = i32;
pub const LK_OP_FORWARD: lk_op = 0;
pub const LK_OP_DATA_GRAD: lk_op = 1;
pub const LK_OP_WEIGHT_GRAD: lk_op = 2;

/// One depthwise convolution: input x [n, c, h, w] (NCHW, contiguous), filter w [c, 1, kh, kw],
/// optional bias [c], output y [n, c, oh, ow] (see `lk_output_size`), PyTorch's
/// cross-correlation: y[n,c,i,j] = sum x[n, c, i*stride_h - pad_top + ky*dilation_h,
/// j*stride_w - pad_left + kx*dilation_w] * w[c, 0, ky, kx] (+ bias[c]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lk_conv_desc {
    pub n: i64,
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i32,
    pub kw: i32,
    pub pad_top: i32,
    pub pad_bottom: i32,
    pub pad_left: i32,
    pub pad_right: i32,
    pub stride_h: i32,
    pub stride_w: i32,
    pub dilation_h: i32,
    pub dilation_w: i32,
    pub dtype: lk_dtype,
}

/// An lkconv context for one device (opaque). Use a handle from one thread at a time.
pub struct lk_handle {
    backend: Backend,
}

enum Backend {
    Host(Device),
    Cuda {
        device: Arc<CudaDevice>,
        /// The caller's CUstream (borrowed); NULL is the legacy default stream.
        stream: *mut c_void,
    },
}

/// A failed call: its status and the message `lk_last_error` returns.
struct Failure(lk_status, String);

type CallResult<T = ()> = Result<T, Failure>;

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Shape { .. }
            | Error::ZeroSize { .. }
            | Error::Overflow(_)
            | Error::EmptyOutput(_)
            | Error::DType(_)
            | Error::BufferLength { .. }
            | Error::InvalidArgument(_) => LK_STATUS_INVALID_ARGUMENT,
            Error::Unsupported(_) => LK_STATUS_UNSUPPORTED,
            Error::CudaUnavailable(_) => LK_STATUS_CUDA_UNAVAILABLE,
            _ if e.is_out_of_memory() => LK_STATUS_OUT_OF_MEMORY,
            Error::Cuda { .. } => LK_STATUS_CUDA_ERROR,
            _ => LK_STATUS_INTERNAL,
        };
        Failure(status, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(LK_STATUS_INVALID_ARGUMENT, msg.into())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs one entry point: its failure (or a panic) becomes a status and the thread's last error.
fn guard(f: impl FnOnce() -> CallResult) -> lk_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => LK_STATUS_OK,
        Ok(Err(Failure(status, msg))) => {
            set_last_error(&msg);
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (panic caught in lkconv): {what}"));
            LK_STATUS_INTERNAL
        }
    }
}

fn non_null<T>(what: &str, p: *const T) -> CallResult<*const T> {
    if p.is_null() {
        Err(invalid(format!("{what} is NULL")))
    } else {
        Ok(p)
    }
}

fn dtype_of(d: lk_dtype) -> CallResult<DType> {
    match d {
        LK_DTYPE_F32 => Ok(DType::F32),
        LK_DTYPE_F16 => Ok(DType::F16),
        LK_DTYPE_BF16 => Ok(DType::Bf16),
        other => Err(invalid(format!(
            "unknown dtype {other} (expected LK_DTYPE_F32, LK_DTYPE_F16 or LK_DTYPE_BF16)"
        ))),
    }
}

fn op_of(op: lk_op) -> CallResult<Op> {
    match op {
        LK_OP_FORWARD => Ok(Op::Forward),
        LK_OP_DATA_GRAD => Ok(Op::DataGrad),
        LK_OP_WEIGHT_GRAD => Ok(Op::WeightGrad),
        other => Err(invalid(format!(
            "unknown op {other} (expected LK_OP_FORWARD, LK_OP_DATA_GRAD or LK_OP_WEIGHT_GRAD)"
        ))),
    }
}

/// A validated descriptor: the convolution, its sizes and its element type.
struct Problem {
    conv: DwConv2d,
    shape: ConvShape,
    dtype: DType,
}

fn size(what: &str, v: impl Into<i64>) -> CallResult<usize> {
    let v = v.into();
    usize::try_from(v).map_err(|_| invalid(format!("{what} is negative ({v})")))
}

/// Reads and checks a descriptor with lkconv's own validation.
///
/// # Safety
/// `d` is NULL or points to a readable `lk_conv_desc`.
unsafe fn problem(d: *const lk_conv_desc) -> CallResult<Problem> {
    // SAFETY: non-null, and the caller promises a readable descriptor; every field is an
    // integer, so any bit pattern is a valid value.
    let d = unsafe { *non_null("descriptor", d)? };
    let dtype = dtype_of(d.dtype)?;
    let conv = DwConv2d {
        kernel: (size("kh", d.kh)?, size("kw", d.kw)?),
        padding: Padding {
            top: size("pad_top", d.pad_top)?,
            bottom: size("pad_bottom", d.pad_bottom)?,
            left: size("pad_left", d.pad_left)?,
            right: size("pad_right", d.pad_right)?,
        },
        stride: (size("stride_h", d.stride_h)?, size("stride_w", d.stride_w)?),
        dilation: (
            size("dilation_h", d.dilation_h)?,
            size("dilation_w", d.dilation_w)?,
        ),
    };
    let shape = conv.resolve(
        size("n", d.n)?,
        size("c", d.c)?,
        size("h", d.h)?,
        size("w", d.w)?,
    )?;
    // Every tensor's byte count must fit in size_t (it does on 64-bit hosts; checked for 32).
    // `resolve` bounded the weight's element count too, so the product cannot overflow.
    let weight_len: usize = conv.weight_dims(shape.c).iter().product();
    for len in [shape.input_len(), shape.output_len(), weight_len] {
        len.checked_mul(dtype.size_bytes())
            .ok_or_else(|| invalid("a tensor's byte count overflows size_t"))?;
    }
    Ok(Problem { conv, shape, dtype })
}

/// # Safety
/// `h` is NULL or a handle from `lk_create` not yet destroyed.
unsafe fn handle_ref<'a>(h: *const lk_handle) -> CallResult<&'a lk_handle> {
    // SAFETY: non-null, and the caller promises a live handle.
    Ok(unsafe { &*non_null("handle", h)? })
}

/// Creates a handle for `device` (GPU `ordinal` for `LK_DEVICE_CUDA`; ignored otherwise) and
/// stores it in `*handle` (NULL on failure). A CUDA handle starts on the legacy default stream
/// (NULL); `lk_set_stream` changes it.
///
/// # Safety
/// `handle` is NULL or points to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn lk_create(
    handle: *mut *mut lk_handle,
    device: lk_device,
    ordinal: c_int,
) -> lk_status {
    guard(|| {
        let out = non_null("handle output pointer", handle)?.cast_mut();
        // SAFETY: non-null and writable by the caller's contract.
        unsafe { *out = std::ptr::null_mut() };
        let backend = match device {
            LK_DEVICE_CPU => Backend::Host(Device::Cpu),
            LK_DEVICE_SIM if lkconv_core::sim::available() => Backend::Host(Device::Sim),
            LK_DEVICE_SIM => {
                return Err(Failure(
                    LK_STATUS_UNSUPPORTED,
                    "this library was built without the kernel simulator".into(),
                ))
            }
            LK_DEVICE_CUDA => {
                let ordinal = size("ordinal", ordinal)?;
                let device = CudaDevice::shared(ordinal)?;
                if !device.kernels_loaded() {
                    return Err(Failure(
                        LK_STATUS_CUDA_UNAVAILABLE,
                        "CUDA kernels are not loaded (built without nvcc, or the GPU's \
                         architecture is not in the fatbin)"
                            .into(),
                    ));
                }
                Backend::Cuda {
                    device,
                    stream: std::ptr::null_mut(),
                }
            }
            other => {
                return Err(invalid(format!(
                    "unknown device {other} (expected LK_DEVICE_CPU, LK_DEVICE_CUDA or \
                     LK_DEVICE_SIM)"
                )))
            }
        };
        // SAFETY: as above.
        unsafe { *out = Box::into_raw(Box::new(lk_handle { backend })) };
        Ok(())
    })
}

/// Destroys a handle (NULL is accepted and does nothing). Waits for nothing: work queued on a
/// CUDA stream stays queued.
///
/// # Safety
/// `handle` is NULL or a handle from `lk_create` not yet destroyed, used by no other thread.
#[no_mangle]
pub unsafe extern "C" fn lk_destroy(handle: *mut lk_handle) -> lk_status {
    guard(|| {
        if !handle.is_null() {
            // SAFETY: a live handle made by `Box::into_raw` in `lk_create`, destroyed once.
            drop(unsafe { Box::from_raw(handle) });
        }
        Ok(())
    })
}

/// Sets the CUDA stream (a `CUstream` / `cudaStream_t` of the device's primary context,
/// borrowed: the caller keeps it alive while work queued on it runs) on which the handle
/// queues its work; NULL is the legacy default stream. `LK_STATUS_UNSUPPORTED` for a non-NULL
/// stream on a CPU or SIM handle.
///
/// # Safety
/// `handle` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn lk_set_stream(
    handle: *mut lk_handle,
    cuda_stream: *mut c_void,
) -> lk_status {
    guard(|| {
        let h = non_null("handle", handle)?.cast_mut();
        // SAFETY: a live handle (caller's contract), used by this thread only.
        match unsafe { &mut (*h).backend } {
            Backend::Cuda { stream, .. } => *stream = cuda_stream,
            Backend::Host(_) if cuda_stream.is_null() => {}
            Backend::Host(d) => {
                return Err(Failure(
                    LK_STATUS_UNSUPPORTED,
                    format!("a CUDA stream was given to a {d} handle"),
                ))
            }
        }
        Ok(())
    })
}

/// The output height and width of the convolution `desc` describes.
///
/// # Safety
/// Each pointer is NULL or valid for its access.
#[no_mangle]
pub unsafe extern "C" fn lk_output_size(
    desc: *const lk_conv_desc,
    oh: *mut i64,
    ow: *mut i64,
) -> lk_status {
    guard(|| {
        let (oh, ow) = (
            non_null("oh", oh)?.cast_mut(),
            non_null("ow", ow)?.cast_mut(),
        );
        // SAFETY: the caller's contract.
        let p = unsafe { problem(desc)? };
        // SAFETY: non-null and writable by the caller's contract. Sizes fit i64 (validated).
        unsafe {
            *oh = p.shape.oh as i64;
            *ow = p.shape.ow as i64;
        }
        Ok(())
    })
}

/// The bytes of workspace `op` needs on this handle (0 on CPU and SIM, where the workspace
/// arguments may be NULL and 0). Allocate at least this much (device memory for CUDA, 16-byte
/// aligned: cudaMalloc's alignment is enough) and pass it to the op.
///
/// # Safety
/// Each pointer is NULL or valid for its access.
#[no_mangle]
pub unsafe extern "C" fn lk_workspace_size(
    handle: *mut lk_handle,
    desc: *const lk_conv_desc,
    op: lk_op,
    bytes: *mut usize,
) -> lk_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let h = unsafe { handle_ref(handle)? };
        let bytes = non_null("bytes", bytes)?.cast_mut();
        // SAFETY: the caller's contract.
        let p = unsafe { problem(desc)? };
        let op = op_of(op)?;
        let n = match &h.backend {
            Backend::Host(_) => 0,
            Backend::Cuda { .. } => {
                lkconv_core::cuda::workspace_bytes(op, Impl::Fast, p.dtype, &p.conv, &p.shape)?
            }
        };
        // SAFETY: non-null and writable by the caller's contract.
        unsafe { *bytes = n };
        Ok(())
    })
}

/// The three passes with their tensors in argument order: (first input, second input, bias,
/// output). Which tensor each one is follows from the op.
#[derive(Clone, Copy)]
struct Args {
    in0: *const c_void,
    in1: *const c_void,
    bias: *const c_void,
    out: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
}

/// Element counts of (first input, second input, output) for `op`.
fn lens(op: Op, p: &Problem) -> [usize; 3] {
    let s = &p.shape;
    let w = p.conv.weight_dims(s.c).iter().product();
    match op {
        Op::Forward => [s.input_len(), w, s.output_len()],
        Op::DataGrad => [s.output_len(), w, s.input_len()],
        Op::WeightGrad => [s.input_len(), s.output_len(), w],
    }
}

/// Names of (first input, second input, output) for `op`, for messages.
fn names(op: Op) -> [&'static str; 3] {
    match op {
        Op::Forward => ["x", "w", "y"],
        Op::DataGrad => ["dy", "w", "dx"],
        Op::WeightGrad => ["x", "dy", "dw"],
    }
}

/// Runs one op on a handle: checks every pointer before any work starts.
///
/// # Safety
/// The pointers in `a` satisfy the contract of the public entry point.
unsafe fn run(handle: *const lk_handle, desc: *const lk_conv_desc, op: Op, a: Args) -> CallResult {
    // SAFETY: the caller's contract.
    let h = unsafe { handle_ref(handle)? };
    // SAFETY: the caller's contract.
    let p = unsafe { problem(desc)? };
    let [n0, n1, nout] = names(op);
    let align = p.dtype.size_bytes();
    let bias = (!a.bias.is_null()).then_some(a.bias);
    for (name, ptr) in [(n0, a.in0), (n1, a.in1), (nout, a.out.cast_const())]
        .into_iter()
        .chain(bias.map(|b| ("bias", b)))
    {
        non_null(name, ptr)?;
        if !(ptr as usize).is_multiple_of(align) {
            return Err(invalid(format!(
                "{name} pointer {ptr:p} is not aligned to its {} elements",
                p.dtype
            )));
        }
    }
    match &h.backend {
        Backend::Host(device) => match p.dtype {
            // SAFETY: pointers checked non-null and aligned; lengths per the caller's contract.
            DType::F32 => unsafe { run_host::<f32>(*device, op, &p, a) },
            // SAFETY: as above (f16 is a transparent u16).
            DType::F16 => unsafe { run_host::<f16>(*device, op, &p, a) },
            // SAFETY: as above (bf16 is a transparent u16).
            DType::Bf16 => unsafe { run_host::<bf16>(*device, op, &p, a) },
        },
        Backend::Cuda { device, stream } => {
            // SAFETY: the caller gives a stream of this device's primary context and keeps it
            // alive while the queued work runs (lk_set_stream's contract).
            let stream = unsafe { device.context().wrap_borrowed_stream(stream.cast()) };
            let addr = |p: *const c_void| p as usize as u64;
            let mut ex = lkconv_core::cuda::CudaExec::on_stream(device.clone(), stream)?;
            let problem = lkconv_core::Problem::new(op, Impl::Fast, p.dtype, &p.conv, &p.shape)?;
            let operands = lkconv_core::cuda::RawOperands {
                in0: addr(a.in0),
                in1: addr(a.in1),
                bias: if op == Op::Forward { addr(a.bias) } else { 0 },
                out: addr(a.out),
                workspace: addr(a.workspace),
                workspace_bytes: a.workspace_bytes,
            };
            // SAFETY: device pointers of the tensors `desc` describes (the entry points'
            // contract), valid until the work on the caller's stream completes.
            unsafe { lkconv_core::cuda::run_raw(&mut ex, &problem, operands) }?;
            Ok(())
        }
    }
}

/// Copies `len` elements from a host pointer into a new vector (allocation failure is
/// `LK_STATUS_OUT_OF_MEMORY`, never an abort).
///
/// # Safety
/// `p` is non-null, aligned for `T` and readable for `len` elements.
unsafe fn host_vec<T: Element>(p: *const c_void, len: usize) -> CallResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Failure(
            LK_STATUS_OUT_OF_MEMORY,
            format!("cannot allocate {len} elements of host memory"),
        )
    })?;
    // SAFETY: the caller's contract.
    v.extend_from_slice(unsafe { std::slice::from_raw_parts(p.cast::<T>(), len) });
    Ok(v)
}

/// Runs `op` on the CPU engine or the simulator: copies in, computes, copies out.
///
/// # Safety
/// The pointers in `a` are non-null (bias may be NULL), aligned for `T`, and hold the elements
/// the descriptor gives each tensor; the output is writable.
unsafe fn run_host<T: Element>(device: Device, op: Op, p: &Problem, a: Args) -> CallResult {
    let [n0, n1, nout] = lens(op, p);
    let s = &p.shape;
    let wdims = p.conv.weight_dims(s.c);
    let (imp, conv) = (Impl::Fast, &p.conv);
    // SAFETY (all host_vec calls): the caller's contract.
    let in0 = unsafe { host_vec::<T>(a.in0, n0)? };
    let in1 = unsafe { host_vec::<T>(a.in1, n1)? };
    let out = match op {
        Op::Forward => {
            let x = Tensor::from_vec(&s.input_dims(), in0)?;
            let w = Tensor::from_vec(&wdims, in1)?;
            let bias = if a.bias.is_null() {
                None
            } else {
                Some(Tensor::from_vec(&[s.c], unsafe {
                    host_vec::<T>(a.bias, s.c)?
                })?)
            };
            lkconv_core::device::forward(device, imp, conv, &x, &w, bias.as_ref())?
        }
        Op::DataGrad => {
            let dy = Tensor::from_vec(&s.output_dims(), in0)?;
            let w = Tensor::from_vec(&wdims, in1)?;
            lkconv_core::device::data_grad(device, imp, conv, &dy, &w, (s.h, s.w))?
        }
        Op::WeightGrad => {
            let x = Tensor::from_vec(&s.input_dims(), in0)?;
            let dy = Tensor::from_vec(&s.output_dims(), in1)?;
            lkconv_core::device::weight_grad(device, imp, conv, &x, &dy)?
        }
    };
    if out.len() != nout {
        return Err(Failure(
            LK_STATUS_INTERNAL,
            format!(
                "{} produced {} elements, expected {nout}",
                op.name(),
                out.len()
            ),
        ));
    }
    // SAFETY: the output holds `nout` writable elements (caller's contract); `out` is our own
    // vector, so the two cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(out.data().as_ptr(), a.out.cast::<T>(), nout) };
    Ok(())
}

/// y = conv(x, w) + bias. x [n,c,h,w], w [c,1,kh,kw], bias [c] or NULL, y [n,c,oh,ow], all of
/// `desc->dtype`; `workspace` of `workspace_bytes` >= `lk_workspace_size(.., LK_OP_FORWARD, ..)`
/// (NULL and 0 when that is 0). CUDA: queued on the handle's stream, returns without waiting.
///
/// # Safety
/// Each pointer is NULL or valid for its tensor (host memory on CPU and SIM, device memory of
/// the handle's GPU on CUDA), `y` and the workspace overlap nothing else, and on CUDA all stay
/// valid until the queued work completes.
#[no_mangle]
pub unsafe extern "C" fn lk_dwconv2d_forward(
    handle: *mut lk_handle,
    desc: *const lk_conv_desc,
    x: *const c_void,
    w: *const c_void,
    bias: *const c_void,
    y: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
) -> lk_status {
    let args = Args {
        in0: x,
        in1: w,
        bias,
        out: y,
        workspace,
        workspace_bytes,
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { run(handle, desc, Op::Forward, args) })
}

/// dx = the gradient of the forward pass with respect to x, given dy [n,c,oh,ow] and
/// w [c,1,kh,kw]; dx is [n,c,h,w]. Otherwise as `lk_dwconv2d_forward`.
///
/// # Safety
/// As for `lk_dwconv2d_forward`.
#[no_mangle]
pub unsafe extern "C" fn lk_dwconv2d_data_grad(
    handle: *mut lk_handle,
    desc: *const lk_conv_desc,
    dy: *const c_void,
    w: *const c_void,
    dx: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
) -> lk_status {
    let args = Args {
        in0: dy,
        in1: w,
        bias: std::ptr::null(),
        out: dx,
        workspace,
        workspace_bytes,
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { run(handle, desc, Op::DataGrad, args) })
}

/// dw = the gradient of the forward pass with respect to w, given x [n,c,h,w] and
/// dy [n,c,oh,ow]; dw is [c,1,kh,kw] (overwritten, not accumulated; deterministic).
/// Otherwise as `lk_dwconv2d_forward`.
///
/// # Safety
/// As for `lk_dwconv2d_forward`.
#[no_mangle]
pub unsafe extern "C" fn lk_dwconv2d_weight_grad(
    handle: *mut lk_handle,
    desc: *const lk_conv_desc,
    x: *const c_void,
    dy: *const c_void,
    dw: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
) -> lk_status {
    let args = Args {
        in0: x,
        in1: dy,
        bias: std::ptr::null(),
        out: dw,
        workspace,
        workspace_bytes,
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { run(handle, desc, Op::WeightGrad, args) })
}

/// A static name for a status ("LK_STATUS_OK", ...; "unknown status" otherwise).
#[no_mangle]
pub extern "C" fn lk_status_string(status: lk_status) -> *const c_char {
    let s: &'static CStr = match status {
        LK_STATUS_OK => c"LK_STATUS_OK",
        LK_STATUS_INVALID_ARGUMENT => c"LK_STATUS_INVALID_ARGUMENT",
        LK_STATUS_UNSUPPORTED => c"LK_STATUS_UNSUPPORTED",
        LK_STATUS_CUDA_UNAVAILABLE => c"LK_STATUS_CUDA_UNAVAILABLE",
        LK_STATUS_CUDA_ERROR => c"LK_STATUS_CUDA_ERROR",
        LK_STATUS_OUT_OF_MEMORY => c"LK_STATUS_OUT_OF_MEMORY",
        LK_STATUS_INTERNAL => c"LK_STATUS_INTERNAL",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// The message of the last call on this thread that failed ("" if none). Valid until the next
/// failing lkconv call on this thread.
#[no_mangle]
pub extern "C" fn lk_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// lkconv's version, "MAJOR.MINOR.PATCH" (static).
#[no_mangle]
pub extern "C" fn lk_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("version string with a NUL"),
        };
    VERSION.as_ptr()
}

/// Diagnostics for bindings: raises a panic inside lkconv, which is caught at the boundary like
/// any other, and returns `LK_STATUS_INTERNAL` with a message in `lk_last_error`.
#[no_mangle]
pub extern "C" fn lk_test_internal_error() -> lk_status {
    guard(|| panic!("lk_test_internal_error was called"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: lk_last_error returns a NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(lk_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        assert_eq!(lk_test_internal_error(), LK_STATUS_INTERNAL);
        assert!(last_error().contains("lk_test_internal_error was called"));
    }

    use lkconv_core::cuda::{CUresult, DriverError};

    #[test]
    fn errors_map_to_their_status() {
        let cases = [
            (Error::EmptyOutput("e".into()), LK_STATUS_INVALID_ARGUMENT),
            (Error::Unsupported("u".into()), LK_STATUS_UNSUPPORTED),
            (
                Error::CudaUnavailable("c".into()),
                LK_STATUS_CUDA_UNAVAILABLE,
            ),
            (
                Error::driver("launch", DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED)),
                LK_STATUS_CUDA_ERROR,
            ),
            (
                Error::driver("alloc", DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)),
                LK_STATUS_OUT_OF_MEMORY,
            ),
            (
                Error::OutOfMemory {
                    what: "y".into(),
                    bytes: 1 << 40,
                },
                LK_STATUS_OUT_OF_MEMORY,
            ),
            (Error::Simulator("s".into()), LK_STATUS_INTERNAL),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert_eq!(guard(|| Err(e.into())), want, "{text}");
            assert_eq!(last_error(), text);
        }
    }

    #[test]
    fn the_descriptor_has_the_c_layout() {
        assert_eq!(std::mem::size_of::<lk_conv_desc>(), 80);
        assert_eq!(std::mem::align_of::<lk_conv_desc>(), 8);
    }
}
