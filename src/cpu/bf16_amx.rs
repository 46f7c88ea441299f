//! The AMX-BF16 GEMM micro-kernel: blocks of 32 x 32 f32 results in four 16 x 16 tiles, each k
//! step (32 bf16 values) two A tiles and two B tiles feeding four `tdpbf16ps` (16 x 16 x 32
//! products each). Stable Rust has no AMX intrinsics, so the instructions are `asm!`; Linux
//! grants the tile state to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).

/// Rows (and columns) of one tile of f32 results; one A tile row holds 32 bf16 (64 bytes).
const TILE: usize = 16;
/// Results per block: 2 x 2 tiles.
const BLOCK: usize = 2 * TILE;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel granted this process the tile data
/// state (asked once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| cpu_has_amx() && request_tile_permission())
}

/// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
pub fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid_count;
        if __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when granted (Linux only).
fn request_tile_permission() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain system call that only changes this process's permitted xsave
        // features; it reads no memory of ours. `syscall` clobbers rcx and r11.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            )
        };
        ret == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The 64-byte tile configuration: palette 1, tiles 0-7 all 16 rows x 64 bytes (tiles 0-3 the
/// f32 results, 4-5 A, 6-7 B).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // bytes per row
            c[48 + t] = TILE as u8; // rows
        }
        TileConfig(c)
    }
}

/// C block (m x nc at the caller's origin) = A[r0..] * B[:, c0..] + beta * C.
/// Only called when `enabled()` (the weights were packed for AMX after that check).
pub(crate) fn gemm(p: &Blocks, r0: usize, m: usize, c0: usize, nc: usize, out: &BlockOut) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(enabled(), "AMX kernel called without AMX");
        let cfg = TileConfig::new();
        // SAFETY: AMX is present and permitted (asserted); the configuration is 64 bytes.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        let mut acc = [0.0f32; BLOCK * BLOCK];
        let (sa, sb) = (p.lda * 4, p.ldb * 4); // row strides in bytes
        for jb in (0..nc).step_by(BLOCK) {
            let col = c0 + jb;
            for ib in (0..m).step_by(BLOCK) {
                let row = r0 + ib;
                // Two A tiles (rows row.., row + 16..), two B tiles (columns col.., col + 16..).
                p.check(row, BLOCK, col, BLOCK);
                let a0 = p.a[row * p.lda..].as_ptr();
                let b0 = p.b[col..].as_ptr();
                // A whole block with beta 0 or 1 accumulates in C itself (no scratch, no merge).
                let direct =
                    ib + BLOCK <= m && jb + BLOCK <= nc && (out.beta == 0.0 || out.beta == 1.0);
                // SAFETY: rows ib..ib + 32, columns jb..jb + 32 of the caller's block when
                // `direct` (`gemm_raw`'s contract); `acc` (32 x 32 floats) otherwise.
                let (base, ld) = if direct {
                    (unsafe { out.c.add(ib * out.ldc + jb) }, out.ldc)
                } else {
                    (acc.as_mut_ptr(), BLOCK)
                };
                if direct && out.beta == 1.0 {
                    // SAFETY: each load reads 16 rows of 64 bytes, `ld` floats apart, of the
                    // block above (valid for reads when beta != 0).
                    unsafe {
                        std::arch::asm!(
                            "tileloadd tmm0, [{p0} + {s} * 1]",
                            "tileloadd tmm1, [{p1} + {s} * 1]",
                            "tileloadd tmm2, [{p2} + {s} * 1]",
                            "tileloadd tmm3, [{p3} + {s} * 1]",
                            p0 = in(reg) base,
                            p1 = in(reg) base.add(TILE),
                            p2 = in(reg) base.add(TILE * ld),
                            p3 = in(reg) base.add(TILE * ld + TILE),
                            s = in(reg) ld * 4,
                            options(nostack, readonly)
                        )
                    };
                } else {
                    // SAFETY: tiles are configured (above); tilezero touches no memory.
                    unsafe {
                        std::arch::asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack)
                        )
                    };
                }
                for ks in 0..p.kp / TILE {
                    // SAFETY: each tile load reads 16 rows of 64 bytes: A rows row..row + 32,
                    // pair words 16ks..16ks + 16 (< lda); B pair rows 16ks..16ks + 16, columns
                    // col..col + 32 -- all inside the packed operands (`check`).
                    unsafe {
                        let a_lo = a0.add(TILE * ks);
                        let a_hi = a_lo.add(TILE * p.lda);
                        let b_lo = b0.add(TILE * ks * p.ldb);
                        let b_hi = b_lo.add(TILE);
                        std::arch::asm!(
                            "tileloadd tmm4, [{a_lo} + {sa} * 1]",
                            "tileloadd tmm5, [{a_hi} + {sa} * 1]",
                            "tileloadd tmm6, [{b_lo} + {sb} * 1]",
                            "tileloadd tmm7, [{b_hi} + {sb} * 1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a_lo = in(reg) a_lo,
                            a_hi = in(reg) a_hi,
                            b_lo = in(reg) b_lo,
                            b_hi = in(reg) b_hi,
                            sa = in(reg) sa,
                            sb = in(reg) sb,
                            options(nostack, readonly)
                        )
                    };
                }
                // SAFETY: each store writes 16 rows of 64 bytes, `ld` floats apart, inside the
                // block chosen above (C's, or the 32 x 32 floats of `acc`).
                unsafe {
                    std::arch::asm!(
                        "tilestored [{p0} + {s} * 1], tmm0",
                        "tilestored [{p1} + {s} * 1], tmm1",
                        "tilestored [{p2} + {s} * 1], tmm2",
                        "tilestored [{p3} + {s} * 1], tmm3",
                        p0 = in(reg) base,
                        p1 = in(reg) base.add(TILE),
                        p2 = in(reg) base.add(TILE * ld),
                        p3 = in(reg) base.add(TILE * ld + TILE),
                        s = in(reg) ld * 4,
                        options(nostack)
                    )
                };
                if !direct {
                    // SAFETY: rows ib.., columns jb.. of the caller's block (`gemm_raw`'s
                    // contract).
                    unsafe {
                        out.merge(ib, jb, &acc, BLOCK, BLOCK.min(m - ib), BLOCK.min(nc - jb))
                    };
                }
            }
        }
        // SAFETY: releases the tile state configured above.
        unsafe { std::arch::asm!("tilerelease", options(nostack)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, r0, m, c0, nc, out);
        unreachable!("AMX is x86-64 only");
    }
}

