//! `lkconv plan`: its JSON follows the schema the standalone CUDA harness reads (the launches of
//! `kernels::plan`, bit for bit) and carries the occupancy model per launch (when this build has a
//! ptxas report); bad flags are errors.

use std::process::Command;

use lkconv::occupancy::{self, Gpu};
use lkconv::plan;
use lkconv::problem::Problem;
use lkconv::{DType, DwConv2d, Impl, Op};
use serde_json::Value;

fn lkconv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lkconv"))
        .args(args)
        .output()
        .expect("run lkconv")
}

fn plan_json(args: &[&str]) -> Vec<Value> {
    let o = lkconv(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

#[test]
fn json_matches_the_planner_and_the_model() {
    let conv = DwConv2d::new(7, 5).with_stride(2, 1).with_padding(3, 1);
    let s = conv.resolve(2, 3, 20, 17).unwrap();
    for (op, imp, gpu) in [
        (Op::Forward, Impl::Fast, "h100"),
        (Op::DataGrad, Impl::Naive, "a100"),
        (Op::WeightGrad, Impl::Fast, "l4"),
        (Op::WeightGrad, Impl::Im2col, "h200"),
    ] {
        let out = plan_json(&[
            "plan",
            "--op",
            op.name(),
            "--shape",
            "2,3,20,17",
            "--kernel",
            "7,5",
            "--stride",
            "2,1",
            "--padding",
            "3,1",
            "--dtype",
            "bf16",
            "--impl",
            imp.name(),
            "--gpu",
            gpu,
            "--json",
        ]);
        assert_eq!(out.len(), 1);
        let j = &out[0];
        assert_eq!(j["op"], op.name());
        assert_eq!(j["dtype"], "bf16");
        assert_eq!(j["impl"], imp.name());
        assert_eq!(ints(&j["shape"]), [2, 3, 20, 17]);
        assert_eq!(ints(&j["kernel"]), [7, 5]);
        assert_eq!(ints(&j["stride"]), [2, 1]);
        assert_eq!(ints(&j["dilation"]), [1, 1]);
        assert_eq!(ints(&j["padding"]), [3, 3, 1, 1]);
        assert_eq!(
            ints(&j["output"]),
            s.output_dims().map(|v| v as i64).to_vec()
        );
        let plan = plan::plan(&Problem::new(op, imp, DType::Bf16, &conv, &s).unwrap()).unwrap();
        assert_eq!(j["workspace_bytes"], plan.workspace_bytes);
        assert_eq!(j["gemm"].is_null(), plan.gemm.is_none());
        if let Some((after, g)) = plan.gemm {
            assert_eq!(j["gemm"]["after_launch"], after);
            assert_eq!(j["gemm"]["m"], g.m);
            assert_eq!(j["gemm"]["a_trans"], g.a_trans);
            assert_eq!(j["gemm"]["stride_c"], g.stride_c);
        }
        let launches = j["launches"].as_array().unwrap();
        assert_eq!(launches.len(), plan.launches.len());
        let g = Gpu::named(gpu).unwrap();
        for (jl, l) in launches.iter().zip(&plan.launches) {
            assert_eq!(jl["kernel"], l.kernel.name());
            assert_eq!(
                ints(&jl["grid"]),
                [l.grid.0, l.grid.1, l.grid.2].map(i64::from)
            );
            assert_eq!(
                ints(&jl["block"]),
                [l.block.0, l.block.1, l.block.2].map(i64::from)
            );
            assert_eq!(jl["shared_bytes"], l.shared_bytes);
            let a = &l.args;
            for (k, v) in [
                ("n", a.n),
                ("c", a.c),
                ("h", a.h),
                ("w", a.w),
                ("oh", a.oh),
                ("ow", a.ow),
                ("kh", a.kh),
                ("kw", a.kw),
                ("sh", a.sh),
                ("sw", a.sw),
                ("pad_top", a.pad_top),
                ("pad_left", a.pad_left),
                ("dh", a.dh),
                ("dw", a.dw),
                ("aux0", a.aux0),
                ("aux1", a.aux1),
                ("aux2", a.aux2),
                ("aux3", a.aux3),
            ] {
                assert_eq!(jl["args"][k], v, "{} arg {k}", l.kernel);
            }
            let occ = &jl["occupancy"];
            match occupancy::launch_occupancy(&g, l) {
                Some(Ok(o)) => {
                    assert_eq!(occ["available"], true);
                    assert_eq!(occ["blocks_per_sm"], o.blocks_per_sm);
                    assert_eq!(occ["warps_per_sm"], o.warps_per_sm);
                    assert_eq!(occ["registers"], o.resources.registers);
                    assert_eq!(occ["tail_blocks"], o.tail_blocks);
                    assert!(o.blocks_per_sm > 0 && o.resources.registers > 0);
                    let share = occ["plan_useful_fma_share"].as_f64().unwrap();
                    assert!(share > 0.0 && share <= 1.0, "{share}");
                }
                Some(Err(e)) => panic!("{}: {e}", l.kernel),
                None => {
                    assert!(
                        !lkconv::cuda::kernels_compiled(),
                        "{} lacks ptxas",
                        l.kernel
                    );
                    assert_eq!(occ["available"], false);
                    assert!(occ["reason"].as_str().unwrap().contains("nvcc"));
                }
            }
        }
    }
}

#[test]
fn default_shapes_cover_every_pass() {
    let out = plan_json(&["plan", "--json"]);
    assert_eq!(out.len(), 15);
    let o = lkconv(&["plan", "--gpu", "l4"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("| 64x1024x7x7 K13 | wgrad |"), "{text}");
    if !lkconv::cuda::kernels_compiled() {
        assert!(text.contains("occupancy: unavailable"), "{text}");
    }
}

#[test]
fn bad_flags_are_errors() {
    for args in [
        vec!["plan", "--gpu", "v100"],
        vec!["plan", "--op", "sideways"],
        vec!["plan", "--shape", "1,2,3"],
        vec!["plan", "--kernel", "3"],
        vec![
            "plan",
            "--shape",
            "1,1,4,4",
            "--kernel",
            "9",
            "--padding",
            "0",
        ],
        vec!["plan", "--impl", "reference"],
        vec!["plan", "--dtype", "f64"],
    ] {
        let o = lkconv(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).starts_with("lkconv: error:"),
            "{args:?}"
        );
    }
}
