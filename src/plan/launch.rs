//! What a plan is made of: the kernel argument block ([`DwArgs`]), kernels named by type
//! ([`KernelId`]), one launch ([`Launch`]), the one GEMM step ([`Gemm`]) and a [`Plan`].

use std::fmt;

use crate::conv::{ConvShape, DwConv2d};
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

// The layout `kernels/lk_args.cuh` static_asserts on the device side.
const _: () = assert!(std::mem::size_of::<DwArgs>() == 112 && std::mem::align_of::<DwArgs>() == 8);

/// A kernel family: one `.cu` entry point per storage type (and, for the templated tiled
/// kernels, per filter size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `lk_fwd_<t>_k<K>` / `lk_fwd_<t>_generic` (`kernels/lk_conv.cu`).
    TiledFwd,
    /// `lk_dgrad_<t>_k<K>` / `lk_dgrad_<t>_generic` (`kernels/lk_conv.cu`).
    TiledDgrad,
    /// `lk_wgrad_partial_<t>` (`kernels/lk_wgrad.cu`).
    WgradPartial,
    /// `lk_wgrad_reduce_<t>` (`kernels/lk_wgrad.cu`).
    WgradReduce,
    /// `lk_wgrad_strided_<t>` (`kernels/lk_wgrad_strided.cu`).
    WgradStrided,
    /// `lk_naive_fwd_<t>` (`kernels/lk_naive.cu`).
    NaiveFwd,
    /// `lk_naive_dgrad_<t>`.
    NaiveDgrad,
    /// `lk_naive_wgrad_<t>`.
    NaiveWgrad,
    /// `lk_im2col_<t>` (`kernels/lk_im2col.cu`).
    Im2col,
    /// `lk_im2col_epilogue_<t>`.
    Im2colEpilogue,
    /// `lk_col2im_<t>`.
    Col2im,
    /// `lk_bias_act_<t>` (`kernels/lk_model.cu`).
    BiasAct,
    /// `lk_affine_<t>`.
    Affine,
    /// `lk_avgpool_<t>`.
    Avgpool,
    /// `lk_dense_conv_<t>`.
    DenseConv,
    /// `lk_tc_fwd_<t>_k<K>` / `lk_tc_fwd_<t>_generic`, f16/bf16 only (`kernels/lk_tc.cu`).
    TcFwd,
    /// `lk_tc_dgrad_<t>_k<K>` / `lk_tc_dgrad_<t>_generic`, f16/bf16 only.
    TcDgrad,
    /// `lk_tc_wgrad_<t>`, f16/bf16 only (`kernels/lk_tc_wgrad.cu`; partials for `WgradReduce`).
    TcWgrad,
}

impl Family {
    pub const ALL: [Family; 18] = [
        Family::TiledFwd,
        Family::TiledDgrad,
        Family::WgradPartial,
        Family::WgradReduce,
        Family::WgradStrided,
        Family::NaiveFwd,
        Family::NaiveDgrad,
        Family::NaiveWgrad,
        Family::Im2col,
        Family::Im2colEpilogue,
        Family::Col2im,
        Family::BiasAct,
        Family::Affine,
        Family::Avgpool,
        Family::DenseConv,
        Family::TcFwd,
        Family::TcDgrad,
        Family::TcWgrad,
    ];

