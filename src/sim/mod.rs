//! The kernel simulator device: the unchanged `kernels/*.cu` compiled for the host with g++
//! against the SIMT runtime in `kernels/sim/` (fibers per block, blocks on worker threads), and
//! [`SimExec`], the simulator back-end of the plan executor (`crate::exec::Executor`): host
//! buffers, launches through the simulator, GEMMs on the host.
//!
//! Every buffer is poisoned with NaN when allocated, so an element a kernel fails to write (or
//! a read of something never written) shows up in the result; the simulator also poisons
//! shared memory before every block. It checks launch limits (block size, grid size, 227 KB of
//! shared memory) and reports barrier divergence as an error. It is also a sanitizer
//! ([`sanitize`]): thread schedules, guard pages around every buffer, initcheck of shared memory.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::{Buf, Executor};
use crate::plan::{Gemm, Launch, Step};

pub mod sanitize;
pub use sanitize::{with_schedule, GuardedBuf, Schedule};
pub mod warp;

#[cfg(lkconv_sim)]
mod ffi {
    use std::ffi::c_char;

    extern "C" {
        pub fn lksim_selftest(err: *mut c_char, err_len: usize) -> i32;
        pub fn lksim_f32_to_f16_bits(v: f32) -> u16;
        pub fn lksim_f16_bits_to_f32(b: u16) -> f32;
        pub fn lksim_f32_to_bf16_bits(v: f32) -> u16;
        pub fn lksim_kernel_count() -> usize;
        pub fn lksim_tile_ld(tw: i32, kcw: i32) -> i32;
        pub fn lksim_tiled_smem_floats(th: i32, tw: i32, kch: i32, kcw: i32) -> i32;
        pub fn lksim_wgrad_smem_floats(th: i32, tw: i32, kh: i32, kw: i32, threads: i32) -> i32;
        pub fn lksim_rx() -> i32;
        pub fn lksim_wgrad_strided_threads() -> i32;
        pub fn lksim_wgrad_strided_taps() -> i32;
        pub fn lksim_kernel_name(i: usize) -> *const c_char;
    }
}

/// True when the crate was built with the simulator (g++ and `kernels/sim/` present).
pub fn available() -> bool {
    cfg!(lkconv_sim)
}

fn unavailable<T>() -> Result<T> {
    Err(Error::Simulator("built without the simulator".into()))
}

