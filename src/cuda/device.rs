//! [`CudaDevice`]: a context on one GPU, the embedded kernels, device facts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::driver::{compiled_archs, driver_err, driver_missing, FATBIN, NO_KERNELS};
use crate::error::{Error, Result};
use crate::plan::{KernelId, Launch};

/// Shared memory (static + dynamic) a block may use without opting in.
const DEFAULT_DYNAMIC_SMEM: u32 = 48 * 1024;

/// Facts about one GPU, read from the driver when the device is opened.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for H100.
    pub compute_capability: (i32, i32),
    pub sm_count: u32,
    /// Peak (boost) SM clock in MHz (`CU_DEVICE_ATTRIBUTE_CLOCK_RATE`; when the driver does not
    /// report it, the datasheet boost clock of a few known cards, else 0).
    pub clock_mhz: f64,
    /// True when `clock_mhz` is a datasheet figure rather than the driver's.
    pub clock_from_datasheet: bool,
    /// Peak memory clock in MHz; 0 when unknown.
    pub memory_clock_mhz: f64,
    pub memory_bus_width_bits: u32,
    pub total_mem_bytes: usize,
    pub l2_cache_bytes: u32,
    pub max_threads_per_block: u32,
    /// Largest dynamic + static shared memory one block may opt in to.
    pub max_shared_per_block_optin: u32,
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
}

/// FP32 FMA lanes per SM for a compute capability (NVIDIA's CUDA C Programming Guide,
/// "Arithmetic Instructions" throughput table: 32-bit floating-point add/multiply/FMA results
/// per clock per SM).
///
/// | CC | architecture | lanes |
/// |---|---|---|
/// | 3.x | Kepler | 192 |
/// | 5.x | Maxwell | 128 |
/// | 6.0 | Pascal P100 | 64 |
/// | 6.1, 6.2 | Pascal consumer / Jetson | 128 |
/// | 7.0, 7.2, 7.5 | Volta, Xavier, Turing | 64 |
/// | 8.0 | Ampere A100 / A30 | 64 |
/// | 8.6, 8.7, 8.9 | Ampere consumer, Orin, Ada | 128 |
/// | 9.0 | Hopper H100 / H200 | 128 |
/// | 10.x, 11.x, 12.x | Blackwell | 128 |
///
/// `None` for anything else.
pub fn fp32_lanes_per_sm(major: i32, minor: i32) -> Option<u32> {
    match (major, minor) {
        (3, _) => Some(192),
        (5, _) => Some(128),
        (6, 0) => Some(64),
        (6, _) => Some(128),
        (7, _) => Some(64),
        (8, 0) => Some(64),
        (8, _) => Some(128),
        (9, _) | (10, _) | (11, _) | (12, _) => Some(128),
        _ => None,
    }
}

impl DeviceInfo {
    /// FP32 lanes per SM used for the peak: the table of [`fp32_lanes_per_sm`], or 128 (the
    /// value of every architecture since Ampere consumer parts) for a capability it lacks.
    pub fn fp32_lanes(&self) -> u32 {
        let (major, minor) = self.compute_capability;
        fp32_lanes_per_sm(major, minor).unwrap_or(128)
    }

    /// Peak FP32 GFLOP/s: SMs x FP32 lanes per SM x 2 (an FMA is two FLOPs) x peak SM clock.
    /// H100 SXM: 132 x 128 x 2 x 1.98 GHz = 66.9 TFLOP/s, the datasheet figure.
    pub fn peak_fp32_gflops(&self) -> f64 {
        self.sm_count as f64 * self.fp32_lanes() as f64 * 2.0 * self.clock_mhz / 1e3
    }

    /// How [`DeviceInfo::peak_fp32_gflops`] was computed, for reports.
    pub fn peak_fp32_note(&self) -> String {
        let (major, minor) = self.compute_capability;
        let table = if fp32_lanes_per_sm(major, minor).is_some() {
            ""
        } else {
            ", capability not in the table: assumed"
        };
        let clock = if self.clock_from_datasheet {
            " (datasheet boost clock)"
        } else {
            ""
        };
        format!(
            "{} SMs x {} FP32 lanes/SM (sm_{major}{minor}{table}) x 2 x {:.0} MHz{clock} = {:.1} TFLOP/s",
            self.sm_count,
            self.fp32_lanes(),
            self.clock_mhz,
            self.peak_fp32_gflops() / 1e3
        )
    }

    /// Peak DRAM bandwidth in GB/s: 2 (double data rate) x memory clock x bus width / 8.
    pub fn peak_bandwidth_gbs(&self) -> f64 {
        2.0 * self.memory_clock_mhz * 1e6 * self.memory_bus_width_bits as f64 / 8.0 / 1e9
    }

