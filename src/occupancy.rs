//! An occupancy and waves model per kernel launch, for named GPUs: from the ptxas report that
//! `build.rs` keeps (registers and static shared memory per kernel and architecture) and a launch
//! plan ([`crate::kernels::plan`]), how many blocks of a launch fit on one SM and what limits
//! them, the warps per SM, the occupancy, the waves over the SMs and the last wave's tail, and the
//! lanes idle in partial warps.
//!
//! The per-SM limits follow the CUDA occupancy calculator's rules (`cuda_occupancy.h`):
//! registers are allocated per warp in units of 256 and per SM sub-partition (4 per SM);
//! shared memory per block is the kernel's static plus dynamic bytes plus 1 KB reserved by the
//! system, rounded up to 128 bytes, against the SM's largest carveout (the default preference,
//! which the driver raises to what the launch needs); blocks above 48 KB of dynamic shared memory
//! opt in (the CUDA device does) up to the per-block limit. The limits are the published ones of
//! the CUDA programming guide (compute capabilities table) and the SM counts those of the
//! products (H100 SXM5, H200 SXM, A100 SXM4/PCIe, L4).

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::plan::Launch;

/// The per-SM limits of one GPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// Short name (`h100`).
    pub name: &'static str,
    /// The SASS architecture its kernels run as (`sm_90`).
    pub arch: &'static str,
    pub sm_count: u32,
    pub max_threads_per_sm: u32,
    pub max_warps_per_sm: u32,
    pub max_blocks_per_sm: u32,
    pub registers_per_sm: u32,
    /// Registers are allocated per warp in multiples of this.
    pub register_alloc_unit: u32,
    pub max_registers_per_thread: u32,
    pub max_registers_per_block: u32,
    /// Register file sub-partitions (warp schedulers) per SM.
    pub sub_partitions: u32,
    /// The largest shared-memory carveout of the unified L1/shared memory, bytes.
    pub shared_per_sm: u32,
    /// Shared memory one block may use (with the opt-in above 48 KB), bytes.
    pub shared_per_block: u32,
    /// Shared memory the system reserves per resident block, bytes.
    pub shared_reserved_per_block: u32,
    /// Shared memory is allocated in multiples of this, bytes.
    pub shared_alloc_unit: u32,
}

const KB: u32 = 1024;

/// sm_90; the other architectures differ from it only where they say so.
const fn hopper(name: &'static str, sm_count: u32) -> Gpu {
    Gpu {
        name,
        arch: "sm_90",
        sm_count,
        max_threads_per_sm: 2048,
        max_warps_per_sm: 64,
        max_blocks_per_sm: 32,
        registers_per_sm: 65536,
        register_alloc_unit: 256,
        max_registers_per_thread: 255,
        max_registers_per_block: 65536,
        sub_partitions: 4,
        shared_per_sm: 228 * KB,
        shared_per_block: 227 * KB,
        shared_reserved_per_block: KB,
        shared_alloc_unit: 128,
    }
}

/// The GPUs the model knows, by name.
pub const GPUS: [Gpu; 4] = [
    hopper("h100", 132),
    hopper("h200", 132),
    Gpu {
        name: "a100",
        arch: "sm_80",
        sm_count: 108,
        shared_per_sm: 164 * KB,
        shared_per_block: 163 * KB,
        ..hopper("", 0)
    },
    Gpu {
        name: "l4",
        arch: "sm_89",
        sm_count: 58,
        max_threads_per_sm: 1536,
        max_warps_per_sm: 48,
        max_blocks_per_sm: 24,
        shared_per_sm: 100 * KB,
        shared_per_block: 99 * KB,
        ..hopper("", 0)
    },
];

impl Gpu {
    /// The GPU named `name` (h100, h200, a100, l4; case-insensitive).
    pub fn named(name: &str) -> Result<Gpu> {
        let lower = name.trim().to_ascii_lowercase();
        GPUS.iter()
            .find(|g| g.name == lower)
            .copied()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown GPU '{name}' (expected {})",
                    GPUS.map(|g| g.name).join(", ")
                ))
            })
    }
}

/// What ptxas reported for one kernel on one architecture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub registers: u32,
    /// Static shared memory (the kernels use dynamic shared memory; usually 0).
    pub static_shared: u32,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parses a `ptxas -v` report into resources per (kernel, architecture).
