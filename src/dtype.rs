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

/// Converts a slice of any element type to f32.
pub fn to_f32_vec<T: Element>(src: &[T]) -> Vec<f32> {
    src.iter().map(|v| v.to_f32()).collect()
}

/// Converts f32 values to any element type (round to nearest even).
pub fn from_f32_vec<T: Element>(src: &[f32]) -> Vec<T> {
    src.iter().map(|&v| T::from_f32(v)).collect()
}
