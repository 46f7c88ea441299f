// lkbench's CUDA backend: the driver API (libcuda.so.1, opened at run time so that no CUDA
// library is needed to link), the kernels from a cubin/fatbin built by nvcc (build.sh), one
// stream, CUDA events for timing, and cuBLAS (libcublas, opened at run time when present) for
// the im2col baseline's GEMM step.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <dlfcn.h>

#include <map>
#include <stdexcept>
#include <string>

#include "backend.h"

namespace lkbench {
namespace {

// Resolves one driver entry point; `name` is the exported symbol (the _v2 names of cuda.h).
template <typename F>
F sym(void* lib, const char* name) {
    void* p = dlsym(lib, name);
    if (!p) throw std::runtime_error(std::string("libcuda has no ") + name);
    return reinterpret_cast<F>(p);
}

struct Driver {
    void* lib = nullptr;
    decltype(&::cuInit) init;
    decltype(&::cuGetErrorString) error_string;
    decltype(&::cuDeviceGet) device_get;
    decltype(&::cuDeviceGetName) device_name;
    decltype(&::cuDeviceGetAttribute) device_attribute;
    decltype(&::cuDevicePrimaryCtxRetain) primary_ctx;
    decltype(&::cuCtxSetCurrent) set_current;
    decltype(&::cuModuleLoad) module_load;
    decltype(&::cuModuleGetFunction) get_function;
    decltype(&::cuFuncSetAttribute) func_set_attribute;
    decltype(&::cuLaunchKernel) launch;
    decltype(&::cuMemAlloc) mem_alloc;
    decltype(&::cuMemFree) mem_free;
    decltype(&::cuMemcpyHtoD) htod;
    decltype(&::cuMemcpyDtoH) dtoh;
    decltype(&::cuMemsetD8Async) memset8;
    decltype(&::cuStreamCreate) stream_create;
    decltype(&::cuStreamSynchronize) stream_sync;
    decltype(&::cuEventCreate) event_create;
    decltype(&::cuEventRecord) event_record;
    decltype(&::cuEventSynchronize) event_sync;
    decltype(&::cuEventElapsedTime) event_elapsed;

    Driver() {
        lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) throw std::runtime_error("no CUDA driver (libcuda.so.1 not found)");
        init = sym<decltype(init)>(lib, "cuInit");
        error_string = sym<decltype(error_string)>(lib, "cuGetErrorString");
        device_get = sym<decltype(device_get)>(lib, "cuDeviceGet");
        device_name = sym<decltype(device_name)>(lib, "cuDeviceGetName");
        device_attribute = sym<decltype(device_attribute)>(lib, "cuDeviceGetAttribute");
        primary_ctx = sym<decltype(primary_ctx)>(lib, "cuDevicePrimaryCtxRetain");
        set_current = sym<decltype(set_current)>(lib, "cuCtxSetCurrent");
        module_load = sym<decltype(module_load)>(lib, "cuModuleLoad");
        get_function = sym<decltype(get_function)>(lib, "cuModuleGetFunction");
        func_set_attribute = sym<decltype(func_set_attribute)>(lib, "cuFuncSetAttribute");
        launch = sym<decltype(launch)>(lib, "cuLaunchKernel");
        mem_alloc = sym<decltype(mem_alloc)>(lib, "cuMemAlloc_v2");
        mem_free = sym<decltype(mem_free)>(lib, "cuMemFree_v2");
        htod = sym<decltype(htod)>(lib, "cuMemcpyHtoD_v2");
        dtoh = sym<decltype(dtoh)>(lib, "cuMemcpyDtoH_v2");
        memset8 = sym<decltype(memset8)>(lib, "cuMemsetD8Async");
        stream_create = sym<decltype(stream_create)>(lib, "cuStreamCreate");
        stream_sync = sym<decltype(stream_sync)>(lib, "cuStreamSynchronize");
        event_create = sym<decltype(event_create)>(lib, "cuEventCreate");
        event_record = sym<decltype(event_record)>(lib, "cuEventRecord");
        event_sync = sym<decltype(event_sync)>(lib, "cuEventSynchronize");
        event_elapsed = sym<decltype(event_elapsed)>(lib, "cuEventElapsedTime_v2");
    }
    void check(CUresult r, const std::string& what) const {
        if (r == CUDA_SUCCESS) return;
        const char* s = nullptr;
        error_string(r, &s);
        throw std::runtime_error(what + ": " + (s ? s : "CUDA error " + std::to_string((int)r)));
    }
};

// The three cuBLAS entry points the GEMM step needs (declared here: no cuBLAS headers needed).
struct Cublas {
    using Handle = void*;
    using Create = int (*)(Handle*);
    using SetStream = int (*)(Handle, CUstream);
    using SgemmStridedBatched = int (*)(Handle, int, int, int, int, int, const float*, const float*, int,
                                        long long, const float*, int, long long, const float*, float*, int,
                                        long long, int);
    Handle handle = nullptr;
    SgemmStridedBatched sgemm = nullptr;

