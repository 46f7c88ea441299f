//! `lkconv replknet`, `lkconv classify`, `lkconv bench --model`.
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Instant;

use crate::{BenchArgs, ClassifyArgs, ReplknetArgs};
use lkconv::model::{
    imagenet::IMAGENET_CLASSES, reference, Backend, Checkpoint, GpuModel, GpuTarget, Replknet,
    ReplknetConfig,
};
use lkconv::safetensors_io::{self, TensorFile};
use lkconv::{Device, Error, Result, Tensor};

/// The devices the model runs on: cpu (deploy form), cuda (the deploy form resident on the
/// GPU: our depthwise and element-wise kernels, cuBLAS for the 1x1 convs), sim (the same
/// device program in the kernel simulator; slow, small inputs) and cpu-ref (the un-folded
/// training-form graph in f64, slow, small inputs). `auto`: cuda when a GPU is usable, else cpu.
fn model_device(name: &str) -> Result<Device> {
    let dev = if name == "auto" {
        Device::auto()
    } else {
        Device::from_str(name)?
    };
    match dev {
        Device::Cpu | Device::CpuRef => Ok(dev),
        Device::Sim if lkconv::sim::available() => Ok(dev),
        Device::Sim => Err(Error::Simulator(
            "lkconv was built without the kernel simulator".into(),
        )),
        Device::Cuda(_) => Ok(dev),
    }
}

/// The model in the requested compute type: bf16 runs on the CPU engine only.
fn with_dtype(model: Replknet, dtype: &str, dev: Device) -> Result<Replknet> {
    match lkconv::DType::from_str(dtype)? {
        lkconv::DType::F32 => Ok(model),
        lkconv::DType::Bf16 if dev == Device::Cpu => Ok(Replknet {
            deploy: model.deploy.into_cpu_bf16(lkconv::cpu::bf16::detect())?,
        }),
        other => Err(Error::Unsupported(format!(
            "--dtype {other} (this command runs f32, or bf16 on --device cpu)"
        ))),
    }
}

fn parse_indices(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim().parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!("--out-indices: '{p}' is not a stage index"))
            })
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(Error::InvalidArgument(
            "--out-indices: no stage index given".into(),
        ));
    }
    let mut seen = Vec::with_capacity(v.len());
    for i in v {
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
    Ok(seen)
}