    /// One line: name, capability, SMs, clock, memory, driver.
    pub fn summary(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!(
            "cuda:{} {} (sm_{major}{minor}), {} SMs @ {:.0} MHz, {:.1} GiB, {:.0} GB/s, L2 {} MiB, \
             smem/block {} KiB, driver CUDA {}.{}, FP32 peak {:.1} TFLOP/s",
            self.ordinal,
            self.name,
            self.sm_count,
            self.clock_mhz,
            self.total_mem_bytes as f64 / (1u64 << 30) as f64,
            self.peak_bandwidth_gbs(),
            self.l2_cache_bytes >> 20,
            self.max_shared_per_block_optin >> 10,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            self.peak_fp32_gflops() / 1e3
        )
    }
}

/// A kernel function and the dynamic shared memory it has been opted in to.
struct KernelEntry {
    func: CudaFunction,
    static_smem: u32,
    /// The MAX_DYNAMIC_SHARED_SIZE_BYTES opted in to; None: the default (48 KB minus static).
    dynamic_limit: Option<u32>,
}

/// Why the embedded kernels are not loaded.
#[derive(Debug)]
enum ModuleMissing {
    /// Built without nvcc.
    NotCompiled,
    /// The driver refused the fatbin.
    Load(cudarc::driver::DriverError),
}

/// One GPU: its primary context, the embedded kernels, a cuBLAS handle, and facts about it.
///
/// Thread-safe: share it through an `Arc` ([`CudaDevice::shared`] keeps one per ordinal).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    module: std::result::Result<Arc<CudaModule>, ModuleMissing>,
    kernels: Mutex<HashMap<KernelId, KernelEntry>>,
    blas: Mutex<Option<CudaBlas>>,
    info: DeviceInfo,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .field("kernels_loaded", &self.module.is_ok())
            .finish()
    }
}

/// Reads the driver's CUDA version (e.g. 13000); call only with libcuda present.
pub(crate) fn driver_version() -> Result<i32> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: libcuda is present (callers check `driver_missing` first); cuDriverGetVersion
    // writes one int through a pointer to a live local and needs no initialised context.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(driver_err("cuDriverGetVersion"))?;
    Ok(v)
}

