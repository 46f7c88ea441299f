//! The problem description: a depthwise 2-D convolution, its output shape and input validation.
//!
//! `y[n,c,oy,ox] = sum_{ky,kx} x[n,c, oy*sh - top + ky*dh, ox*sw - left + kx*dw] * w[c,0,ky,kx] (+ bias[c])`

use crate::error::{Error, Result};

/// Zero padding on each side of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// The same padding on top/bottom (`ph`) and on left/right (`pw`).
    pub fn symmetric(ph: usize, pw: usize) -> Self {
        Padding {
            top: ph,
            bottom: ph,
            left: pw,
            right: pw,
        }
    }
}

/// Depthwise convolution parameters (one filter per channel, PyTorch cross-correlation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwConv2d {
    /// Filter extent (KH, KW); any size >= 1, odd or even.
    pub kernel: (usize, usize),
    pub padding: Padding,
    /// (SH, SW) >= 1.
    pub stride: (usize, usize),
    /// (DH, DW) >= 1.
    pub dilation: (usize, usize),
}

/// The resolved sizes of one convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    /// Input height and width.
    pub h: usize,
    pub w: usize,
    /// Output height and width.
    pub oh: usize,
    pub ow: usize,
}

impl ConvShape {
    pub fn input_dims(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
    pub fn output_dims(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }
    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.n * self.c * self.oh * self.ow
    }
}

/// Largest element count we accept in one tensor: GPU kernels index with 32-bit ints per plane
/// and 64-bit overall; the limit keeps every byte count representable.
const MAX_ELEMENTS: usize = 1 << 40;

impl DwConv2d {
    /// A KH x KW filter, stride 1, dilation 1, "same" padding K/2 on each side.
    pub fn new(kh: usize, kw: usize) -> Self {
        DwConv2d {
            kernel: (kh, kw),
            padding: Padding::symmetric(kh / 2, kw / 2),
            stride: (1, 1),
            dilation: (1, 1),
        }
    }

    /// Sets symmetric padding.
    pub fn with_padding(mut self, ph: usize, pw: usize) -> Self {
        self.padding = Padding::symmetric(ph, pw);
        self
    }

    /// Sets padding per side.
    pub fn with_padding_sides(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }

    pub fn with_stride(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }

    pub fn with_dilation(mut self, dh: usize, dw: usize) -> Self {
        self.dilation = (dh, dw);
        self
    }

    /// True for the fast case: stride 1 and dilation 1.
    pub fn is_unit(&self) -> bool {
        self.stride == (1, 1) && self.dilation == (1, 1)
    }

