// lkbench: runs the planner's launches of lkconv's kernels without Rust, checks them against the
// naive kernel and times them (the tuning harness of BENCHMARKS.md "The first GPU run").
//
//   lkbench [--module K.cubin] [--group-ms MS] [--groups G] [--no-time] [--json OUT] PLAN.json...
//
// PLAN.json: `lkconv plan --json` output (/work/notes/plan_json.md; one object, an array of
// objects, or one object per line; "-" reads stdin). Plans of the same problem (op, dtype,
// shape, kernel, stride, dilation, padding) share random inputs; the "naive" plan of a problem,
// when given, is the reference: every other plan's output must match it within
// eps(dtype) * max(|a|, |b|) + 3e-5 * magnitude + 1e-6 per element (the magnitude is the naive
// kernel run on |inputs|; outputs and workspace are poisoned with NaN before every check run).
// Timing: a warm-up run, then --groups groups (default 5) of M back-to-back runs of the whole
// plan (launches and GEMM) between two events, M <= 1000 sized so that a group lasts >=
// --group-ms (default 1 ms, as lkconv's own timer); the median per-run time and nominal GFLOP/s (2 N C OH OW KH KW) are printed.
// Exit status: 0 when every check passed, 1 when a check failed or a plan could not run, 2 on
// bad arguments or input.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <vector>

#include "backend.h"
#include "json.h"

namespace lkbench {

// ---- plans ------------------------------------------------------------------------------------
struct Plan {
    std::string op, dtype, impl;
    long long shape[4], output[4], kernel[2], stride[2], dilation[2], padding[4];
    long long workspace_bytes = 0;
    std::vector<Launch> launches;
    bool has_gemm = false;
    Gemm gemm{};