pub fn parse_ptxas(report: &str) -> HashMap<(String, String), KernelResources> {
    let mut out = HashMap::new();
    let mut current: Option<(String, String)> = None;
    let number_before = |text: &str, unit: &str| -> Option<u32> {
        text.split(',').find_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse::<u32>().ok()?;
            let rest: Vec<&str> = words.collect();
            (rest.join(" ") == unit).then_some(n)
        })
    };
    for line in report.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            let rest = &line[pos + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = line
                .split("for '")
                .nth(1)
                .map(|a| a.trim_end_matches('\'').to_string())
                .unwrap_or_default();
            out.insert((name.clone(), arch.clone()), KernelResources::default());
            current = Some((name, arch));
            continue;
        }
        let Some(key) = current.as_ref() else {
            continue;
        };
        let Some(r) = out.get_mut(key) else { continue };
        if line.contains("bytes stack frame") {
            r.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
            r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if let Some(used) = line.split("Used ").nth(1) {
            r.registers = number_before(used, "registers").unwrap_or(0);
            r.static_shared = number_before(used, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// The ptxas report of this build (empty when nvcc was not found).
const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.log"));

/// The resources ptxas reported for `kernel` on `arch` in this build; None without nvcc.
pub fn resources(kernel: &str, arch: &str) -> Option<KernelResources> {
    static TABLE: OnceLock<HashMap<(String, String), KernelResources>> = OnceLock::new();
    TABLE
        .get_or_init(|| parse_ptxas(PTXAS_REPORT))
        .get(&(kernel.to_string(), arch.to_string()))
        .copied()
}

/// What limits the blocks resident on one SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Registers,
    SharedMemory,
    /// Threads (warps) per SM.
    Threads,
    /// Blocks per SM.
    Blocks,
}

impl Limiter {
    pub fn name(self) -> &'static str {
        match self {
            Limiter::Registers => "registers",
            Limiter::SharedMemory => "shared memory",
            Limiter::Threads => "threads",
            Limiter::Blocks => "blocks",
        }
    }
}

/// The occupancy model of one launch on one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Occupancy {
    pub gpu: &'static str,
    pub arch: &'static str,
    pub resources: KernelResources,
    pub threads_per_block: u32,
    pub warps_per_block: u32,
    /// Registers allocated per block (per-warp allocation units included).
    pub registers_per_block: u32,
    /// Shared memory allocated per block (static + dynamic + reserved, rounded up).
    pub shared_per_block: u32,
    /// Blocks per SM allowed by each resource.
    pub limit_registers: u32,
    pub limit_shared: u32,
    pub limit_threads: u32,
    pub limit_blocks: u32,
    pub blocks_per_sm: u32,
    /// Every resource whose limit equals `blocks_per_sm` (the first is reported as the limiter).
    pub limiters: Vec<Limiter>,
    pub warps_per_sm: u32,
    /// Resident warps over the SM's maximum.
    pub occupancy: f64,
    pub grid_blocks: u64,
    /// Blocks the whole GPU holds at once (blocks_per_sm x SMs).
    pub blocks_per_wave: u64,
    /// grid_blocks / blocks_per_wave.
    pub waves: f64,
    pub full_waves: u64,
    /// Blocks in the last, partial wave (0 when the grid fills whole waves).
    pub tail_blocks: u64,
    /// Lanes of the block's last warp that have no thread, over all lanes of its warps.
    pub idle_lane_share: f64,
}

fn round_up(v: u64, unit: u64) -> u64 {
    v.div_ceil(unit) * unit
}