    /// Checks the parameters themselves (not yet any tensor).
    pub fn validate(&self) -> Result<()> {
        let (kh, kw) = self.kernel;
        for (what, v) in [
            ("kernel height", kh),
            ("kernel width", kw),
            ("stride height", self.stride.0),
            ("stride width", self.stride.1),
            ("dilation height", self.dilation.0),
            ("dilation width", self.dilation.1),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize {
                    what: what.into(),
                    got: v,
                });
            }
        }
        let limit = i32::MAX as usize;
        let p = self.padding;
        for (what, v) in [
            ("kernel height", kh),
            ("kernel width", kw),
            ("padding", p.top.max(p.bottom).max(p.left).max(p.right)),
            ("stride", self.stride.0.max(self.stride.1)),
            ("dilation", self.dilation.0.max(self.dilation.1)),
        ] {
            if v > limit / 4 {
                return Err(Error::Overflow(format!("{what} {v} is too large")));
            }
        }
        Ok(())
    }

    /// Output extent along one axis, or an error naming the axis when nothing is left.
    fn out_extent(
        axis: &str,
        len: usize,
        k: usize,
        pad: usize,
        stride: usize,
        dil: usize,
    ) -> Result<usize> {
        let span = (k - 1)
            .checked_mul(dil)
            .and_then(|v| v.checked_add(1))
            .ok_or_else(|| Error::Overflow(format!("dilated kernel {axis}")))?;
        let padded = len
            .checked_add(pad)
            .ok_or_else(|| Error::Overflow(format!("padded {axis}")))?;
        if padded < span {
            return Err(Error::EmptyOutput(format!(
                "{axis}: input {len} plus padding {pad} is smaller than the dilated kernel {span}"
            )));
        }
        Ok((padded - span) / stride + 1)
    }

    /// Output (OH, OW) for an input of (H, W).
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.validate()?;
        if h == 0 || w == 0 {
            return Err(Error::ZeroSize {
                what: "input height/width".into(),
                got: 0,
            });
        }
        let p = self.padding;
        let oh = Self::out_extent(
            "height",
            h,
            self.kernel.0,
            p.top + p.bottom,
            self.stride.0,
            self.dilation.0,
        )?;
        let ow = Self::out_extent(
            "width",
            w,
            self.kernel.1,
            p.left + p.right,
            self.stride.1,
            self.dilation.1,
        )?;
        Ok((oh, ow))
    }

    /// Resolves and checks an input shape [N, C, H, W].
    pub fn shape_for_input(&self, x_shape: &[usize]) -> Result<ConvShape> {
        let [n, c, h, w] = dims4("input x", x_shape)?;
        self.resolve(n, c, h, w)
    }

    /// Resolves and checks all sizes of a problem.
    pub fn resolve(&self, n: usize, c: usize, h: usize, w: usize) -> Result<ConvShape> {
        for (what, v) in [
            ("batch N", n),
            ("channels C", c),
            ("input height H", h),
            ("input width W", w),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize {
                    what: what.into(),
                    got: v,
                });
            }
        }
        let (oh, ow) = self.output_hw(h, w)?;
        let too_big = |dims: [usize; 4]| {
            crate::tensor::checked_numel(&dims).and_then(|v| {
                if v > MAX_ELEMENTS {
                    Err(Error::Overflow(format!(
                        "tensor {dims:?} has more than 2^40 elements"
                    )))
                } else {
                    Ok(v)
                }
            })
        };
        too_big([n, c, h, w])?;
        too_big([n, c, oh, ow])?;
        too_big(self.weight_dims(c))?;
        let plane_limit = i32::MAX as usize;
        if h.checked_mul(w).is_none_or(|v| v > plane_limit)
            || oh.checked_mul(ow).is_none_or(|v| v > plane_limit)
        {
            return Err(Error::Overflow(format!(
                "image plane {h}x{w} exceeds 2^31 elements"
            )));
        }
        Ok(ConvShape { n, c, h, w, oh, ow })
    }

    /// Expected weight shape `[C, 1, KH, KW]`.
    pub fn weight_dims(&self, c: usize) -> [usize; 4] {
        [c, 1, self.kernel.0, self.kernel.1]
    }

    /// Checks a weight shape against C and the kernel size.
    pub fn check_weight(&self, c: usize, w_shape: &[usize]) -> Result<()> {
        let expected = self.weight_dims(c);
        if w_shape != expected {
            return Err(Error::shape(
                "weight w",
                format!("{expected:?} ([C, 1, KH, KW])"),
                w_shape,
            ));
        }
        Ok(())
    }

    /// Checks an optional bias length against C.
    pub fn check_bias(&self, c: usize, bias_shape: Option<&[usize]>) -> Result<()> {
        if let Some(b) = bias_shape {
            if b != [c] {
                return Err(Error::shape("bias", format!("[{c}]"), b));
            }
        }
        Ok(())
    }

    /// Validates a forward call: x [N,C,H,W], w [C,1,KH,KW], bias [C].
    pub fn check_forward(
        &self,
        x: &[usize],
        w: &[usize],
        bias: Option<&[usize]>,
    ) -> Result<ConvShape> {
        let s = self.shape_for_input(x)?;
        self.check_weight(s.c, w)?;
        self.check_bias(s.c, bias)?;
        Ok(s)
    }

    /// Validates a data-gradient call: dy [N,C,OH,OW] must be the output of an input (H, W).
    pub fn check_data_grad(
        &self,
        dy: &[usize],
        w: &[usize],
        input_hw: (usize, usize),
    ) -> Result<ConvShape> {
        let [n, c, dh, dw] = dims4("output gradient dy", dy)?;
        let s = self.resolve(n, c, input_hw.0, input_hw.1)?;
        if (dh, dw) != (s.oh, s.ow) {
            return Err(Error::shape(
                "output gradient dy",
                format!(
                    "[{n}, {c}, {}, {}] (the output of a {}x{} input)",
                    s.oh, s.ow, s.h, s.w
                ),
                dy,
            ));
        }
        self.check_weight(c, w)?;
        Ok(s)
    }

    /// Validates a weight-gradient call: x [N,C,H,W] and dy [N,C,OH,OW].
    pub fn check_weight_grad(&self, x: &[usize], dy: &[usize]) -> Result<ConvShape> {
        let s = self.shape_for_input(x)?;
        let expected = s.output_dims();
        if dy != expected {
            return Err(Error::shape(
                "output gradient dy",
                format!("{expected:?}"),
                dy,
            ));
        }
        Ok(s)
    }

    /// Nominal FLOPs of one pass: 2 * N * C * OH * OW * KH * KW (padded taps included).
    pub fn flops(&self, s: &ConvShape) -> f64 {
        2.0 * (s.n * s.c) as f64 * (s.oh * s.ow) as f64 * (self.kernel.0 * self.kernel.1) as f64
    }

    /// FLOPs of the taps that fall inside the image (the useful work), counted in closed form
    /// (any size counts in microseconds).
    pub fn useful_flops(&self, s: &ConvShape) -> f64 {
        // Pairs (o, t), o < out, t < k, with pad <= o * stride + t * dil <= pad + len - 1.
        let count = |out: usize, len: usize, k: usize, pad: usize, stride: usize, dil: usize| {
            let below =
                |x: i128| pairs_at_most(out as u128, k as u128, stride as u128, dil as u128, x);
            (below(pad as i128 + len as i128 - 1) - below(pad as i128 - 1)) as f64
        };
        let rows = count(
            s.oh,
            s.h,
            self.kernel.0,
            self.padding.top,
            self.stride.0,
            self.dilation.0,
        );
        let cols = count(
            s.ow,
            s.w,
            self.kernel.1,
            self.padding.left,
            self.stride.1,
            self.dilation.1,
        );
        2.0 * (s.n * s.c) as f64 * rows * cols
    }
}