/// The kernels registered in the simulator library, sorted by name.
pub fn registered_kernels() -> Result<Vec<String>> {
    #[cfg(lkconv_sim)]
    {
        // SAFETY: lksim_kernel_count has no preconditions; it reads a static registry.
        let count = unsafe { ffi::lksim_kernel_count() };
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: i < count, so the returned pointer is a NUL-terminated string owned by the
            // registry for the life of the process.
            let p = unsafe { ffi::lksim_kernel_name(i) };
            if p.is_null() {
                return Err(Error::Simulator(format!("kernel {i} has no name")));
            }
            // SAFETY: p is non-null and NUL-terminated (see above).
            let s = unsafe { std::ffi::CStr::from_ptr(p) };
            v.push(s.to_string_lossy().into_owned());
        }
        Ok(v)
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// Runs the simulator runtime's self-tests: barrier semantics over several blocks and workers,
/// and that it reports a thread exiting before a barrier, threads at different barriers, a
/// misaligned 16-byte shared load, a write past the dynamic shared memory, an oversized block and
/// oversized shared memory.
pub fn selftest() -> Result<()> {
    #[cfg(lkconv_sim)]
    {
        let mut err = vec![0u8; 512];
        // SAFETY: `err` is writable for err.len() bytes; the self-test owns all other buffers.
        let rc = unsafe { ffi::lksim_selftest(err.as_mut_ptr().cast(), err.len()) };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(Error::Simulator(
            String::from_utf8_lossy(&err[..end]).into_owned(),
        ))
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// The simulator runtime's own storage conversions (`__float2half_rn`, `__half2float`,
/// `__float2bfloat16_rn`), exposed to test them bit for bit against the `half` crate.
#[derive(Clone, Copy, Debug)]
pub struct Conversions {
    pub f32_to_f16_bits: fn(f32) -> u16,
    pub f16_bits_to_f32: fn(u16) -> f32,
    pub f32_to_bf16_bits: fn(f32) -> u16,
}

/// The simulator's conversions (see [`Conversions`]).
pub fn conversions() -> Result<Conversions> {
    #[cfg(lkconv_sim)]
    {
        fn to_f16(v: f32) -> u16 {
            // SAFETY: a pure function of its argument.
            unsafe { ffi::lksim_f32_to_f16_bits(v) }
        }
        fn from_f16(b: u16) -> f32 {
            // SAFETY: a pure function of its argument.
            unsafe { ffi::lksim_f16_bits_to_f32(b) }
        }
        fn to_bf16(v: f32) -> u16 {
            // SAFETY: a pure function of its argument.
            unsafe { ffi::lksim_f32_to_bf16_bits(v) }
        }
        Ok(Conversions {
            f32_to_f16_bits: to_f16,
            f16_bits_to_f32: from_f16,
            f32_to_bf16_bits: to_bf16,
        })
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// The kernels' own tile geometry (`kernels/lk_common.cuh`, compiled for the host), exposed
/// to test it against the planner's (`crate::plan::geometry`).
#[derive(Clone, Copy, Debug)]
pub struct KernelGeometry {
    /// `lk::tile_ld(tw, kcw)`.
    pub tile_ld: fn(i32, i32) -> i32,
    /// `lk::tiled_smem_floats(th, tw, kch, kcw)`.
    pub tiled_smem_floats: fn(i32, i32, i32, i32) -> i32,
    /// `lk::wgrad_smem_floats(th, tw, kh, kw, threads)`.
    pub wgrad_smem_floats: fn(i32, i32, i32, i32, i32) -> i32,
    /// `lk::RX`, `lk::WG_THREADS`, `lk::WG_TC`.
    pub rx: i32,
    pub wgrad_strided_threads: i32,
    pub wgrad_strided_taps: i32,
}

/// The kernels' geometry (see [`KernelGeometry`]).
pub fn kernel_geometry() -> Result<KernelGeometry> {
    #[cfg(lkconv_sim)]
    {
        fn tile_ld(tw: i32, kcw: i32) -> i32 {
            // SAFETY: a pure function of its arguments.
            unsafe { ffi::lksim_tile_ld(tw, kcw) }
        }
        fn tiled(th: i32, tw: i32, kch: i32, kcw: i32) -> i32 {
            // SAFETY: a pure function of its arguments.
            unsafe { ffi::lksim_tiled_smem_floats(th, tw, kch, kcw) }
        }
        fn wgrad(th: i32, tw: i32, kh: i32, kw: i32, threads: i32) -> i32 {
            // SAFETY: a pure function of its arguments.
            unsafe { ffi::lksim_wgrad_smem_floats(th, tw, kh, kw, threads) }
        }
        // SAFETY: the three return compile-time constants.
        let (rx, threads, taps) = unsafe {
            (
                ffi::lksim_rx(),
                ffi::lksim_wgrad_strided_threads(),
                ffi::lksim_wgrad_strided_taps(),
            )
        };
        Ok(KernelGeometry {
            tile_ld,
            tiled_smem_floats: tiled,
            wgrad_smem_floats: wgrad,
            rx,
            wgrad_strided_threads: threads,
            wgrad_strided_taps: taps,
        })
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// Runs one launch in the simulator: the one launch site of the simulator back-end.
///
/// # Safety
/// As for [`Executor::run`]: every address in `l.args` is 0 or host memory holding every
/// element the kernel touches for the launch's problem, alive and not accessed through Rust
/// references while the call runs.
unsafe fn launch(l: &Launch) -> Result<()> {
    // SAFETY: this function's contract, passed on.
    unsafe { sanitize::launch(&l.kernel.name(), l.grid, l.block, l.shared_bytes, &l.args) }
}

/// NaN as f32, and as each of its two 16-bit halves read as bf16 or f16.
const POISON: u32 = 0x7fc0_7fc0;

/// The simulator back-end: host buffers (u32 words, 16-byte aligned, with guard pages: memcheck),
/// launches through the simulator, GEMMs on the host.
#[derive(Debug, Default)]
pub struct SimExec {
    bufs: Vec<GuardedBuf>,
}

/// `len` bytes at byte offset `off` of little-endian words (only the words touched are read).
fn get_bytes(words: &[u32], off: usize, len: usize) -> Vec<u8> {
    let (w0, w1) = (off / 4, (off + len).div_ceil(4));
    let bytes: Vec<u8> = words[w0..w1].iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes[off - 4 * w0..off - 4 * w0 + len].to_vec()
}

/// Writes `data` at byte offset `off` of little-endian words (read-modify-write of the words
/// touched).
fn put_bytes(words: &mut [u32], off: usize, data: &[u8]) {
    let (w0, w1) = (off / 4, (off + data.len()).div_ceil(4));
    let mut bytes: Vec<u8> = words[w0..w1].iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes[off - 4 * w0..off - 4 * w0 + data.len()].copy_from_slice(data);
    for (w, c) in words[w0..w1].iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Copies the `rows x cols` operand of a GEMM into `dst` (row-major, contiguous): element
/// (r, c) is stored at `r * ld + c` in `src`, or at `c * ld + r` when `trans`.
fn gather(src: &[f32], ld: usize, trans: bool, (rows, cols): (usize, usize), dst: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            dst[r * cols + c] = if trans {
                src[c * ld + r]
            } else {
                src[r * ld + c]
            };
        }
    }
}

impl SimExec {
    /// A simulator executor (fails when the crate was built without the simulator).
    pub fn new() -> Result<Self> {
        if !available() {
            return unavailable();
        }
        Ok(SimExec::default())
    }

    /// (buffer index, byte offset) of the byte range `[start, end)`, which must lie in one
    /// buffer.
    fn find(&self, start: u64, end: u64) -> Result<(usize, usize)> {
        self.bufs
            .iter()
            .position(|b| {
                let base = b.addr();
                start >= base && end <= base + b.len() as u64 && start < end.max(start + 1)
            })
            .map(|i| (i, (start - self.bufs[i].addr()) as usize))
            .ok_or_else(|| {
                Error::Simulator(format!("bytes {start:#x}..{end:#x} are in no one buffer"))
            })
    }

    /// The f32 values of the byte range `[start, end)` of `dtype` elements.
    fn read(&self, (start, end): (u64, u64), dtype: DType) -> Result<(usize, usize, Vec<f32>)> {
        let (i, off) = self.find(start, end)?;
        let v = dtype.decode(&get_bytes(
            self.bufs[i].words(),
            off,
            (end - start) as usize,
        ));
        Ok((i, off, v))
    }

    /// The one GEMM step on the host: operands widened to f32, op(A) and B gathered into
    /// contiguous matrices, one sgemm per batch entry, C rounded back to its dtype (as cuBLAS
    /// does with f32 compute).
    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        let [ea, eb, ec] = g.extents()?;
        let overlaps = |(s0, e0): (u64, u64), (s1, e1): (u64, u64)| s0 < e1 && s1 < e0;
        if overlaps(ec, ea) || overlaps(ec, eb) {
            return Err(Error::Simulator("GEMM output overlaps an input".into()));
        }
        let (_, _, a) = self.read(ea, g.dtype)?;
        let (_, _, b) = self.read(eb, g.dtype)?;
        let (ci, coff, mut c) = self.read(ec, g.dtype)?;
        let (m, n, k) = (g.m, g.n, g.k);
        let mut pa = vec![0f32; m * k];
        let mut pb = vec![0f32; k * n];
        let mut pc = vec![0f32; m * n];
        for i in 0..g.batch {
            let c0 = i * g.stride_c;
            gather(&a[i * g.stride_a..], g.lda, g.a_trans, (m, k), &mut pa);
            gather(&b[i * g.stride_b..], g.ldb, g.b_trans, (k, n), &mut pb);
            crate::cpu::gemm::sgemm(m, k, n, &pa, false, &pb, 0.0, &mut pc);
            for r in 0..m {
                c[c0 + r * g.ldc..c0 + r * g.ldc + n].copy_from_slice(&pc[r * n..(r + 1) * n]);
            }
        }
        put_bytes(self.bufs[ci].words_mut(), coff, &g.dtype.encode(&c));
        Ok(())
    }

    fn run_steps(&mut self, steps: &[Step]) -> Result<()> {
        for s in steps {
            match s {
                // SAFETY: forwarded from `Executor::run`'s contract.
                Step::Kernel(l) => unsafe { launch(l) }?,
                Step::Gemm(g) => self.gemm(g)?,
            }
        }
        Ok(())
    }
}

impl Executor for SimExec {
    fn name(&self) -> String {
        "sim".into()
    }
    fn alloc(&mut self, bytes: usize) -> Result<Buf> {
        // A guarded mapping never moves: addresses stay valid until `truncate` frees it.
        let name = format!("buffer {}", self.bufs.len());
        let mut b = GuardedBuf::new(4 * bytes.div_ceil(4).max(1), &name, 0)?;
        b.words_mut().fill(POISON);
        let addr = b.addr();
        self.bufs.push(b);
        Ok(Buf { addr, bytes })
    }
    fn truncate(&mut self, keep: usize) {
        self.bufs.truncate(keep);
    }
    fn count(&self) -> usize {
        self.bufs.len()
    }
    fn upload(&mut self, dst: Buf, data: &[u8]) -> Result<()> {
        let (i, off) = self.find(dst.addr, dst.addr + data.len() as u64)?;
        put_bytes(self.bufs[i].words_mut(), off, data);
        Ok(())
    }
    fn download(&mut self, src: Buf, bytes: usize) -> Result<Vec<u8>> {
        let (i, off) = self.find(src.addr, src.addr + bytes as u64)?;
        Ok(get_bytes(self.bufs[i].words(), off, bytes))
    }
    fn prepare(&mut self, _steps: &[Step]) -> Result<()> {
        // the simulator checks each launch's limits itself when it runs
        Ok(())
    }
    unsafe fn run(&mut self, steps: &[Step]) -> Result<()> {
        self.run_steps(steps)
    }
    unsafe fn time(&mut self, steps: &[Step], reps: usize, batch: usize) -> Result<Vec<f64>> {
        self.run_steps(steps)?;
        (0..reps.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                for _ in 0..batch.max(1) {
                    self.run_steps(steps)?;
                }
                Ok(t.elapsed().as_secs_f64() * 1e3 / batch.max(1) as f64)
            })
            .collect()
    }
}
