//! Concurrency and resources: many threads calling the library at once get bit-identical answers
//! to one thread (CPU engine, simulator, CUDA where present); 10,000 calls do not grow memory
//! (live heap bytes from a counting allocator, and RSS); a failed call leaves no partial output
//! (caller buffers untouched, no file, no temporary) and the next call works.
//!
//! The tests of this file take one lock each, so that the heap measurements see only their own
//! calls; the threads inside each test are what runs concurrently.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use common::{assert_matches, have_gpu, random, rng, Inputs};
use lkconv::device::{self, Device, Impl, Op};
use lkconv::safetensors_io::{self, TensorFile};
use lkconv::{cpu, DwConv2d, Error, Padding, Rng, Tensor};

/// Counts the bytes currently allocated by the whole process.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout unchanged; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resident set size in bytes (Linux /proc/self/statm; None elsewhere).
fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A few problems covering the kernels' paths: templated and generic sizes, strided/dilated,
/// asymmetric padding, a kernel larger than the image.
fn problems() -> Vec<(DwConv2d, [usize; 4])> {
    vec![
        (DwConv2d::new(13, 13), [2, 3, 17, 21]),
        (DwConv2d::new(4, 7), [1, 2, 9, 12]),
        (
            DwConv2d::new(5, 3).with_stride(2, 1).with_dilation(1, 2),
            [2, 2, 13, 11],
        ),
        (
            DwConv2d::new(9, 6).with_padding_sides(Padding {
                top: 1,
                bottom: 7,
                left: 5,
                right: 0,
            }),
            [1, 3, 6, 5],
        ),
    ]
}

type Bits = Vec<Vec<u32>>;

/// Every pass of every problem on (device, imp), as bit patterns.
fn run_all(device: Device, imp: Impl, inputs: &[(DwConv2d, Inputs<f32>)]) -> Bits {
    let bits = |t: Tensor<f32>| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut out = Vec::new();
    for (conv, t) in inputs {
        let hw = (t.x.shape()[2], t.x.shape()[3]);
        let y = device::forward(device, imp, conv, &t.x, &t.w, t.bias.as_ref());
        let dx = device::data_grad(device, imp, conv, &t.dy, &t.w, hw);
        let dw = device::weight_grad(device, imp, conv, &t.x, &t.dy);
        for r in [y, dx, dw] {
            out.push(bits(
                r.unwrap_or_else(|e| panic!("{device} {}: {e}", imp.name())),
            ));
        }
    }
    out
}

fn random_inputs(rng: &mut Rng) -> Vec<(DwConv2d, Inputs<f32>)> {
    problems()
        .into_iter()
        .map(|(conv, [n, c, h, w])| {
            let s = conv.resolve(n, c, h, w).unwrap();
            let t = Inputs {
                x: random(&s.input_dims(), rng),
                w: random(&conv.weight_dims(c), rng),
                bias: Some(random(&[c], rng)),
                dy: random(&s.output_dims(), rng),
            };
            (conv, t)
        })
        .collect()
}

