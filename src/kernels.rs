//! The CUDA kernel catalogue and launch planning, shared by the kernel simulator (`crate::sim`) and
//! the CUDA device: every kernel in `kernels/*.cu`, and the one place where a kernel and its tile
//! configuration are chosen for an op, an implementation, a dtype and a shape ([`plan`]).
//!
//! Every kernel has the C signature `extern "C" __global__ void NAME(const DwArgs args)`.
//!
//! Kernels (`<t>` = `f32` | `f16` | `bf16`, `<K>` = 3, 5, 7, 13, 25, 27, 29, 31):
//! - `lk_fwd_<t>_k<K>`, `lk_dgrad_<t>_k<K>`: block-tiled forward / data gradient, K x K filter as a
//!   template parameter, stride 1 / dilation 1 (`kernels/lk_conv.cu`);
//! - `lk_fwd_<t>_generic`, `lk_dgrad_<t>_generic`: the same for any KH x KW (filter processed in
//!   chunks of `aux2` rows x `aux3` columns so that shared memory stays small);
//! - `lk_wgrad_partial_<t>`, `lk_wgrad_reduce_<t>`: deterministic weight gradient, stride 1 /
//!   dilation 1, any kernel size (`kernels/lk_wgrad.cu`);
//! - `lk_naive_fwd_<t>`, `lk_naive_dgrad_<t>`, `lk_naive_wgrad_<t>`: one thread per output, any
//!   stride/dilation; the baseline and the fwd/dgrad path for stride/dilation != 1;
//! - `lk_wgrad_strided_<t>` (+ `lk_wgrad_reduce_<t>`): deterministic weight gradient for any
//!   stride/dilation (and stride-1 shapes whose tiles do not fit shared memory)
//!   (`kernels/lk_wgrad_strided.cu`);
//! - `lk_im2col_<t>`, `lk_im2col_epilogue_<t>`, `lk_col2im_<t>`: the im2col + GEMM baseline;
//! - `lk_bias_act_<t>`, `lk_affine_<t>`, `lk_avgpool_<t>`, `lk_dense_conv_<t>`: RepLKNet's
//!   element-wise epilogues, head pooling and stem conv (`kernels/lk_model.cu`, planned by the
//!   `model_*_launch` functions).
//!
//! Tile configurations chosen by [`plan`] (RX = 8 outputs per thread along x):
//! - tiled fwd/dgrad: register tile RY x 8 per thread (RY = 2 templated, 1 generic); block
//!   (TX, TY, P): OW split evenly into ceil(OW / 64) tiles of 8*TX columns (TX <= 8), OH split
//!   evenly into tiles of TH = RY*TY <= RY*256/TX rows (48 KB of shared memory at most), or
//!   into more tiles of >= 16 rows when N*C is small so that the grid has >= 264 blocks;
//!   P planes per block (one z-slice each) when TX*TY < 128 and the grid stays >= 264 blocks
//!   (small images: up to 256 threads within 48 KB); grid (ceil(N*C / P), tiles_y, tiles_x);
//! - wgrad partial: output tile TH x TW = min(OH, 16) x min(OW, 32) (shrunk to fit 48 KB of
//!   shared memory), one thread per (filter row, 8 filter columns) unit, G row groups filling up to
//!   256 threads; B = clamp(ceil(528 / C), 1, N * tiles) blocks per channel;
//! - wgrad strided: 256 threads = TG tap groups (8 taps each, TG = the power of two <= 8 that
//!   covers ceil(KH*KW / 8)) x 256/TG position lanes, 8 KB of shared memory;
//!   B = clamp(min(ceil(528 / C), N*OH*OW / 1024), 1, 65535) blocks per channel.

use std::sync::OnceLock;