    std::string problem_key() const {
        std::ostringstream k;
        k << op << ' ' << dtype;
        for (long long v : shape) k << ' ' << v;
        for (long long v : kernel) k << ' ' << v;
        for (long long v : stride) k << ' ' << v;
        for (long long v : dilation) k << ' ' << v;
        for (long long v : padding) k << ' ' << v;
        return k.str();
    }
    std::string label() const {
        std::ostringstream s;
        s << op << ' ' << dtype << ' ' << impl << ' ' << shape[0] << 'x' << shape[1] << 'x' << shape[2]
          << 'x' << shape[3] << " K" << kernel[0];
        if (kernel[1] != kernel[0]) s << 'x' << kernel[1];
        if (stride[0] != 1 || stride[1] != 1) s << " s" << stride[0] << ',' << stride[1];
        if (dilation[0] != 1 || dilation[1] != 1) s << " d" << dilation[0] << ',' << dilation[1];
        return s.str();
    }
    double nominal_flops() const {
        return 2.0 * output[0] * output[1] * output[2] * output[3] * kernel[0] * kernel[1];
    }
};

template <size_t N>
static void ints(const lkjson::Value& v, const char* key, long long (&out)[N]) {
    const lkjson::Value& a = v.at(key);
    if (a.kind != lkjson::Value::Array || a.items.size() != N)
        throw std::runtime_error(std::string("\"") + key + "\" must be an array of " + std::to_string(N));
    for (size_t i = 0; i < N; ++i) out[i] = a.items[i].integer();
}

static int arg_i32(const lkjson::Value& args, const char* key) {
    long long v = args.at(key).integer();
    if (v < INT32_MIN || v > INT32_MAX) throw std::runtime_error(std::string(key) + " does not fit an int");
    return (int)v;
}

static unsigned dim(const lkjson::Value& a, size_t i) {
    long long v = a.at(i).integer();
    if (v < 1 || v > 0x7fffffffLL) throw std::runtime_error("grid/block dimension out of range");
    return (unsigned)v;
}

Plan plan_from_json(const lkjson::Value& v) {
    Plan p;
    p.op = v.at("op").text();
    p.dtype = v.at("dtype").text();
    p.impl = v.at("impl").text();
    if (p.op != "fwd" && p.op != "dgrad" && p.op != "wgrad") throw std::runtime_error("unknown op " + p.op);
    if (p.dtype != "f32" && p.dtype != "f16" && p.dtype != "bf16")
        throw std::runtime_error("unknown dtype " + p.dtype);
    ints(v, "shape", p.shape);
    ints(v, "output", p.output);
    ints(v, "kernel", p.kernel);
    ints(v, "stride", p.stride);
    ints(v, "dilation", p.dilation);
    ints(v, "padding", p.padding);
    for (long long d : p.shape)
        if (d < 1) throw std::runtime_error("shape dims must be positive");
    for (long long d : p.output)
        if (d < 1) throw std::runtime_error("output dims must be positive");
    p.workspace_bytes = v.at("workspace_bytes").integer();
    if (p.workspace_bytes < 0) throw std::runtime_error("negative workspace_bytes");
    for (const lkjson::Value& l : v.at("launches").items) {
        Launch L{};
        L.kernel = l.at("kernel").text();
        const lkjson::Value& g = l.at("grid");
        const lkjson::Value& b = l.at("block");
        for (size_t i = 0; i < 3; ++i) {
            L.grid[i] = dim(g, i);
            L.block[i] = dim(b, i);
        }
        long long smem = l.at("shared_bytes").integer();
        if (smem < 0 || smem > (1LL << 31)) throw std::runtime_error("bad shared_bytes");
        L.shared_bytes = (unsigned)smem;
        const lkjson::Value& a = l.at("args");
        DwArgs& d = L.args;
        d.n = arg_i32(a, "n");
        d.c = arg_i32(a, "c");
        d.h = arg_i32(a, "h");
        d.w = arg_i32(a, "w");
        d.oh = arg_i32(a, "oh");
        d.ow = arg_i32(a, "ow");
        d.kh = arg_i32(a, "kh");
        d.kw = arg_i32(a, "kw");
        d.sh = arg_i32(a, "sh");
        d.sw = arg_i32(a, "sw");
        d.pad_top = arg_i32(a, "pad_top");
        d.pad_left = arg_i32(a, "pad_left");
        d.dh = arg_i32(a, "dh");
        d.dw = arg_i32(a, "dw");
        d.aux0 = arg_i32(a, "aux0");
        d.aux1 = arg_i32(a, "aux1");
        d.aux2 = arg_i32(a, "aux2");
        d.aux3 = arg_i32(a, "aux3");
        p.launches.push_back(L);
    }
    if (p.launches.empty()) throw std::runtime_error("a plan without launches");
    if (v.has("gemm") && !v.at("gemm").is_null()) {
        const lkjson::Value& g = v.at("gemm");
        Gemm& G = p.gemm;
        G.after_launch = g.at("after_launch").integer();
        G.batch = g.at("batch").integer();
        G.m = g.at("m").integer();
        G.n = g.at("n").integer();
        G.k = g.at("k").integer();
        // f32 element offsets into the workspace ("a_offset"), or byte offsets ("a", as the
        // planner's Gemm holds them before binding)
        auto offset = [&](const char* elems, const char* bytes) -> long long {
            if (g.has(elems)) return g.at(elems).integer();
            long long b = g.at(bytes).integer();
            if (b % 4) throw std::runtime_error(std::string("gemm.") + bytes + " is not a multiple of 4 bytes");
            return b / 4;
        };
        if (g.has("dtype") && g.at("dtype").text() != "f32")
            throw std::runtime_error("only f32 GEMM steps are supported");
        G.a_offset = offset("a_offset", "a");
        G.lda = g.at("lda").integer();
        G.stride_a = g.at("stride_a").integer();
        G.a_trans = g.at("a_trans").boolean();
        G.b_offset = offset("b_offset", "b");
        G.ldb = g.at("ldb").integer();
        G.stride_b = g.at("stride_b").integer();
        G.b_trans = g.at("b_trans").boolean();
        G.c_offset = offset("c_offset", "c");
        G.ldc = g.at("ldc").integer();
        G.stride_c = g.at("stride_c").integer();
        if (G.after_launch < 0 || G.after_launch >= (long long)p.launches.size())
            throw std::runtime_error("gemm.after_launch names no launch");
        p.has_gemm = true;
    }
    return p;
}

// ---- storage types ----------------------------------------------------------------------------
static size_t elem_bytes(const std::string& dtype) { return dtype == "f32" ? 4 : 2; }

static std::vector<unsigned char> encode(const std::vector<float>& v, const std::string& dtype) {
    std::vector<unsigned char> out(v.size() * elem_bytes(dtype));
    for (size_t i = 0; i < v.size(); ++i) {
        if (dtype == "f32") {
            std::memcpy(&out[4 * i], &v[i], 4);
        } else {
            uint16_t b = half_bits_of(v[i], dtype == "bf16");
            std::memcpy(&out[2 * i], &b, 2);
        }
    }
    return out;
}

static std::vector<float> decode(const std::vector<unsigned char>& raw, const std::string& dtype) {
    size_t n = raw.size() / elem_bytes(dtype);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) {
        if (dtype == "f32") {
            std::memcpy(&out[i], &raw[4 * i], 4);
        } else {
            uint16_t b;
            std::memcpy(&b, &raw[2 * i], 2);
            out[i] = float_of_half_bits(b, dtype == "bf16");
        }
    }
    return out;
}