/// The packed operands as the micro-kernels see them (pair words, row strides in words).
pub(crate) struct Blocks<'a> {
    pub a: &'a [u32],
    pub lda: usize,
    pub b: &'a [u32],
    pub ldb: usize,
    /// Pair rows of k (k padded to K_STEP, halved).
    pub kp: usize,
}

impl Blocks<'_> {
    /// Asserts that a block of `rows x cols` at (r, c) lies inside the packed operands.
    pub fn check(&self, r: usize, rows: usize, c: usize, cols: usize) {
        assert!((r + rows) * self.lda <= self.a.len(), "packed A too short");
        assert!(
            self.kp == 0 || (self.kp - 1) * self.ldb + c + cols <= self.b.len(),
            "packed B too short"
        );
    }
}

/// Where a block's f32 results go.
pub(crate) struct BlockOut {
    pub c: *mut f32,
    pub ldc: usize,
    pub beta: f32,
}

impl BlockOut {
    /// C[r.., col..] = acc[..rows][..cols] + beta * C (C not read when beta is 0).
    ///
    /// # Safety
    /// The rows x cols block at (r, col) must be valid and ours (`gemm_raw`'s contract).
    pub unsafe fn merge(
        &self,
        r: usize,
        col: usize,
        acc: &[f32],
        ld_acc: usize,
        rows: usize,
        cols: usize,
    ) {
        for i in 0..rows {
            // SAFETY: row r + i, columns col..col + cols of the caller's block.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.c.add((r + i) * self.ldc + col), cols)
            };
            let src = &acc[i * ld_acc..i * ld_acc + cols];
            if self.beta == 0.0 {
                dst.copy_from_slice(src);
            } else {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s + self.beta * *d;
                }
            }
        }
    }
}
