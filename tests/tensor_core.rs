//! The tensor-core path: the simulator's warp-level matrix operation against a plain matrix
//! product, its warp primitives and divergence errors, and the tensor-core kernels against the
//! f64 reference (simulator always; a CUDA GPU when present).

mod common;

use half::{bf16, f16};
use lkconv::{sim, DType, Rng};

/// Random f16/bf16 bits of values uniform in +-1 times 2^[-3, 3].
fn random_bits(dtype: DType, len: usize, rng: &mut Rng) -> Vec<u16> {
    (0..len)
        .map(|_| {
            let v = rng.uniform_pm1() * (2f32).powi(rng.range(0, 6) as i32 - 3);
            match dtype {
                DType::Bf16 => bf16::from_f32(v).to_bits(),
                _ => f16::from_f32(v).to_bits(),
            }
        })
        .collect()
}

fn bits_to_f64(dtype: DType, b: u16) -> f64 {
    match dtype {
        DType::Bf16 => bf16::from_bits(b).to_f64(),
        _ => f16::from_bits(b).to_f64(),
    }
}

#[test]
fn warp_primitives_and_divergence_errors() {
    sim::warp::selftest().expect("warp self-test");
}

#[test]
fn mma_m16n8k16_matches_a_plain_product() {
    let mut rng = common::rng();
    for dtype in [DType::F16, DType::Bf16] {
        for count in [1usize, 3, 32] {
            let a = random_bits(dtype, count * 256, &mut rng);
            let b = random_bits(dtype, count * 128, &mut rng);
            let c: Vec<f32> = (0..count * 128).map(|_| rng.uniform_pm1() * 4.0).collect();
            let d = sim::warp::mma_m16n8k16(dtype, &a, &b, &c).expect("mma runs");
            for w in 0..count {
                for i in 0..16 {
                    for j in 0..8 {
                        let mut want = c[w * 128 + i * 8 + j] as f64;
                        let mut mag = want.abs();
                        for k in 0..16 {
                            let p = bits_to_f64(dtype, a[w * 256 + i * 16 + k])
                                * bits_to_f64(dtype, b[w * 128 + k * 8 + j]);
                            want += p;
                            mag += p.abs();
                        }
                        let got = d[w * 128 + i * 8 + j] as f64;
                        // 17 f32 additions of exact products
                        let tol = 17.0 * f32::EPSILON as f64 * mag;
                        assert!(
                            (got - want).abs() <= tol,
                            "{dtype} product {w} of {count}: D[{i}][{j}] = {got}, expected {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn mma_rejects_bad_sizes() {
    assert!(sim::warp::mma_m16n8k16(DType::F32, &[0; 256], &[0; 128], &[0.0; 128]).is_err());
    assert!(sim::warp::mma_m16n8k16(DType::F16, &[0; 255], &[0; 128], &[0.0; 128]).is_err());
    assert!(sim::warp::mma_m16n8k16(DType::F16, &[], &[], &[]).is_err());
}
