//! The simulator as a sanitizer (issue 14): schedule permutation to expose races, and memcheck
//! (guard pages around every buffer a kernel sees).
//!
//! **Schedules.** The fibers of a block run from one `__syncthreads()` to the next without
//! interruption, one after another; [`Schedule`] sets that order in every barrier interval (and
//! the order the blocks of a grid are handed to the workers): forward, reverse, or a seeded random
//! permutation drawn afresh per block and interval. A race-free kernel gives bit-identical
//! results under every schedule. The schedule of a launch is the innermost [`with_schedule`] of
//! the calling thread (tests running in parallel threads each force their own), else
//! `LKCONV_SIM_SCHEDULE=forward|reverse|random:SEED` (read once per process), else forward.
//!
//! **memcheck.** Every buffer a simulator kernel sees (those of `SimExec`, and of
//! [`run_launches`]) is a [`GuardedBuf`]: its own mapping with an inaccessible page on each side, the data ending at most 15 bytes before the back guard page (a 16-byte aligned
//! start) and a canary in the slack. A kernel that reads or writes past either end stops with
//! `Error::Simulator("<kernel> block (x,y,z): out-of-bounds global write 0 bytes past the end of
//! `out` (N bytes)")`; a write into the slack is reported after the launch.

use std::cell::Cell;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::plan::{DwArgs, Launch};

/// The order in which the simulator runs the threads of each barrier interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Thread 0, 1, 2, ... (and block 0, 1, 2, ...).
    #[default]
    Forward,
    /// The last thread (and block) first.
    Reverse,
    /// A permutation drawn from this seed, afresh for every block and barrier interval.
    Random(u64),
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "forward" => Ok(Schedule::Forward),
            "reverse" => Ok(Schedule::Reverse),
            other => other
                .strip_prefix("random:")
                .and_then(|seed| seed.parse::<u64>().ok())
                .map(Schedule::Random)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "simulator schedule '{other}' is not forward, reverse or random:SEED"
                    ))
                }),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Forward => write!(f, "forward"),
            Schedule::Reverse => write!(f, "reverse"),
            Schedule::Random(seed) => write!(f, "random:{seed}"),
        }
    }
}

thread_local! {
    static FORCED: Cell<Option<Schedule>> = const { Cell::new(None) };
}

/// Runs `f` with every simulator launch of this thread under `schedule` (nested calls: the
/// innermost wins; the previous setting is restored even if `f` panics).
pub fn with_schedule<R>(schedule: Schedule, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Schedule>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(schedule))));
    f()
}

/// The schedule a launch from this thread uses now (see the module documentation); a malformed
/// `LKCONV_SIM_SCHEDULE` is an error.
pub fn current_schedule() -> Result<Schedule> {
    if let Some(s) = FORCED.with(Cell::get) {
        return Ok(s);
    }
    static FROM_ENV: OnceLock<std::result::Result<Schedule, String>> = OnceLock::new();
    FROM_ENV
        .get_or_init(|| match std::env::var("LKCONV_SIM_SCHEDULE") {
            Ok(v) => v
                .parse::<Schedule>()
                .map_err(|e| format!("LKCONV_SIM_SCHEDULE: {e}")),
            Err(_) => Ok(Schedule::Forward),
        })
        .clone()
        .map_err(Error::InvalidArgument)
}

/// Per-launch options (identical to `lksim::LaunchOptions` in kernels/sim/sim_runtime.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LaunchOptions {
    schedule: u32,
    reserved: u32,
    seed: u64,
}

impl From<Schedule> for LaunchOptions {
    fn from(s: Schedule) -> Self {
        let (schedule, seed) = match s {
            Schedule::Forward => (0, 0),
            Schedule::Reverse => (1, 0),
            Schedule::Random(seed) => (2, seed),
        };
        LaunchOptions {
            schedule,
            reserved: 0,
            seed,
        }
    }
}

#[cfg(lkconv_sim)]
mod ffi {
    use super::LaunchOptions;
    use crate::plan::DwArgs;
    use std::ffi::c_char;