/// `threads` threads each run every implementation `rounds` times, all at once; every answer must
/// equal (bit for bit) what one thread got alone, and that must match the reference.
fn threads_agree_with_one_thread(device: Device, threads: usize, rounds: usize) {
    let mut rng = rng();
    let inputs = random_inputs(&mut rng);
    let impls = [Impl::Fast, Impl::Naive, Impl::Im2col];
    let alone: Vec<Bits> = impls
        .iter()
        .map(|&imp| run_all(device, imp, &inputs))
        .collect();
    for (conv, t) in &inputs {
        for (i, &imp) in impls.iter().enumerate() {
            let k = 3 * inputs.iter().position(|(c, _)| c == conv).unwrap();
            for (j, op) in Op::ALL.into_iter().enumerate() {
                let want = t.expected(op, conv);
                let shape = want.shape.clone();
                let got = Tensor::from_vec(
                    &shape,
                    alone[i][k + j].iter().map(|&b| f32::from_bits(b)).collect(),
                )
                .unwrap();
                assert_matches(&format!("{device} {} {op:?}", imp.name()), &got, &want);
            }
        }
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (inputs, alone) = (&inputs, &alone);
                scope.spawn(move || {
                    for round in 0..rounds {
                        // each thread walks the implementations in its own order
                        for k in 0..impls.len() {
                            let i = (thread + round + k) % impls.len();
                            let got = run_all(device, impls[i], inputs);
                            assert!(
                                got == alone[i],
                                "{device} {}: thread {thread} round {round} differs from one thread",
                                impls[i].name()
                            );
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a thread failed");
        }
    });
}

#[test]
fn cpu_threads_get_the_same_bits_as_one_thread() {
    let _one = one_at_a_time();
    threads_agree_with_one_thread(Device::Cpu, 8, 4);
}

#[test]
fn simulator_threads_get_the_same_bits_as_one_thread() {
    let _one = one_at_a_time();
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    threads_agree_with_one_thread(Device::Sim, 4, 2);
}

#[test]
fn cuda_threads_get_the_same_bits_as_one_thread() {
    let _one = one_at_a_time();
    if !have_gpu() {
        return;
    }
    threads_agree_with_one_thread(Device::Cuda(0), 8, 8);
}

/// One call of a mixed workload: every pass on the CPU engine, a failing call, a file round trip
/// in memory; every 10th call also one simulator pass.
fn workload_call(i: usize, t: &Inputs<f32>, conv: &DwConv2d) {
    let hw = (t.x.shape()[2], t.x.shape()[3]);
    let imp = [Impl::Fast, Impl::Naive, Impl::Im2col][i % 3];
    match i % 5 {
        0 => drop(device::forward(Device::Cpu, imp, conv, &t.x, &t.w, t.bias.as_ref()).unwrap()),
        1 => drop(device::data_grad(Device::Cpu, imp, conv, &t.dy, &t.w, hw).unwrap()),
        2 => drop(device::weight_grad(Device::Cpu, imp, conv, &t.x, &t.dy).unwrap()),
        3 => {
            // a failing call: the weight does not match C
            let r = device::forward(Device::Cpu, imp, conv, &t.x, &t.dy, None);
            assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
        }
        _ => {
            let bytes = safetensors_io::to_bytes(&[("x", &t.x), ("w", &t.w)], None).unwrap();
            let back = TensorFile::from_bytes(&bytes).unwrap();
            assert_eq!(back.get("w").unwrap(), &t.w);
        }
    }
    if i % 10 == 9 {
        drop(device::forward(Device::Sim, Impl::Fast, conv, &t.x, &t.w, None).unwrap());
    }
}

#[test]
fn ten_thousand_calls_do_not_grow_memory() {
    let _one = one_at_a_time();
    let mut rng = rng();
    let conv = DwConv2d::new(5, 4).with_stride(1, 2);
    let s = conv.resolve(1, 2, 10, 9).unwrap();
    let t = Inputs::<f32> {
        x: random(&s.input_dims(), &mut rng),
        w: random(&conv.weight_dims(2), &mut rng),
        bias: Some(random(&[2], &mut rng)),
        dy: random(&s.output_dims(), &mut rng),
    };
    // warm up: thread pools, lazily built tables, the allocator's arenas
    for i in 0..500 {
        workload_call(i, &t, &conv);
    }
    let (heap0, rss0) = (LIVE_BYTES.load(Ordering::SeqCst), rss_bytes());
    let calls = 10_000;
    let start = std::time::Instant::now();
    for i in 0..calls {
        workload_call(i, &t, &conv);
    }
    let (heap1, rss1) = (LIVE_BYTES.load(Ordering::SeqCst), rss_bytes());
    println!(
        "{calls} calls in {:?}: live heap {heap0} -> {heap1} bytes, RSS {rss0:?} -> {rss1:?}",
        start.elapsed()
    );
    // a leak of even one byte per call would show as 10 kB
    assert!(
        heap1 - heap0 < 4096,
        "live heap grew by {} bytes over {calls} calls",
        heap1 - heap0
    );
    if let (Some(a), Some(b)) = (rss0, rss1) {
        assert!(
            b < a + (8 << 20),
            "RSS grew by {} kB over {calls} calls",
            (b - a) >> 10
        );
    }
}

/// Files in `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn failed_writes_leave_nothing_and_the_next_write_works() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::<f32>::full(&[2, 3], 1.5).unwrap();
    let existing_dir = dir.path().join("out.safetensors");
    std::fs::create_dir(&existing_dir).unwrap();
    let before = listing(dir.path());
    // the final rename onto a directory fails
    let r = safetensors_io::write(&existing_dir, &[("t", &t)], None);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert_eq!(listing(dir.path()), before, "a temporary was left behind");
    assert!(listing(&existing_dir).is_empty());
    // the directory does not exist: the temporary cannot even be created
    let r = safetensors_io::write(
        dir.path().join("absent/out.safetensors"),
        &[("t", &t)],
        None,
    );
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert_eq!(listing(dir.path()), before);
    // the next call works and leaves exactly its output
    let good = dir.path().join("good.safetensors");
    safetensors_io::write(&good, &[("t", &t)], None).unwrap();
    assert_eq!(TensorFile::read(&good).unwrap().get("t").unwrap(), &t);
    let mut after = before.clone();
    after.push("good.safetensors".into());
    after.sort();
    assert_eq!(listing(dir.path()), after);
}

#[test]
fn concurrent_writes_to_one_path_leave_one_whole_file() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shared.safetensors");
    let tensors: Vec<Tensor<f32>> = (0..8)
        .map(|i| Tensor::full(&[64, 64], i as f32).unwrap())
        .collect();
    std::thread::scope(|scope| {
        for t in &tensors {
            let out = &out;
            scope.spawn(move || {
                for _ in 0..10 {
                    safetensors_io::write(out, &[("t", t)], None).unwrap();
                }
            });
        }
    });
    assert_eq!(listing(dir.path()), vec!["shared.safetensors".to_string()]);
    let t = TensorFile::read(&out).unwrap().take("t").unwrap();
    let first = t.data()[0];
    assert!(t.data().iter().all(|&v| v == first), "a mix of two writes");
}

