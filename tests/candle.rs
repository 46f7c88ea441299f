//! `lkconv::candle::DepthwiseConv2d` against candle's own `conv2d(groups = C)` and candle's
//! autograd (CPU), strided inputs, f16/bf16, and typed errors. Run with `--features candle`.
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::Expected;
use lkconv::candle::DepthwiseConv2d;
use lkconv::{DwConv2d, Padding};

type Result<T> = candle_core::Result<T>;

/// A candle tensor as an lkconv f32 tensor (for the suite's comparator).
fn to_lk(t: &Tensor) -> lkconv::Tensor<f32> {
    let v = t
        .to_dtype(DType::F32)
        .and_then(|f| f.flatten_all()?.to_vec1::<f32>())
        .expect("float data");
    lkconv::Tensor::from_vec(t.dims(), v).expect("shape")
}

/// `got` within `tol * max(max |want|, 1)` of candle's `want`, element by element.
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    common::assert_matches(what, &to_lk(got), &Expected::scaled(&to_lk(want), tol));
}

/// Fresh random data in [-1, 1) each run (candle's CPU RNG).
fn uniform(dims: &[usize]) -> Result<Tensor> {
    Tensor::rand(-1f32, 1f32, dims, &Device::Cpu)
}

/// (n, c, h, w, k, padding, stride, dilation): odd and even kernels, a kernel larger than the
/// image, batch 1, one channel, non-square images, stride and dilation. The strided cases
/// divide evenly: candle's own conv2d backward fails ("shape mismatch in add") when the
/// stride leaves input rows unused; `strided_gradients_match_the_reference` covers those.
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
const CASES: &[Case] = &[
    (2, 3, 13, 11, 7, 3, 1, 1),
    (1, 1, 9, 17, 4, 2, 1, 1),
    (1, 2, 5, 6, 9, 4, 1, 1),
    (2, 4, 16, 12, 31, 15, 1, 1),
    (1, 3, 13, 15, 5, 1, 2, 2),
    (3, 2, 11, 14, 3, 2, 3, 1),
];

#[test]
fn strided_gradients_match_the_reference() -> Result<()> {
    // Stride 2 on 12 rows with a span of 9 leaves the last input row unused.
    let conv = DwConv2d::new(5, 4)
        .with_padding(1, 2)
        .with_stride(2, 3)
        .with_dilation(2, 1);
    let x = Var::from_tensor(&uniform(&[2, 3, 12, 16])?)?;
    let w = Var::from_tensor(&uniform(&[3, 1, 5, 4])?)?;
    let y = DepthwiseConv2d::new(conv).forward(&x, &w, None)?;
    let r = uniform(y.dims())?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    let dx = Expected::data_grad(&conv, &to_lk(&r), &to_lk(&w), (12, 16));
    let dw = Expected::weight_grad(&conv, &to_lk(&x), &to_lk(&r));
    for (var, want, what) in [(&x, dx, "dx"), (&w, dw, "dw")] {
        common::assert_matches(what, &to_lk(g.get(var).expect("gradient")), &want);
    }
    Ok(())
}

#[test]
fn forward_and_autograd_match_candle_conv2d_groups_c() -> Result<()> {
    for &(n, c, h, w, k, p, s, d) in CASES {
        let what = format!("n{n} c{c} {h}x{w} k{k} p{p} s{s} d{d}");
        let x = Var::from_tensor(&uniform(&[n, c, h, w])?)?;
        let wt = Var::from_tensor(&uniform(&[c, 1, k, k])?)?;
        let b = Var::from_tensor(&uniform(&[c])?)?;
        let conv = DwConv2d::new(k, k)
            .with_padding(p, p)
            .with_stride(s, s)
            .with_dilation(d, d);
        let ours = DepthwiseConv2d::new(conv).forward(&x, &wt, Some(&b))?;
        let theirs = x
            .conv2d(&wt, p, s, d, c)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
        let tol = 1e-5 * (k * k) as f64;
        assert_close(&ours, &theirs, tol, &format!("forward {what}"));

        // The same loss through both ops: a random weighting of the outputs.
        let r = uniform(ours.dims())?;
        let g_ours = (&ours * &r)?.sum_all()?.backward()?;
        let g_theirs = (&theirs * &r)?.sum_all()?.backward()?;
        let terms = (n * ours.dims()[2] * ours.dims()[3]) as f64;
        for (var, name, tol) in [
            (&x, "dx", tol),
            (&wt, "dw", 1e-5 * terms),
            (&b, "db", 1e-5 * terms),
        ] {
            let got = g_ours.get(var).expect("our gradient");
            let want = g_theirs.get(var).expect("candle's gradient");
            assert_close(got, want, tol, &format!("{name} {what}"));
        }
    }
    Ok(())
}

