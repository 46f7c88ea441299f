// The one kernel argument block shared by every kernel, the simulator and Rust
// (src/plan/launch.rs `DwArgs`, #[repr(C)]: same field order, same layout, 112 bytes).
#pragma once

struct DwArgs {
    unsigned long long in0;        // fwd: x; dgrad: dy; wgrad: x
    unsigned long long in1;        // fwd: w; dgrad: w;  wgrad: dy
    unsigned long long bias;       // fwd: bias or 0
    unsigned long long out;        // fwd: y; dgrad: dx; wgrad: dw
    unsigned long long workspace;  // f32 scratch or 0
    int n, c, h, w;                // input image dims (x / dx)
    int oh, ow;                    // output dims (y / dy)
    int kh, kw;
    int sh, sw, pad_top, pad_left, dh, dw;
    int aux0, aux1, aux2, aux3;    // kernel-specific
};
static_assert(sizeof(DwArgs) == 112, "DwArgs layout must match src/plan/launch.rs");
