//! The instruction sets this CPU has. The standard library detects them once and caches the
//! answer, so each check is a load.

/// AVX2 and FMA (x86-64 since Haswell and Zen).
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 alone.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 F and BF16 (`vdpbf16ps`: AMD Zen 4, Intel Cooper Lake and Sapphire Rapids on).
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 F, BW, VL and VNNI (`vpdpbusd`, `vpdpwssd`: AMD Zen 4, Intel Ice Lake on), and
/// F16C.
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 F, BW and VL (masked 16-bit loads and stores: Intel Skylake-SP, AMD Zen 4 on).
pub fn avx512_bw_vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 VBMI (`vpermb`, any byte of a register to any place: Intel Ice Lake and Sapphire
/// Rapids on, AMD Zen 4), with [`avx512_vnni`]'s features.
pub fn avx512_vbmi_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_vnni() && std::arch::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