/// Number of CUDA devices; an error says "no CUDA driver" or passes on the driver's error.
pub(crate) fn device_count() -> Result<usize> {
    if let Some(e) = driver_missing() {
        return Err(e);
    }
    let n = CudaContext::device_count()
        .map_err(|e| Error::CudaUnavailable(format!("no CUDA device (driver: {e})")))?;
    Ok(n.max(0) as usize)
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks for the driver library, retains the primary context, creates
    /// a non-blocking stream, reads the device facts and loads the embedded fatbin.
    ///
    /// Errors: [`Error::CudaUnavailable`] without libcuda or without that device,
    /// [`Error::Cuda`] for any other driver failure. A fatbin that fails to load does not fail
    /// `new` (so that `describe` works); every launch then reports it.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(e) = driver_missing() {
            return Err(e);
        }
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::CudaUnavailable(if count == 0 {
                "no CUDA device".to_string()
            } else {
                format!("no CUDA device with ordinal {ordinal} ({count} present)")
            }));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::CudaUnavailable(format!("no CUDA device: opening device {ordinal}: {e}"))
        })?;
        let info = read_info(&ctx, ordinal)?;
        let module = match FATBIN {
            None => Err(ModuleMissing::NotCompiled),
            // The bytes are copied into a Vec (16-byte aligned by the system allocator), which
            // is what cuModuleLoadData wants for a fatbin image.
            Some(bytes) => ctx
                .load_module(Ptx::from_binary(bytes.to_vec()))
                .map_err(ModuleMissing::Load),
        };
        Ok(CudaDevice {
            ctx,
            module,
            kernels: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            info,
        })
    }

    /// The process-wide device for `ordinal`, opened on first use and then shared (so the
    /// fatbin is loaded once). Failures are not cached: a later call tries again.
    pub fn shared(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(CudaDevice::new(ordinal)?);
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// Facts about the device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.info.ordinal
    }

    /// Peak FP32 GFLOP/s (see [`DeviceInfo::peak_fp32_gflops`]).
    pub fn peak_fp32_gflops(&self) -> f64 {
        self.info.peak_fp32_gflops()
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A new non-blocking stream on this device.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(driver_err("creating a stream"))
    }

    /// Whether the embedded kernels are loaded (false without nvcc or when loading failed).
    pub fn kernels_loaded(&self) -> bool {
        self.module.is_ok()
    }

    /// Checks that `stream` belongs to this device's context.
    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if **stream.context() != *self.ctx {
            return Err(Error::InvalidArgument(format!(
                "the stream belongs to cuda:{}, the device is cuda:{}",
                stream.context().ordinal(),
                self.ordinal()
            )));
        }
        Ok(())
    }

    /// Why the kernels cannot run, or Ok when the fatbin is loaded.
    pub(crate) fn require_module(&self) -> Result<&Arc<CudaModule>> {
        self.module.as_ref().map_err(|m| match m {
            ModuleMissing::NotCompiled => Error::CudaUnavailable(NO_KERNELS.into()),
            ModuleMissing::Load(e) => Error::driver(
                format!(
                    "loading the embedded fatbin ({}) on sm_{}{}",
                    compiled_archs(),
                    self.info.compute_capability.0,
                    self.info.compute_capability.1
                ),
                *e,
            ),
        })
    }

    /// The kernel of a launch, ready to run: the launch configuration checked against the
    /// device's limits, the function fetched from the module on first use and cached, and
    /// opted in to more than 48 KB of dynamic shared memory when asked for. Fails (never
    /// launches) when the request exceeds what the device allows for this kernel.
    pub(crate) fn kernel(&self, l: &Launch) -> Result<CudaFunction> {
        let info = &self.info;
        let (gx, gy, gz) = l.grid;
        let (bx, by, bz) = l.block;
        let threads = bx as u64 * by as u64 * bz as u64;
        let grid_ok = gx >= 1
            && gx <= i32::MAX as u32
            && (1..=65535).contains(&gy)
            && (1..=65535).contains(&gz);
        let block_ok = threads >= 1
            && threads <= info.max_threads_per_block as u64
            && bx <= 1024
            && by <= 1024
            && bz <= 64;
        if !grid_ok || !block_ok {
            return Err(Error::Unsupported(format!(
                "launch of '{}' with grid {:?} and block {:?} exceeds the limits of {}",
                l.kernel, l.grid, l.block, info.name
            )));
        }
        crate::plan::tensor_core::check_device(l.kernel, info.compute_capability, &info.name)?;
        let module = self.require_module()?;
        let (id, shared_bytes) = (l.kernel, l.shared_bytes);
        let mut kernels = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match kernels.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let func = module.load_function(&id.name()).map_err(|e| {
                    Error::driver(format!("kernel '{id}' is not in the embedded fatbin"), e)
                })?;
                let static_smem = func
                    .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                    .map_err(driver_err("reading a kernel's static shared memory"))?;
                v.insert(KernelEntry {
                    func,
                    static_smem: static_smem.max(0) as u32,
                    dynamic_limit: None,
                })
            }
        };
        let total = shared_bytes as u64 + entry.static_smem as u64;
        if total > info.max_shared_per_block_optin as u64 {
            return Err(Error::Unsupported(format!(
                "kernel '{id}' needs {shared_bytes} B dynamic + {} B static shared memory, \
                 {} allows {} B per block",
                entry.static_smem, info.name, info.max_shared_per_block_optin
            )));
        }
        // Without opting in, static + dynamic shared memory is limited to 48 KB.
        let needs_optin = total > DEFAULT_DYNAMIC_SMEM as u64;
        if needs_optin && entry.dynamic_limit.is_none_or(|l| l < shared_bytes) {
            self.ctx
                .bind_to_thread()
                .map_err(driver_err("binding the context"))?;
            entry
                .func
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
                .map_err(driver_err("opting a kernel in to more shared memory"))?;
            entry.dynamic_limit = Some(shared_bytes);
        }
        Ok(entry.func.clone())
    }

    /// Runs `f` with this device's cuBLAS handle bound to `stream` and to `workspace`, the
    /// caller's cuBLAS workspace for that stream (as PyTorch does: one handle, a workspace per
    /// stream, so that GEMMs queued on two streams never share scratch memory). The lock is
    /// held until `f` has queued its work, so no other thread rebinds the handle meanwhile.
    ///
    /// # Safety
    /// `workspace` must be device memory of this context of `workspace_bytes` bytes that only
    /// work queued on `stream` uses, alive until that work completes.
    pub(crate) unsafe fn with_blas<R>(
        &self,
        stream: &Arc<CudaStream>,
        workspace: u64,
        workspace_bytes: usize,
        f: impl FnOnce(&CudaBlas) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // cuBLAS calls use the thread's current context; a launch usually bound it, but a
        // caller may reach a GEMM first on a fresh thread.
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        if guard.is_none() {
            // SAFETY: only asks whether libcublas can be dlopened; no cuBLAS call is made, and
            // this must precede any, which would panic without the library.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(Error::CudaUnavailable(
                    "cuBLAS (libcublas.so) not found: needed by the GEMM steps".into(),
                ));
            }
            let blas = CudaBlas::new(stream.clone())
                .map_err(|e| Error::cublas("creating a cuBLAS handle", e))?;
            *guard = Some(blas);
        }
        let Some(blas) = guard.as_mut() else {
            unreachable!("set above")
        };
        // SAFETY: set_stream is unsafe because work on the new stream may race with work
        // queued on the old one through the handle's workspace; the workspace is rebound to
        // this stream's own below, before any GEMM, and the lock is held until the GEMM is
        // queued, so no other thread's GEMM lands on this stream or this workspace.
        unsafe { blas.set_stream(stream.clone()) }
            .map_err(|e| Error::cublas("binding cuBLAS to a stream", e))?;
        // SAFETY: the handle is live; the workspace satisfies this function's contract.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace as *mut std::ffi::c_void,
                workspace_bytes,
            )
        }
        .result()
        .map_err(|e| Error::cublas("binding the cuBLAS workspace", e))?;
        f(blas)
    }

    /// Bytes of cuBLAS workspace per stream (PyTorch's defaults: 32 MiB on sm_90 and later,
    /// 4 MiB x 2 before).
    pub(crate) fn blas_workspace_bytes(&self) -> usize {
        if self.info.compute_capability.0 >= 9 {
            32 << 20
        } else {
            8 << 20
        }
    }
}

