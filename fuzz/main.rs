//! A coverage-less mutational fuzzer on stable Rust for lkconv's input boundaries (nightly, and
//! so cargo-fuzz/libFuzzer, is not available). Targets:
//!
//! - `safetensors`: `TensorFile::from_bytes` on arbitrary bytes (the reader);
//! - `checkpoint`: safetensors bytes -> `Checkpoint::from_tensors` (name normalisation, config
//!   inference) -> `Replknet::from_checkpoint` (re-parameterisation) -> a forward pass on a tiny
//!   image when the model is small;
//! - `conv_problem`: a textual problem (`key=value` pairs, see `fuzz/corpus/conv_problem`) ->
//!   `DwConv2d` validation, output-size inference (checked against an independent u128
//!   computation), the validated `Problem` of each pass and the planner on it, and for small problems every CPU implementation and the
//!   simulator against the reference (the suite's comparator).
//!
//! Each target starts from its checked-in corpus (`fuzz/corpus/<target>/`, every file is run
//! as-is first) and then runs seeded mutations (byte edits, interesting integers, dictionary
//! tokens, splices, safetensors header edits with the length prefix fixed up, and tensor-level
//! edits for checkpoints) for a bounded time. It fails on: a panic, an input running longer than
//! the per-input limit (a watchdog thread), and any single allocation larger than the bound the
//! input justifies (a counting global allocator). A failing input is saved under
//! `target/fuzz-artifacts/` and can be replayed with `LKCONV_FUZZ_REPLAY=<file>`.
//!
//! Environment: `LKCONV_FUZZ_SECONDS` (per target, default 3), `LKCONV_FUZZ_SEED` (default: the
//! clock; printed), `LKCONV_FUZZ_TARGETS` (comma-separated names, default all),
//! `LKCONV_FUZZ_INPUT_LIMIT_MS` (default 10000), `LKCONV_FUZZ_REPLAY`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lkconv::device::{self, Device, Impl, Op};
use lkconv::model::{Checkpoint, Replknet};
use lkconv::safetensors_io::{self, TensorFile};
use lkconv::{DType, DwConv2d, Error, Padding, Problem, Rng, Tensor};

// ---------------------------------------------------------------------------------------------
// The allocation bound: a global allocator that records any single allocation above LIMIT.

/// Largest single allocation the running input justifies (usize::MAX when no input runs).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Largest single allocation above LIMIT seen while the input ran (0: none).
static VIOLATION: AtomicUsize = AtomicUsize::new(0);
/// Above this, an allocation is refused outright (the process aborts with the input saved).
const HARD_CAP: usize = 1 << 31;

struct Bounded;

impl Bounded {
    fn check(size: usize) -> bool {
        if size > LIMIT.load(Ordering::Relaxed) {
            VIOLATION.fetch_max(size, Ordering::Relaxed);
            if size > HARD_CAP {
                LIMIT.store(usize::MAX, Ordering::Relaxed);
                report_abort(&format!("single allocation of {size} bytes"));
                return false;
            }
        }
        true
    }
}

// SAFETY: forwards to the system allocator with the caller's layout; refusing (null) is allowed
// by the GlobalAlloc contract.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::check(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::check(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::check(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

// ---------------------------------------------------------------------------------------------
// The running input, for the watchdog and the abort report.

struct Current {
    target: &'static str,
    input: Vec<u8>,
}

static CURRENT: Mutex<Option<Current>> = Mutex::new(None);
/// Milliseconds since START when the running input began (0: idle).
static RUNNING_SINCE_MS: AtomicU64 = AtomicU64::new(0);
static REPORTING: AtomicBool = AtomicBool::new(false);
/// Where the last panic happened (file:line).
static PANIC_AT: Mutex<String> = Mutex::new(String::new());

fn start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-artifacts")
}

