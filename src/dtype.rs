//! Element types: f32, f16 and bf16 storage, always computed in f32 or wider.

use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The storage type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Short lower-case name used by the CLI, kernel names and benchmark records.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Unit roundoff of the storage type (used to size test tolerances).
    pub fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 9.765625e-4,
            DType::Bf16 => 7.8125e-3,
        }
    }

    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

    /// f32 values as little-endian bytes of this type (rounded to nearest even): the one byte
    /// codec of device buffers.
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * self.size_bytes());
        for &x in v {
            match self {
                DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                DType::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            }
        }
        out
    }

    /// Little-endian bytes of this type as f32 values (exact).
    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            other => Err(Error::InvalidArgument(format!(
                "unknown dtype '{other}' (expected f32, f16 or bf16)"
            ))),
        }
    }
}

/// A storage element: converts to and from f32, in which all arithmetic happens.
pub trait Element: Copy + Send + Sync + Default + fmt::Debug + PartialEq + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    #[inline]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// Rounds an f64 result to this type (through f32 for the half types).
    #[inline]
    fn from_f64(v: f64) -> Self {
        Self::from_f32(v as f32)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// Converts f32 values to any element type (round to nearest even).
pub fn from_f32_vec<T: Element>(src: &[f32]) -> Vec<T> {
    src.iter().map(|&v| T::from_f32(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_codec_round_trips_and_rounds_to_nearest_even() {
        let v = [1.0f32, -2.5, 1.0 + f32::EPSILON, 65504.0, f32::NAN, 3.0e-8];
        for dt in DType::ALL {
            let b = dt.encode(&v);
            assert_eq!(b.len(), v.len() * dt.size_bytes());
            let back = dt.decode(&b);
            for (x, y) in v.iter().zip(&back) {
                let want = match dt {
                    DType::F32 => *x,
                    DType::F16 => f16::from_f32(*x).to_f32(),
                    DType::Bf16 => bf16::from_f32(*x).to_f32(),
                };
                assert!(
                    want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                    "{dt} {x}"
                );
            }
            // decoding then encoding is exact
            assert_eq!(dt.encode(&back), b);
        }
    }
}