    explicit Cublas(CUstream stream) {
        void* lib = nullptr;
        for (const char* n : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"})
            if ((lib = dlopen(n, RTLD_NOW | RTLD_LOCAL))) break;
        if (!lib) return;
        auto create = reinterpret_cast<Create>(dlsym(lib, "cublasCreate_v2"));
        auto set_stream = reinterpret_cast<SetStream>(dlsym(lib, "cublasSetStream_v2"));
        sgemm = reinterpret_cast<SgemmStridedBatched>(dlsym(lib, "cublasSgemmStridedBatched"));
        if (!create || !set_stream || !sgemm || create(&handle) != 0 || set_stream(handle, stream) != 0) {
            handle = nullptr;
            sgemm = nullptr;
        }
    }
};

class CudaBackend : public Backend {
   public:
    explicit CudaBackend(const std::string& module_path) {
        d_.check(d_.init(0), "cuInit");
        d_.check(d_.device_get(&dev_, 0), "cuDeviceGet");
        CUcontext ctx;
        d_.check(d_.primary_ctx(&ctx, dev_), "cuDevicePrimaryCtxRetain");
        d_.check(d_.set_current(ctx), "cuCtxSetCurrent");
        d_.check(d_.module_load(&module_, module_path.c_str()), "loading kernels from " + module_path);
        d_.check(d_.stream_create(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
        d_.check(d_.event_create(&ev0_, CU_EVENT_DEFAULT), "cuEventCreate");
        d_.check(d_.event_create(&ev1_, CU_EVENT_DEFAULT), "cuEventCreate");
        cublas_ = std::make_unique<Cublas>(stream_);
    }
    std::string describe() override {
        char name[256] = {0};
        d_.device_name(name, sizeof name, dev_);
        int major = 0, minor = 0, sms = 0;
        d_.device_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev_);
        d_.device_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev_);
        d_.device_attribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev_);
        return std::string(name) + " (sm_" + std::to_string(major) + std::to_string(minor) + ", " +
               std::to_string(sms) + " SMs; cuBLAS " + (cublas_->sgemm ? "loaded" : "not found: im2col skipped") +
               ")";
    }
    uint64_t alloc(size_t bytes) override {
        CUdeviceptr p = 0;
        d_.check(d_.mem_alloc(&p, bytes), "cuMemAlloc " + std::to_string(bytes) + " bytes");
        return (uint64_t)p;
    }
    void release(uint64_t addr) override { d_.mem_free((CUdeviceptr)addr); }
    void upload(uint64_t dst, const void* src, size_t bytes) override {
        sync();
        d_.check(d_.htod((CUdeviceptr)dst, src, bytes), "cuMemcpyHtoD");
    }
    void download(void* dst, uint64_t src, size_t bytes) override {
        sync();
        d_.check(d_.dtoh(dst, (CUdeviceptr)src, bytes), "cuMemcpyDtoH");
    }
    void fill(uint64_t dst, unsigned char byte, size_t bytes) override {
        d_.check(d_.memset8((CUdeviceptr)dst, byte, bytes, stream_), "cuMemsetD8Async");
    }
    void launch(const Launch& l) override {
        CUfunction f = function(l.kernel, l.shared_bytes);
        void* params[] = {const_cast<DwArgs*>(&l.args)};
        d_.check(d_.launch(f, l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1], l.block[2], l.shared_bytes,
                           stream_, params, nullptr),
                 "launching " + l.kernel);
    }
    // Row-major C = op(A) op(B) as column-major C^T = op(B)^T op(A)^T (operands and m/n swap).
    bool gemm(const Gemm& g, uint64_t ws) override {
        if (!cublas_->sgemm) return false;
        const float one = 1.f, zero = 0.f;
        const float* base = reinterpret_cast<const float*>(ws);
        int rc = cublas_->sgemm(cublas_->handle, g.b_trans ? 1 : 0, g.a_trans ? 1 : 0, (int)g.n, (int)g.m, (int)g.k,
                                &one, base + g.b_offset, (int)g.ldb, g.stride_b, base + g.a_offset, (int)g.lda,
                                g.stride_a, &zero, const_cast<float*>(base) + g.c_offset, (int)g.ldc, g.stride_c,
                                (int)g.batch);
        if (rc != 0) throw std::runtime_error("cublasSgemmStridedBatched failed: status " + std::to_string(rc));
        return true;
    }
    void sync() override { d_.check(d_.stream_sync(stream_), "cuStreamSynchronize (a kernel failed?)"); }
    double time_ms(const std::function<void()>& body, int reps) override {
        d_.check(d_.event_record(ev0_, stream_), "cuEventRecord");
        for (int i = 0; i < reps; ++i) body();
        d_.check(d_.event_record(ev1_, stream_), "cuEventRecord");
        d_.check(d_.event_sync(ev1_), "cuEventSynchronize (a kernel failed?)");
        float ms = 0;
        d_.check(d_.event_elapsed(&ms, ev0_, ev1_), "cuEventElapsedTime");
        return ms / reps;
    }

   private:
    CUfunction function(const std::string& name, unsigned shared_bytes) {
        auto it = functions_.find(name);
        if (it == functions_.end()) {
            CUfunction f;
            d_.check(d_.get_function(&f, module_, name.c_str()), "no kernel " + name + " in the module");
            it = functions_.emplace(name, f).first;
        }
        if (shared_bytes > 48 * 1024)
            d_.check(d_.func_set_attribute(it->second, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, (int)shared_bytes),
                     "raising the shared-memory limit of " + name);
        return it->second;
    }
    Driver d_;
    CUdevice dev_ = 0;
    CUmodule module_ = nullptr;
    CUstream stream_ = nullptr;
    CUevent ev0_ = nullptr, ev1_ = nullptr;
    std::unique_ptr<Cublas> cublas_;
    std::map<std::string, CUfunction> functions_;
};

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& module) {
    return std::make_unique<CudaBackend>(module.empty() ? "lkbench_kernels.cubin" : module);
}

uint16_t half_bits_of(float v, bool bf16) {
    return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}
float float_of_half_bits(uint16_t bits, bool bf16) {
    return bf16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
}

}  // namespace lkbench
