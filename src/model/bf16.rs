//! RepLKNet on the CPU in bf16: the 1x1 convolutions (stem, RepLK blocks, ConvFFN, transitions)
//! as bf16 GEMMs with f32 sums (`cpu::bf16`: AMX, AVX-512 BF16 or the f32 fallback), weights
//! rounded and packed once; the depthwise layers on bf16-rounded input and filter (`cpu::bf16_dw`).
//! Activations are kept in f32 between layers and rounded to bf16 where a convolution reads
//! them; biases, activations functions, residual adds, the stem's dense 3x3 conv and the head
//! stay f32/f64.

use std::sync::Arc;

use super::deploy::{Block, DeployModel, Depthwise, Pointwise};
use crate::cpu::bf16::{Bf16Input, Bf16Isa, Bf16Weights};
use crate::dtype::DType;
use crate::error::Result;

impl DeployModel {
    /// This model with its CPU engine in bf16 on `isa` (`cpu::bf16::detect()` for this
    /// machine's best); the GPU engines do not take it.
    pub fn into_cpu_bf16(self, isa: Bf16Isa) -> Result<DeployModel> {
        let mut m = self;
        let mut pws: Vec<&mut Pointwise> = vec![&mut m.stem.conv2];
        let mut dws: Vec<&mut Depthwise> = vec![&mut m.stem.conv1, &mut m.stem.conv3];
        for stage in &mut m.stages {
            for block in &mut stage.blocks {
                match block {
                    Block::RepLk(b) => {
                        pws.push(&mut b.pw1);
                        pws.push(&mut b.pw2);
                        dws.push(&mut b.lk);
                    }
                    Block::Ffn(b) => {
                        pws.push(&mut b.pw1);
                        pws.push(&mut b.pw2);
                    }
                }
            }
        }
        for t in &mut m.transitions {
            pws.push(&mut t.pw);
            dws.push(&mut t.dw);
        }
        for pw in pws {
            pw.bf16 = Some(Arc::new(Bf16Weights::new(isa, pw.cout, pw.cin, &pw.w)?));
        }
        for dw in dws {
            dw.bf16 = true;
        }
        Ok(m)
    }

    /// The precision of the CPU engine's convolutions: bf16 after [`DeployModel::into_cpu_bf16`].
    pub fn cpu_dtype(&self) -> DType {
        if self.stem.conv2.bf16.is_some() {
            DType::Bf16
        } else {
            DType::F32
        }
    }
}

/// The bf16 operands of one 1x1-conv call: the layer's packed weights and each image's packed
/// input (buffers reused per thread: handed back on drop).
pub(crate) struct PointwiseBf16<'a> {
    w: &'a Bf16Weights,
    x: Vec<Bf16Input>,
}

thread_local! {
    /// The packed inputs of the last 1x1 conv run from this thread, kept so that the next layer
    /// reuses their memory instead of faulting in fresh pages.
    static PACKED: std::cell::RefCell<Vec<Bf16Input>> = Default::default();
}

impl Drop for PointwiseBf16<'_> {
    fn drop(&mut self) {
        let x = std::mem::take(&mut self.x);
        PACKED.with(|p| *p.borrow_mut() = x);
    }
}

impl Pointwise {
    /// Packs the `n` images of `x` (`[n, cin, hw]`) when this layer runs in bf16.
    pub(crate) fn bf16_operands(
        &self,
        x: &[f32],
        n: usize,
        hw: usize,
    ) -> Option<PointwiseBf16<'_>> {
        let w = self.bf16.as_deref()?;
        let mut packed = PACKED.with(|p| std::mem::take(&mut *p.borrow_mut()));
        packed.resize_with(n, Bf16Input::new);
        for (img, p) in packed.iter_mut().enumerate() {
            let xi = &x[img * self.cin * hw..(img + 1) * self.cin * hw];
            p.pack(w.isa(), self.cin, hw, xi, hw)
                .expect("the weights were packed for an available ISA; sizes from the layer");
        }
        Some(PointwiseBf16 { w, x: packed })
    }
}

impl PointwiseBf16<'_> {
    /// Rows r0..r0 + m, columns c0..c0 + nc of image `img`'s output block at `c` (rows `ldc`
    /// apart) = W x + beta * C.
    ///
    /// # Safety
    /// As `cpu::bf16::gemm_raw`: the block must be valid and written by no other thread.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm(
        &self,
        img: usize,
        r0: usize,
        m: usize,
        c0: usize,
        nc: usize,
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe { crate::cpu::bf16::gemm_raw(self.w, r0, m, &self.x[img], c0, nc, beta, c, ldc) }
    }
}
