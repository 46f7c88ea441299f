//! `lkconv._lkconv`: the native part of the Python package.
//!
//! CPU: the fast f32 passes of `lkconv::cpu` on C-contiguous NumPy arrays, writing into an output
//! array the caller allocated (so that `lkconv.torch` can hand in views of its own tensors).
//! CUDA: the raw-pointer entry points of `lkconv::cuda` on device pointers and a stream that the
//! caller (`lkconv.torch`) takes from PyTorch. Every problem is validated here, by the core's
//! checks; Python only converts layouts and dtypes.

use lkconv::cuda::{self, CudaDevice};
use lkconv::{ConvShape, DType, DwConv2d, Error, Impl, Op, Padding, Problem};
use numpy::{PyReadonlyArray1, PyReadonlyArray4, PyReadwriteArray4, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Maps the core's typed errors onto the Python exceptions a caller expects: bad input is a
/// `ValueError`, an unsupported combination `NotImplementedError`, host or device memory exhausted
/// `MemoryError`, other CUDA trouble `RuntimeError`.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    if e.is_out_of_memory() {
        return PyMemoryError::new_err(msg);
    }
    match e {
        Error::Unsupported(_) => PyNotImplementedError::new_err(msg),
        Error::CudaUnavailable(_) | Error::Cuda { .. } | Error::Simulator(_) | Error::Io { .. } => {
            PyRuntimeError::new_err(msg)
        }
        _ => PyValueError::new_err(msg),
    }
}

/// The convolution from Python's (kernel, stride, padding [top, bottom, left, right], dilation)
/// (each a list or a tuple).
fn conv_of(
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<DwConv2d> {
    let [top, bottom, left, right] = padding;
    let conv = DwConv2d::new(kernel[0], kernel[1])
        .with_padding_sides(Padding {
            top,
            bottom,
            left,
            right,
        })
        .with_stride(stride[0], stride[1])
        .with_dilation(dilation[0], dilation[1]);
    conv.validate().map_err(py_err)?;
    Ok(conv)
}

fn check_dims(what: &str, got: &[usize], expected: [usize; 4]) -> PyResult<()> {
    if got != expected {
        return Err(PyValueError::new_err(format!(
            "{what} has shape {got:?}, expected {expected:?}"
        )));
    }
    Ok(())
}

fn not_contiguous(what: &str) -> PyErr {
    PyValueError::new_err(format!("{what} must be C-contiguous"))
}

fn slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    what: &str,
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| not_contiguous(what))
}

fn slice_mut<'a>(what: &str, a: &'a mut PyReadwriteArray4<'_, f32>) -> PyResult<&'a mut [f32]> {
    a.as_slice_mut().map_err(|_| not_contiguous(what))
}

