//! The `.cu` sources (one per op family, in `host/engine/kernels/`), embedded in the binary so a
//! GPU machine needs nothing but the driver, NVRTC and the CUDA headers.

/// Prepended to every family before compiling: `common.cuh` (bf16 typedefs, warp/block
/// reductions, dynamic shared memory), then `mma.cuh` (tensor-core and async-copy wrappers).
pub const PRELUDE: &str = concat!(include_str!("../../kernels/common.cuh"), "\n", include_str!("../../kernels/mma.cuh"));

/// One op family: its file name and the kernels (`<op>_<dtype>`) it defines.
pub struct Family {
    pub file: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

/// Every kernel family the CUDA backend loads.
pub const FAMILIES: &[Family] = &[
    Family {
        file: "elementwise.cu",
        source: include_str!("../../kernels/elementwise.cu"),
        kernels: &[
            "cast_f32_bf16",
            "cast_bf16_f32",
            "fill_f32",
            "fill_bf16",
            "fill_u32",
            "axpy_f32",
            "scale_f32",
            "add_bias_f32",
            "add_bias_bf16",
            "scale_cols_f32",
            "col_dot_f32",
            "sum_squares_f32",
            "div_f32",
            "copy_cols_f32",
            "gather_rows_f32",
            "scatter_add_rows_f32",
            "row_dot_f32",
        ],
    },
    Family {
        file: "rmsnorm.cu",
        source: include_str!("../../kernels/rmsnorm.cu"),
        kernels: &["rmsnorm_fwd_f32", "rmsnorm_fwd_bf16", "rmsnorm_bwd_f32", "rmsnorm_bwd_bf16"],
    },
    Family {
        file: "rope.cu",
        source: include_str!("../../kernels/rope.cu"),
        kernels: &["rope_f32"],
    },
    Family {
        file: "attention.cu",
        source: include_str!("../../kernels/attention.cu"),
        kernels: &[
            "attention_fwd_f32",
            "attention_bwd_delta_f32",
            "attention_bwd_dq_f32",
            "attention_bwd_dkv_f32",
        ],
    },
    Family {
        file: "flash_attention.cu",
        source: include_str!("../../kernels/flash_attention.cu"),
        kernels: &[
            "flash_fwd_hd64",
            "flash_fwd_hd128",
            "flash_fwd_hd256",
            "flash_bwd_delta",
            "flash_bwd_dq_hd64",
            "flash_bwd_dq_hd128",
            "flash_bwd_dq_hd256",
            "flash_bwd_dkv_hd64",
            "flash_bwd_dkv_hd128",
            "flash_bwd_dkv_hd256",
        ],
    },
    Family {
        file: "swiglu.cu",
        source: include_str!("../../kernels/swiglu.cu"),
        kernels: &["swiglu_fwd_f32", "swiglu_bwd_f32", "geglu_fwd_f32", "geglu_bwd_f32", "swiglu_fwd_bf16", "swiglu_bwd_bf16", "geglu_fwd_bf16", "geglu_bwd_bf16"],
    },
    Family {
        file: "embedding.cu",
        source: include_str!("../../kernels/embedding.cu"),
        kernels: &["embedding_fwd_f32", "embedding_fwd_bf16", "embedding_bwd_f32"],
    },
    Family {
        file: "cross_entropy.cu",
        source: include_str!("../../kernels/cross_entropy.cu"),
        kernels: &["cross_entropy_fwd_bwd_f32"],
    },
    Family {
        file: "adapter.cu",
        source: include_str!("../../kernels/adapter.cu"),
        kernels: &["dropout_f32", "dora_weight_norm_f32", "dora_weight_norm_bf16"],
    },
    Family {
        file: "optim.cu",
        source: include_str!("../../kernels/optim.cu"),
        kernels: &["adamw_f32"],
    },
    Family {
        file: "dequant.cu",
        source: include_str!("../../kernels/dequant.cu"),
        kernels: &["dequant_4bit_f32", "dequant_4bit_bf16", "dequant_8bit_f32", "dequant_8bit_bf16"],
    },
];

/// Probe families: used by no op. Small kernels that run one instruction family (mma.sync,
/// ldmatrix, cp.async, shuffles, votes, atomics, conversions) on inputs a host computation can
/// check ([`super::emu::probes`]); the emulator's tests run them, and a GPU can run the same ones.
pub const PROBES: &[Family] = &[Family {
    file: "probe.cu",
    source: include_str!("../../kernels/probe.cu"),
    kernels: &[
        "probe_mma_bf16",
        "probe_mma_f16",
        "probe_ldmatrix",
        "probe_tile_mma_bf16",
        "probe_cp_async",
        "probe_cp_async_groups",
        "probe_shfl",
        "probe_atomics",
        "probe_convert",
        "probe_widen",
    ],
}];

/// The full source NVRTC compiles for a family: prelude, then the family's file.
pub fn full_source(f: &Family) -> String {
    format!("{PRELUDE}\n#line 1 \"{}\"\n{}", f.file, f.source)
}