#[test]
fn cli_output_naming_a_directory_fails_cleanly_and_the_next_run_works() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rng();
    let conv = DwConv2d::new(3, 3);
    let x: Tensor<f32> = random(&[1, 2, 6, 7], &mut rng);
    let w: Tensor<f32> = random(&[2, 1, 3, 3], &mut rng);
    let input = dir.path().join("in.safetensors");
    safetensors_io::write(&input, &[("x", &x), ("w", &w)], None).unwrap();
    let out_dir = dir.path().join("y.safetensors");
    std::fs::create_dir(&out_dir).unwrap();
    let before = listing(dir.path());
    let run = |out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lkconv"))
            .args(["conv", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(out)
            .output()
            .expect("run lkconv")
    };
    let o = run(&out_dir);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("error"));
    assert_eq!(listing(dir.path()), before, "a temporary was left behind");
    assert!(listing(&out_dir).is_empty());
    let good = dir.path().join("good.safetensors");
    let o = run(&good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y = TensorFile::read(&good).unwrap().take("y").unwrap();
    assert_eq!(y, cpu::forward(&conv, &x, &w, None).unwrap());
}

#[test]
fn failed_calls_leave_buffers_untouched_and_the_next_call_works() {
    let _one = one_at_a_time();
    let mut rng = rng();
    let conv = DwConv2d::new(3, 3);
    let s = conv.resolve(1, 2, 5, 6).unwrap();
    let x: Tensor<f32> = random(&s.input_dims(), &mut rng);
    let w: Tensor<f32> = random(&conv.weight_dims(2), &mut rng);
    let dy: Tensor<f32> = random(&s.output_dims(), &mut rng);
    let poison = f32::from_bits(0x7fc0_dead);
    let is_poison = |v: &[f32]| v.iter().all(|v| v.to_bits() == poison.to_bits());
    // caller buffers: one element short, or inputs of the wrong length
    let mut y = vec![poison; s.output_len() - 1];
    let r = cpu::forward_f32_into(&conv, &s, x.data(), w.data(), None, &mut y);
    assert!(matches!(r, Err(Error::BufferLength { .. })), "{r:?}");
    assert!(is_poison(&y), "a failed forward wrote to the output");
    let mut dx = vec![poison; s.input_len()];
    let r = cpu::data_grad_f32_into(&conv, &s, &dy.data()[1..], w.data(), &mut dx);
    assert!(matches!(r, Err(Error::BufferLength { .. })), "{r:?}");
    assert!(is_poison(&dx), "a failed data gradient wrote to the output");
    let mut dw = vec![poison; 2 * 9];
    let r = cpu::weight_grad_f32_into(&conv, &s, x.data(), &dy.data()[1..], &mut dw);
    assert!(matches!(r, Err(Error::BufferLength { .. })), "{r:?}");
    assert!(
        is_poison(&dw),
        "a failed weight gradient wrote to the output"
    );
    // the next calls work
    let mut y = vec![poison; s.output_len()];
    cpu::forward_f32_into(&conv, &s, x.data(), w.data(), None, &mut y).unwrap();
    let want = common::Expected::forward(&conv, &x, &w, None);
    assert_matches(
        "forward after failures",
        &Tensor::from_vec(&s.output_dims(), y).unwrap(),
        &want,
    );
    // every device: an error (empty output, wrong weight), then a good call
    let empty = DwConv2d::new(9, 9).with_padding(0, 0);
    let mut devices = vec![Device::Cpu, Device::CpuRef, Device::Sim];
    if have_gpu() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
            let imp = if device == Device::CpuRef {
                Impl::Reference
            } else {
                imp
            };
            let w9 = Tensor::<f32>::full(&[2, 1, 9, 9], 1.0).unwrap();
            let r = device::forward(device, imp, &empty, &x, &w9, None);
            assert!(matches!(r, Err(Error::EmptyOutput(_))), "{device}: {r:?}");
            let r = device::forward(device, imp, &conv, &x, &dy, None);
            assert!(matches!(r, Err(Error::Shape { .. })), "{device}: {r:?}");
            let y = device::forward(device, imp, &conv, &x, &w, None).unwrap();
            assert_matches(&format!("{device} {} after errors", imp.name()), &y, &want);
        }
    }
}