pub fn replknet(args: &ReplknetArgs) -> Result<()> {
    let dev = model_device(&args.device)?;
    if dev == Device::CpuRef && lkconv::DType::from_str(&args.dtype)? != lkconv::DType::F32 {
        return Err(Error::Unsupported(
            "--device cpu-ref is the f64 reference (no --dtype)".into(),
        ));
    }
    let indices = args.out_indices.as_deref().map(parse_indices).transpose()?;
    safetensors_io::check_writable(&args.output)?;
    let ck = Checkpoint::read(&args.weights)?;
    let config = ck.config.clone();
    let mut input_file = TensorFile::read(&args.input)?;
    let x = input_file.take("input")?;
    let t0 = Instant::now();
    let outputs: Vec<(String, Tensor<f32>)> = match dev {
        Device::CpuRef => {
            let (logits, stages) = reference::forward(&ck, &x)?;
            match &indices {
                Some(idx) => idx
                    .iter()
                    .map(|&i| {
                        stages
                            .get(i)
                            .cloned()
                            .map(|t| (format!("stage{i}"), t))
                            .ok_or_else(|| {
                                Error::InvalidArgument(format!(
                                    "out index {i} is out of range: the model has {} stages",
                                    stages.len()
                                ))
                            })
                    })
                    .collect::<Result<_>>()?,
                None => vec![(
                    "logits".into(),
                    logits.ok_or_else(|| {
                        Error::Unsupported("the checkpoint has no classification head".into())
                    })?,
                )],
            }
        }
        _ => {
            let model = with_dtype(Replknet::from_checkpoint_owned(ck)?, &args.dtype, dev)?;
            let mut ws = lkconv::model::Workspace::with_backend(backend_of(dev));
            match &indices {
                Some(idx) => {
                    let out = model.run(&x, Some(idx), false, &mut ws)?;
                    out.stages
                        .into_iter()
                        .map(|(i, t)| (format!("stage{i}"), t))
                        .collect()
                }
                None => {
                    let out = model.run(&x, None, true, &mut ws)?;
                    vec![("logits".into(), out.logits.expect("requested"))]
                }
            }
        }
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let cfg = &config;
    let mut meta = BTreeMap::new();
    meta.insert(
        "config".to_string(),
        format!(
            "{{\"large_kernel_sizes\": {:?}, \"layers\": {:?}, \"channels\": {:?}, \"small_kernel\": {}, \"dw_ratio\": {}, \"ffn_ratio\": {}, \"num_classes\": {}}}",
            cfg.large_kernel_sizes,
            cfg.layers,
            cfg.channels,
            cfg.small_kernel.map_or("null".to_string(), |k| k.to_string()),
            cfg.dw_ratio,
            cfg.ffn_ratio,
            cfg.num_classes
        ),
    );
    meta.insert("device".to_string(), dev.to_string());
    let refs: Vec<(&str, &Tensor<f32>)> = outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors_io::write(&args.output, &refs, Some(meta))?;
    for (n, t) in &outputs {
        println!("{n}: {:?}", t.shape());
    }
    println!(
        "replknet: {} on {dev}, {:.1} ms -> {}",
        x.shape()
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x"),
        ms,
        args.output.display()
    );
    Ok(())
}

/// Largest `--size` that `classify` accepts (RepLKNet runs at 224-640).
const MAX_IMAGE_SIDE: usize = 8192;
/// Largest resized image before the centre crop: a bound on the memory an odd aspect ratio takes.
const MAX_RESIZED_PIXELS: f64 = (1u64 << 28) as f64;

/// ImageNet evaluation preprocessing: bicubic resize of the short side to size/0.875, centre
/// crop, mean/std normalisation. Returns [1, 3, size, size].
pub fn preprocess(
    img: &image::RgbImage,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Tensor<f32>> {
    if size == 0 {
        return Err(Error::ZeroSize {
            what: "--size".into(),
            got: 0,
        });
    }
    if size > MAX_IMAGE_SIDE {
        return Err(Error::InvalidArgument(format!(
            "--size {size} exceeds {MAX_IMAGE_SIDE}"
        )));
    }
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::InvalidArgument("the image is empty".into()));
    }
    // The short side goes to size / 0.875; the long side keeps the aspect ratio.
    let short = (size as f64 / 0.875).floor();
    let long = (short * w.max(h) as f64 / w.min(h) as f64).max(short);
    if short * long > MAX_RESIZED_PIXELS {
        return Err(Error::InvalidArgument(format!(
            "a {w}x{h} image resized to a short side of {short} pixels would have more than \
             {MAX_RESIZED_PIXELS} pixels"
        )));
    }
    let (short, long) = (short as u32, long as u32);
    let (nw, nh) = if w <= h { (short, long) } else { (long, short) };
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
    let s = size as u32;
    let left = (nw - s) / 2;
    let top = (nh - s) / 2;
    let mut data = vec![0.0f32; 3 * size * size];
    for y in 0..s {
        for x in 0..s {
            let p = resized.get_pixel(left + x, top + y);
            for c in 0..3 {
                data[c * size * size + (y * s + x) as usize] =
                    (p[c] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
    }
    Tensor::from_vec(&[1, 3, size, size], data)
}

fn backend_of(dev: Device) -> Backend {
    match dev {
        Device::Sim => Backend::Sim,
        Device::Cuda(i) => Backend::Cuda(i),
        Device::Cpu | Device::CpuRef => Backend::Cpu,
    }
}

pub fn classify(args: &ClassifyArgs) -> Result<()> {
    let dev = model_device(&args.device)?;
    if dev == Device::CpuRef {
        return Err(Error::Unsupported(
            "classify runs on --device cpu, cuda or sim".into(),
        ));
    }
    let arch = ReplknetConfig::by_name(&args.arch)?;
    let (mean, std) = if arch == ReplknetConfig::replknet_xl() {
        ([0.5; 3], [0.5; 3])
    } else {
        ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    };
    let img = image::open(&args.image)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", args.image.display())))?
        .to_rgb8();
    let x = preprocess(&img, args.size, mean, std)?;
    let model = with_dtype(Replknet::load(&args.weights)?, &args.dtype, dev)?;
    let t0 = Instant::now();
    let mut ws = lkconv::model::Workspace::with_backend(backend_of(dev));
    let logits = model
        .run(&x, None, true, &mut ws)?
        .logits
        .ok_or_else(|| Error::Unsupported("the model has no head".into()))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let l = logits.data();
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = l.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    println!(
        "{} ({}x{} -> {}x{}, {:.1} ms)",
        args.image.display(),
        img.width(),
        img.height(),
        args.size,
        args.size,
        ms
    );
    for &i in order.iter().take(5) {
        let p = ((l[i] - max) as f64).exp() / sum;
        let name = if l.len() == IMAGENET_CLASSES.len() {
            IMAGENET_CLASSES[i]
        } else {
            ""
        };
        println!("{:>6.2}%  {i:>4}  {name}", p * 100.0);
    }
    Ok(())
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let name = args.model.as_deref().unwrap_or("31b");
    if let Some(path) = &args.plot {
        crate::plot::check_target(path)?;
    }
    let dev = model_device(&args.device)?;
    if dev == Device::CpuRef {
        return Err(Error::Unsupported(
            "bench --model runs on --device cpu, cuda or sim".into(),
        ));
    }
    let dtype = lkconv::DType::from_str(&args.dtype)?;
    if dtype == lkconv::DType::F16 && !matches!(dev, Device::Cuda(_) | Device::Sim) {
        return Err(Error::Unsupported(
            "bench --model --dtype f16 runs on --device cuda or sim only (the CPU engine runs f32 or bf16)".into(),
        ));
    }
    if args.batch == 0 {
        return Err(Error::ZeroSize {
            what: "--batch".into(),
            got: 0,
        });
    }
    let cfg = ReplknetConfig::by_name(name)?;
    let t0 = Instant::now();
    let model = Replknet::random(&cfg, 1)?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut rng = lkconv::Rng::new(2);
    let x = Tensor::<f32>::random(&[args.batch, 3, args.size, args.size], &mut rng)?;
    let reps = args.reps.max(1);
    let mut cpu_ms = None;
    let (mut times, where_, timer) = match dev {
        Device::Cuda(_) | Device::Sim => {
            let target = match dev {
                Device::Cuda(i) => GpuTarget::Cuda(i),
                _ => GpuTarget::Sim,
            };
            let t = Instant::now();
            let mut gpu = GpuModel::new(&model.deploy, target, dtype)?;
            let upload_s = t.elapsed().as_secs_f64();
            // one untimed run inside time_forward builds the program and warms up
            let times = gpu.time_forward(&model.deploy, &x, reps)?;
            let what = match dev {
                Device::Cuda(i) => lkconv::cuda::CudaDevice::shared(i)
                    .map(|d| format!("{dev} ({})", d.info().name))
                    .unwrap_or_else(|_| dev.to_string()),
                _ => dev.to_string(),
            };
            let timer = if matches!(dev, Device::Cuda(_)) {
                format!("CUDA events, weights uploaded in {upload_s:.2} s")
            } else {
                "wall clock".to_string()
            };
            (times, what, timer)
        }
        _ => {
            let bf16_isa = lkconv::cpu::bf16::detect();
            let model = match dtype {
                lkconv::DType::Bf16 => Replknet {
                    deploy: model.deploy.into_cpu_bf16(bf16_isa)?,
                },
                _ => model,
            };
            let mut ws = lkconv::model::Workspace::new();
            // the warm-up run inside time_reps grows the workspace
            let (timing, times) = crate::bench::time_reps(reps, f64::INFINITY, || {
                std::hint::black_box(model.run(&x, None, true, &mut ws)?);
                Ok(())
            })?;
            cpu_ms = timing.cpu_ms;
            let bf16_note = match dtype {
                lkconv::DType::Bf16 => format!(", bf16 on {}", bf16_isa.name()),
                _ => String::new(),
            };
            (
                times,
                format!("cpu ({} threads{bf16_note})", rayon::current_num_threads()),
                "wall clock".to_string(),
            )
        }
    };
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let gmacs = cfg.macs(args.size, args.size) / 1e9;
    let peak_mib = crate::bench::peak_rss_mib();
    if let Some(path) = &args.plot {
        let title = format!(
            "RepLKNet-{} {}x3x{}x{}: time per layer kind",
            name.to_ascii_uppercase(),
            args.batch,
            args.size,
            args.size
        );
        plot_profile(path, &title, &crate::bench::machine_name(dev), med)?;
    }
    if args.json {
        let v = serde_json::json!({
            "model": format!("RepLKNet-{}", name.to_ascii_uppercase()),
            "device": where_, "dtype": dtype.name(), "timer": timer,
            "batch": args.batch, "size": args.size, "runs": times.len(),
            "median_ms": med, "min_ms": times[0], "max_ms": times[times.len() - 1],
            "cpu_ms_per_run": cpu_ms,
            "images_per_s": args.batch as f64 / (med / 1e3),
            "gmacs_per_image": gmacs, "peak_rss_mib": peak_mib,
            "build_s": load_s,
        });
        println!("{v}");
        return Ok(());
    }
    let extra = match (cpu_ms, peak_mib) {
        (Some(c), Some(p)) => format!("; {c:.1} ms CPU time per run; peak memory {p:.0} MiB"),
        (None, Some(p)) => format!("; peak memory {p:.0} MiB"),
        (Some(c), None) => format!("; {c:.1} ms CPU time per run"),
        (None, None) => String::new(),
    };
    println!(
        "RepLKNet-{} {}x3x{}x{} {} {}: median {:.2} ms (min {:.2}, max {:.2}, {} runs, {}), {:.2} images/s, {:.1} GFLOP/s ({:.2} GMACs/image); random weights built+folded in {:.2} s{extra}",
        name.to_ascii_uppercase(),
        args.batch,
        args.size,
        args.size,
        where_,
        dtype,
        med,
        times[0],
        times[times.len() - 1],
        times.len(),
        timer,
        args.batch as f64 / (med / 1e3),
        2.0 * gmacs * args.batch as f64 / (med / 1e3),
        gmacs,
        load_s
    );
    Ok(())
}

/// `bench --model --plot`: the CPU engine's per-layer-kind profile as bars, when it was
/// collected (`LKCONV_PROFILE=1`, CPU); otherwise says why no chart is drawn.
fn plot_profile(path: &std::path::Path, title: &str, machine: &str, median_ms: f64) -> Result<()> {
    let Some(profile) = lkconv::model::cpu::profile_ms() else {
        eprintln!(
            "lkconv: no chart written to {}: bench --model --plot draws the CPU engine's \
             per-layer-kind profile, which is collected with LKCONV_PROFILE=1 on --device cpu only",
            path.display()
        );
        return Ok(());
    };
    let points: Vec<crate::plot::Point> = profile
        .iter()
        .filter(|(_, ms)| *ms > 0.0)
        .map(|&(kind, ms)| crate::plot::Point {
            panel: format!(
                "median forward pass {median_ms:.1} ms; mean per layer kind over all runs"
            ),
            series: "lkconv".into(),
            x: crate::plot::XKey::Category(kind.into()),
            value: ms,
        })
        .collect();
    let subtitle = format!("cpu: {machine}; f32; LKCONV_PROFILE=1 (wall time per layer kind)");
    let fig = crate::plot::Figure::new(
        crate::plot::Kind::Bars,
        title,
        &subtitle,
        "layer kind",
        "time per forward pass (ms)",
        &points,
    )?;
    let fig = crate::plot::Figure {
        log_allowed: false,
        ..fig
    };
    crate::plot::render(&fig, path)?;
    eprintln!("chart: {}", path.display());
    Ok(())
}
