//! `lkconv plan`: the launches the planner picks for a problem, with the occupancy model of each
//! launch on a named GPU (`lkconv::occupancy`). `--json` prints one object per problem (one per
//! line), in the schema of the standalone CUDA harness (kernels/bench/); the text form is a
//! Markdown table (BENCHMARKS.md's occupancy table is this command's output).

use lkconv::occupancy::{self, Gpu, Occupancy};
use lkconv::plan::{self, Launch, Plan};
use lkconv::problem::Problem;
use lkconv::{ConvShape, DType, DwConv2d, Error, Impl, Op, Result};
use serde_json::{json, Value};

use crate::args::{pair, shape4};
use crate::PlanArgs;

/// The benchmark shapes (N, C, H, W, K) when no --shape is given.
const DEFAULT_SHAPES: [([usize; 4], usize); 5] = [
    ([64, 128, 56, 56], 31),
    ([1, 128, 56, 56], 31),
    ([64, 256, 28, 28], 29),
    ([64, 512, 14, 14], 27),
    ([64, 1024, 7, 7], 13),
];

/// One planned problem.
struct Planned {
    op: Op,
    conv: DwConv2d,
    shape: ConvShape,
    plan: Plan,
    /// Useful FMAs over the FMAs the plan executes.
    useful_share: f64,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let dtype: DType = args.dtype.parse()?;
    let imp: Impl = args.implementation.parse()?;
    let gpu = Gpu::named(&args.gpu)?;
    let ops: Vec<Op> = if args.op == "all" {
        Op::ALL.to_vec()
    } else {
        vec![args.op.parse()?]
    };
    let shapes: Vec<([usize; 4], (usize, usize))> = match &args.shape {
        Some(s) => {
            let k = pair("--kernel", args.kernel.as_deref().unwrap_or("31"))?;
            vec![(shape4(s)?, k)]
        }
        None if args.kernel.is_some() => {
            return Err(Error::InvalidArgument("--kernel needs --shape".into()))
        }
        None => DEFAULT_SHAPES.iter().map(|&(s, k)| (s, (k, k))).collect(),
    };
    let mut problems = Vec::new();
    for &([n, c, h, w], k) in &shapes {
        let conv = args.geometry.conv(k)?;
        let shape = conv.resolve(n, c, h, w)?;
        for &op in &ops {
            let p = Problem::new(op, imp, dtype, &conv, &shape)?;
            let plan = plan::plan(&p)?;
            let executed = plan::executed_fmas(&p)?;
            problems.push(Planned {
                op,
                conv,
                shape,
                plan,
                useful_share: p.useful_flops() / 2.0 / executed,
            });
        }
    }
    if args.json {
        for p in &problems {
            println!("{}", problem_json(p, dtype, imp, &gpu));
        }
    } else {
        print_table(&problems, &gpu);
    }
    Ok(())
}

/// The model for one launch, or why there is none.
fn launch_model(gpu: &Gpu, l: &Launch) -> std::result::Result<Occupancy, String> {
    match occupancy::launch_occupancy(gpu, l) {
        Some(Ok(o)) => Ok(o),
        Some(Err(e)) => Err(e.to_string()),
        None if lkconv::cuda::kernels_compiled() => {
            Err(format!("no ptxas entry for {} on {}", l.kernel, gpu.arch))
        }
        None => Err("unavailable (built without nvcc: no ptxas report)".into()),
    }
}

fn occupancy_json(gpu: &Gpu, l: &Launch, useful_share: f64) -> Value {
    let o = match launch_model(gpu, l) {
        Ok(o) => o,
        Err(reason) => return json!({ "available": false, "reason": reason }),
    };
    json!({
        "available": true,
        "gpu": o.gpu,
        "arch": o.arch,
        "sm_count": gpu.sm_count,
        "registers": o.resources.registers,
        "static_shared_bytes": o.resources.static_shared,
        "stack_frame_bytes": o.resources.stack_frame,
        "spill_stores_bytes": o.resources.spill_stores,
        "spill_loads_bytes": o.resources.spill_loads,
        "threads_per_block": o.threads_per_block,
        "warps_per_block": o.warps_per_block,
        "registers_per_block": o.registers_per_block,
        "shared_bytes_allocated": o.shared_per_block,
        "limits": {
            "registers": o.limit_registers,
            "shared_memory": o.limit_shared,
            "threads": o.limit_threads,
            "blocks": o.limit_blocks,
        },
        "blocks_per_sm": o.blocks_per_sm,
        "limiter": o.limiters.first().map(|l| l.name()),
        "limiters": o.limiters.iter().map(|l| l.name()).collect::<Vec<_>>(),
        "warps_per_sm": o.warps_per_sm,
        "occupancy": o.occupancy,
        "grid_blocks": o.grid_blocks,
        "blocks_per_wave": o.blocks_per_wave,
        "waves": o.waves,
        "full_waves": o.full_waves,
        "tail_blocks": o.tail_blocks,
        "idle_lane_share": o.idle_lane_share,
        "plan_useful_fma_share": useful_share,
    })
}