/// #{(i, j) : i < ni, j < nj, a * i + b * j <= x} for a, b >= 1.
fn pairs_at_most(ni: u128, nj: u128, a: u128, b: u128, x: i128) -> u128 {
    if x < 0 || ni == 0 || nj == 0 {
        return 0;
    }
    let x = x as u128;
    // Rows i <= x / a have at least one j; those with a * i <= x - b * (nj - 1) have all nj.
    let rows = ni.min(x / a + 1);
    let full = match x.checked_sub(b * (nj - 1)) {
        Some(r) => rows.min(r / a + 1),
        None => 0,
    };
    // Rows full..rows hold floor((x - a * i) / b) + 1 each; with i = rows - 1 - m this is
    // floor((a * m + c) / b) + 1 for m < rows - full, c = x - a * (rows - 1) >= 0.
    let n = rows - full;
    full * nj + n + floor_sum(n, b, a, x - a * (rows - 1))
}

/// sum_{m < n} floor((a * m + c) / d), d >= 1, by the Euclid-like reduction (O(log) steps).
fn floor_sum(mut n: u128, mut d: u128, mut a: u128, mut c: u128) -> u128 {
    let mut sum = 0;
    loop {
        if a >= d {
            sum += n * n.saturating_sub(1) / 2 * (a / d);
            a %= d;
        }
        if c >= d {
            sum += n * (c / d);
            c %= d;
        }
        // The remaining terms count lattice points under the line; swap the axes.
        let top = a * n + c;
        if top < d {
            return sum;
        }
        (n, c, d, a) = (top / d, top % d, a, d);
    }
}

/// Splits a shape into exactly four dimensions.
pub fn dims4(what: &str, shape: &[usize]) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(shape)
        .map_err(|_| Error::shape(what, "4 dimensions [N, C, H, W]", shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taps inside the image by enumerating every (output, tap) pair.
    fn useful_flops_by_enumeration(conv: &DwConv2d, s: &ConvShape) -> f64 {
        let count = |out: usize, len: usize, k: usize, pad: usize, stride: usize, dil: usize| {
            let inside = |o: usize, t: usize| {
                let i = (o * stride + t * dil) as i64 - pad as i64;
                i >= 0 && (i as usize) < len
            };
            (0..out)
                .flat_map(|o| (0..k).map(move |t| (o, t)))
                .filter(|&(o, t)| inside(o, t))
                .count() as f64
        };
        let (p, (kh, kw)) = (&conv.padding, conv.kernel);
        let rows = count(s.oh, s.h, kh, p.top, conv.stride.0, conv.dilation.0);
        let cols = count(s.ow, s.w, kw, p.left, conv.stride.1, conv.dilation.1);
        2.0 * (s.n * s.c) as f64 * rows * cols
    }

    #[test]
    fn useful_flops_matches_enumeration() {
        let (mut rng, seed) = crate::rng::Rng::from_time();
        let mut pick = |lo: usize, hi: usize| rng.range(lo, hi);
        let mut checked = 0;
        for _ in 0..3000 {
            let conv = DwConv2d {
                kernel: (pick(1, 12), pick(1, 12)),
                padding: Padding {
                    top: pick(0, 9),
                    bottom: pick(0, 9),
                    left: pick(0, 9),
                    right: pick(0, 9),
                },
                stride: (pick(1, 4), pick(1, 4)),
                dilation: (pick(1, 3), pick(1, 3)),
            };
            let Ok(s) = conv.resolve(pick(1, 2), pick(1, 3), pick(1, 11), pick(1, 11)) else {
                continue;
            };
            assert_eq!(
                conv.useful_flops(&s),
                useful_flops_by_enumeration(&conv, &s),
                "{conv:?} {s:?} (seed {seed})"
            );
            checked += 1;
        }
        assert!(checked > 1000, "only {checked} valid cases");
    }

    /// A million output rows under a kernel of a million rows: the enumeration would visit 10^12
    /// pairs; the count must not.
    #[test]
    fn useful_flops_of_a_huge_kernel_is_counted_without_enumeration() {
        let conv = DwConv2d::new(1_000_001, 1);
        let s = conv.resolve(1, 1, 1_000_000, 1).unwrap();
        // Every output row sees all 10^6 image rows except where the window leaves the image:
        // row o covers image rows [o - 500000, o + 500000].
        let rows: f64 = (0..1_000_000i64)
            .map(|o| ((o + 500_000).min(999_999) - (o - 500_000).max(0) + 1) as f64)
            .sum();
        assert_eq!(conv.useful_flops(&s), 2.0 * rows);
    }
}