static double epsilon(const std::string& dtype) {
    return dtype == "f32" ? 1.1920928955078125e-7 : dtype == "f16" ? 9.765625e-4 : 7.8125e-3;
}

// Random k / 256 with k in [-255, 255] \ {0}: exact in f32, f16 and bf16, never zero.
static std::vector<float> random_values(size_t n, uint64_t seed) {
    std::vector<float> v(n);
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; ++i) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        int k = (int)(s % 510) - 255;
        if (k >= 0) ++k;
        v[i] = (float)k / 256.f;
    }
    return v;
}

// ---- one problem --------------------------------------------------------------------------------
struct Buffer {
    Backend* dev = nullptr;
    uint64_t addr = 0;
    size_t bytes = 0;
    Buffer(Backend* d, size_t b) : dev(d), bytes(b) {
        if (b) addr = d->alloc(b);
    }
    ~Buffer() {
        if (addr) dev->release(addr);
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
};

struct Options {
    std::string module;
    double group_ms = 1.0;
    int groups = 5;
    bool time = true;
    std::string json_out;
};

struct Result {
    std::string label, check = "unchecked", note;
    double worst = 0;  // max |err| / tol over the output
    double ms = -1, gflops = -1;
    long long reps = 0;
    std::vector<std::string> kernels;
};

class Problem {
   public:
    Problem(Backend* dev, const Plan& p) : dev_(dev), p_(p) {
        const long long* in_dims = p.shape;
        const long long* out_dims = p.output;
        const long long planes_c = p.shape[1];
        const size_t eb = elem_bytes(p.dtype);
        auto count = [](const long long* d) { return (size_t)(d[0] * d[1] * d[2] * d[3]); };
        const size_t w_len = (size_t)(planes_c * p.kernel[0] * p.kernel[1]);
        // fwd: x, w, bias, y; dgrad: dy, w, -, dx; wgrad: x, dy, -, dw
        if (p.op == "fwd") {
            len0_ = count(in_dims), len1_ = w_len, out_len_ = count(out_dims), bias_len_ = (size_t)planes_c;
        } else if (p.op == "dgrad") {
            len0_ = count(out_dims), len1_ = w_len, out_len_ = count(in_dims);
        } else {
            len0_ = count(in_dims), len1_ = count(out_dims), out_len_ = w_len;
        }
        auto v0 = random_values(len0_, 1), v1 = random_values(len1_, 2), vb = random_values(bias_len_, 3);
        in0_ = std::make_unique<Buffer>(dev, len0_ * eb);
        in1_ = std::make_unique<Buffer>(dev, len1_ * eb);
        bias_ = std::make_unique<Buffer>(dev, bias_len_ * eb);
        upload(*in0_, v0);
        upload(*in1_, v1);
        upload(*bias_, vb);
        auto absv = [](std::vector<float> v) {
            for (float& x : v) x = std::fabs(x);
            return v;
        };
        in0_abs_ = std::make_unique<Buffer>(dev, len0_ * eb);
        in1_abs_ = std::make_unique<Buffer>(dev, len1_ * eb);
        bias_abs_ = std::make_unique<Buffer>(dev, bias_len_ * eb);
        upload(*in0_abs_, absv(v0));
        upload(*in1_abs_, absv(v1));
        upload(*bias_abs_, absv(vb));
        out_ = std::make_unique<Buffer>(dev, out_len_ * eb);
    }

    // Runs `plan` once on the given inputs into out_ (workspace `ws`); false: GEMM unsupported.
    bool run(const Plan& plan, const Buffer& in0, const Buffer& in1, const Buffer& bias, const Buffer& ws) {
        for (size_t i = 0; i < plan.launches.size(); ++i) {
            Launch l = plan.launches[i];
            l.args.in0 = in0.addr;
            l.args.in1 = in1.addr;
            l.args.bias = bias.addr;
            l.args.out = out_->addr;
            l.args.workspace = ws.addr;
            dev_->launch(l);
            if (plan.has_gemm && plan.gemm.after_launch == (long long)i && !dev_->gemm(plan.gemm, ws.addr))
                return false;
        }
        return true;
    }