    /// The entry-point name with `{}` for the storage type.
    fn pattern(self) -> &'static str {
        match self {
            Family::TiledFwd => "lk_fwd_{}",
            Family::TiledDgrad => "lk_dgrad_{}",
            Family::WgradPartial => "lk_wgrad_partial_{}",
            Family::WgradReduce => "lk_wgrad_reduce_{}",
            Family::WgradStrided => "lk_wgrad_strided_{}",
            Family::NaiveFwd => "lk_naive_fwd_{}",
            Family::NaiveDgrad => "lk_naive_dgrad_{}",
            Family::NaiveWgrad => "lk_naive_wgrad_{}",
            Family::Im2col => "lk_im2col_{}",
            Family::Im2colEpilogue => "lk_im2col_epilogue_{}",
            Family::Col2im => "lk_col2im_{}",
            Family::BiasAct => "lk_bias_act_{}",
            Family::Affine => "lk_affine_{}",
            Family::Avgpool => "lk_avgpool_{}",
            Family::DenseConv => "lk_dense_conv_{}",
            Family::TcFwd => "lk_tc_fwd_{}",
            Family::TcDgrad => "lk_tc_dgrad_{}",
            Family::TcWgrad => "lk_tc_wgrad_{}",
        }
    }

    /// True for the tiled fwd/dgrad families, which have a templated kernel per filter size.
    pub fn is_tiled(self) -> bool {
        matches!(self, Family::TiledFwd | Family::TiledDgrad)
    }

    /// True for the tensor-core families (f16/bf16 only, sm_80+).
    pub fn is_tensor_core(self) -> bool {
        matches!(self, Family::TcFwd | Family::TcDgrad | Family::TcWgrad)
    }

    /// Families with a templated kernel per filter size and a generic one.
    pub fn has_templates(self) -> bool {
        self.is_tiled() || matches!(self, Family::TcFwd | Family::TcDgrad)
    }
}

/// Kernel sizes with a templated (fully unrolled) tiled kernel.
pub const TEMPLATE_SIZES: [usize; 8] = [3, 5, 7, 13, 25, 27, 29, 31];

/// One kernel of `kernels/*.cu`: its family, storage type and, for a templated tiled kernel,
/// its square filter size K (`None`: the generic kernel of a tiled family, or a family that
/// has no template).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId {
    pub family: Family,
    pub dtype: DType,
    pub k: Option<u8>,
}

impl KernelId {
    /// A kernel without a filter-size template.
    pub fn new(family: Family, dtype: DType) -> Self {
        KernelId {
            family,
            dtype,
            k: None,
        }
    }

    /// The tiled kernel of `family` for a `k x k` filter: templated when `k` is one of
    /// [`TEMPLATE_SIZES`], else generic.
    pub fn tiled(family: Family, dtype: DType, kh: usize, kw: usize) -> Self {
        let k = (kh == kw && TEMPLATE_SIZES.contains(&kh)).then_some(kh as u8);
        KernelId { family, dtype, k }
    }

    /// True for a templated tiled kernel.
    pub fn is_templated(&self) -> bool {
        self.k.is_some()
    }

    /// The `extern "C"` entry point in `kernels/*.cu`, e.g. `lk_fwd_f32_k31`.
    pub fn name(&self) -> String {
        let base = self.family.pattern().replace("{}", self.dtype.name());
        match (self.family.has_templates(), self.k) {
            (true, Some(k)) => format!("{base}_k{k}"),
            (true, None) => format!("{base}_generic"),
            _ => base,
        }
    }

