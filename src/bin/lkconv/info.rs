//! `lkconv info`: what this build and this machine offer.

use lkconv::Result;

pub fn run() -> Result<()> {
    println!("lkconv {}", env!("CARGO_PKG_VERSION"));
    if lkconv::cuda::kernels_compiled() {
        println!(
            "CUDA kernels: compiled for {}",
            lkconv::cuda::compiled_archs()
        );
    } else {
        println!("CUDA kernels: built without CUDA kernels (nvcc was not found at build time)");
    }
    println!("nvcc: {}", lkconv::cuda::nvcc_version());
    match lkconv::cuda::describe() {
        Ok(devices) if devices.is_empty() => println!("CUDA devices: none"),
        Ok(devices) => {
            println!("CUDA devices:");
            for d in devices {
                println!("  {d}");
            }
        }
        Err(e) => println!("CUDA devices: {e}"),
    }
    println!(
        "kernel simulator: {}",
        if lkconv::sim::available() {
            "built"
        } else {
            "not built"
        }
    );
    println!(
        "CPU: {} threads, fast path uses {}",
        rayon::current_num_threads(),
        lkconv::cpu::direct::simd_description()
    );
    Ok(())
}