    // Poisons the output and workspace, runs, and reads the output back (empty: not run).
    std::vector<float> checked_run(const Plan& plan, bool abs_inputs, const Buffer& ws) {
        dev_->fill(out_->addr, 0xff, out_->bytes);
        if (ws.bytes) dev_->fill(ws.addr, 0xff, ws.bytes);
        bool ok = abs_inputs ? run(plan, *in0_abs_, *in1_abs_, *bias_abs_, ws) : run(plan, *in0_, *in1_, *bias_, ws);
        if (!ok) return {};
        dev_->sync();
        std::vector<unsigned char> raw(out_->bytes);
        dev_->download(raw.data(), out_->addr, raw.size());
        return decode(raw, p_.dtype);
    }

    Result measure(const Plan& plan, const Plan* naive, const Options& o) {
        Result r;
        r.label = plan.label();
        for (const Launch& l : plan.launches) r.kernels.push_back(l.kernel);
        Buffer ws(dev_, (size_t)std::max(plan.workspace_bytes, naive ? naive->workspace_bytes : 0LL));
        if (naive && naive != &plan) {
            if (ref_.empty()) {
                ref_ = checked_run(*naive, false, ws);
                mag_ = checked_run(*naive, true, ws);
            }
            std::vector<float> got = checked_run(plan, false, ws);
            if (got.empty()) {
                r.check = "skipped";
                r.note = "no cuBLAS for the GEMM step";
                return r;
            }
            const double eps = epsilon(p_.dtype);
            size_t bad = 0, first_bad = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                const double a = got[i], b = ref_[i], m = mag_[i];
                const double tol = eps * std::max(std::fabs(a), std::fabs(b)) + 3e-5 * m + 1e-6;
                const double q = std::fabs(a - b) / tol;
                if (!(q <= 1.0) || std::isnan(m)) {
                    if (bad++ == 0) first_bad = i;
                }
                if (q > r.worst || std::isnan(q)) r.worst = std::isnan(q) ? INFINITY : q;
            }
            if (bad) {
                std::ostringstream s;
                s << bad << " of " << got.size() << " elements differ from the naive kernel, first ["
                  << first_bad << "] " << got[first_bad] << " vs " << ref_[first_bad];
                r.check = "FAIL";
                r.note = s.str();
            } else {
                r.check = "ok";
            }
        } else if (!naive) {
            r.note = "no naive plan for this problem in the input";
        } else {
            r.check = "reference";
        }
        if (o.time) {
            bool runs = true;
            auto body = [&] { runs = run(plan, *in0_, *in1_, *bias_, ws) && runs; };
            body();  // warm-up
            dev_->sync();
            if (!runs) {
                r.note = "no cuBLAS for the GEMM step: not timed";
                return r;
            }
            const double first = std::max(dev_->time_ms(body, 1), 1e-4);
            const int m = (int)std::clamp(std::ceil(o.group_ms / first), 1.0, 1000.0);
            std::vector<double> t;
            for (int g = 0; g < o.groups; ++g) t.push_back(dev_->time_ms(body, m));
            std::sort(t.begin(), t.end());
            r.ms = t[t.size() / 2];
            r.reps = (long long)m * o.groups;
            r.gflops = plan.nominal_flops() / (r.ms * 1e6);
        }
        return r;
    }

   private:
    void upload(Buffer& b, const std::vector<float>& v) {
        if (!b.bytes) return;
        auto raw = encode(v, p_.dtype);
        dev_->upload(b.addr, raw.data(), raw.size());
    }
    Backend* dev_;
    Plan p_;
    size_t len0_ = 0, len1_ = 0, out_len_ = 0, bias_len_ = 0;
    std::unique_ptr<Buffer> in0_, in1_, bias_, in0_abs_, in1_abs_, bias_abs_, out_;
    std::vector<float> ref_, mag_;
};

static std::string json_escape(const std::string& s) {
    std::string o;
    for (char c : s) {
        if (c == '"' || c == '\\') o += '\\';
        if ((unsigned char)c < 0x20) continue;
        o += c;
    }
    return o;
}

static int usage(const char* msg) {
    std::fprintf(stderr,
                 "lkbench: %s\nusage: lkbench [--module K.cubin] [--group-ms MS] [--groups G] [--no-time] "
                 "[--json OUT] PLAN.json... (\"-\" = stdin)\n",
                 msg);
    return 2;
}

