//! `lkconv`: the command-line tool (info, conv, bench, replknet, classify).

mod args;
mod bench;
mod conv;
mod info;
mod model;
mod plan;
mod plot;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use args::GeometryArgs;

#[derive(Parser)]
#[command(
    name = "lkconv",
    version,
    about = "Very large depthwise convolutions and RepLKNet, on CPU and CUDA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Version, compiled CUDA kernels, CUDA devices and CPU features.
    Info,
    /// Runs one depthwise convolution pass on tensors from a safetensors file.
    Conv(ConvArgs),
    /// Times the convolution passes (or a whole RepLKNet with --model).
    Bench(BenchArgs),
    /// Runs RepLKNet on an input tensor from a safetensors file.
    Replknet(ReplknetArgs),
    /// Classifies an image with RepLKNet and prints the top-5 classes.
    Classify(ClassifyArgs),
    /// The launches planned for a problem and their occupancy on a named GPU.
    Plan(PlanArgs),
}

#[derive(Args, Debug)]
pub struct ConvArgs {
    /// fwd (reads x, w, optional bias; writes y), dgrad (reads dy, w; writes dx) or wgrad (reads x, dy; writes dw).
    #[arg(long, default_value = "fwd")]
    pub op: String,
    #[arg(long)]
    pub input: std::path::PathBuf,
    #[arg(long)]
    pub output: std::path::PathBuf,
    /// cpu, cpu-ref, sim or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute type (the files hold f32 whatever this is): f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub geometry: GeometryArgs,
    /// dgrad: the input's H,W (default: dy's H,W).
    #[arg(long)]
    pub input_hw: Option<String>,
    /// wgrad: the kernel's KH,KW (or K).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Implementation: fast, naive, im2col, tc (tensor cores: f16/bf16, sm_80+; default fast).
    #[arg(long = "impl", default_value = "fast")]
    pub implementation: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// auto (cuda when a GPU is present, else cpu), cpu, cpu-ref, sim or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// fwd, dgrad, wgrad or all.
    #[arg(long, default_value = "all")]
    pub op: String,
    /// N,C,H,W (default: the four RepLKNet-31B layer shapes).
    #[arg(long)]
    pub shape: Option<String>,
    /// K or KH,KW (with --shape; default 31).
    #[arg(long)]
    pub kernel: Option<String>,
    /// A kernel-size sweep: K1,K2,... (square), one case per size at --shape.
    #[arg(long, requires = "shape", conflicts_with = "kernel")]
    pub kernels: Option<String>,
    /// Also draw the results as a chart: FILE.png or FILE.svg (written atomically).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
    /// Only this implementation (fast, naive, im2col, tc, reference); default all (tc only when named).
    #[arg(long = "impl")]
    pub implementation: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON array of records instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Minimum measured repetitions per case.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Time a whole RepLKNet forward pass instead: 31b, 31l or xl.
    #[arg(long)]
    pub model: Option<String>,
    /// Batch size for --model.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Image size for --model.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
}

#[derive(Args, Debug)]
pub struct ReplknetArgs {
    #[arg(long)]
    pub weights: std::path::PathBuf,
    #[arg(long)]
    pub input: std::path::PathBuf,
    #[arg(long)]
    pub output: std::path::PathBuf,
    /// cpu, cuda or sim.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Comma-separated stage indices: write stage{i} instead of logits.
    #[arg(long)]
    pub out_indices: Option<String>,
    /// f32, or bf16 (CPU engine: bf16 operands, f32 sums; AMX / AVX-512 BF16 where present).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// A JPEG or PNG image.
    pub image: std::path::PathBuf,
    #[arg(long)]
    pub weights: std::path::PathBuf,
    /// 31b, 31l or xl (sets the preprocessing; the architecture is read from the weights).
    #[arg(long, default_value = "31b")]
    pub arch: String,
    /// cpu, cuda or sim.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Input resolution.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// f32, or bf16 (CPU engine: bf16 operands, f32 sums; AMX / AVX-512 BF16 where present).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// fwd, dgrad, wgrad or all.
    #[arg(long, default_value = "all")]
    pub op: String,
    /// N,C,H,W (default: the benchmark shapes with their kernels).
    #[arg(long)]
    pub shape: Option<String>,
    /// K or KH,KW (with --shape; default 31).
    #[arg(long)]
    pub kernel: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Implementation: fast, naive or im2col.
    #[arg(long = "impl", default_value = "fast")]
    pub implementation: String,
    /// h100, h200, a100 or l4.
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    #[command(flatten)]
    pub geometry: GeometryArgs,
    /// One JSON object per problem and line (the schema of kernels/bench/).
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info::run(),
        Command::Conv(args) => conv::run(&args),
        Command::Bench(args) if args.model.is_some() => model::bench(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Replknet(args) => model::replknet(&args),
        Command::Classify(args) => model::classify(&args),
        Command::Plan(args) => plan::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lkconv: error: {e}");
            ExitCode::from(2)
        }
    }
}