fn problem_json(p: &Planned, dtype: DType, imp: Impl, gpu: &Gpu) -> Value {
    let s = &p.shape;
    let pad = p.conv.padding;
    let launches: Vec<Value> = p
        .plan
        .launches
        .iter()
        .map(|l| {
            let a = &l.args;
            json!({
                "kernel": l.kernel.name(),
                "grid": [l.grid.0, l.grid.1, l.grid.2],
                "block": [l.block.0, l.block.1, l.block.2],
                "shared_bytes": l.shared_bytes,
                "args": {
                    "n": a.n, "c": a.c, "h": a.h, "w": a.w, "oh": a.oh, "ow": a.ow,
                    "kh": a.kh, "kw": a.kw, "sh": a.sh, "sw": a.sw,
                    "pad_top": a.pad_top, "pad_left": a.pad_left, "dh": a.dh, "dw": a.dw,
                    "aux0": a.aux0, "aux1": a.aux1, "aux2": a.aux2, "aux3": a.aux3,
                },
                "occupancy": occupancy_json(gpu, l, p.useful_share),
            })
        })
        .collect();
    // offsets in elements of the GEMM's dtype into the workspace (the plan holds byte offsets)
    let gemm = p.plan.gemm.map_or(Value::Null, |(after, g)| {
        let es = g.dtype.size_bytes() as u64;
        json!({
            "after_launch": after, "batch": g.batch, "m": g.m, "n": g.n, "k": g.k,
            "a_offset": g.a / es, "lda": g.lda, "stride_a": g.stride_a, "a_trans": g.a_trans,
            "b_offset": g.b / es, "ldb": g.ldb, "stride_b": g.stride_b, "b_trans": g.b_trans,
            "c_offset": g.c / es, "ldc": g.ldc, "stride_c": g.stride_c,
            "dtype": g.dtype.name(),
        })
    });
    json!({
        "op": p.op.name(),
        "dtype": dtype.name(),
        "impl": imp.name(),
        "shape": s.input_dims(),
        "kernel": [p.conv.kernel.0, p.conv.kernel.1],
        "stride": [p.conv.stride.0, p.conv.stride.1],
        "dilation": [p.conv.dilation.0, p.conv.dilation.1],
        "padding": [pad.top, pad.bottom, pad.left, pad.right],
        "output": s.output_dims(),
        "workspace_bytes": p.plan.workspace_bytes,
        "launches": launches,
        "gemm": gemm,
    })
}

fn print_table(problems: &[Planned], gpu: &Gpu) {
    println!(
        "Occupancy model on {} ({}, {} SMs, {} warps and {} KB of shared memory per SM):\n",
        gpu.name,
        gpu.arch,
        gpu.sm_count,
        gpu.max_warps_per_sm,
        gpu.shared_per_sm / 1024
    );
    println!(
        "| shape (N x C x H x W, K) | op | kernel | grid | block | smem/block | regs | blocks/SM (limiter) | warps/SM | occupancy | waves (tail blocks) | idle lanes | useful FMAs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut unavailable = None;
    for p in problems {
        let s = &p.shape;
        let (kh, kw) = p.conv.kernel;
        let k = if kh == kw {
            format!("K{kh}")
        } else {
            format!("K{kh}x{kw}")
        };
        let shape = format!("{}x{}x{}x{} {k}", s.n, s.c, s.h, s.w);
        for (i, l) in p.plan.launches.iter().enumerate() {
            let (gx, gy, gz) = l.grid;
            let (bx, by, bz) = l.block;
            let useful = if i == 0 {
                format!("{:.0}%", 100.0 * p.useful_share)
            } else {
                String::new()
            };
            let model = match launch_model(gpu, l) {
                Ok(o) => format!(
                    "{} | {} ({}) | {} | {:.0}% | {:.2} ({}) | {:.0}%",
                    o.resources.registers,
                    o.blocks_per_sm,
                    o.limiters
                        .iter()
                        .map(|l| l.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                    o.warps_per_sm,
                    100.0 * o.occupancy,
                    o.waves,
                    o.tail_blocks,
                    100.0 * o.idle_lane_share
                ),
                Err(reason) => {
                    unavailable.get_or_insert(reason);
                    "- | - | - | - | - | -".into()
                }
            };
            println!(
                "| {shape} | {} | {} | {gx}x{gy}x{gz} | {bx}x{by}x{bz} | {} | {model} | {useful} |",
                p.op.name(),
                l.kernel,
                l.shared_bytes
            );
        }
    }
    if let Some(reason) = unavailable {
        println!("\noccupancy: {reason}");
    }
}