#[test]
fn no_bias_op2_and_asymmetric_padding_match_the_reference() -> Result<()> {
    let conv = DwConv2d::new(6, 5).with_padding_sides(Padding {
        top: 3,
        bottom: 1,
        left: 0,
        right: 4,
    });
    let x = uniform(&[2, 3, 9, 8])?;
    let w = uniform(&[3, 1, 6, 5])?;
    let y = DepthwiseConv2d::new(conv).forward(&x, &w, None)?;
    let want = Expected::forward(&conv, &to_lk(&x), &to_lk(&w), None);
    common::assert_matches("asymmetric padding", &to_lk(&y), &want);
    Ok(())
}

#[test]
fn strided_and_offset_inputs_are_read_through_their_layout() -> Result<()> {
    let conv = DwConv2d::new(5, 5);
    let op = DepthwiseConv2d::new(conv);
    // x: a transposed view of a wider tensor, narrowed (non-zero start offset); w: transposed.
    let big = uniform(&[2, 3, 14, 12])?;
    let x = big.narrow(2, 2, 11)?.transpose(2, 3)?; // [2, 3, 12, 11], strided
    let w = uniform(&[3, 1, 5, 5])?.transpose(2, 3)?;
    let b = uniform(&[6])?.narrow(0, 3, 3)?;
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let y = op.forward(&x, &w, Some(&b))?;
    let y_contig = op.forward(&x.contiguous()?, &w.contiguous()?, Some(&b.contiguous()?))?;
    let exact = Expected::exact(&to_lk(&y_contig));
    common::assert_matches("strided vs contiguous", &to_lk(&y), &exact);
    // Gradients of strided inputs too.
    let xv = Var::from_tensor(&x)?;
    let g = op.forward(&xv, &w, None)?.sum_all()?.backward()?;
    let gx = g.get(&xv).expect("dx");
    let want_dx = {
        let xv2 = Var::from_tensor(&x.contiguous()?)?;
        let g2 = xv2.conv2d(&w, 2, 1, 1, 3)?.sum_all()?.backward()?;
        g2.get(&xv2).expect("candle dx").clone()
    };
    assert_close(gx, &want_dx, 1e-4, "dx of a strided input");
    Ok(())
}

#[test]
fn half_types_match_candle_in_f32_on_the_same_values() -> Result<()> {
    for (dtype, eps) in [(DType::F16, 2f64.powi(-11)), (DType::BF16, 2f64.powi(-8))] {
        let x = uniform(&[1, 4, 10, 9])?.to_dtype(dtype)?;
        let w = uniform(&[4, 1, 7, 7])?.to_dtype(dtype)?;
        let y = DepthwiseConv2d::new(DwConv2d::new(7, 7)).forward(&x, &w, None)?;
        assert_eq!(y.dtype(), dtype);
        let want = x
            .to_dtype(DType::F32)?
            .conv2d(&w.to_dtype(DType::F32)?, 3, 1, 1, 4)?;
        // One rounding of each output (half a unit of the type at |y|) plus the f32
        // accumulation of 49 products of magnitude <= 1.
        let want = to_lk(&want);
        let bound = want
            .data()
            .iter()
            .map(|v| eps * (v.abs() as f64) + 49.0 * 49.0 * f32::EPSILON as f64)
            .collect();
        let expected = Expected {
            shape: want.shape().to_vec(),
            value: want.data().iter().map(|&v| v as f64).collect(),
            bound,
        };
        common::assert_matches(&format!("{dtype:?}"), &to_lk(&y), &expected);
    }
    Ok(())
}

#[test]
fn bad_inputs_are_candle_errors() -> Result<()> {
    let op = DepthwiseConv2d::new(DwConv2d::new(3, 3));
    let x = uniform(&[1, 2, 8, 8])?;
    let w = uniform(&[2, 1, 3, 3])?;
    let cases = [
        (op.forward(&x, &w.to_dtype(DType::F16)?, None), "dtype"),
        (
            op.forward(&x.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, None),
            "F64",
        ),
        (op.forward(&x, &uniform(&[3, 1, 3, 3])?, None), "shape"),
        (op.forward(&x, &w, Some(&uniform(&[5])?)), "bias"),
        (
            DepthwiseConv2d::new(DwConv2d::new(20, 20).with_padding(0, 0)).forward(&x, &w, None),
            "empty output",
        ),
    ];
    for (result, words) in cases {
        let e = result.expect_err(words).to_string();
        assert!(e.contains(words), "error '{e}' does not mention '{words}'");
    }
    Ok(())
}

#[test]
fn readme_candle_example_is_the_module_doc_test() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find("\n## candle\n")
        .expect("README has a candle section");
    let block = &readme[start..];
    let open = block.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let example = &block[open..open + block[open..].find("```").expect("closed block")];
    let module = std::fs::read_to_string(root.join("src/candle.rs")).expect("src/candle.rs");
    let doc: String = module
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
        .collect();
    let doc_example: String = example
        .lines()
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert!(
        doc.contains(&doc_example),
        "README's candle example differs from the doc-test in src/candle.rs:\n{example}"
    );
}