/// The occupancy of `launch` on `gpu` for a kernel with `res` (from [`resources`]). A launch
/// that cannot run (too many registers or too much shared memory for one block) is an error.
pub fn model(gpu: &Gpu, launch: &Launch, res: KernelResources) -> Result<Occupancy> {
    let (bx, by, bz) = launch.block;
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads == 0 || threads > 1024 {
        return Err(Error::InvalidArgument(format!(
            "{}: block of {threads} threads",
            launch.kernel
        )));
    }
    let warps = threads.div_ceil(32);
    // registers: per warp in allocation units, warps spread over the sub-partitions
    let regs_per_warp = round_up(res.registers as u64 * 32, gpu.register_alloc_unit as u64);
    let regs_per_block = regs_per_warp * warps;
    let regs_checked = regs_per_warp * round_up(warps, gpu.sub_partitions as u64);
    if res.registers > gpu.max_registers_per_thread
        || regs_checked > gpu.max_registers_per_block as u64
    {
        return Err(Error::Unsupported(format!(
            "{}: {} registers x {threads} threads do not fit one block on {}",
            launch.kernel, res.registers, gpu.name
        )));
    }
    let regs_per_partition = (gpu.registers_per_sm / gpu.sub_partitions) as u64;
    let limit_regs = regs_per_partition
        .checked_div(regs_per_warp)
        .map_or(u64::from(gpu.max_blocks_per_sm), |warps_per_partition| {
            warps_per_partition * gpu.sub_partitions as u64 / warps
        });
    // shared memory
    let used = res.static_shared as u64 + launch.shared_bytes as u64;
    if used > gpu.shared_per_block as u64 {
        return Err(Error::Unsupported(format!(
            "{}: {used} bytes of shared memory per block exceed {}'s {} bytes",
            launch.kernel, gpu.name, gpu.shared_per_block
        )));
    }
    let shared = round_up(
        used + gpu.shared_reserved_per_block as u64,
        gpu.shared_alloc_unit as u64,
    );
    let limit_shared = gpu.shared_per_sm as u64 / shared;
    let limit_threads = gpu.max_warps_per_sm as u64 / warps;
    let limit_blocks = gpu.max_blocks_per_sm as u64;
    let blocks = limit_regs
        .min(limit_shared)
        .min(limit_threads)
        .min(limit_blocks);
    let limiters: Vec<Limiter> = [
        (Limiter::Registers, limit_regs),
        (Limiter::SharedMemory, limit_shared),
        (Limiter::Threads, limit_threads),
        (Limiter::Blocks, limit_blocks),
    ]
    .into_iter()
    .filter(|&(_, l)| l == blocks)
    .map(|(k, _)| k)
    .collect();
    let (gx, gy, gz) = launch.grid;
    let grid = gx as u64 * gy as u64 * gz as u64;
    let per_wave = blocks * gpu.sm_count as u64;
    let as_u32 = |v: u64| v.min(u32::MAX as u64) as u32;
    Ok(Occupancy {
        gpu: gpu.name,
        arch: gpu.arch,
        resources: res,
        threads_per_block: threads as u32,
        warps_per_block: warps as u32,
        registers_per_block: as_u32(regs_per_block),
        shared_per_block: as_u32(shared),
        limit_registers: as_u32(limit_regs),
        limit_shared: as_u32(limit_shared),
        limit_threads: as_u32(limit_threads),
        limit_blocks: as_u32(limit_blocks),
        blocks_per_sm: as_u32(blocks),
        limiters,
        warps_per_sm: as_u32(blocks * warps),
        occupancy: (blocks * warps) as f64 / gpu.max_warps_per_sm as f64,
        grid_blocks: grid,
        blocks_per_wave: per_wave,
        waves: grid as f64 / per_wave as f64,
        full_waves: grid / per_wave,
        tail_blocks: grid % per_wave,
        idle_lane_share: (warps * 32 - threads) as f64 / (warps * 32) as f64,
    })
}