    /// Every kernel in `kernels/*.cu`, sorted by name.
    pub fn all() -> Vec<KernelId> {
        let mut v = Vec::new();
        for dtype in DType::ALL {
            for family in Family::ALL {
                if family.is_tensor_core() && dtype == DType::F32 {
                    continue;
                }
                v.push(KernelId::new(family, dtype));
                if family.has_templates() {
                    for k in TEMPLATE_SIZES {
                        v.push(KernelId::tiled(family, dtype, k, k));
                    }
                }
            }
        }
        v.sort_by_key(|k| k.name());
        v
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The names of every kernel in `kernels/*.cu`, sorted.
pub fn kernel_names() -> Vec<String> {
    KernelId::all().iter().map(KernelId::name).collect()
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: KernelId,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory; above 48 KB the CUDA side must raise the function's
    /// `MAX_DYNAMIC_SHARED_SIZE_BYTES` attribute.
    pub shared_bytes: u32,
    pub args: DwArgs,
}

/// The one GEMM step of every plan and of the model's device program: a row-major
/// strided-batched GEMM, all operands of `dtype`, f32 accumulation (cuBLAS on the GPU with
/// `CUBLAS_COMPUTE_32F`, no TF32; a host loop in the simulator).
///
/// For every `i in 0..batch`: `C_i = op(A_i) * op(B_i)` (alpha 1, beta 0), `C_i` an `m x n`
/// matrix. `A_i` starts at byte address `a + i * stride_a * size`; without `a_trans` it is
/// stored `m x k` (element (r, p) at `r * lda + p`), with `a_trans` stored `k x m` (element
/// (r, p) of op(A) at `p * lda + r`). Likewise `B_i` (`k x n`, or `n x k` with `b_trans`) and
/// `C_i` (element (r, j) at `r * ldc + j`). Strides and leading dimensions are in elements.
///
/// In a [`Plan`] the addresses are byte offsets into the workspace until [`Plan::bind`] adds the
/// workspace's address. Uses (M = N*OH*OW, KK = KH*KW, layouts in `kernels/lk_im2col.cu`):
/// fwd `OUT_c[M x 1] = P_c[M x KK] * W_c[KK x 1]`; wgrad `OUT_c[KK x 1] = P_c^T * DY_c[M x 1]`;
/// dgrad `DCOL_c[M x KK] = DY_c[M x 1] * W_c[1 x KK]`, then `lk_col2im` gathers it into dx.
/// The model: per image `Y[Cout x HW] = W[Cout x Cin] * X[Cin x HW]` with `stride_a = 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub dtype: DType,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub a_trans: bool,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub b_trans: bool,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// Rows and columns of the stored A, B and C.
    fn stored(&self) -> [(usize, usize, usize, usize, u64); 3] {
        let (ar, ac) = if self.a_trans {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.b_trans {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        [
            (ar, ac, self.lda, self.stride_a, self.a),
            (br, bc, self.ldb, self.stride_b, self.b),
            (self.m, self.n, self.ldc, self.stride_c, self.c),
        ]
    }

    /// Checks sizes and leading dimensions, and returns the byte extent `[start, end)` of each
    /// operand (A, B, C), so that a back-end can check them against its buffers.
    pub fn extents(&self) -> Result<[(u64, u64); 3]> {
        if self.m == 0 || self.n == 0 || self.k == 0 || self.batch == 0 {
            return Err(Error::InvalidArgument(format!(
                "empty GEMM m={} n={} k={} batch={}",
                self.m, self.n, self.k, self.batch
            )));
        }
        let es = self.dtype.size_bytes();
        let overflow = || Error::Overflow("GEMM extent".into());
        let mut out = [(0u64, 0u64); 3];
        for (slot, (rows, cols, ld, stride, base)) in out.iter_mut().zip(self.stored()) {
            if ld < cols {
                return Err(Error::InvalidArgument(format!(
                    "GEMM leading dimension {ld} below the row length {cols}"
                )));
            }
            let elems = (self.batch - 1)
                .checked_mul(stride)
                .and_then(|v| v.checked_add((rows - 1).checked_mul(ld)?))
                .and_then(|v| v.checked_add(cols))
                .ok_or_else(overflow)?;
            let bytes = elems.checked_mul(es).ok_or_else(overflow)? as u64;
            *slot = (base, base.checked_add(bytes).ok_or_else(overflow)?);
        }
        Ok(out)
    }
}

/// One step of a plan or of a device program.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Kernel(Launch),
    Gemm(Gemm),
}

/// The launches of one op, the f32 workspace they need, and an optional GEMM step that runs
/// after `launches[gemm.0]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub launches: Vec<Launch>,
    /// Bytes of f32 workspace (0: none; bind 0).
    pub workspace_bytes: usize,
    /// `(after_launch, gemm)`, the GEMM's addresses relative to the workspace until bound.
    pub gemm: Option<(usize, Gemm)>,
}

impl Plan {
    /// Sets the five buffer addresses in every launch (see [`DwArgs`] for their meaning per op)
    /// and moves the GEMM's workspace offsets to the workspace's address. Bind once.
    pub fn bind(&mut self, in0: u64, in1: u64, bias: u64, out: u64, workspace: u64) {
        for l in &mut self.launches {
            l.args.in0 = in0;
            l.args.in1 = in1;
            l.args.bias = bias;
            l.args.out = out;
            l.args.workspace = workspace;
        }
        if let Some((_, g)) = &mut self.gemm {
            g.a += workspace;
            g.b += workspace;
            g.c += workspace;
        }
    }