/// Saves `input` of `target` and returns the path.
fn save_artifact(target: &str, input: &[u8]) -> PathBuf {
    let dir = artifacts_dir();
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// Saves the running input and says why the process is about to end (hang, huge allocation).
fn report_abort(why: &str) {
    if REPORTING.swap(true, Ordering::SeqCst) {
        return;
    }
    let saved = CURRENT.try_lock().ok().and_then(|c| {
        c.as_ref()
            .map(|c| (c.target, save_artifact(c.target, &c.input)))
    });
    match saved {
        Some((target, path)) => eprintln!(
            "FUZZ FAILURE: {target}: {why}; input saved to {} (replay with LKCONV_FUZZ_REPLAY={})",
            path.display(),
            path.display()
        ),
        None => eprintln!("FUZZ FAILURE: {why}"),
    }
}

fn watchdog(limit: Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(50));
        let since = RUNNING_SINCE_MS.load(Ordering::Relaxed);
        let now = start().elapsed().as_millis() as u64;
        if since != 0 && now.saturating_sub(since) > limit.as_millis() as u64 {
            LIMIT.store(usize::MAX, Ordering::Relaxed);
            report_abort(&format!("one input ran longer than {limit:?} (a hang)"));
            std::process::exit(3);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Targets.

struct Target {
    name: &'static str,
    /// Runs one input; `Err` is a property violation (a panic is caught separately).
    run: fn(&[u8]) -> Result<(), String>,
    /// Largest single allocation an input of this length justifies, before the target may raise
    /// it for data it decides to allocate (see `allow`).
    bound: fn(usize) -> usize,
    mutate: fn(&mut Vec<u8>, &mut Rng, &[Vec<u8>]),
    /// What `reached(0..)` counts for this target.
    stages: &'static [&'static str],
}

/// How many inputs of the current target got past each stage (named by `STAGES` of the target).
static REACHED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn reached(stage: usize) {
    REACHED[stage].fetch_add(1, Ordering::Relaxed);
}

/// Raises the running input's allocation bound to `bytes` (for buffers sized by a problem the
/// target has validated as small).
fn allow(bytes: usize) {
    LIMIT.fetch_max(bytes, Ordering::Relaxed);
}

#[rustfmt::skip]
const SAFETENSORS_TOKENS: &[&str] = &[
    "\"F32\"", "\"F16\"", "\"BF16\"", "\"F64\"", "\"I64\"", "\"I32\"", "\"U8\"", "\"BOOL\"",
    "\"F8_E4M3\"", "\"F8_E5M2\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"",
    "\"__metadata__\"", "[]", "[0]", "[0,0]", "{}", "null", "\"\"", ",", ":",
];

fn safetensors_bound(len: usize) -> usize {
    // f16/bf16 data widen to f32 (x2); the header's maps and strings stay near its length
    4 * len + (64 << 10)
}

fn run_safetensors(bytes: &[u8]) -> Result<(), String> {
    let Ok(file) = TensorFile::from_bytes(bytes) else {
        return Ok(());
    };
    reached(0);
    // what was read must serialise back to the same tensors
    let tensors: Vec<(&str, &Tensor<f32>)> =
        file.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let again = safetensors_io::to_bytes(&tensors, None).map_err(|e| e.to_string())?;
    let back = TensorFile::from_bytes(&again).map_err(|e| format!("round trip: {e}"))?;
    for (name, t) in &file.tensors {
        let b = back.tensors.get(name).ok_or("round trip lost a tensor")?;
        if b.shape() != t.shape()
            || b.data()
                .iter()
                .zip(t.data())
                .any(|(x, y)| x.to_bits() != y.to_bits())
        {
            return Err(format!("round trip changed tensor '{name}'"));
        }
    }
    for name in file.non_float.keys() {
        if !matches!(file.get(name), Err(Error::DType(_))) {
            return Err(format!("non-float tensor '{name}' is not a DType error"));
        }
    }
    Ok(())
}

#[rustfmt::skip]
const CHECKPOINT_TOKENS: &[&str] = &[
    "stem.", "stages.", "transitions.", "blocks.", "0.", "1.", "2.", "3.", "99999999999.",
    "large_kernel.", "lkb_origin.", "lkb_reparam.", "small_conv.", "conv.", "bn.", "pw1.",
    "pw2.", "preffn_bn.", "prelkb_bn.", "norm.", "head.", "head.fc.", "model.", "backbone.",
    "module.", "state_dict.", "weight", "bias", "running_mean", "running_var",
    "num_batches_tracked",
];

fn checkpoint_bound(len: usize) -> usize {
    // folding works in f64 (x2 over f32, x4 over f16 data)
    8 * len + (256 << 10)
}

fn run_checkpoint(bytes: &[u8]) -> Result<(), String> {
    let Ok(file) = TensorFile::from_bytes(bytes) else {
        return Ok(());
    };
    reached(0);
    let Ok(ck) = Checkpoint::from_tensors(file.tensors) else {
        return Ok(());
    };
    reached(1);
    let Ok(model) = Replknet::from_checkpoint(&ck) else {
        return Ok(());
    };
    reached(2);
    let cfg = model.config().clone();
    // run a tiny image through models the file justifies (the forward pass allocates
    // activations sized by the channels and the image, not by the file)
    let widest = cfg
        .channels
        .iter()
        .map(|&c| cfg.ffn_channels_or(c))
        .max()
        .unwrap_or(0)
        .max(cfg.in_channels);
    if widest > 256 || cfg.large_kernel_sizes.iter().any(|&k| k > 64) {
        return Ok(());
    }
    let hw = 16;
    // plus the 1x1 GEMM's packing buffers, sized by the CPU's caches (the gemm crate: 2 MiB
    // here), not by the model
    allow(64 * widest * hw * hw + (4 << 20));
    reached(3);
    let mut rng = Rng::new(bytes.len() as u64);
    let x = Tensor::<f32>::random(&[1, cfg.in_channels, hw, hw], &mut rng).unwrap();
    let stages: Vec<usize> = (0..cfg.channels.len()).collect();
    match model.forward_features(&x, &stages) {
        Ok(out) if out.len() != stages.len() => Err("wrong number of stage outputs".into()),
        Ok(_) => Ok(()),
        Err(Error::Shape { .. } | Error::EmptyOutput(_) | Error::Unsupported(_)) => Ok(()),
        Err(e) => Err(format!("forward of a loaded model: unexpected error {e}")),
    }
}

trait FfnWidth {
    fn ffn_channels_or(&self, c: usize) -> usize;
}

impl FfnWidth for lkconv::model::ReplknetConfig {
    /// The widest activation of a stage with `c` channels.
    fn ffn_channels_or(&self, c: usize) -> usize {
        let f = (c as f64 * self.ffn_ratio.max(self.dw_ratio)).ceil();
        if f.is_finite() && f < 1e9 {
            (f as usize).max(c)
        } else {
            usize::MAX
        }
    }
}

#[rustfmt::skip]
const CONV_TOKENS: &[&str] = &[
    "n=", "c=", "h=", "w=", "kh=", "kw=", "pt=", "pb=", "pl=", "pr=", "sh=", "sw=", "dh=",
    "dw=", "x=", "wt=", "dy=", "bias=", "hw=", "dtype=f32", "dtype=f16", "dtype=bf16", "0", "1",
    "2", "3", "31", "4294967295", "18446744073709551615", "536870911", "2147483647", ",", " ",
];

fn conv_bound(_len: usize) -> usize {
    // validating a problem allocates error messages and plans, never buffers of its size
    64 << 10
}

/// A problem as written in the corpus: `key=value` pairs; shapes as `a,b,c,d`.
#[derive(Debug, Default)]
struct ProblemText {
    vals: BTreeMap<String, Vec<u64>>,
    dtype: Option<String>,
}

fn parse_problem(bytes: &[u8]) -> Option<ProblemText> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut p = ProblemText::default();
    for tok in text.split_whitespace() {
        let (k, v) = tok.split_once('=')?;
        if k == "dtype" {
            p.dtype = Some(v.to_string());
            continue;
        }
        let nums: Option<Vec<u64>> = v.split(',').map(|s| s.parse().ok()).collect();
        p.vals.insert(k.to_string(), nums?);
    }
    Some(p)
}