    extern "C" {
        pub fn lksim_launch_opts(
            name: *const c_char,
            gx: u32,
            gy: u32,
            gz: u32,
            bx: u32,
            by: u32,
            bz: u32,
            shared_bytes: u32,
            args: *const DwArgs,
            opts: *const LaunchOptions,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn lksim_guarded_alloc(bytes: usize, name: *const c_char, fill: u8) -> *mut u8;
        pub fn lksim_guarded_free(p: *mut u8);
    }
}

#[cfg(not(lkconv_sim))]
fn unavailable<T>() -> Result<T> {
    Err(Error::Simulator("built without the simulator".into()))
}

/// Host memory with guard pages on both sides (see the module documentation), freed on drop.
#[derive(Debug)]
pub struct GuardedBuf {
    ptr: *mut u8,
    len: usize,
}

impl GuardedBuf {
    /// `len` bytes, each set to `fill`; `name` appears in out-of-bounds reports.
    pub fn new(len: usize, name: &str, fill: u8) -> Result<Self> {
        #[cfg(lkconv_sim)]
        {
            let cname = std::ffi::CString::new(name)
                .map_err(|_| Error::InvalidArgument(format!("bad buffer name {name:?}")))?;
            // SAFETY: cname is NUL-terminated; the call returns null or a fresh mapping of at
            // least max(len, 1) writable bytes owned by the returned GuardedBuf.
            let ptr = unsafe { ffi::lksim_guarded_alloc(len, cname.as_ptr(), fill) };
            if ptr.is_null() {
                return Err(Error::Simulator(format!(
                    "cannot allocate {len} bytes of guarded memory for `{name}`"
                )));
            }
            Ok(GuardedBuf { ptr, len })
        }
        #[cfg(not(lkconv_sim))]
        {
            let _ = (len, name, fill);
            unavailable()
        }
    }

    /// A guarded copy of `data`.
    pub fn copy_of<T: Copy>(data: &[T], name: &str) -> Result<Self> {
        let bytes = std::mem::size_of_val(data);
        let b = Self::new(bytes, name, 0)?;
        // SAFETY: b.ptr holds `bytes` writable bytes in a fresh mapping, disjoint from `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().cast::<u8>(), b.ptr, bytes) };
        Ok(b)
    }

    /// The address a kernel argument carries.
    pub fn addr(&self) -> u64 {
        self.ptr as usize as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents as bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr holds len initialised bytes for the life of self (16-byte aligned).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The contents as `T` values (len must be a multiple of T's size).
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        let n = self.len / std::mem::size_of::<T>();
        let mut v = vec![T::default(); n];
        // SAFETY: ptr holds len >= n * size_of::<T>() initialised bytes; every bit pattern is a
        // valid f32 / f16 / bf16; v is a fresh allocation of n elements.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr().cast::<u8>(), n * size_of::<T>())
        };
        v
    }

    /// The contents as 32-bit words (len / 4 of them).
    pub fn words(&self) -> &[u32] {
        // SAFETY: ptr is 16-byte aligned and holds len initialised bytes for the life of self;
        // every bit pattern is a valid u32.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u32>(), self.len / 4) }
    }

    /// The contents as 32-bit words, mutable.
    pub fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: as for `words`, exclusively borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u32>(), self.len / 4) }
    }
}

// SAFETY: a GuardedBuf owns its mapping exclusively (no aliasing handle exists); moving it to
// another thread moves that ownership, as for a Vec.
unsafe impl Send for GuardedBuf {}

impl Drop for GuardedBuf {
    fn drop(&mut self) {
        #[cfg(lkconv_sim)]
        // SAFETY: ptr came from lksim_guarded_alloc and is freed once, here.
        unsafe {
            ffi::lksim_guarded_free(self.ptr)
        };
    }
}