    /// Workspace length in f32 elements.
    pub fn workspace_len(&self) -> usize {
        self.workspace_bytes / 4
    }

    /// The steps in execution order (the GEMM after its launch).
    pub fn steps(&self) -> Vec<Step> {
        let mut v = Vec::with_capacity(self.launches.len() + 1);
        for (i, l) in self.launches.iter().enumerate() {
            v.push(Step::Kernel(l.clone()));
            if let Some((after, g)) = self.gemm {
                if after == i {
                    v.push(Step::Gemm(g));
                }
            }
        }
        if let Some((after, g)) = self.gemm {
            if after >= self.launches.len() {
                v.push(Step::Gemm(g));
            }
        }
        v
    }
}

/// Threads per block for the one-thread-per-element kernels.
pub(crate) const FLAT_BLOCK: u32 = 256;

pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Overflow(format!("{what} {v} does not fit a 32-bit int")))
}

/// The shape-dependent part of every launch's arguments (pointers and aux fields zero).
pub(crate) fn base_args(conv: &DwConv2d, s: &ConvShape) -> Result<DwArgs> {
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
    if s.n.checked_mul(s.c).is_none_or(|v| v > i32::MAX as usize) {
        return Err(Error::Overflow("N*C exceeds 2^31 - 1 planes".into()));
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
pub(crate) fn flat_launch(kernel: KernelId, total: usize, args: DwArgs) -> Result<Launch> {
    let blocks = total.div_ceil(FLAT_BLOCK as usize);
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
pub(crate) fn strided_launch(kernel: KernelId, total: usize, args: DwArgs) -> Launch {
    let blocks = total.div_ceil(FLAT_BLOCK as usize).clamp(1, 1 << 20);
    Launch {
        kernel,
        grid: (blocks as u32, 1, 1),
        block: (FLAT_BLOCK, 1, 1),
        shared_bytes: 0,
        args,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_layout_matches_the_c_struct() {
        assert_eq!(std::mem::size_of::<DwArgs>(), 112);
    }

    #[test]
    fn kernel_ids_name_the_entry_points() {
        let names = kernel_names();
        assert_eq!(names.len(), 93 + 36 + 2); // + the tensor-core kernels (f16, bf16)
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, names, "names are sorted and unique");
        let id = KernelId::tiled(Family::TiledFwd, DType::Bf16, 31, 31);
        assert_eq!(id.name(), "lk_fwd_bf16_k31");
        assert_eq!(
            KernelId::tiled(Family::TiledDgrad, DType::F16, 9, 9).name(),
            "lk_dgrad_f16_generic"
        );
        assert_eq!(
            KernelId::tiled(Family::TiledFwd, DType::F32, 31, 29).name(),
            "lk_fwd_f32_generic"
        );
        assert_eq!(
            KernelId::new(Family::WgradReduce, DType::F32).name(),
            "lk_wgrad_reduce_f32"
        );
        assert_eq!(
            KernelId::new(Family::DenseConv, DType::F16).to_string(),
            "lk_dense_conv_f16"
        );
    }

    #[test]
    fn gemm_extents_cover_every_element() {
        let g = Gemm {
            dtype: DType::F16,
            batch: 3,
            m: 4,
            n: 5,
            k: 6,
            a: 1000,
            lda: 6,
            stride_a: 0,
            a_trans: false,
            b: 5000,
            ldb: 5,
            stride_b: 30,
            b_trans: false,
            c: 9000,
            ldc: 7,
            stride_c: 28,
        };
        let [a, b, c] = g.extents().unwrap();
        assert_eq!(a, (1000, 1000 + 2 * 24));
        assert_eq!(b, (5000, 5000 + 2 * (2 * 30 + 30)));
        assert_eq!(c, (9000, 9000 + 2 * (2 * 28 + 3 * 7 + 5)));
        assert!(Gemm { ldc: 4, ..g }.extents().is_err());
        assert!(Gemm { batch: 0, ..g }.extents().is_err());
    }
}
