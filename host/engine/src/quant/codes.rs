//! The code books and scalar quantizers of bitsandbytes, as its CUDA kernels apply them
//! (`csrc/kernels.cu`: `dQuantizeNF4`, `dQuantizeFP4`, `dQuantize<0>`), since the checkpoints
//! people load were quantized on GPUs. Where bitsandbytes' CPU path differs (FP4 at its
//! thresholds and for values that round to zero, the 8-bit code search of double quant) the CUDA
//! kernel is followed; `tests/engine/make_quant_goldens.py` states each difference and checks that
//! every disagreement with bitsandbytes-on-CPU is one of them.

/// NF4 values by code (`bitsandbytes.functional.get_4bit_type("nf4")`, as f32), written as
/// bitsandbytes writes them.
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 values by code (1 sign, 2 exponent, 1 mantissa bit, bias 2): `[0, 0.0625, 8, 12, 4, 6, 2,
/// 3]` and their negatives, divided by 12 in f32 as `get_4bit_type("fp4")` does; code 8 is -0.0,
/// as the CUDA kernels decode it (`0 * absmax * -1`).
pub const FP4: [f32; 16] = {
    const RAW: [f32; 16] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];
    let mut out = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = RAW[i] / 12.0;
        i += 1;
    }
    out
};

/// The signed 8-bit dynamic map of double quantization (`create_dynamic_map(signed=True,
/// max_exponent_bits=7)`, 256 sorted values from -0.99297 to 1.0), as f32 bit patterns. This is
/// what bitsandbytes stores as `nested_quant_map`; the quantization golden test checks it.
pub const DYNAMIC_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// [`DYNAMIC_BITS`] as values.
pub fn dynamic_map() -> Vec<f32> {
    DYNAMIC_BITS.iter().map(|&b| f32::from_bits(b)).collect()
}

/// The NF4 code of `x` (already divided by its block's absmax): `dQuantizeNF4`'s decision tree.
/// Its thresholds are the kernel's decimal literals read as f32 (as nvcc reads them): the f32
/// midpoints of neighbouring [`NF4`] values, except 4 of the 15 that lie 1 ulp from the midpoint
/// (bitsandbytes' CPU path uses the midpoints). A value on a threshold takes the lower code. NaN
/// (an all-zero block, `0 * (1/0)`) gives code 0, as on a GPU.
pub fn quantize_nf4(x: f32) -> u8 {
    T_NF4.iter().filter(|&&t| x > t).count() as u8
}

/// `dQuantizeNF4`'s thresholds, sorted.
#[allow(clippy::excessive_precision)]
const T_NF4: [f32; 15] = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
    -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
    0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
];
// The tree asks `x > t` from the middle out; a count of `x > t` over the sorted thresholds gives
// the same code for every x, NaN included (every comparison false: code 0).

/// The FP4 code of `x` (already divided by its block's absmax): `dQuantizeFP4`. The sign bit is
/// `x < 0`, so both zeros and NaN take the positive zero code; the magnitude is compared with
/// the kernel's literals (a value on a literal takes the smaller magnitude).
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let code = if a > 0.291_666_67 {
        if a > 0.583_333 {
            if a > 0.833_333_3 { 0b0011 } else { 0b0010 }
        } else if a > 0.416_666_7 {
            0b0101
        } else {
            0b0100
        }
    } else if a > 0.085_937_5 {
        if a > 0.208_333_33 { 0b0111 } else { 0b0110 }
    } else if a > 0.002_604_17 {
        0b0001
    } else {
        0b0000
    };
    code | sign
}

/// The 8-bit code of `x` (already divided by its block's absmax) in a sorted 256-entry `code`:
/// `dQuantize<0>` of bitsandbytes' CUDA kernel. Seven halving steps from the middle narrow the
/// search to a pivot; `x` then goes to the pivot or to the neighbour the search last visited on
/// that side, whichever is nearer by the f32 midpoint (ties to the pivot).
pub fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let picked = if x > val {
        if x > (upper + val) * 0.5 { upper_pivot } else { pivot }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    picked as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_thresholds_are_the_kernel_literals_within_an_ulp_of_the_midpoints() {
        let next_up = |x: f32| if x > 0.0 { f32::from_bits(x.to_bits() + 1) } else { f32::from_bits(x.to_bits() - 1) };
        let mut off = 0;
        for (i, &t) in T_NF4.iter().enumerate() {
            assert_eq!(quantize_nf4(t), i as u8, "a value on a threshold takes the lower code");
            assert_eq!(quantize_nf4(next_up(t)), i as u8 + 1, "threshold {i}");
            let mid = (NF4[i] + NF4[i + 1]) / 2.0;
            let ulps = (t.to_bits() as i64 - mid.to_bits() as i64).abs();
            assert!(ulps <= 1, "threshold {i}: {ulps} ulp from the midpoint");
            off += ulps;
        }
        assert_eq!(off, 4, "four literals are 1 ulp from the f32 midpoints (bf591cd9, 3df64863, 3f006d03, 3f5c89d9)");
        for (c, v) in NF4.iter().enumerate() {
            assert_eq!(quantize_nf4(*v), c as u8);
        }
        assert_eq!(quantize_nf4(f32::NAN), 0);
    }

    #[test]
    fn fp4_codes_round_trip_and_zero_is_positive() {
        for (c, v) in FP4.iter().enumerate() {
            let want = if c == 8 { 0 } else { c as u8 }; // -0.0 is not < 0
            assert_eq!(quantize_fp4(*v), want, "code {c} value {v}");
        }
        assert_eq!(quantize_fp4(-0.001), 0b1000, "a small negative value keeps its sign");
        assert_eq!(quantize_fp4(0.001), 0);
        assert_eq!(quantize_fp4(f32::NAN), 0);
        // On the kernel's literal 7/24 (not the f32 midpoint of 1/4 and 1/3) the smaller magnitude wins.
        assert_eq!(quantize_fp4(0.291_666_67), 0b0111);
        assert_eq!(quantize_fp4(f32::from_bits(0.291_666_67f32.to_bits() + 1)), 0b0100);
    }

    #[test]
    fn dynamic_map_search_finds_every_code_and_the_nearest_between() {
        let code: [f32; 256] = DYNAMIC_BITS.map(f32::from_bits);
        assert!(code.windows(2).all(|w| w[0] < w[1]), "sorted");
        for (i, &v) in code.iter().enumerate() {
            assert_eq!(quantize_dynamic(&code, v) as usize, i, "code {i} = {v}");
        }
        assert_eq!(quantize_dynamic(&code, 0.5 * (code[200] + code[201]) + 1e-6), 201);
        assert_eq!(quantize_dynamic(&code, 0.5 * (code[200] + code[201]) - 1e-6), 200);
        assert_eq!(quantize_dynamic(&code, -2.0), 0);
        assert_eq!(quantize_dynamic(&code, 2.0), 255);
        assert_eq!(quantize_dynamic(&code, f32::NAN), 0);
    }
}