int main_impl(int argc, char** argv) {
    Options o;
    std::vector<std::string> files;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
            return argv[++i];
        };
        if (a == "--module") o.module = next();
        else if (a == "--group-ms") o.group_ms = std::stod(next());
        else if (a == "--groups") o.groups = std::max(1, std::stoi(next()));
        else if (a == "--no-time") o.time = false;
        else if (a == "--json") o.json_out = next();
        else if (a == "-h" || a == "--help") return usage("help"), 0;
        else if (a.size() > 1 && a[0] == '-' && a != "-") return usage(("unknown option " + a).c_str());
        else files.push_back(a);
    }
    if (files.empty()) return usage("no plan file");

    // read every plan, grouped by problem in input order
    std::vector<std::pair<std::string, std::vector<Plan>>> problems;
    for (const std::string& f : files) {
        std::stringstream text;
        if (f == "-") {
            text << std::cin.rdbuf();
        } else {
            std::ifstream in(f);
            if (!in) return usage(("cannot read " + f).c_str());
            text << in.rdbuf();
        }
        std::vector<lkjson::Value> values;
        try {
            values = lkjson::parse_all(text.str());
        } catch (const std::exception& e) {
            return usage((f + ": " + e.what()).c_str());
        }
        std::vector<const lkjson::Value*> objs;
        for (const auto& v : values) {
            if (v.kind == lkjson::Value::Array)
                for (const auto& it : v.items) objs.push_back(&it);
            else
                objs.push_back(&v);
        }
        for (const lkjson::Value* v : objs) {
            Plan p;
            try {
                p = plan_from_json(*v);
            } catch (const std::exception& e) {
                return usage((f + ": plan " + std::to_string(objs.size()) + ": " + e.what()).c_str());
            }
            std::string key = p.problem_key();
            auto it = std::find_if(problems.begin(), problems.end(), [&](auto& q) { return q.first == key; });
            if (it == problems.end()) problems.push_back({key, {p}});
            else it->second.push_back(p);
        }
    }

    std::unique_ptr<Backend> dev = make_backend(o.module);
    std::printf("lkbench on %s; timing: median of %d groups of back-to-back runs (>= %.1f ms a group) between two events\n",
                dev->describe().c_str(), o.groups, o.group_ms);
    std::vector<Result> results;
    int failures = 0;
    for (auto& [key, plans] : problems) {
        const Plan* naive = nullptr;
        for (const Plan& p : plans)
            if (p.impl == "naive") naive = &p;
        try {
            Problem prob(dev.get(), plans[0]);
            // the naive plan first (it is the reference), then the others in input order
            std::vector<const Plan*> order;
            if (naive) order.push_back(naive);
            for (const Plan& p : plans)
                if (&p != naive) order.push_back(&p);
            for (const Plan* p : order) {
                Result r;
                try {
                    r = prob.measure(*p, naive, o);
                } catch (const std::exception& e) {
                    r.label = p->label();
                    r.check = "ERROR";
                    r.note = e.what();
                }
                if (r.check == "FAIL" || r.check == "ERROR") ++failures;
                std::printf("%-40s %-9s", r.label.c_str(), r.check.c_str());
                if (r.check == "ok") std::printf(" (worst %.2g of tol)", r.worst);
                if (r.ms >= 0) std::printf("  %10.4f ms  %10.1f GFLOP/s  (%lld runs)", r.ms, r.gflops, r.reps);
                std::printf("  [");
                for (size_t i = 0; i < p->launches.size(); ++i) {
                    const Launch& l = p->launches[i];
                    std::printf("%s%s %ux%ux%u/%ux%ux%u smem %u", i ? "; " : "", l.kernel.c_str(), l.grid[0],
                                l.grid[1], l.grid[2], l.block[0], l.block[1], l.block[2], l.shared_bytes);
                }
                std::printf("%s]", p->has_gemm ? " + GEMM" : "");
                if (!r.note.empty()) std::printf("  %s", r.note.c_str());
                std::printf("\n");
                std::fflush(stdout);
                results.push_back(r);
            }
        } catch (const std::exception& e) {
            std::printf("%-40s ERROR     %s\n", plans[0].label().c_str(), e.what());
            ++failures;
        }
    }
    if (!o.json_out.empty()) {
        std::ofstream js(o.json_out);
        js << "[\n";
        for (size_t i = 0; i < results.size(); ++i) {
            const Result& r = results[i];
            js << "  {\"problem\": \"" << json_escape(r.label) << "\", \"check\": \"" << r.check
               << "\", \"worst_over_tol\": " << (std::isfinite(r.worst) ? r.worst : -1) << ", \"ms\": " << r.ms
               << ", \"gflops\": " << r.gflops << ", \"runs\": " << r.reps << ", \"note\": \""
               << json_escape(r.note) << "\"}" << (i + 1 < results.size() ? "," : "") << "\n";
        }
        js << "]\n";
    }
    std::printf("%zu plans, %d failed\n", results.size(), failures);
    return failures ? 1 : 0;
}

}  // namespace lkbench

int main(int argc, char** argv) {
    try {
        return lkbench::main_impl(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lkbench: %s\n", e.what());
        return 2;
    }
}