/// Output shape [N, C, OH, OW] of a forward call; validates x, the weight and the bias.
#[pyfunction]
#[pyo3(signature = (x_shape, w_shape, bias_shape, stride, padding, dilation))]
fn forward_shape(
    x_shape: Vec<usize>,
    w_shape: Vec<usize>,
    bias_shape: Option<Vec<usize>>,
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<[usize; 4]> {
    let kernel = kernel_of(&w_shape)?;
    let conv = conv_of(kernel, stride, padding, dilation)?;
    let s = conv
        .check_forward(&x_shape, &w_shape, bias_shape.as_deref())
        .map_err(py_err)?;
    Ok(s.output_dims())
}

/// (KH, KW) of a weight [C, 1, KH, KW] (its other extents are checked by the core).
fn kernel_of(w_shape: &[usize]) -> PyResult<[usize; 2]> {
    match *w_shape {
        [_, _, kh, kw] => Ok([kh, kw]),
        _ => Err(py_err(Error::Shape {
            what: "weight w".into(),
            expected: "4 dimensions [C, 1, KH, KW]".into(),
            got: w_shape.to_vec(),
        })),
    }
}

/// Validates a data-gradient call (dy, w, input H x W); returns dx's shape [N, C, H, W].
#[pyfunction]
fn data_grad_shape(
    dy_shape: Vec<usize>,
    w_shape: Vec<usize>,
    input_hw: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<[usize; 4]> {
    let conv = conv_of(kernel_of(&w_shape)?, stride, padding, dilation)?;
    let s = conv
        .check_data_grad(&dy_shape, &w_shape, (input_hw[0], input_hw[1]))
        .map_err(py_err)?;
    Ok(s.input_dims())
}

/// Validates a weight-gradient call (x, dy, kernel); returns dw's shape [C, 1, KH, KW].
#[pyfunction]
fn weight_grad_shape(
    x_shape: Vec<usize>,
    dy_shape: Vec<usize>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<[usize; 4]> {
    let conv = conv_of(kernel, stride, padding, dilation)?;
    let s = conv
        .check_weight_grad(&x_shape, &dy_shape)
        .map_err(py_err)?;
    Ok(conv.weight_dims(s.c))
}

/// y = conv(x, w) + bias on the fast CPU path, into `y` (all f32, C-contiguous).
#[pyfunction]
#[pyo3(signature = (x, w, bias, y, stride, padding, dilation))]
#[allow(clippy::too_many_arguments)]
fn forward_f32(
    py: Python<'_>,
    x: PyReadonlyArray4<'_, f32>,
    w: PyReadonlyArray4<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    mut y: PyReadwriteArray4<'_, f32>,
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<()> {
    let conv = conv_of(kernel_of(w.shape())?, stride, padding, dilation)?;
    let s = conv
        .check_forward(x.shape(), w.shape(), bias.as_ref().map(|b| b.shape()))
        .map_err(py_err)?;
    check_dims("y", y.shape(), s.output_dims())?;
    let (xs, ws) = (slice("x", &x)?, slice("w", &w)?);
    let bs = bias.as_ref().map(|b| slice("bias", b)).transpose()?;
    let ys = slice_mut("y", &mut y)?;
    py.detach(|| lkconv::cpu::forward_f32_into(&conv, &s, xs, ws, bs, ys))
        .map_err(py_err)
}

/// dx = conv_transpose(dy, w) on the fast CPU path, into `dx` (its H, W give the input size).
#[pyfunction]
fn data_grad_f32(
    py: Python<'_>,
    dy: PyReadonlyArray4<'_, f32>,
    w: PyReadonlyArray4<'_, f32>,
    mut dx: PyReadwriteArray4<'_, f32>,
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<()> {
    let conv = conv_of(kernel_of(w.shape())?, stride, padding, dilation)?;
    let input_hw = (dx.shape()[2], dx.shape()[3]);
    let s = conv
        .check_data_grad(dy.shape(), w.shape(), input_hw)
        .map_err(py_err)?;
    check_dims("dx", dx.shape(), s.input_dims())?;
    let (dys, ws) = (slice("dy", &dy)?, slice("w", &w)?);
    let dxs = slice_mut("dx", &mut dx)?;
    py.detach(|| lkconv::cpu::data_grad_f32_into(&conv, &s, dys, ws, dxs))
        .map_err(py_err)
}

/// dw = sum over the batch of corr(x, dy) on the fast CPU path (deterministic), into `dw`.
#[pyfunction]
fn weight_grad_f32(
    py: Python<'_>,
    x: PyReadonlyArray4<'_, f32>,
    dy: PyReadonlyArray4<'_, f32>,
    mut dw: PyReadwriteArray4<'_, f32>,
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<()> {
    let conv = conv_of(kernel_of(dw.shape())?, stride, padding, dilation)?;
    let s = conv
        .check_weight_grad(x.shape(), dy.shape())
        .map_err(py_err)?;
    check_dims("dw", dw.shape(), conv.weight_dims(s.c))?;
    let (xs, dys) = (slice("x", &x)?, slice("dy", &dy)?);
    let dws = slice_mut("dw", &mut dw)?;
    py.detach(|| lkconv::cpu::weight_grad_f32_into(&conv, &s, xs, dys, dws))
        .map_err(py_err)
}

fn op_of(name: &str) -> PyResult<Op> {
    match name {
        "forward" => Ok(Op::Forward),
        "data_grad" => Ok(Op::DataGrad),
        "weight_grad" => Ok(Op::WeightGrad),
        other => Err(PyValueError::new_err(format!(
            "unknown op '{other}' (forward, data_grad or weight_grad)"
        ))),
    }
}

fn dtype_of(name: &str) -> PyResult<DType> {
    name.parse().map_err(py_err)
}

/// The problem of an op: `input_shape` is x's [N, C, H, W] for every op.
fn problem(
    input_shape: [usize; 4],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<(DwConv2d, ConvShape)> {
    let conv = conv_of(kernel, stride, padding, dilation)?;
    let [n, c, h, w] = input_shape;
    let s = conv.resolve(n, c, h, w).map_err(py_err)?;
    Ok((conv, s))
}

/// True when the wheel carries compiled CUDA kernels, a driver is present and GPU 0 opens.
#[pyfunction]
fn cuda_usable() -> bool {
    cuda::kernels_compiled() && CudaDevice::shared(0).is_ok()
}

/// Why CUDA is not usable ("" when it is).
#[pyfunction]
fn cuda_unusable_reason() -> String {
    if !cuda::kernels_compiled() {
        return "lkconv was built without CUDA kernels (no nvcc at build time)".into();
    }
    match CudaDevice::shared(0) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// Bytes of device workspace an op needs (allocate it with PyTorch's caching allocator).
#[pyfunction]
fn cuda_workspace_bytes(
    op: &str,
    dtype: &str,
    input_shape: [usize; 4],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> PyResult<usize> {
    let (conv, s) = problem(input_shape, kernel, stride, padding, dilation)?;
    cuda::workspace_bytes(op_of(op)?, Impl::Fast, dtype_of(dtype)?, &conv, &s).map_err(py_err)
}

/// Queues one op of lkconv's CUDA kernels on a stream that PyTorch owns; never synchronises.
///
/// `ptrs` are (first input, second input, bias or 0, output) as for `lkconv::cuda::*_raw`:
/// forward (x, w, bias, y), data_grad (dy, w, 0, dx), weight_grad (x, dy, 0, dw).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_launch(
    py: Python<'_>,
    op: &str,
    dtype: &str,
    device: usize,
    stream: usize,
    input_shape: [usize; 4],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
    ptrs: [u64; 4],
    workspace: [u64; 2],
) -> PyResult<()> {
    let op = op_of(op)?;
    let dtype = dtype_of(dtype)?;
    let conv = conv_of(kernel, stride, padding, dilation)?;
    let [in0, in1, bias, out] = ptrs;
    let [ws, ws_len] = workspace;
    let ws_len = usize::try_from(ws_len)
        .map_err(|_| PyValueError::new_err("workspace length does not fit in usize"))?;
    if in0 == 0 || in1 == 0 || out == 0 || (op != Op::Forward && bias != 0) {
        return Err(PyValueError::new_err("null or unexpected device pointer"));
    }
    let problem = Problem::for_input(op, Impl::Fast, dtype, &conv, input_shape).map_err(py_err)?;
    let operands = cuda::RawOperands {
        in0,
        in1,
        bias,
        out,
        workspace: ws,
        workspace_bytes: ws_len,
    };
    py.detach(|| {
        let dev = CudaDevice::shared(device)?;
        // SAFETY: `stream` is `torch.cuda.current_stream(device).cuda_stream`, a live stream of
        // the device's primary context (the one cudarc retains), kept alive by PyTorch for the
        // duration of this call; the wrapper does not own or destroy it, and our work is
        // ordered on it like any PyTorch op.
        let stream = unsafe {
            dev.context()
                .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream)
        };
        let mut ex = cuda::CudaExec::on_stream(dev, stream)?;
        // SAFETY: the pointers are `data_ptr()`s of contiguous tensors on `device` that
        // `lkconv.torch` allocated or checked to hold exactly the elements of this problem in
        // `dtype` (the output and the workspace freshly allocated, so nothing overlaps them);
        // PyTorch's caching allocator keeps every one of them valid for work queued on this
        // stream, the stream they were allocated or last used on.
        unsafe { cuda::run_raw(&mut ex, &problem, operands) }
    })
    .map_err(py_err)
}

/// The instruction set of the CPU fast path on this machine (e.g. "avx512").
#[pyfunction]
fn cpu_simd() -> &'static str {
    lkconv::cpu::direct::simd_description()
}

#[pymodule]
fn _lkconv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(forward_shape, m)?)?;
    m.add_function(wrap_pyfunction!(data_grad_shape, m)?)?;
    m.add_function(wrap_pyfunction!(weight_grad_shape, m)?)?;
    m.add_function(wrap_pyfunction!(forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(data_grad_f32, m)?)?;
    m.add_function(wrap_pyfunction!(weight_grad_f32, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_usable, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unusable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_launch, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_simd, m)?)?;
    Ok(())
}