use crate::conv::{ConvShape, DwConv2d};
use crate::device::{Impl, Op};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The argument block of every kernel (identical to `struct DwArgs` in `kernels/lk_args.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DwArgs {
    /// fwd: x; dgrad: dy; wgrad: x (device or host address).
    pub in0: u64,
    /// fwd: w; dgrad: w; wgrad: dy.
    pub in1: u64,
    /// fwd: bias or 0.
    pub bias: u64,
    /// fwd: y; dgrad: dx; wgrad: dw.
    pub out: u64,
    /// f32 scratch (wgrad partial sums, im2col matrices); 0 if none.
    pub workspace: u64,
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub oh: i32,
    pub ow: i32,
    pub kh: i32,
    pub kw: i32,
    pub sh: i32,
    pub sw: i32,
    pub pad_top: i32,
    pub pad_left: i32,
    pub dh: i32,
    pub dw: i32,
    /// Kernel-specific (tile counts, chunk sizes, modes): see each kernel's comment.
    pub aux0: i32,
    pub aux1: i32,
    pub aux2: i32,
    pub aux3: i32,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory; above 48 KB the CUDA side must raise the function's
    /// `MAX_DYNAMIC_SHARED_SIZE_BYTES` attribute.
    pub shared_bytes: u32,
    pub args: DwArgs,
}

/// A per-channel strided-batched f32 GEMM inside the workspace, run after
/// `launches[after_launch]` and before the next launch (cuBLAS on the GPU, a host loop in the
/// simulator: [`GemmStep::run_host`]).
///
/// For every `b in 0..batch`: `C_b = op(A_b) * op(B_b)` (alpha = 1, beta = 0), with
/// `C_b` an `m x n` matrix. All matrices are **row-major** f32 at element offsets into the
/// workspace: `A_b` starts at `a_offset + b * stride_a`; without `a_trans` it is stored `m x k`
/// (element (i, p) at `i * lda + p`), with `a_trans` it is stored `k x m` (element (i, p) of
/// op(A) at `p * lda + i`). Likewise `B_b` (`k x n`, or stored `n x k` with `b_trans`) and
/// `C_b` (element (i, j) at `c_offset + b * stride_c + i * ldc + j`).
/// On cuBLAS (column-major) compute the transpose: `C^T = op(B)^T * op(A)^T`, i.e.
/// `cublasSgemmStridedBatched(transb', transa', n, m, k, B, ldb, A, lda, C, ldc)`.
///
/// Uses (M = N*OH*OW, KK = KH*KW, layouts in `kernels/lk_im2col.cu`):
/// - fwd:   `OUT_c[M x 1] = P_c[M x KK] * W_c[KK x 1]`;
/// - wgrad: `OUT_c[KK x 1] = P_c^T * DY_c[M x 1]` (`a_trans`);
/// - dgrad: `DCOL_c[M x KK] = DY_c[M x 1] * W_c[1 x KK]`, then `lk_col2im` gathers it into dx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmStep {
    pub after_launch: usize,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_offset: usize,
    pub lda: usize,
    pub stride_a: usize,
    pub a_trans: bool,
    pub b_offset: usize,
    pub ldb: usize,
    pub stride_b: usize,
    pub b_trans: bool,
    pub c_offset: usize,
    pub ldc: usize,
    pub stride_c: usize,
}

impl GemmStep {
    /// Runs the GEMM on the host over the workspace (f32 accumulation in a fixed order).
    pub fn run_host(&self, ws: &mut [f32]) -> Result<()> {
        let last_c = self.c_offset + self.batch.saturating_sub(1) * self.stride_c;
        if self.batch > 0 && last_c + (self.m.max(1) - 1) * self.ldc + self.n > ws.len() {
            return Err(Error::BufferLength {
                what: "GEMM workspace".into(),
                expected: last_c + self.m * self.ldc,
                got: ws.len(),
            });
        }
        let mut row = vec![0f32; self.n];
        for b in 0..self.batch {
            let a0 = self.a_offset + b * self.stride_a;
            let b0 = self.b_offset + b * self.stride_b;
            let c0 = self.c_offset + b * self.stride_c;
            for i in 0..self.m {
                for (j, out) in row.iter_mut().enumerate() {
                    let mut acc = 0f32;
                    for p in 0..self.k {
                        let a = if self.a_trans {
                            ws[a0 + p * self.lda + i]
                        } else {
                            ws[a0 + i * self.lda + p]
                        };
                        let bv = if self.b_trans {
                            ws[b0 + j * self.ldb + p]
                        } else {
                            ws[b0 + p * self.ldb + j]
                        };
                        acc += a * bv;
                    }
                    *out = acc;
                }
                ws[c0 + i * self.ldc..c0 + i * self.ldc + self.n].copy_from_slice(&row);
            }
        }
        Ok(())
    }
}

/// The launches of one op, the f32 workspace they need, and an optional GEMM step.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub launches: Vec<Launch>,
    /// Bytes of f32 workspace (0: none; bind 0).
    pub workspace_bytes: usize,
    pub gemm: Option<GemmStep>,
}

impl Plan {
    /// Sets the five buffer addresses in every launch (see [`DwArgs`] for their meaning per op).
    pub fn bind(&mut self, in0: u64, in1: u64, bias: u64, out: u64, workspace: u64) {
        for l in &mut self.launches {
            l.args.in0 = in0;
            l.args.in1 = in1;
            l.args.bias = bias;
            l.args.out = out;
            l.args.workspace = workspace;
        }
    }

    /// Workspace length in f32 elements.
    pub fn workspace_len(&self) -> usize {
        self.workspace_bytes / 4
    }
}

/// Kernel sizes with a templated (fully unrolled) tiled kernel.
pub const TEMPLATE_SIZES: [usize; 8] = [3, 5, 7, 13, 25, 27, 29, 31];
/// Outputs per thread along x in the tiled kernels.
pub const RX: usize = 8;
/// Shared memory per block the planner aims for (no opt-in needed below it).
pub const SHARED_TARGET_BYTES: usize = 48 * 1024;
/// The hardware limit on dynamic shared memory per block (sm_80+: 227 KB).
pub const SHARED_LIMIT_BYTES: usize = 227 * 1024;
/// Blocks the tiled forward/data-gradient grid aims for at least (2 per SM of a 132-SM H100).
const TARGET_BLOCKS: usize = 264;
/// Threads per block for the one-thread-per-element kernels.
const FLAT_BLOCK: u32 = 256;

fn all_names() -> &'static Vec<&'static str> {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut v: Vec<String> = Vec::new();
        for t in DType::ALL.map(DType::name) {
            for k in TEMPLATE_SIZES {
                v.push(format!("lk_fwd_{t}_k{k}"));
                v.push(format!("lk_dgrad_{t}_k{k}"));
            }
            for base in [
                "lk_fwd_{}_generic",
                "lk_dgrad_{}_generic",
                "lk_wgrad_partial_{}",
                "lk_wgrad_reduce_{}",
                "lk_wgrad_strided_{}",
                "lk_naive_fwd_{}",
                "lk_naive_dgrad_{}",
                "lk_naive_wgrad_{}",
                "lk_im2col_{}",
                "lk_im2col_epilogue_{}",
                "lk_col2im_{}",
                "lk_bias_act_{}",
                "lk_affine_{}",
                "lk_avgpool_{}",
                "lk_dense_conv_{}",
            ] {
                v.push(base.replace("{}", t));
            }
        }
        v.extend(
            crate::tensor_core::kernel_names()
                .iter()
                .map(|s| s.to_string()),
        );
        v.sort();
        v.into_iter()
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect()
    })
}

/// Every kernel that exists in `kernels/*.cu`, sorted by name.
pub fn kernel_names() -> Vec<&'static str> {
    all_names().clone()
}

/// The catalogue's `&'static` name for a kernel (internal: every planned name exists).
fn name(s: String) -> Result<&'static str> {
    all_names()
        .iter()
        .copied()
        .find(|n| *n == s)
        .ok_or_else(|| Error::InvalidArgument(format!("no kernel named {s}")))
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Overflow(format!("{what} {v} does not fit a 32-bit int")))
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

fn round4(v: usize) -> usize {
    v.div_ceil(4) * 4
}

/// The shape-dependent part of every launch's arguments (pointers and aux fields zero).
fn base_args(conv: &DwConv2d, s: &ConvShape) -> Result<DwArgs> {
    let p = conv.padding;
    let (kh, kw) = conv.kernel;
    // every index the kernels form in 32-bit ints stays below 2^31
    let half = i32::MAX as usize / 2;
    let span_h = s.h.checked_add(p.top + p.bottom);
    let span_w = s.w.checked_add(p.left + p.right);
    if span_h.is_none_or(|v| v > half) || span_w.is_none_or(|v| v > half) {
        return Err(Error::Overflow(
            "padded image extent does not fit the kernels' 32-bit indices".into(),
        ));
    }
    if kh.checked_mul(kw).is_none_or(|v| v > half) {
        return Err(Error::Overflow(format!("filter {kh}x{kw} is too large")));
    }
    Ok(DwArgs {
        n: to_i32("batch N", s.n)?,
        c: to_i32("channels C", s.c)?,
        h: to_i32("height H", s.h)?,
        w: to_i32("width W", s.w)?,
        oh: to_i32("output height", s.oh)?,
        ow: to_i32("output width", s.ow)?,
        kh: to_i32("kernel height", kh)?,
        kw: to_i32("kernel width", kw)?,
        sh: to_i32("stride", conv.stride.0)?,
        sw: to_i32("stride", conv.stride.1)?,
        pad_top: to_i32("padding", p.top)?,
        pad_left: to_i32("padding", p.left)?,
        dh: to_i32("dilation", conv.dilation.0)?,
        dw: to_i32("dilation", conv.dilation.1)?,
        ..DwArgs::default()
    })
}

/// A 1-D launch of one thread per element (`total` elements), exact (no grid-stride loop).
fn flat_launch(kernel: &'static str, total: usize, args: DwArgs) -> Result<Launch> {
    let blocks = ceil_div(total, FLAT_BLOCK as usize);
    let gx = u32::try_from(blocks)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::Overflow(format!("{total} threads exceed the CUDA grid")))?;
    Ok(Launch {
        kernel,
        grid: (gx.max(1), 1, 1),
        block: (FLAT_BLOCK, 1, 1),
        shared_bytes: 0,
        args,
    })
}

/// A 1-D grid-stride launch over `total` elements.
fn strided_launch(kernel: &'static str, total: usize, args: DwArgs) -> Launch {
    let blocks = ceil_div(total, FLAT_BLOCK as usize).clamp(1, 1 << 20);
    Launch {
        kernel,
        grid: (blocks as u32, 1, 1),
        block: (FLAT_BLOCK, 1, 1),
        shared_bytes: 0,
        args,
    }
}

/// The activation a model kernel applies (`aux0` of `lk_bias_act` and `lk_dense_conv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelAct {
    None = 0,
    Relu = 1,
    /// Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
    Gelu = 2,
}

/// NCHW dims as the kernels' 32-bit fields, checking that the element count fits 64 bits.
fn model_dims(n: usize, c: usize, h: usize, w: usize) -> Result<(DwArgs, usize)> {
    let total = n
        .checked_mul(c)
        .and_then(|v| v.checked_mul(h))
        .and_then(|v| v.checked_mul(w))
        .filter(|&v| v <= i64::MAX as usize / 2)
        .ok_or_else(|| Error::Overflow(format!("tensor {n}x{c}x{h}x{w}")))?;
    let args = DwArgs {
        n: to_i32("batch N", n)?,
        c: to_i32("channels C", c)?,
        h: to_i32("height H", h)?,
        w: to_i32("width W", w)?,
        ..DwArgs::default()
    };
    Ok((args, total))
}

/// `lk_bias_act_<t>` over an `[n, c, h, w]` tensor: `y = act(x + bias[c]) + res` (bind in0 = x,
/// bias, in1 = res, out = y; bias and res may be 0). Pointers are left 0.
pub fn model_bias_act_launch(
    dtype: DType,
    [n, c, h, w]: [usize; 4],
    act: ModelAct,
) -> Result<Launch> {
    let (mut args, total) = model_dims(n, c, h, w)?;
    args.aux0 = act as i32;
    Ok(strided_launch(
        name(format!("lk_bias_act_{}", dtype.name()))?,
        total,
        args,
    ))
}

/// `lk_affine_<t>`: `y = x * scale[c] + shift[c]` (bind in0 = x, in1 = scale, bias = shift,
/// out = y; scale and shift may be 0).
pub fn model_affine_launch(dtype: DType, [n, c, h, w]: [usize; 4]) -> Result<Launch> {
    let (args, total) = model_dims(n, c, h, w)?;
    Ok(strided_launch(
        name(format!("lk_affine_{}", dtype.name()))?,
        total,
        args,
    ))
}

/// `lk_avgpool_<t>`: per plane `mean * scale[c] + shift[c]` into `[n, c]`, or `[c, n]` with
/// `transposed` (bind in0 = x, in1 = scale, bias = shift, out).
pub fn model_avgpool_launch(
    dtype: DType,
    [n, c, h, w]: [usize; 4],
    transposed: bool,
) -> Result<Launch> {
    let (mut args, _) = model_dims(n, c, h, w)?;
    args.aux1 = transposed as i32;
    flat_launch(name(format!("lk_avgpool_{}", dtype.name()))?, n * c, args)
}

/// `lk_dense_conv_<t>`: a dense `k x k` conv (stride, padding, dilation 1) with bias and
/// activation, `[n, cin, h, w]` -> `[n, cout, oh, ow]` (bind in0 = x, in1 = w `[cout, cin, k,
/// k]`, bias, out = y).
#[allow(clippy::too_many_arguments)]
pub fn model_dense_conv_launch(
    dtype: DType,
    [n, cin, h, w]: [usize; 4],
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    act: ModelAct,
) -> Result<Launch> {
    let out = |v: usize| -> Result<usize> {
        let padded = v + 2 * pad;
        if k == 0 || stride == 0 || padded < k {
            return Err(Error::EmptyOutput(format!(
                "dense conv: input {v} (padding {pad}) is smaller than the kernel {k}"
            )));
        }
        Ok((padded - k) / stride + 1)
    };
    let (oh, ow) = (out(h)?, out(w)?);
    let (mut args, _) = model_dims(n, cin, h, w)?;
    let (_, total) = model_dims(n, cout, oh, ow)?;
    args.oh = to_i32("output height", oh)?;
    args.ow = to_i32("output width", ow)?;
    args.kh = to_i32("kernel", k)?;
    args.kw = args.kh;
    args.sh = to_i32("stride", stride)?;
    args.sw = args.sh;
    args.pad_top = to_i32("padding", pad)?;
    args.pad_left = args.pad_top;
    args.dh = 1;
    args.dw = 1;
    args.aux0 = act as i32;
    args.aux1 = to_i32("output channels", cout)?;
    flat_launch(
        name(format!("lk_dense_conv_{}", dtype.name()))?,
        total,
        args,
    )
}

/// Plans `op` with implementation `imp` for storage type `dtype` on a checked shape.
///
/// `Impl::Fast` uses the tiled kernels for stride 1 / dilation 1; otherwise the deterministic
/// two-kernel `lk_wgrad_strided` + `lk_wgrad_reduce` for the weight gradient and the naive (one
/// thread per output, any stride/dilation) kernels for fwd/dgrad; `Impl::Naive` and
/// `Impl::Im2col` are the baselines (im2col supports all three ops: see [`GemmStep`]);
/// `Impl::Reference` is CPU-only.
pub fn plan(op: Op, imp: Impl, dtype: DType, conv: &DwConv2d, shape: &ConvShape) -> Result<Plan> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    if s != *shape {
        return Err(Error::InvalidArgument(format!(
            "shape {shape:?} is not what the convolution gives for its input ({s:?})"
        )));
    }
    let args = base_args(conv, &s)?;
    if s.n.checked_mul(s.c).is_none_or(|v| v > i32::MAX as usize) {
        return Err(Error::Overflow("N*C exceeds 2^31 - 1 planes".into()));
    }
    let t = dtype.name();
    match imp {
        Impl::Reference => Err(Error::Unsupported(
            "the reference implementation runs on the CPU only".into(),
        )),
        Impl::Naive => naive_plan(op, t, &s, conv, args),
        Impl::Im2col => im2col_plan(op, t, &s, conv, args),
        Impl::TensorCore => match crate::tensor_core::plan(op, dtype, conv, &s, args)? {
            Some(p) => Ok(p),
            None => plan(op, Impl::Fast, dtype, conv, &s),
        },
        Impl::Fast => {
            let fast = match op {
                Op::Forward | Op::DataGrad if conv.is_unit() => tiled_plan(op, t, &s, conv, args)?,
                Op::Forward | Op::DataGrad => None,
                Op::WeightGrad => {
                    let tiled = if conv.is_unit() {
                        wgrad_plan(t, &s, conv, args)?
                    } else {
                        None
                    };
                    match tiled {
                        Some(p) => Some(p),
                        None => wgrad_strided_plan(t, &s, conv, args)?,
                    }
                }
            };
            match fast {
                Some(p) => Ok(p),
                None => naive_plan(op, t, &s, conv, args),
            }
        }
    }
}

fn naive_plan(op: Op, t: &str, s: &ConvShape, conv: &DwConv2d, args: DwArgs) -> Result<Plan> {
    let (kh, kw) = conv.kernel;
    let (kernel, total) = match op {
        Op::Forward => (format!("lk_naive_fwd_{t}"), s.output_len()),
        Op::DataGrad => (format!("lk_naive_dgrad_{t}"), s.input_len()),
        Op::WeightGrad => (format!("lk_naive_wgrad_{t}"), s.c * kh * kw),
    };
    Ok(Plan {
        launches: vec![flat_launch(name(kernel)?, total, args)?],
        workspace_bytes: 0,
        gemm: None,
    })
}

/// Row stride (floats) of the tiled kernel's input tile: a multiple of 4 (16-byte loads) that is
/// 4 more than a multiple of 8, so that the rows of a warp start on different shared-memory banks.
/// Must match `tile_ld` in kernels/lk_common.cuh.
fn tile_ld(tw: usize, kcw: usize) -> usize {
    let ld = tw + round4(kcw);
    if ld.is_multiple_of(8) {
        ld + 4
    } else {
        ld
    }
}

/// Shared bytes of the tiled fwd/dgrad kernel.
fn tiled_smem(th: usize, tw: usize, kch: usize, kcw: usize) -> usize {
    4 * (kch * round4(kcw) + (th + kch - 1) * tile_ld(tw, kcw))
}

/// The tiled forward / data-gradient kernel; None when no configuration fits the grid limits.
fn tiled_plan(
    op: Op,
    t: &str,
    s: &ConvShape,
    conv: &DwConv2d,
    mut args: DwArgs,
) -> Result<Option<Plan>> {
    let (kh, kw) = conv.kernel;
    let dgrad = op == Op::DataGrad;
    let (oh, ow) = if dgrad { (s.h, s.w) } else { (s.oh, s.ow) };
    // at most 8 threads (64 columns) per tile row, tiles balanced so few columns are wasted
    let tiles_x = ceil_div(ow, 8 * RX);
    let tx = ceil_div(ceil_div(ow, tiles_x), RX).clamp(1, 8);
    let tw = tx * RX;
    let templated = kh == kw && TEMPLATE_SIZES.contains(&kh);
    // output rows per thread: 2 in the templated kernel (RY), 1 in the generic one
    let ry = if templated { 2 } else { 1 };
    let mut max_th = 256 / tx * ry;
    let (mut kch, mut kcw) = (kh, kw);
    if templated {
        while tiled_smem(ceil_div(max_th.min(oh), ry) * ry, tw, kch, kcw) > SHARED_TARGET_BYTES
            && max_th > ry
        {
            max_th = max_th.div_ceil(2);
        }
    } else {
        kch = kch.min(64);
        kcw = kcw.min(64);
        while tiled_smem(max_th.min(oh), tw, kch, kcw) > SHARED_TARGET_BYTES {
            if kch > 8 {
                kch = kch.div_ceil(2);
            } else if kcw > 8 {
                kcw = kcw.div_ceil(2);
            } else if max_th > 1 {
                max_th = max_th.div_ceil(2);
            } else {
                break;
            }
        }
    }
    let planes = s.n * s.c;
    let mut tiles_y = ceil_div(oh, max_th);
    // few planes (batch 1): more, shorter tiles (>= 16 rows) so that the grid fills the GPU
    if planes * tiles_x * tiles_y < TARGET_BLOCKS {
        let want = ceil_div(TARGET_BLOCKS, planes * tiles_x).min(ceil_div(oh, 16));
        tiles_y = tiles_y.max(want);
    }
    let threads_y = ceil_div(ceil_div(oh, tiles_y), ry);
    let th = threads_y * ry;
    let smem1 = tiled_smem(th, tw, kch, kcw);
    if tiles_y > 65535 || tiles_x > 65535 || smem1 > SHARED_LIMIT_BYTES {
        return Ok(None);
    }
    // small images, many planes: pack P planes into one block (one z-slice each)
    let threads1 = tx * threads_y;
    let blocks1 = planes * tiles_x * tiles_y;
    let p = if threads1 < 128 {
        (256 / threads1)
            .min(SHARED_TARGET_BYTES / smem1)
            .min(64)
            .min(blocks1 / TARGET_BLOCKS)
            .max(1)
    } else {
        1
    };
    let smem = smem1 * p;
    let kind = if dgrad { "dgrad" } else { "fwd" };
    let kernel = if templated {
        format!("lk_{kind}_{t}_k{kh}")
    } else {
        format!("lk_{kind}_{t}_generic")
    };
    args.aux0 = tiles_x as i32;
    args.aux1 = tiles_y as i32;
    args.aux2 = kch as i32;
    args.aux3 = kcw as i32;
    Ok(Some(Plan {
        launches: vec![Launch {
            kernel: name(kernel)?,
            grid: (ceil_div(planes, p) as u32, tiles_y as u32, tiles_x as u32),
            block: (tx as u32, threads_y as u32, p as u32),
            shared_bytes: smem as u32,
            args,
        }],
        workspace_bytes: 0,
        gemm: None,
    }))
}

/// Shared bytes of the weight-gradient partial kernel.
fn wgrad_smem(th: usize, tw: usize, kh: usize, kw: usize, threads: usize) -> usize {
    let kwb = ceil_div(kw, RX);
    let twp = ceil_div(tw, RX) * RX;
    4 * ((th + kh - 1) * (kwb * RX + twp + RX) + th * twp + threads * RX)
}

fn wgrad_threads(th: usize, kh: usize, kw: usize) -> (usize, usize) {
    let units = kh * ceil_div(kw, RX);
    if units <= 256 {
        let g = (256 / units).min(th).max(1);
        (units, g)
    } else {
        (256, 1)
    }
}

/// The two-kernel deterministic weight gradient; None when the tiles do not fit shared memory.
fn wgrad_plan(t: &str, s: &ConvShape, conv: &DwConv2d, mut args: DwArgs) -> Result<Option<Plan>> {
    let (kh, kw) = conv.kernel;
    let mut th = s.oh.min(16);
    let mut tw = s.ow.min(32);
    let smem_of = |th: usize, tw: usize| {
        let (tpg, g) = wgrad_threads(th, kh, kw);
        wgrad_smem(th, tw, kh, kw, tpg * g)
    };
    while smem_of(th, tw) > SHARED_TARGET_BYTES && (th > 1 || tw > 8) {
        if th > 1 {
            th = th.div_ceil(2);
        } else {
            tw = tw.div_ceil(2).max(8).min(tw);
            if tw == 8 {
                break;
            }
        }
    }
    let smem = smem_of(th, tw);
    if smem > SHARED_LIMIT_BYTES {
        return Ok(None);
    }
    let (tpg, g) = wgrad_threads(th, kh, kw);
    let tiles = ceil_div(s.oh, th) * ceil_div(s.ow, tw);
    let items = s.n * tiles;
    let blocks = ceil_div(528, s.c).clamp(1, items.min(65535));
    let kk = kh * kw;
    let ws_len =
        s.c.checked_mul(blocks)
            .and_then(|v| v.checked_mul(kk))
            .ok_or_else(|| Error::Overflow("weight-gradient workspace".into()))?;
    let mut a1 = args;
    a1.aux0 = th as i32;
    a1.aux1 = tw as i32;
    a1.aux2 = g as i32;
    args.aux0 = blocks as i32;
    let partial = Launch {
        kernel: name(format!("lk_wgrad_partial_{t}"))?,
        grid: (s.c as u32, blocks as u32, 1),
        block: ((tpg * g) as u32, 1, 1),
        shared_bytes: smem as u32,
        args: a1,
    };
    let reduce = flat_launch(name(format!("lk_wgrad_reduce_{t}"))?, s.c * kk, args)?;
    Ok(Some(Plan {
        launches: vec![partial, reduce],
        workspace_bytes: ws_len
            .checked_mul(4)
            .ok_or_else(|| Error::Overflow("weight-gradient workspace".into()))?,
        gemm: None,
    }))
}

/// Threads per block of `lk_wgrad_strided` (must match `WG_THREADS` in the kernel).
const WGRAD_STRIDED_THREADS: usize = 256;
/// Filter taps per thread of `lk_wgrad_strided` (`WG_TC`).
const WGRAD_STRIDED_TAPS: usize = 8;
/// Blocks the strided weight-gradient grid aims for (4 per SM of a 132-SM H100).
const WGRAD_TARGET_BLOCKS: usize = 528;
/// Output positions a strided weight-gradient block gets at least (when there are enough).
const WGRAD_MIN_POSITIONS: usize = 1024;

/// The deterministic weight gradient for any stride/dilation: `lk_wgrad_strided` (partial sums
/// per (channel, slice of the N*OH*OW positions)) + `lk_wgrad_reduce`; None when an index would
/// not fit the kernel's 32-bit ints.
fn wgrad_strided_plan(
    t: &str,
    s: &ConvShape,
    conv: &DwConv2d,
    mut args: DwArgs,
) -> Result<Option<Plan>> {
    let (kh, kw) = conv.kernel;
    let kk = kh * kw;
    let ohw = s.oh * s.ow;
    if ohw > i32::MAX as usize / 2 {
        return Ok(None);
    }
    // tap groups: a power of two <= 8 covering the 8-tap chunks (fewer passes over the slice)
    let chunks = ceil_div(kk, WGRAD_STRIDED_TAPS);
    let tg = chunks.next_power_of_two().min(8);
    let positions = s.n * ohw;
    let blocks = ceil_div(WGRAD_TARGET_BLOCKS, s.c)
        .min(positions / WGRAD_MIN_POSITIONS)
        .clamp(1, 65535);
    let ws_len =
        s.c.checked_mul(blocks)
            .and_then(|v| v.checked_mul(kk))
            .and_then(|v| v.checked_mul(4))
            .ok_or_else(|| Error::Overflow("weight-gradient workspace".into()))?;
    let mut a1 = args;
    a1.aux0 = tg as i32;
    args.aux0 = blocks as i32;
    let partial = Launch {
        kernel: name(format!("lk_wgrad_strided_{t}"))?,
        grid: (s.c as u32, blocks as u32, 1),
        block: (WGRAD_STRIDED_THREADS as u32, 1, 1),
        shared_bytes: (4 * WGRAD_STRIDED_THREADS * WGRAD_STRIDED_TAPS) as u32,
        args: a1,
    };
    let reduce = flat_launch(name(format!("lk_wgrad_reduce_{t}"))?, s.c * kk, args)?;
    Ok(Some(Plan {
        launches: vec![partial, reduce],
        workspace_bytes: ws_len,
        gemm: None,
    }))
}

fn im2col_plan(op: Op, t: &str, s: &ConvShape, conv: &DwConv2d, args: DwArgs) -> Result<Plan> {
    let (kh, kw) = conv.kernel;
    let kk = kh * kw;
    let overflow = || Error::Overflow("im2col workspace".into());
    let m = s.n.checked_mul(s.oh * s.ow).ok_or_else(overflow)?;
    let cm = s.c.checked_mul(m).ok_or_else(overflow)?;
    let ckk = s.c.checked_mul(kk).ok_or_else(overflow)?;
    let cmkk = cm.checked_mul(kk).ok_or_else(overflow)?;
    let with_mode = |mode: i32| DwArgs { aux0: mode, ..args };
    let base = GemmStep {
        after_launch: 0,
        batch: s.c,
        m: 0,
        n: 0,
        k: 0,
        a_offset: 0,
        lda: 0,
        stride_a: 0,
        a_trans: false,
        b_offset: 0,
        ldb: 0,
        stride_b: 0,
        b_trans: false,
        c_offset: 0,
        ldc: 0,
        stride_c: 0,
    };
    let (launches, gemm, len) = match op {
        Op::Forward => {
            let len = cmkk.checked_add(ckk + cm).ok_or_else(overflow)?;
            let g = GemmStep {
                m,
                n: 1,
                k: kk,
                a_offset: 0,
                lda: kk,
                stride_a: m * kk,
                b_offset: cmkk,
                ldb: 1,
                stride_b: kk,
                c_offset: cmkk + ckk,
                ldc: 1,
                stride_c: m,
                ..base
            };
            let l = vec![
                strided_launch(name(format!("lk_im2col_{t}"))?, cmkk + ckk, with_mode(0)),
                strided_launch(
                    name(format!("lk_im2col_epilogue_{t}"))?,
                    s.output_len(),
                    with_mode(0),
                ),
            ];
            (l, g, len)
        }
        Op::WeightGrad => {
            let len = cmkk.checked_add(cm + ckk).ok_or_else(overflow)?;
            let g = GemmStep {
                m: kk,
                n: 1,
                k: m,
                a_offset: 0,
                lda: kk,
                stride_a: m * kk,
                a_trans: true,
                b_offset: cmkk,
                ldb: 1,
                stride_b: m,
                c_offset: cmkk + cm,
                ldc: 1,
                stride_c: kk,
                ..base
            };
            let l = vec![
                strided_launch(name(format!("lk_im2col_{t}"))?, cmkk + cm, with_mode(1)),
                strided_launch(name(format!("lk_im2col_epilogue_{t}"))?, ckk, with_mode(1)),
            ];
            (l, g, len)
        }
        Op::DataGrad => {
            let len = cmkk.checked_add(cm + ckk).ok_or_else(overflow)?;
            let g = GemmStep {
                m,
                n: kk,
                k: 1,
                a_offset: 0,
                lda: 1,
                stride_a: m,
                b_offset: cm,
                ldb: kk,
                stride_b: kk,
                c_offset: cm + ckk,
                ldc: kk,
                stride_c: m * kk,
                ..base
            };
            let l = vec![
                strided_launch(name(format!("lk_im2col_{t}"))?, cm + ckk, with_mode(2)),
                strided_launch(name(format!("lk_col2im_{t}"))?, s.input_len(), with_mode(2)),
            ];
            (l, g, len)
        }
    };
    Ok(Plan {
        launches,
        workspace_bytes: len.checked_mul(4).ok_or_else(overflow)?,
        gemm: Some(gemm),
    })
}

/// Number of filter taps `t in 0..k` with `o - pad + t` inside `0..len` (stride/dilation 1).
fn taps_inside(o: usize, k: usize, pad: i64, len: usize) -> usize {
    let lo = (pad - o as i64).max(0);
    let hi = (len as i64 + pad - o as i64).min(k as i64);
    (hi - lo).max(0) as usize
}

/// The FMAs the planned kernels execute for one call (padding taps and idle lanes of a register
/// tile included), to report which share of the executed work is useful
/// (`DwConv2d::useful_flops / 2` over this). Tiled fwd/dgrad: every thread runs its full
/// 1 x RX register tile over the filter rows that touch the image (templated: the quads of 4
/// filter columns its stored outputs can reach, and no register row past the plane; generic: the
/// columns its outputs can reach); wgrad: each unit's clamped rows times 8-column
/// steps of 64 FMAs; naive and strided wgrad: only taps inside the image; im2col: the nominal
/// GEMM.
pub fn executed_fmas(op: Op, imp: Impl, conv: &DwConv2d, shape: &ConvShape) -> Result<f64> {
    let plan = plan(op, imp, DType::F32, conv, shape)?;
    let s = shape;
    let (kh, kw) = conv.kernel;
    let planes = (s.n * s.c) as f64;
    let l = &plan.launches[0];
    if plan.gemm.is_some() {
        return Ok((s.c * s.n * s.oh * s.ow * kh * kw) as f64);
    }
    if l.kernel.starts_with("lk_naive") || l.kernel.starts_with("lk_wgrad_strided") {
        return Ok(conv.useful_flops(s) / 2.0);
    }
    let p = conv.padding;
    if l.kernel.starts_with("lk_wgrad") {
        let (th, tw) = (l.args.aux0 as usize, l.args.aux1 as usize);
        let kwb = ceil_div(kw, RX);
        let mut per_plane = 0usize;
        for oy0 in (0..s.oh).step_by(th) {
            for ox0 in (0..s.ow).step_by(tw) {
                for ky in 0..kh {
                    let lo = (p.top as i64 - ky as i64 - oy0 as i64).max(0);
                    let hi = (th.min(s.oh - oy0) as i64)
                        .min(s.h as i64 + p.top as i64 - ky as i64 - oy0 as i64);
                    let rows = (hi - lo).max(0) as usize;
                    for q in 0..kwb {
                        let gx0 = ox0 as i64 - p.left as i64 + (q * RX) as i64;
                        let ox_lo = (-(gx0 + RX as i64 - 1)).max(0);
                        let ox_hi = (tw.min(s.ow - ox0) as i64).min(s.w as i64 - gx0);
                        if ox_hi > ox_lo {
                            let start = ox_lo / RX as i64 * RX as i64;
                            let steps = (ox_hi - start + RX as i64 - 1) / RX as i64;
                            per_plane += rows * steps as usize * RX * RX;
                        }
                    }
                }
            }
        }
        return Ok(planes * per_plane as f64);
    }
    // tiled fwd / dgrad
    let dgrad = op == Op::DataGrad;
    let (src_h, src_w, oh, ow) = if dgrad {
        (s.oh, s.ow, s.h, s.w)
    } else {
        (s.h, s.w, s.oh, s.ow)
    };
    let (pt, pl) = if dgrad {
        (kh as i64 - 1 - p.top as i64, kw as i64 - 1 - p.left as i64)
    } else {
        (p.top as i64, p.left as i64)
    };
    let generic = l.kernel.ends_with("_generic");
    let ry = if generic { 1 } else { 2 };
    let th = l.block.1 as usize * ry;
    // rows: per output row inside the plane (the templated kernel skips its second register row
    // past the plane), the filter rows whose source row is in the image
    let mut rows = 0usize;
    for oy0 in (0..oh).step_by(th) {
        for oyb in (oy0..oy0 + th).step_by(ry).filter(|&o| o < oh) {
            rows += (oyb..(oyb + ry).min(oh))
                .map(|oy| taps_inside(oy, kh, pt, src_h))
                .sum::<usize>();
        }
    }
    // cols: per thread (global x index t, outputs t*RX ..), the filter columns it visits
    let threads_x = (l.grid.2 * l.block.0) as usize;
    let cols: usize = (0..threads_x)
        .map(|t| {
            let gx0 = (t * RX) as i64 - pl;
            if generic {
                let lo = (-(gx0 + RX as i64 - 1)).max(0);
                let hi = (kw as i64).min(src_w as i64 - gx0);
                (hi - lo).max(0) as usize
            } else {
                // quads of 4 taps that reach the image for one of the stored outputs j < jn
                let jn = (RX as i64).min(ow as i64 - (t * RX) as i64);
                let lo = (-(gx0 + jn - 1)).max(0);
                let hi = (kw as i64).min(src_w as i64 - gx0);
                if jn <= 0 || lo >= hi {
                    0
                } else {
                    let (q_lo, q_hi) = (lo / 4, (hi + 3) / 4);
                    ((4 * q_hi).min(kw as i64) - 4 * q_lo) as usize
                }
            }
        })
        .sum();
    Ok(planes * (rows * cols * RX) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executed_fma_counts() {
        // 56x56 K31: all output rows/cols compute; the useful share is below 1
        let conv = DwConv2d::new(31, 31);
        let s = conv.resolve(1, 2, 56, 56).unwrap();
        for op in Op::ALL {
            let e = executed_fmas(op, Impl::Fast, &conv, &s).unwrap();
            let u = conv.useful_flops(&s) / 2.0;
            assert!(e >= u && e < 2.5 * u, "{op:?} {e} {u}");
        }
        assert_eq!(
            executed_fmas(Op::Forward, Impl::Naive, &conv, &s).unwrap(),
            conv.useful_flops(&s) / 2.0
        );
    }

    #[test]
    fn args_layout_matches_the_c_struct() {
        assert_eq!(std::mem::size_of::<DwArgs>(), 112);
    }

    #[test]
    fn plans_stay_within_launch_limits() {
        let mut sizes: Vec<(usize, usize)> = TEMPLATE_SIZES.iter().map(|&k| (k, k)).collect();
        sizes.extend([(1, 1), (2, 2), (51, 5), (5, 51), (101, 101), (301, 3)]);
        for (kh, kw) in sizes {
            let conv = DwConv2d::new(kh, kw);
            for (h, w) in [
                (1, 1),
                (7, 7),
                (14, 14),
                (56, 56),
                (300, 5),
                (5, 300),
                (256, 200),
            ] {
                let s = conv.resolve(2, 3, h, w).unwrap();
                for op in Op::ALL {
                    let p = plan(op, Impl::Fast, DType::F32, &conv, &s).unwrap();
                    for l in &p.launches {
                        let threads = l.block.0 * l.block.1 * l.block.2;
                        assert!((1..=256).contains(&threads), "{l:?}");
                        assert!(l.grid.1 <= 65535 && l.grid.2 <= 65535, "{l:?}");
                        // template sizes stay below the 48 KB that needs no opt-in
                        let limit = if TEMPLATE_SIZES.contains(&kh) && kh == kw {
                            SHARED_TARGET_BYTES
                        } else {
                            SHARED_LIMIT_BYTES
                        };
                        assert!(l.shared_bytes as usize <= limit, "{l:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn catalogue_has_every_planned_kernel() {
        let names = kernel_names();
        assert_eq!(names.len(), 93 + 36);
        let conv = DwConv2d::new(31, 31);
        let s = conv.resolve(1, 4, 20, 20).unwrap();
        for op in Op::ALL {
            for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
                let p = plan(op, imp, DType::F16, &conv, &s).unwrap();
                for l in &p.launches {
                    assert!(names.contains(&l.kernel));
                }
            }
        }
    }
}