/// The model for `launch` on `gpu` with this build's ptxas report; None when the build has no
/// report for the kernel (built without nvcc).
pub fn launch_occupancy(gpu: &Gpu, launch: &Launch) -> Option<Result<Occupancy>> {
    resources(&launch.kernel.name(), gpu.arch).map(|r| model(gpu, launch, r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{DwArgs, Family, KernelId};
    use crate::DType;

    fn launch(grid: u32, block: (u32, u32, u32), shared: u32) -> Launch {
        Launch {
            kernel: KernelId::new(Family::Affine, DType::F32),
            grid: (grid, 1, 1),
            block,
            shared_bytes: shared,
            args: DwArgs::default(),
        }
    }

    fn res(registers: u32) -> KernelResources {
        KernelResources {
            registers,
            ..KernelResources::default()
        }
    }

    #[test]
    fn register_limited() {
        // 128 registers x 256 threads: 4096 registers per warp, 4 warps per sub-partition
        // (16384 / 4096), 16 warps per SM, 2 blocks of 8 warps; 2 x 132 = 264 blocks a wave
        let h100 = Gpu::named("h100").unwrap();
        let o = model(&h100, &launch(1000, (256, 1, 1), 0), res(128)).unwrap();
        assert_eq!(o.limit_registers, 2);
        assert_eq!(o.blocks_per_sm, 2);
        assert_eq!(o.limiters, vec![Limiter::Registers]);
        assert_eq!(o.warps_per_sm, 16);
        assert_eq!(o.occupancy, 0.25);
        assert_eq!(o.blocks_per_wave, 264);
        assert_eq!((o.full_waves, o.tail_blocks), (3, 208));
        assert!((o.waves - 1000.0 / 264.0).abs() < 1e-12);
        // 80 registers: 2560 per warp, 6 warps per sub-partition, 24 per SM, 3 blocks of 8
        let o = model(&h100, &launch(10, (256, 1, 1), 0), res(80)).unwrap();
        assert_eq!((o.limit_registers, o.warps_per_sm), (3, 24));
        // 70 registers round up to 72 per thread (2304 per warp): 7 warps per sub-partition
        let o = model(&h100, &launch(10, (32, 1, 1), 0), res(70)).unwrap();
        assert_eq!(o.limit_registers, 28);
        assert_eq!(o.limiters, vec![Limiter::Registers]);
    }

    #[test]
    fn shared_memory_limited() {
        // 48 KB + 1 KB reserved = 50176 bytes per block: 3 fit in A100's 164 KB, 2 in L4's 100 KB
        let l = launch(500, (128, 1, 1), 48 * 1024);
        let a100 = Gpu::named("a100").unwrap();
        let o = model(&a100, &l, res(32)).unwrap();
        assert_eq!(o.shared_per_block, 50176);
        assert_eq!(
            (o.blocks_per_sm, o.limiters.clone()),
            (3, vec![Limiter::SharedMemory])
        );
        assert_eq!(o.warps_per_sm, 12);
        let l4 = Gpu::named("L4").unwrap();
        let o = model(&l4, &l, res(32)).unwrap();
        assert_eq!(o.blocks_per_sm, 2);
        assert_eq!(o.blocks_per_wave, 116);
        assert_eq!((o.full_waves, o.tail_blocks), (4, 36));
        // unaligned sizes round up to 128 bytes: 30000 + 1024 -> 31104; 7 per H100 SM
        let o = model(
            &Gpu::named("h200").unwrap(),
            &launch(1, (64, 1, 1), 30000),
            res(32),
        );
        let o = o.unwrap();
        assert_eq!((o.shared_per_block, o.blocks_per_sm), (31104, 7));
        // over the per-block limit: an error, not zero blocks
        assert!(matches!(
            model(&l4, &launch(1, (64, 1, 1), 100 * 1024), res(32)),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn thread_and_block_limited() {
        // 1024 threads, 16 registers: 2 blocks of 32 warps fill H100's 64 warps; L4 (48 warps)
        // holds one, with 16 warp slots unused
        let l = launch(264, (32, 32, 1), 0);
        let o = model(&Gpu::named("h100").unwrap(), &l, res(16)).unwrap();
        assert_eq!((o.blocks_per_sm, o.occupancy), (2, 1.0));
        assert_eq!(o.limiters, vec![Limiter::Threads]);
        assert_eq!((o.waves, o.tail_blocks), (1.0, 0));
        let o = model(&Gpu::named("l4").unwrap(), &l, res(16)).unwrap();
        assert_eq!((o.blocks_per_sm, o.warps_per_sm), (1, 32));
        assert!((o.occupancy - 32.0 / 48.0).abs() < 1e-12);
        // 16 threads, 8 registers: one half-empty warp per block, 32 blocks at most
        let o = model(
            &Gpu::named("a100").unwrap(),
            &launch(7, (16, 1, 1), 0),
            res(8),
        )
        .unwrap();
        assert_eq!(
            (o.blocks_per_sm, o.limiters.clone()),
            (32, vec![Limiter::Blocks])
        );
        assert_eq!(o.idle_lane_share, 0.5);
        assert_eq!((o.full_waves, o.tail_blocks), (0, 7));
    }

    #[test]
    fn too_many_registers_is_an_error() {
        let h100 = Gpu::named("h100").unwrap();
        assert!(model(&h100, &launch(1, (1024, 1, 1), 0), res(65)).is_err());
        assert!(model(&h100, &launch(1, (1024, 1, 1), 0), res(64)).is_ok());
        assert!(model(&h100, &launch(1, (32, 1, 1), 0), res(256)).is_err());
        assert!(Gpu::named("v100").is_err());
    }

    #[test]
    fn parses_a_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'lk_a' for 'sm_90'\n\
            ptxas info    : Function properties for lk_a\n    \
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 80 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'lk_a' for 'sm_80'\n\
            ptxas info    : Function properties for lk_a\n    \
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 72 registers, used 1 barriers\n";
        let t = parse_ptxas(log);
        assert_eq!(
            t[&("lk_a".to_string(), "sm_90".to_string())],
            KernelResources {
                registers: 80,
                static_shared: 16,
                stack_frame: 8,
                spill_stores: 4,
                spill_loads: 12
            }
        );
        assert_eq!(t[&("lk_a".to_string(), "sm_80".to_string())].registers, 72);
        assert_eq!(t.len(), 2);
    }
}