/// Runs the kernel `name` (any kernel of the simulator library, its `lksim_test_*` kernels
/// included) under the calling thread's schedule.
///
/// # Safety
/// As for `crate::exec::Executor::run`: every address in `args` is 0 or host memory holding
/// every element the kernel touches, alive and not accessed through Rust references during the
/// call.
pub(crate) unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    args: &DwArgs,
) -> Result<()> {
    #[cfg(lkconv_sim)]
    {
        let opts = LaunchOptions::from(current_schedule()?);
        let cname = std::ffi::CString::new(name)
            .map_err(|_| Error::Simulator(format!("bad kernel name {name}")))?;
        let mut err = vec![0u8; 512];
        // SAFETY: `cname` is NUL-terminated, `args` a #[repr(C)] DwArgs and `opts` a #[repr(C)]
        // LaunchOptions that outlive the call; `err` is writable for err.len() bytes; the buffer
        // addresses are the caller's guarantee.
        let rc = unsafe {
            ffi::lksim_launch_opts(
                cname.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                shared_bytes,
                args,
                &opts,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(Error::Simulator(format!(
            "{name}: {}",
            String::from_utf8_lossy(&err[..end])
        )))
    }
    #[cfg(not(lkconv_sim))]
    {
        let _ = (name, grid, block, shared_bytes, args);
        unavailable()
    }
}

/// A launch by entry-point name: a planned [`Launch`], or one of the simulator's deliberately
/// wrong test kernels (`lksim_test_racy`, `lksim_test_oob`, `lksim_test_uninit`,
/// `lksim_test_uninit_vec`, `lksim_test_tc_wgrad_mutant_{a,d}`, in kernels/sim/sim_testkernels.inc),
/// which have no `KernelId`.
#[derive(Clone, Debug)]
pub struct NamedLaunch {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    pub args: DwArgs,
}

impl From<&Launch> for NamedLaunch {
    fn from(l: &Launch) -> Self {
        NamedLaunch {
            kernel: l.kernel.name(),
            grid: l.grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
            args: l.args,
        }
    }
}

/// The buffers of a run of launches: inputs copied into guarded memory, the output and the f32
/// workspace poisoned with 0xff bytes (NaN in every dtype).
#[derive(Debug, Default)]
pub struct LaunchData<'a> {
    pub in0: &'a [u8],
    pub in1: &'a [u8],
    pub bias: &'a [u8],
    pub out_bytes: usize,
    pub workspace_bytes: usize,
}

/// What a run of launches left in its output and workspace.
#[derive(Debug)]
pub struct LaunchResult {
    pub out: GuardedBuf,
    pub workspace: Option<GuardedBuf>,
}

/// Runs `launches` in order, their buffer addresses rebound to guarded copies of `data` (in0,
/// in1, bias, out, workspace; an empty input binds 0), under the calling thread's schedule.
pub fn run_launches(launches: &[NamedLaunch], data: &LaunchData) -> Result<LaunchResult> {
    let guarded = |d: &[u8], name: &str| -> Result<Option<GuardedBuf>> {
        if d.is_empty() {
            Ok(None)
        } else {
            GuardedBuf::copy_of(d, name).map(Some)
        }
    };
    let in0 = guarded(data.in0, "in0")?;
    let in1 = guarded(data.in1, "in1")?;
    let bias = guarded(data.bias, "bias")?;
    let out = GuardedBuf::new(data.out_bytes, "out", 0xff)?;
    let ws = if data.workspace_bytes > 0 {
        Some(GuardedBuf::new(data.workspace_bytes, "workspace", 0xff)?)
    } else {
        None
    };
    let addr = |b: &Option<GuardedBuf>| b.as_ref().map_or(0, GuardedBuf::addr);
    for l in launches {
        let args = DwArgs {
            in0: addr(&in0),
            in1: addr(&in1),
            bias: addr(&bias),
            out: out.addr(),
            workspace: addr(&ws),
            ..l.args
        };
        // SAFETY: the addresses are guarded buffers that live until the end of this function
        // and are not borrowed while the launch runs; their sizes are the caller's statement of
        // what the kernels touch, and memcheck reports overruns.
        unsafe { launch(&l.kernel, l.grid, l.block, l.shared_bytes, &args) }?;
    }
    Ok(LaunchResult { out, workspace: ws })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_print() {
        for s in [
            "forward",
            "reverse",
            "random:0",
            "random:18446744073709551615",
        ] {
            assert_eq!(s.parse::<Schedule>().unwrap().to_string(), s);
        }
        for bad in ["", "random", "random:x", "backward", "random:-1"] {
            assert!(matches!(
                bad.parse::<Schedule>(),
                Err(Error::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn with_schedule_nests_and_restores() {
        let outer = current_schedule().unwrap();
        with_schedule(Schedule::Reverse, || {
            assert_eq!(current_schedule().unwrap(), Schedule::Reverse);
            with_schedule(Schedule::Random(3), || {
                assert_eq!(current_schedule().unwrap(), Schedule::Random(3))
            });
            assert_eq!(current_schedule().unwrap(), Schedule::Reverse);
        });
        assert_eq!(current_schedule().unwrap(), outer);
    }
}