/// Datasheet boost clocks (MHz) for cards whose driver might not report one.
fn datasheet_clock_mhz(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let table: [(&str, f64); 6] = [
        ("H200", 1980.0),
        ("H100 PCIE", 1755.0),
        ("H100", 1980.0),
        ("A100", 1410.0),
        ("L40S", 2520.0),
        ("A10", 1695.0),
    ];
    table
        .iter()
        .find(|(k, _)| n.contains(k))
        .map(|&(_, mhz)| mhz)
}

fn read_info(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<DeviceInfo> {
    let attr = |a: CUdevice_attribute| -> Result<i32> {
        ctx.attribute(a)
            .map_err(driver_err("reading a device attribute"))
    };
    // Optional attributes (deprecated ones may fail on future drivers): 0 when unreadable.
    let attr_or0 = |a: CUdevice_attribute| -> i32 { ctx.attribute(a).unwrap_or(0).max(0) };
    let name = ctx.name().map_err(driver_err("reading the device name"))?;
    let driver_clock = attr_or0(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE) as f64 / 1e3;
    let (clock_mhz, clock_from_datasheet) = match datasheet_clock_mhz(&name) {
        Some(mhz) if driver_clock <= 0.0 => (mhz, true),
        _ => (driver_clock, false),
    };
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?,
        sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(0) as u32,
        clock_mhz,
        clock_from_datasheet,
        memory_clock_mhz: attr_or0(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            as f64
            / 1e3,
        memory_bus_width_bits: attr_or0(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH,
        ) as u32,
        total_mem_bytes: ctx
            .total_mem()
            .map_err(driver_err("reading the memory size"))?,
        l2_cache_bytes: attr_or0(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE) as u32,
        max_threads_per_block: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?
            .max(0) as u32,
        max_shared_per_block_optin: attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?
        .max(0) as u32,
        driver_version: driver_version()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_peak_is_the_datasheet_figure() {
        let info = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            clock_mhz: 1980.0,
            clock_from_datasheet: false,
            memory_clock_mhz: 2619.0,
            memory_bus_width_bits: 5120,
            total_mem_bytes: 80 << 30,
            l2_cache_bytes: 50 << 20,
            max_threads_per_block: 1024,
            max_shared_per_block_optin: 227 << 10,
            driver_version: 13000,
        };
        assert!((info.peak_fp32_gflops() - 66908.16).abs() < 1.0);
        assert!((info.peak_bandwidth_gbs() - 3352.3).abs() < 1.0);
        assert!(info
            .peak_fp32_note()
            .contains("132 SMs x 128 FP32 lanes/SM (sm_90)"));
        assert_eq!(fp32_lanes_per_sm(8, 0), Some(64));
        assert_eq!(fp32_lanes_per_sm(8, 6), Some(128));
        assert_eq!(fp32_lanes_per_sm(7, 5), Some(64));
        assert_eq!(fp32_lanes_per_sm(2, 0), None);
        assert!(info.summary().contains("sm_90"));
        assert_eq!(datasheet_clock_mhz("NVIDIA H100 PCIe"), Some(1755.0));
        assert_eq!(datasheet_clock_mhz("NVIDIA H100 80GB HBM3"), Some(1980.0));
    }
}