impl ProblemText {
    fn one(&self, k: &str, default: usize) -> usize {
        self.vals
            .get(k)
            .and_then(|v| v.first())
            .map_or(default, |&v| usize::try_from(v).unwrap_or(usize::MAX))
    }
    fn shape(&self, k: &str, default: &[usize]) -> Vec<usize> {
        self.vals.get(k).map_or(default.to_vec(), |v| {
            v.iter()
                .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
                .collect()
        })
    }
}

/// Output extent along one axis in u128 (None: empty output).
fn extent_u128(len: usize, k: usize, pad: u128, stride: usize, dil: usize) -> Option<u128> {
    let span = (k as u128 - 1) * dil as u128 + 1;
    let padded = len as u128 + pad;
    (padded >= span).then(|| (padded - span) / stride as u128 + 1)
}

fn run_conv_problem(bytes: &[u8]) -> Result<(), String> {
    let Some(p) = parse_problem(bytes) else {
        return Ok(());
    };
    reached(0);
    let (kh, kw) = (p.one("kh", 3), p.one("kw", 3));
    let conv = DwConv2d::new(kh, kw)
        .with_padding_sides(Padding {
            top: p.one("pt", kh / 2),
            bottom: p.one("pb", kh / 2),
            left: p.one("pl", kw / 2),
            right: p.one("pr", kw / 2),
        })
        .with_stride(p.one("sh", 1), p.one("sw", 1))
        .with_dilation(p.one("dh", 1), p.one("dw", 1));
    let (n, c, h, w) = (p.one("n", 1), p.one("c", 1), p.one("h", 8), p.one("w", 8));
    let resolved = conv.resolve(n, c, h, w);
    // the resolved sizes against an independent computation
    let zero = [
        kh,
        kw,
        conv.stride.0,
        conv.stride.1,
        conv.dilation.0,
        conv.dilation.1,
        n,
        c,
        h,
        w,
    ]
    .contains(&0);
    let pads = conv.padding;
    let expected = (!zero).then(|| {
        (
            extent_u128(
                h,
                kh,
                pads.top as u128 + pads.bottom as u128,
                conv.stride.0,
                conv.dilation.0,
            ),
            extent_u128(
                w,
                kw,
                pads.left as u128 + pads.right as u128,
                conv.stride.1,
                conv.dilation.1,
            ),
        )
    });
    match (&resolved, expected) {
        (Ok(s), Some((Some(oh), Some(ow)))) => {
            reached(1);
            if (s.oh as u128, s.ow as u128) != (oh, ow) || (s.n, s.c, s.h, s.w) != (n, c, h, w) {
                return Err(format!("resolve gave {s:?}, expected oh {oh} ow {ow}"));
            }
        }
        (Ok(s), _) => {
            return Err(format!(
                "resolve accepted an empty or zero-sized problem: {s:?}"
            ))
        }
        (Err(Error::ZeroSize { .. }), Some(_)) => {
            return Err("ZeroSize for a problem without a zero".into())
        }
        (Err(Error::EmptyOutput(_)), Some((Some(_), Some(_)))) => {
            return Err("EmptyOutput for a problem with an output".into())
        }
        (Err(Error::ZeroSize { .. } | Error::EmptyOutput(_) | Error::Overflow(_)), _) => {}
        (Err(e), _) => return Err(format!("resolve: unexpected error kind {e:?}")),
    }
    // validation with the (possibly mismatched) shapes of the text
    let x_shape = p.shape("x", &[n, c, h, w]);
    let w_shape = p.shape("wt", &conv.weight_dims(c));
    let bias_shape = p.vals.contains_key("bias").then(|| p.shape("bias", &[c]));
    let hw = {
        let v = p.shape("hw", &[h, w]);
        (
            v.first().copied().unwrap_or(0),
            v.get(1).copied().unwrap_or(0),
        )
    };
    let out_default = resolved
        .as_ref()
        .map_or(vec![n, c, 1, 1], |s| s.output_dims().to_vec());
    let dy_shape = p.shape("dy", &out_default);
    // the validated problems (one per pass) built from the shapes of the text
    let problem = |op: Op, imp: Impl, dtype: DType| match op {
        Op::Forward => {
            Problem::forward(imp, dtype, &conv, &x_shape, &w_shape, bias_shape.as_deref())
        }
        Op::DataGrad => Problem::data_grad(imp, dtype, &conv, &dy_shape, &w_shape, hw),
        Op::WeightGrad => Problem::weight_grad(imp, dtype, &conv, &x_shape, &dy_shape),
    };
    let checks = Op::ALL.map(|op| problem(op, Impl::Fast, DType::F32).map(|p| *p.shape()));
    for (op, r) in Op::ALL.into_iter().zip(&checks) {
        let Ok(s) = r else { continue };
        if s.oh * s.ow == 0 || s.n * s.c * s.h * s.w == 0 {
            return Err(format!("{op:?} validated a zero-sized problem {s:?}"));
        }
        for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
            for dtype in DType::ALL {
                let planned = problem(op, imp, dtype).and_then(|p| lkconv::plan::plan(&p));
                match planned {
                    Ok(_) | Err(Error::Overflow(_) | Error::Unsupported(_)) => {}
                    Err(e) => return Err(format!("plan {op:?} {imp:?}: unexpected error {e}")),
                }
            }
        }
        if s.oh
            .saturating_mul(kh)
            .saturating_add(s.ow.saturating_mul(kw))
            < 1 << 24
        {
            let useful = conv.useful_flops(s);
            if useful.is_nan() || useful > conv.flops(s) {
                return Err(format!(
                    "useful flops {useful} above nominal {}",
                    conv.flops(s)
                ));
            }
        }
    }
    // small problems: compute, compare every implementation with the reference
    let numel = |s: &[usize]| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let small = |s: &[usize]| numel(s).is_some_and(|v| v <= 4096);
    let bias_small = bias_shape.as_deref().is_none_or(small);
    if !(small(&x_shape) && small(&w_shape) && small(&dy_shape) && bias_small) {
        return Ok(());
    }
    if let Ok(s) = &resolved {
        let cols = (s.oh * s.ow).saturating_mul(kh * kw).saturating_mul(n * c);
        if cols > 1 << 18 || kh * kw > 4096 {
            return Ok(());
        }
        allow(64 * (cols + 3 * 4096) + (1 << 20));
    } else {
        allow(64 * 3 * 4096 + (1 << 20));
    }
    match p.dtype.as_deref() {
        Some("f16") => compute::<half::f16>(
            &conv,
            &x_shape,
            &w_shape,
            bias_shape,
            &dy_shape,
            hw,
            [&checks[0], &checks[1], &checks[2]],
        ),
        Some("bf16") => compute::<half::bf16>(
            &conv,
            &x_shape,
            &w_shape,
            bias_shape,
            &dy_shape,
            hw,
            [&checks[0], &checks[1], &checks[2]],
        ),
        _ => compute::<f32>(
            &conv,
            &x_shape,
            &w_shape,
            bias_shape,
            &dy_shape,
            hw,
            [&checks[0], &checks[1], &checks[2]],
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn compute<T: lkconv::Element>(
    conv: &DwConv2d,
    x_shape: &[usize],
    w_shape: &[usize],
    bias_shape: Option<Vec<usize>>,
    dy_shape: &[usize],
    hw: (usize, usize),
    checks: [&lkconv::Result<lkconv::ConvShape>; 3],
) -> Result<(), String> {
    reached(2);
    let mut rng = Rng::new(7);
    let t = common::Inputs::<T> {
        x: Tensor::random(x_shape, &mut rng).map_err(|e| e.to_string())?,
        w: Tensor::random(w_shape, &mut rng).map_err(|e| e.to_string())?,
        bias: match bias_shape {
            Some(b) => Some(Tensor::random(&b, &mut rng).map_err(|e| e.to_string())?),
            None => None,
        },
        dy: Tensor::random(dy_shape, &mut rng).map_err(|e| e.to_string())?,
    };
    let sim_too = |s: &lkconv::ConvShape| s.n * s.c * (s.h * s.w + s.oh * s.ow) <= 512;
    for (op, check) in Op::ALL.into_iter().zip(checks) {
        let mut targets = vec![(Device::CpuRef, Impl::Reference)];
        for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
            targets.push((Device::Cpu, imp));
            if check.as_ref().is_ok_and(sim_too) {
                targets.push((Device::Sim, imp));
            }
        }
        let mut want = None;
        for (dev, imp) in targets {
            let got = match op {
                Op::Forward => device::forward(dev, imp, conv, &t.x, &t.w, t.bias.as_ref()),
                Op::DataGrad => device::data_grad(dev, imp, conv, &t.dy, &t.w, hw),
                Op::WeightGrad => device::weight_grad(dev, imp, conv, &t.x, &t.dy),
            };
            match (check, got) {
                (Ok(_), Ok(got)) => {
                    let want = want.get_or_insert_with(|| match op {
                        Op::Forward => common::Expected::forward(conv, &t.x, &t.w, t.bias.as_ref()),
                        Op::DataGrad => common::Expected::data_grad(conv, &t.dy, &t.w, hw),
                        Op::WeightGrad => common::Expected::weight_grad(conv, &t.x, &t.dy),
                    });
                    let values: Vec<f64> = got.data().iter().map(|v| v.to_f64()).collect();
                    if got.shape() != &want.shape[..] || common::compare(&values, want).is_err() {
                        return Err(format!("{op:?} {dev} {}: wrong answer", imp.name()));
                    }
                }
                (Err(_), Err(_)) => {}
                (Ok(_), Err(e)) => {
                    return Err(format!("{op:?} {dev} {}: validated, then {e}", imp.name()))
                }
                (Err(e), Ok(_)) => {
                    return Err(format!(
                        "{op:?} {dev} {}: ran although validation says {e}",
                        imp.name()
                    ))
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mutations.

#[rustfmt::skip]
const INTERESTING_U64: [u64; 12] = [
    0, 1, 2, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 32, i64::MAX as u64,
    u64::MAX,
];
#[rustfmt::skip]
const INTERESTING_DEC: [&str; 14] = [
    "0", "1", "2", "3", "7", "8", "255", "65535", "2147483647", "4294967295", "4294967296",
    "9007199254740993", "18446744073709551615", "-1",
];

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[rng.range(0, v.len() - 1)]
}

/// One generic byte-level edit.
fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>], dict: &[&str]) {
    let len = data.len();
    let pos = |rng: &mut Rng, len: usize| if len == 0 { 0 } else { rng.range(0, len - 1) };
    match rng.range(0, 9) {
        0 if len > 0 => {
            let i = pos(rng, len);
            data[i] ^= 1 << rng.range(0, 7);
        }
        1 if len > 0 => {
            let i = pos(rng, len);
            data[i] = *pick(
                rng,
                &[0u8, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'"', b'[', b',', b'}'],
            );
        }
        2 if len >= 8 => {
            let i = rng.range(0, len - 8);
            let v = *pick(rng, &INTERESTING_U64);
            data[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        3 if len > 0 => {
            let a = pos(rng, len);
            let b = (a + rng.range(1, 16)).min(len);
            data.drain(a..b);
        }
        4 if len > 0 => {
            let a = pos(rng, len);
            let b = (a + rng.range(1, 64)).min(len);
            let chunk = data[a..b].to_vec();
            let at = pos(rng, len);
            data.splice(at..at, chunk);
        }
        5 => {
            let at = pos(rng, len);
            let tok = pick(rng, dict).as_bytes().to_vec();
            data.splice(at..at, tok);
        }
        6 => mutate_digits(data, rng),
        7 if len > 0 => data.truncate(pos(rng, len)),
        8 if !corpus.is_empty() => {
            let other = pick(rng, corpus);
            let a = pos(rng, len);
            let b = if other.is_empty() {
                0
            } else {
                rng.range(0, other.len() - 1)
            };
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        _ => {
            let at = pos(rng, len);
            let v = rng.next_u64().to_le_bytes();
            data.splice(at..at, v[..rng.range(1, 8)].iter().copied());
        }
    }
}

/// Replaces one run of ASCII digits with an interesting number.
fn mutate_digits(data: &mut Vec<u8>, rng: &mut Rng) {
    let runs: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < data.len() {
            if data[i].is_ascii_digit() {
                let s = i;
                while i < data.len() && data[i].is_ascii_digit() {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    if runs.is_empty() {
        return;
    }
    let (a, b) = *pick(rng, &runs);
    let new = if rng.range(0, 2) == 0 {
        rng.range(0, 64).to_string()
    } else {
        pick(rng, &INTERESTING_DEC).to_string()
    };
    data.splice(a..b, new.bytes());
}

/// Edits the JSON header of a safetensors file and fixes its length prefix up (so that the
/// parser gets past the length check), or edits raw bytes when there is no header.
fn mutate_safetensors(data: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>], dict: &[&str]) {
    let header_len = (data.len() >= 8)
        .then(|| u64::from_le_bytes(data[..8].try_into().unwrap()) as usize)
        .filter(|&n| n <= data.len() - 8);
    match header_len {
        Some(n) if rng.range(0, 3) > 0 => {
            let mut header = data[8..8 + n].to_vec();
            for _ in 0..rng.range(1, 3) {
                if rng.range(0, 1) == 0 {
                    mutate_digits(&mut header, rng);
                } else {
                    mutate_bytes(&mut header, rng, &[], dict);
                }
            }
            let body = data[8 + n..].to_vec();
            data.clear();
            data.extend_from_slice(&(header.len() as u64).to_le_bytes());
            data.extend_from_slice(&header);
            data.extend_from_slice(&body);
        }
        _ => mutate_bytes(data, rng, corpus, dict),
    }
}

fn mutate_safetensors_target(data: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>]) {
    mutate_safetensors(data, rng, corpus, SAFETENSORS_TOKENS);
}

/// Tensor-level edits of a checkpoint (drop, rename, reshape, poison values), re-serialised;
/// byte-level edits otherwise.
fn mutate_checkpoint(data: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>]) {
    let Ok(mut file) = TensorFile::from_bytes(data) else {
        return mutate_safetensors(data, rng, corpus, CHECKPOINT_TOKENS);
    };
    if rng.range(0, 4) == 0 || file.tensors.is_empty() {
        return mutate_safetensors(data, rng, corpus, CHECKPOINT_TOKENS);
    }
    let names: Vec<String> = file.tensors.keys().cloned().collect();
    let name = pick(rng, &names).clone();
    match rng.range(0, 5) {
        0 => {
            file.tensors.remove(&name);
        }
        1 => {
            // rename: replace one dotted segment with a dictionary token
            let t = file.tensors.remove(&name).unwrap();
            let mut parts: Vec<String> = name.split('.').map(String::from).collect();
            let i = rng.range(0, parts.len() - 1);
            parts[i] = pick(rng, CHECKPOINT_TOKENS)
                .trim_end_matches('.')
                .to_string();
            file.tensors.insert(parts.join("."), t);
        }
        2 => {
            // reshape: one dimension changed, data cut or extended to match
            let t = file.tensors.remove(&name).unwrap();
            let mut shape = t.shape().to_vec();
            if shape.is_empty() || rng.range(0, 4) == 0 {
                shape.push(1);
            } else {
                let i = rng.range(0, shape.len() - 1);
                shape[i] = *pick(
                    rng,
                    &[
                        0usize,
                        1,
                        2,
                        3,
                        shape[i] + 1,
                        shape[i].saturating_sub(1),
                        2 * shape[i],
                    ],
                );
            }
            let numel: usize = shape.iter().product();
            if numel <= 1 << 16 {
                let mut v = t.into_vec();
                v.resize(numel, 0.5);
                file.tensors
                    .insert(name, Tensor::from_vec(&shape, v).unwrap());
            }
        }
        3 => {
            let t = file.tensors.get_mut(&name).unwrap();
            let len = t.len();
            if len > 0 {
                let v = *pick(
                    rng,
                    &[
                        f32::NAN,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        0.0,
                        -1.0,
                        1e30,
                        -0.0,
                    ],
                );
                for _ in 0..rng.range(1, 4) {
                    t.data_mut()[rng.range(0, len - 1)] = v;
                }
            }
        }
        _ => {
            // a copy of the tensor under a neighbouring block's name
            let t = file.tensors[&name].clone();
            let renamed = name
                .replacen("blocks.0", "blocks.2", 1)
                .replacen("stages.1", "stages.2", 1);
            file.tensors.insert(renamed, t);
        }
    }
    let tensors: Vec<(&str, &Tensor<f32>)> =
        file.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if let Ok(bytes) = safetensors_io::to_bytes(&tensors, None) {
        *data = bytes;
    }
}

fn mutate_conv(data: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>]) {
    if rng.range(0, 2) > 0 {
        mutate_digits(data, rng);
    } else {
        mutate_bytes(data, rng, corpus, CONV_TOKENS);
    }
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "safetensors",
            run: run_safetensors,
            bound: safetensors_bound,
            mutate: mutate_safetensors_target,
            stages: &["parsed"],
        },
        Target {
            name: "checkpoint",
            run: run_checkpoint,
            bound: checkpoint_bound,
            mutate: mutate_checkpoint,
            stages: &[
                "parsed",
                "config inferred",
                "re-parameterised",
                "forward run",
            ],
        },
        Target {
            name: "conv_problem",
            run: run_conv_problem,
            bound: conv_bound,
            mutate: mutate_conv,
            stages: &["parsed", "valid problem", "computed and compared"],
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// The loop.

/// Runs one input under the allocation bound and the watchdog; Err describes a failure.
fn execute(target: &Target, input: &[u8]) -> Result<(), String> {
    *CURRENT.lock().unwrap() = Some(Current {
        target: target.name,
        input: input.to_vec(),
    });
    VIOLATION.store(0, Ordering::SeqCst);
    RUNNING_SINCE_MS.store(start().elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
    let bound = (target.bound)(input.len());
    LIMIT.store(bound, Ordering::SeqCst);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let limit = LIMIT.swap(usize::MAX, Ordering::SeqCst);
    RUNNING_SINCE_MS.store(0, Ordering::SeqCst);
    let violation = VIOLATION.load(Ordering::SeqCst);
    match outcome {
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let at = PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Err(format!("panic at {at}: {msg}"))
        }
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) if violation > 0 => Err(format!(
            "a single allocation of {violation} bytes for a {}-byte input (bound {limit})",
            input.len()
        )),
        Ok(Ok(())) => Ok(()),
    }
}

fn load_corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes the seed corpus (run once with `LKCONV_FUZZ_WRITE_CORPUS=1`; the files are checked
/// in, and inputs found interesting later are added beside them).
fn write_seed_corpus() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let raw = |views: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>, meta: Option<&[(&str, &str)]>| {
        let views: Vec<(String, TensorView<'_>)> = views
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = meta.map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        safetensors::serialize(views, meta).unwrap()
    };
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let f16s = |v: &[f32]| {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let bf16s = |v: &[f32]| {
        v.iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let vals = [1.0f32, -2.5, 0.0, f32::NAN, f32::INFINITY, 3.25];
    let f64s: Vec<u8> = vals
        .iter()
        .flat_map(|&x| f64::from(x).to_le_bytes())
        .collect();
    let all_floats = raw(
        vec![
            ("a", Dtype::F32, vec![2, 3], f32s(&vals)),
            ("b", Dtype::F16, vec![3, 2], f16s(&vals)),
            ("c", Dtype::BF16, vec![6], bf16s(&vals)),
            ("d", Dtype::F64, vec![1, 2, 3], f64s),
        ],
        Some(&[("format", "pt")]),
    );
    write("safetensors", "floats.safetensors", &all_floats);
    write(
        "safetensors",
        "non_float.safetensors",
        &raw(
            vec![
                ("steps", Dtype::I64, vec![], 7i64.to_le_bytes().to_vec()),
                ("mask", Dtype::BOOL, vec![4], vec![1, 0, 1, 1]),
                ("bytes", Dtype::U8, vec![2, 2], vec![1, 2, 3, 4]),
                ("w", Dtype::F32, vec![1], f32s(&[0.5])),
            ],
            None,
        ),
    );
    write(
        "safetensors",
        "empty_dims.safetensors",
        &raw(
            vec![
                ("zero", Dtype::F32, vec![0, 3], vec![]),
                ("scalar", Dtype::F32, vec![], f32s(&[2.0])),
            ],
            None,
        ),
    );
    write(
        "safetensors",
        "no_tensors.safetensors",
        &raw(vec![], Some(&[("k", "v")])),
    );
    let mut lying = all_floats.clone();
    lying[..8].copy_from_slice(&(all_floats.len() as u64).to_le_bytes());
    write("safetensors", "lying_length.safetensors", &lying);
    write(
        "safetensors",
        "truncated.safetensors",
        &all_floats[..all_floats.len() - 5],
    );

    let cfg = |small: Option<usize>, dw_ratio: f64, classes: usize| lkconv::model::ReplknetConfig {
        large_kernel_sizes: vec![5, 3],
        layers: vec![1, 1],
        channels: vec![4, 8],
        small_kernel: small,
        dw_ratio,
        ffn_ratio: 2.0,
        num_classes: classes,
        in_channels: 3,
    };
    use lkconv::model::{random_weights, Form};
    let ser = |t: BTreeMap<String, Tensor<f32>>, prefix: &str| {
        let named: Vec<(String, Tensor<f32>)> = t
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t))
            .collect();
        let refs: Vec<(&str, &Tensor<f32>)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors_io::to_bytes(&refs, None).unwrap()
    };
    write(
        "checkpoint",
        "training.safetensors",
        &ser(
            random_weights(&cfg(Some(3), 1.0, 3), Form::Training, 1).unwrap(),
            "",
        ),
    );
    write(
        "checkpoint",
        "merged_model_prefix.safetensors",
        &ser(
            random_weights(&cfg(Some(3), 1.0, 3), Form::Merged, 2).unwrap(),
            "model.",
        ),
    );
    let mut backbone = random_weights(&cfg(None, 1.5, 0), Form::Training, 3).unwrap();
    backbone.retain(|n, _| !n.starts_with("norm.") && !n.starts_with("head."));
    write(
        "checkpoint",
        "backbone_no_small_kernel.safetensors",
        &ser(backbone, "backbone."),
    );

    for (name, text) in [
        ("same_31.txt", "n=1 c=2 h=9 w=7 kh=31 kw=31"),
        (
            "strided_dilated.txt",
            "n=2 c=3 h=11 w=12 kh=4 kw=5 pt=0 pb=3 pl=2 pr=1 sh=2 sw=3 dh=2 dw=1 bias=3",
        ),
        ("half.txt", "n=1 c=1 h=6 w=5 kh=3 kw=2 dtype=f16"),
        (
            "bf16_dgrad_hw.txt",
            "n=1 c=2 h=5 w=6 kh=2 kw=3 hw=5,6 dtype=bf16",
        ),
        (
            "empty_output.txt",
            "n=1 c=1 h=4 w=4 kh=9 kw=9 pt=0 pb=0 pl=0 pr=0",
        ),
        (
            "mismatched_shapes.txt",
            "n=1 c=4 h=8 w=8 kh=3 kw=3 wt=3,1,3,3 dy=1,4,7,8 bias=5",
        ),
        (
            "huge.txt",
            "n=1 c=1 h=4294967295 w=4294967295 kh=536870911 kw=1 pt=0 pb=536870911",
        ),
        ("zero.txt", "n=0 c=1 h=8 w=8 kh=3 kw=0 sh=0"),
    ] {
        write("conv_problem", name, text.as_bytes());
    }
    println!("seed corpus written under {}", root.display());
}

fn main() {
    if std::env::var_os("LKCONV_FUZZ_WRITE_CORPUS").is_some() {
        return write_seed_corpus();
    }
    // a panic inside a target is caught and reported as a finding: keep its message short
    std::panic::set_hook(Box::new(|info| {
        if let Some(l) = info.location() {
            *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) =
                format!("{}:{}", l.file(), l.line());
        }
    }));
    start();
    let limit = Duration::from_millis(env_or("LKCONV_FUZZ_INPUT_LIMIT_MS", 10_000));
    watchdog(limit);
    if let Ok(path) = std::env::var("LKCONV_FUZZ_REPLAY") {
        let input = std::fs::read(&path).expect("replay file");
        let name = Path::new(&path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let target = targets()
            .into_iter()
            .find(|t| name.starts_with(t.name))
            .expect("artifact name starts with its target");
        match execute(&target, &input) {
            Ok(()) => println!("replay {path}: ok"),
            Err(e) => {
                eprintln!("replay {path}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let seconds: f64 = env_or("LKCONV_FUZZ_SECONDS", 3.0);
    let seed: u64 = env_or("LKCONV_FUZZ_SEED", Rng::from_time().1);
    let only: Option<Vec<String>> = std::env::var("LKCONV_FUZZ_TARGETS")
        .ok()
        .map(|v| v.split(',').map(String::from).collect());
    println!("fuzz: seed {seed} (LKCONV_FUZZ_SEED={seed} replays), {seconds} s per target");
    let mut failures = 0;
    for target in targets() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == target.name))
        {
            continue;
        }
        let corpus = load_corpus(target.name);
        for r in &REACHED {
            r.store(0, Ordering::Relaxed);
        }
        let report = |input: &[u8], e: String| {
            let path = save_artifact(target.name, input);
            eprintln!(
                "FUZZ FAILURE: {}: {e}; input saved to {} (replay with LKCONV_FUZZ_REPLAY={})",
                target.name,
                path.display(),
                path.display()
            );
        };
        for input in &corpus {
            if let Err(e) = execute(&target, input) {
                report(input, e);
                failures += 1;
            }
        }
        let mut rng = Rng::new(seed ^ target.name.len() as u64);
        let began = Instant::now();
        let mut runs = 0u64;
        let mut slowest = Duration::ZERO;
        while began.elapsed().as_secs_f64() < seconds && failures < 10 {
            let mut input = pick(&mut rng, &corpus).clone();
            for _ in 0..rng.range(1, 4) {
                (target.mutate)(&mut input, &mut rng, &corpus);
            }
            let t = Instant::now();
            if let Err(e) = execute(&target, &input) {
                report(&input, e);
                failures += 1;
            }
            slowest = slowest.max(t.elapsed());
            runs += 1;
        }
        let depth: Vec<String> = target
            .stages
            .iter()
            .zip(&REACHED)
            .map(|(s, n)| format!("{s} {}", n.load(Ordering::Relaxed)))
            .collect();
        println!(
            "fuzz {}: {} corpus inputs + {runs} mutated inputs in {:.1} s (slowest {slowest:?}); reached: {}",
            target.name,
            corpus.len(),
            began.elapsed().as_secs_f64(),
            depth.join(", ")
        );
    }
    if failures > 0 {
        eprintln!("fuzz: {failures} failing inputs");
        std::process::exit(1);
    }
    println!("fuzz: no panics, hangs or oversized allocations");
}
